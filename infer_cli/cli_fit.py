"""`infer fit`: the command's front door (filled in by the fit work)."""

from __future__ import annotations


def register(app) -> None:
    """Add the `fit` command to the Typer app."""
