"""`infer quantize`: the command's front door (filled in by the quantize work)."""

from __future__ import annotations


def register(app) -> None:
    """Add the `quantize` command to the Typer app."""
