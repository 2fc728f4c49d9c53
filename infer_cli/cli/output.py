"""The one output object: answers on stdout, everything else on stderr, JSON when asked.

Only the CLI uses this module; library code returns values and raises errors.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape


class Output:
    """Human, JSON or quiet output. In JSON mode stdout carries one document and nothing else."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def result(self, renderable: Any) -> None:
        """A human result on stdout (a table, a line); skipped in JSON mode."""
        if not self.json_mode:
            self.out.print(renderable)

    def json(self, document: Any) -> None:
        sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
        sys.stdout.flush()

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message)

    def warn(self, message: str) -> None:
        self.err.print(f"[yellow]Warning:[/] {escape(message)}")

    def error(self, message: str, hint: str = "") -> None:
        # Messages carry paths and model names: escaped, so '[' in them is not markup.
        self.err.print(f"[bold red]Error:[/] {escape(message)}")
        if hint:
            self.err.print(f"[dim]{escape(hint)}[/]")

    @contextmanager
    def transfer(self) -> Iterator:
        """A progress callback ``(name, done, total)`` drawing rich bars on stderr.

        Bars only on a terminal: piped or in JSON mode the callback does nothing, so logs stay
        clean."""
        if self.quiet or not self.err.is_terminal:
            yield None
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.err, transient=False) as bars:
            tasks: dict[str, Any] = {}

            def update(name: str, done: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = bars.add_task(name, total=total or None, completed=done)
                bars.update(tasks[name], completed=done, total=total or None)

            yield update
