"""Model files checked on use: a file in the store or the Hugging Face cache that another tool
truncated, or changed in place, is caught before llama.cpp reads it.

A download is verified against its sha256 once; what can go wrong later is another program
writing to the file. Hashing a multi-gigabyte file on every run would cost seconds, so infer
keeps, per file, the size and modification time it had when its sha256 was last found right
(``verified.json`` in infer's home) and hashes again only when either differs, as make and rsync
judge a file unchanged. A file infer did not download (the Hugging Face cache is shared with
other tools) is hashed on its first use and then remembered the same way.

The expected sha256 is the one the source names: the package entry of models.toml, or for the
Hub, the blob's file name (huggingface_hub names an LFS blob by its sha256). Files without one
(the user's own paths, small non-LFS files) are used as they are."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

from infer_cli.paths import infer_home

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 4 << 20
_MAX_RECORDS = 4096


def _records_file() -> Path:
    return infer_home() / "verified.json"


def _load(file: Path | None = None) -> dict:
    try:
        data = json.loads((file or _records_file()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(file: Path, records: dict) -> None:
    """Best effort: a record that cannot be written only means one more check later."""
    from infer_cli.files import atomic_write

    if len(records) > _MAX_RECORDS:  # files long gone: keep the newest entries
        records = dict(list(records.items())[-_MAX_RECORDS:])
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, json.dumps(records, indent=0) + "\n")
    except OSError:
        pass


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def record(path: Path, sha256: str) -> None:
    """Remember that ``path`` (as it is now) has ``sha256``: called once a download is verified."""
    real = Path(os.path.realpath(path))
    stamp = _stamp(real)
    if stamp is None:
        return
    records = _load()
    records[str(real)] = [stamp[0], stamp[1], sha256.lower()]
    _save(_records_file(), records)


def expected_sha256(path: Path) -> str | None:
    """The sha256 a Hugging Face cache file must have: its blob's name, for an LFS file."""
    name = Path(os.path.realpath(path)).name.lower()
    return name if _SHA256.fullmatch(name) else None


def sha256_of(path: Path, progress: Callable[[int, int], None] | None = None) -> str:
    digest, done = hashlib.sha256(), 0
    total = path.stat().st_size
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def matches(path: Path, sha256: str, size: int | None = None) -> bool:
    """``path`` has ``sha256`` (and ``size`` when given): from the record when the file's size and
    modification time are those recorded, else by hashing it (and recording a match)."""
    real = Path(os.path.realpath(path))
    stamp = _stamp(real)
    if stamp is None or (size is not None and stamp[0] != size):
        return False
    known = _load().get(str(real))
    if isinstance(known, list) and len(known) == 3 and tuple(known[:2]) == stamp:
        return known[2] == sha256.lower()
    actual = sha256_of(real)
    if actual != sha256.lower():
        return False
    record(real, actual)
    return True


def check(path: Path, sha256: str | None, what: str, fix: str, size: int | None = None) -> None:
    """Raise ModelFileChanged unless ``path`` still holds the verified bytes (no-op without a sha)."""
    from infer_cli.errors import ModelFileChanged

    if not sha256:
        return
    if matches(path, sha256, size):
        return
    stamp = _stamp(Path(os.path.realpath(path)))
    got = "nothing (it is gone)" if stamp is None else (
        f"{stamp[0]:,} bytes where {size:,} were downloaded" if size is not None and stamp[0] != size
        else f"{stamp[0]:,} bytes whose sha256 is not the download's")
    raise ModelFileChanged(what, str(path), got, fix)


# --- the vocabulary check before a load, remembered the same way -------------------------------

def _vocab_records() -> Path:
    return infer_home() / "vocab-checked.json"


def check_vocabulary(path: Path) -> None:
    """``gguf_info.check_vocabulary`` (a token listed twice aborts llama.cpp's load), skipped for
    a file whose size and modification time are those it had when it last passed: the walk costs
    a Python step per token (0.15 s for a 262k vocabulary)."""
    from infer_cli.models import gguf_info

    real = Path(os.path.realpath(path))
    stamp = _stamp(real)
    records = _load(_vocab_records())
    if stamp is not None and records.get(str(real)) == list(stamp):
        return
    gguf_info.check_vocabulary(real)
    if stamp is None:
        return
    records[str(real)] = list(stamp)
    _save(_vocab_records(), records)
