"""The `infer` console script's entry point.

A console script imports its target before calling it, and importing the command line (Typer,
click, rich) takes long enough for a Ctrl-C to land inside it. This module imports nothing heavy
itself, so an interrupt during that import ends with exit 130 and one line, as one during a
command does, never a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    from infer_cli.hugepages import reexec

    reexec()  # on Linux, huge pages for the weights need glibc told so at start-up
    try:
        from infer_cli.cli.app import main as app_main
    except KeyboardInterrupt:  # nothing started yet, nothing to undo
        sys.stderr.write("\nInterrupted.\n")
        sys.exit(130)
    app_main()
