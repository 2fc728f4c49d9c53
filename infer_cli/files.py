"""Writing files so that a reader never sees half of one, and asking how much room is left.

Every output infer makes (a model, a converted checkpoint, a prompt-cache entry, a ref in the
Hugging Face cache, its own state file) is written under a hidden temporary name in the target's
folder and renamed over the target only once it is complete. A rename within one folder is
atomic on POSIX and Windows, so an interrupted or failed write leaves the old file (or none),
never a truncated one that looks finished.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: str | os.PathLike[str], suffix: str = ".partial") -> Path:
    """A hidden name beside ``path``, unique to this process: ``dir/.name.<pid><suffix>``.

    Beside the target, so the final rename stays on one file system; hidden, so listings and
    globs for the finished name (``*.gguf``, ``*.kvc``) do not pick it up."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it replaces
    ``path``, on an exception (KeyboardInterrupt included) it is deleted and ``path`` is left as
    it was. The folder must exist."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        # Gone already after the replace. Should removing it fail, the error that got us here
        # (if any) is the one worth reporting.
        try:
            tmp.unlink()
        except OSError:
            pass


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) in one step."""
    with atomic_output(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system that holds ``path``, or its nearest existing parent (so a
    folder that is about to be created can be asked about)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
