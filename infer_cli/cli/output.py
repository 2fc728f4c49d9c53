"""The one output object: answers on stdout, everything else on stderr, JSON when asked.

Only the CLI uses this module; library code returns values and raises errors.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.text import Text


class Output:
    """Human, JSON or quiet output. In JSON mode stdout carries one document and nothing else."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    @property
    def width(self) -> int:
        """Columns of the terminal stdout goes to (COLUMNS when set; 80 when not a terminal)."""
        return self.out.width

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


def output(json_mode: bool = False, quiet: bool = False) -> Output:
    """The output object of one command (answer on stdout, the rest on stderr)."""
    return Output(json_mode=json_mode, quiet=quiet)


def ago(ts: float | None) -> str:
    """How long ago a timestamp was, as a person says it."""
    if ts is None:
        return "never"
    s = time.time() - ts
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{int(s // n)} {unit} ago"
    return "just now"


def display_path(path: Any) -> str:
    """A path as a person reads it: the home folder as ``~``. JSON output keeps full paths."""
    text = str(path)
    home = os.path.expanduser("~").rstrip(os.sep)
    if home and home != "~" and (text == home or text.startswith(home + os.sep)):
        return "~" + text[len(home):]
    return text


# --- tables that fit the terminal -----------------------------------------------------------
#
# Cells are never broken inside a word: a path or a size cut in two cannot be copied or read.
# Short columns stay on the row; long ones (paths, notes) come last on the row when the whole
# row fits the terminal's width, and otherwise each on its own line under the row, labelled.
# A path longer than the whole terminal is left for the terminal to wrap (a soft wrap copies
# as one line); prose wraps between words.

INDENT = "    "
GAP = "  "


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # numbers and sizes, aligned on their last digit (unless first)
    long: bool = False   # paths and prose: last on the row, or on a line of their own


def table(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int) -> Text:
    """Rows as aligned columns within ``width`` characters (see above)."""
    widths = [max([len(c.header)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    short = [i for i, c in enumerate(columns) if not c.long]
    long = [i for i, c in enumerate(columns) if c.long]
    inline = short
    for k in range(len(long), 0, -1):  # as many long columns on the row as fit, in order
        candidate = short + long[:k]
        if sum(widths[i] for i in candidate) + len(GAP) * (len(candidate) - 1) <= width:
            inline = candidate
            break
    below = [i for i in long if i not in inline]

    def line(cells: list[tuple[int, str]]) -> str:
        # the first cell starts at the margin, so that a row never reads as a line below one
        parts = [cell.rjust(widths[i]) if columns[i].right and n else cell.ljust(widths[i])
                 for n, (i, cell) in enumerate(cells)]
        return GAP.join(parts).rstrip()

    out = Text()
    out.append(line([(i, columns[i].header) for i in inline]) + "\n", style="bold")
    for r in rows:
        out.append(line([(i, r[i]) for i in inline]) + "\n")
        for i in below:
            if r[i]:
                out.append(_own_line(f"{columns[i].header.lower()}: ", r[i], width) + "\n")
    out.rstrip()
    return out


def _own_line(label: str, value: str, width: int) -> str:
    """``value`` on lines of its own under a row: prose wrapped between words, a path whole."""
    return textwrap.fill(value, width, initial_indent=INDENT + label, subsequent_indent=INDENT,
                         break_long_words=False, break_on_hyphens=False) or INDENT + label


def pairs(rows: Sequence[tuple[str, str]], width: int) -> Text:
    """Label/value lines (`infer show`). A value too long for its row wraps between words under
    itself; one with no space to wrap at (a path), or several lines of them, starts on the line
    after its label when it does not fit beside it."""
    left = max((len(label) for label, _ in rows), default=0) + len(GAP)
    room = max(width - left, 1)
    out = Text()
    for label, value in rows:
        out.append(label.ljust(left), style="bold")
        lines = value.split("\n")
        if len(lines) == 1 and " " in value:
            wrapped = textwrap.wrap(value, room, break_long_words=False, break_on_hyphens=False) or [""]
        elif all(len(v) <= room for v in lines):
            wrapped = lines
        else:
            out.rstrip()
            out.append("\n" + "\n".join(INDENT + v for v in lines) + "\n")
            continue
        out.append(wrapped[0] + "".join("\n" + " " * left + w for w in wrapped[1:]) + "\n")
    out.rstrip()
    return out
