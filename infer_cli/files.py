"""Writing files so that a reader never sees half of one, and asking how much room is left.

Every output infer makes (a model, a converted checkpoint, a prompt-cache entry, a ref in the
Hugging Face cache, its own state file) is written under a hidden temporary name in the target's
folder and renamed over the target only once it is complete. A rename within one folder is
atomic on POSIX and Windows, so an interrupted or failed write leaves the old file (or none),
never a truncated one that looks finished.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from infer_cli.errors import DiskFull, FileBusy


def is_disk_full(err: BaseException) -> bool:
    """An OSError that means the file system (or the user's quota) has no room left."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def temp_path(path: str | os.PathLike[str], suffix: str = ".partial") -> Path:
    """A hidden name beside ``path``, unique to this process: ``dir/.name.<pid><suffix>``.

    Beside the target, so the final rename stays on one file system; hidden, so listings and
    globs for the finished name (``*.gguf``, ``*.kvc``) do not pick it up."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{suffix}")


def pid_alive(pid: int) -> bool:
    """A process with this pid exists (this machine; one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return True


def sweep_dead(folder: str | os.PathLike[str], prefix: str) -> int:
    """Remove the hidden temporaries ``folder/<prefix><pid>...`` of processes that are gone: a
    process killed outright (SIGKILL, a power cut) cannot remove its own. Those of live
    processes, this one included, are left alone. Returns how many went."""
    folder = Path(folder)
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        digits = p.name[len(prefix):].split(".", 1)[0].split("-", 1)[0]
        if not digits.isdigit() or int(digits) == os.getpid() or pid_alive(int(digits)):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it replaces
    ``path``, on an exception (KeyboardInterrupt included) it is deleted and ``path`` is left as
    it was. The folder must exist. Temporaries of ``path`` that killed processes left behind
    are removed first."""
    path = Path(path)
    sweep_dead(path.parent, f".{path.name}.")
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if is_disk_full(e):  # the one-line error, and (below) no partial file left behind
            raise DiskFull(str(path.parent), path.name) from None
        raise
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


class LineAppender:
    """Append lines to a file so that it only ever holds whole lines: a write that fails (a
    full disk) is cut back to the last complete line, and raises DiskFull for a full disk."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        self.good = os.lseek(self.fd, 0, os.SEEK_END)

    def write_line(self, text: str) -> None:
        data = (text + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            try:
                os.ftruncate(self.fd, self.good)
            except OSError:
                pass
            if is_disk_full(e):
                raise DiskFull(str(self.path.parent), self.path.name) from None
            raise
        self.good += len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextmanager
def exclusive(path: str | os.PathLike[str], what: str = "written") -> Iterator[None]:
    """Hold the lock of ``path`` (a hidden ``.name.lock`` beside it, holding the owner's pid)
    for the block; FileBusy names the process that holds it. The kernel drops the lock when its
    owner dies, so a killed process never blocks the next run."""
    import fcntl

    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = int(os.pread(fd, 32, 0).decode().strip() or 0) or None
            except (OSError, ValueError):
                pid = None
            os.close(fd)
            raise FileBusy(str(path), pid, what) from None
        try:  # the file we locked must still be the one at that name (see the unlink below)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        # Unlinked before it is unlocked: whoever then locks the old inode sees it is gone.
        try:
            lock.unlink()
        except OSError:
            pass
        os.close(fd)
