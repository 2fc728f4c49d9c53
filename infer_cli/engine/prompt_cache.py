"""A prompt cache that survives across runs: the KV state of a prompt prefix, on disk.

One file per saved prefix, in a folder per (model file, KV settings):

    INFERKV\\x01 | u32 header length | header (JSON) | llama.cpp's sequence state bytes

The header names the model's identity, the settings, the exact tokens the state holds and the
sha256 of the state, so a file from another model, other KV settings, or one that is corrupt or
truncated is refused (never fed to llama.cpp) and the prompt is simply recomputed. No pickle.
The folder has a size cap; the least recently used files go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from infer_cli.errors import DiskFull, NotEnoughDisk
from infer_cli.files import atomic_output
from infer_cli.paths import infer_home

MAGIC = b"INFERKV\x01"
FORMAT = 1
DEFAULT_MAX_BYTES = 2 << 30
MIN_TOKENS = 32          # shorter prefixes are cheaper to recompute than to load
_SAMPLE = 1 << 16
_MAX_HEADER = 64 << 20


def cache_root() -> Path:
    return infer_home() / "prompt-cache"


def max_bytes() -> int:
    """INFER_PROMPT_CACHE_MAX (bytes, or with K/M/G), else 2 GiB."""
    raw = os.environ.get("INFER_PROMPT_CACHE_MAX", "").strip().upper()
    if not raw:
        return DEFAULT_MAX_BYTES
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1], 1)
    try:
        return int(float(raw.rstrip("KMGB") or 0) * mult)
    except ValueError:
        return DEFAULT_MAX_BYTES


def model_identity(path: Path, data_offset: int) -> str:
    """A fingerprint of a GGUF: its size, its whole header, and samples of its weights.

    Cheap (a few MiB read), and two files that differ only in weights still differ."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(min(data_offset, 32 << 20)))
        for where in (data_offset, (data_offset + size) // 2, max(data_offset, size - _SAMPLE)):
            f.seek(where)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


@dataclass
class Entry:
    path: Path
    header: dict
    state_offset: int
    inode: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.header["tokens"]


def read_header(path: Path) -> Entry:
    """The header of a cache file; ValueError with a reason if it is not one of ours."""
    with path.open("rb") as f:
        return _header_of(f, path)


def _header_of(f, path: Path) -> Entry:
    """The header of the open cache file ``f`` (read from its start)."""
    st = os.fstat(f.fileno())
    file_size = st.st_size
    f.seek(0)
    if f.read(len(MAGIC)) != MAGIC:
        raise ValueError("not an infer prompt-cache file")
    raw = f.read(4)
    if len(raw) != 4:
        raise ValueError("truncated")
    (n,) = struct.unpack("<I", raw)
    if n > _MAX_HEADER:
        raise ValueError("header too large")
    body = f.read(n)
    if len(body) != n:
        raise ValueError("truncated")
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"unreadable header ({e.__class__.__name__})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("unknown format")
    tokens, size, sha = header.get("tokens"), header.get("state_size"), header.get("state_sha256")
    # What restore hands llama.cpp comes from here: token ids must fit its int32 llama_token.
    if not isinstance(tokens, list) or not all(
            type(t) is int and 0 <= t < 1 << 31 for t in tokens):
        raise ValueError("its tokens are not a list of token ids")
    if type(size) is not int or size < 0 or not isinstance(sha, str):
        raise ValueError("its state size or checksum is missing")
    # checked before anything reads the state: a crafted size must not become an allocation
    if len(MAGIC) + 4 + n + size != file_size:
        raise ValueError("truncated or corrupt (its size disagrees with its header)")
    return Entry(path, header, len(MAGIC) + 4 + n, st.st_ino)


class PromptCache:
    """The cache for one model file and one set of KV settings."""

    def __init__(self, model_path: Path, model_id: str, settings: dict, *,
                 root: Path | None = None, limit: int | None = None):
        self.model_path = str(model_path)
        self.model_id = model_id
        self.settings = settings
        key = hashlib.sha256(json.dumps([model_id, settings], sort_keys=True).encode()).hexdigest()
        self.root = root or cache_root()
        self.folder = self.root / key[:24]
        self.limit = max_bytes() if limit is None else limit
        self.disk_full: DiskFull | None = None  # the last save the disk had no room for

    # lookup --------------------------------------------------------------------------------

    def _entries(self, notes: list[str]) -> Iterator[Entry]:
        if not self.folder.is_dir():
            return
        for path in self.folder.glob("*.kvc"):
            try:
                with path.open("rb") as f:
                    inode = os.fstat(f.fileno()).st_ino
                    entry = _header_of(f, path)
            except FileNotFoundError:
                continue  # evicted by another process since the listing
            except OSError as e:
                notes.append(f"prompt cache: cannot read {path.name} ({e}); recomputing")
                continue
            except ValueError as e:
                notes.append(f"prompt cache: refused {path.name} ({e}); recomputing")
                _unlink(path, inode)
                continue
            h = entry.header
            if h.get("model") != self.model_id:
                notes.append(f"prompt cache: refused {path.name}: it was made with another model "
                             f"({h.get('model_path', '?')}); recomputing")
                continue
            if h.get("settings") != self.settings:
                notes.append(f"prompt cache: refused {path.name}: made with other KV settings; recomputing")
                continue
            yield entry

    def restore(self, session, tokens: list[int], notes: list[str]) -> str:
        """Load the saved state that serves most of ``tokens``: 'hit' or 'miss'."""
        best, best_keep = None, 0
        for entry in self._entries(notes):
            keep = session.reusable(entry.tokens, tokens, aligned=True)
            if keep >= MIN_TOKENS and keep > best_keep:
                best, best_keep = entry, keep
        if best is None or best_keep <= session.reusable(session.tokens, tokens):
            return "miss"  # what the session already holds is as good
        data = self._state(best, notes)
        if data is None:
            return "miss"
        if not session.load_state(data, best.tokens):
            notes.append(f"prompt cache: llama.cpp refused {best.path.name}; recomputing")
            _unlink(best.path)
            return "miss"
        session.trim(best_keep)
        _touch(best.path)  # least recently used goes first
        return "hit"

    def _state(self, entry: Entry, notes: list[str]) -> bytes | None:
        """The saved state of ``entry``, read from the same file as its header: another process
        may replace (an identical save, renamed into place) or evict the path at any moment, and
        the header of one file must never vouch for the bytes of another."""
        try:
            with entry.path.open("rb") as f:
                if os.fstat(f.fileno()).st_ino != entry.inode:
                    notes.append(f"prompt cache: {entry.path.name} was replaced while being read; "
                                 "recomputing")
                    return None
                f.seek(entry.state_offset)
                data = f.read(entry.header["state_size"] + 1)
        except OSError as e:
            notes.append(f"prompt cache: cannot read {entry.path.name} ({e}); recomputing")
            return None
        if len(data) != entry.header["state_size"] or \
                hashlib.sha256(data).hexdigest() != entry.header["state_sha256"]:
            notes.append(f"prompt cache: refused {entry.path.name}: it is corrupt or truncated; recomputing")
            _unlink(entry.path, entry.inode)
            return None
        return data

    # saving --------------------------------------------------------------------------------

    def save(self, session) -> Path | None:
        """Write the session's current KV state (all of ``session.tokens``) if worth keeping."""
        tokens = list(session.tokens)
        if len(tokens) < MIN_TOKENS:
            return None
        name = hashlib.sha256(struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:32] + ".kvc"
        path = self.folder / name
        if _touch(path):
            return path
        data = session.state_bytes()
        header = {"format": FORMAT, "model": self.model_id, "model_path": self.model_path,
                  "settings": self.settings, "tokens": tokens, "state_size": len(data),
                  "state_sha256": hashlib.sha256(data).hexdigest(), "created": time.time()}
        body = json.dumps(header, separators=(",", ":")).encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_output(path) as tmp, tmp.open("wb") as f:
                f.write(MAGIC + struct.pack("<I", len(body)) + body)
                f.write(data)
        except DiskFull as e:  # atomic_output has removed the partial file
            # A full disk costs the cache entry, never the answer: the command reports it
            # (``disk_full``) once the answer is out.
            self.disk_full = e
            return None
        except (OSError, NotEnoughDisk):
            return None
        evict(self.root, self.limit)
        return path


def _touch(path: Path) -> bool:
    """Mark ``path`` as just used; False when it is gone (another process may evict it at any
    moment: the state already read stays good)."""
    try:
        os.utime(path)
        return True
    except OSError:
        return False


def _unlink(path: Path, inode: int | None = None) -> None:
    """Remove ``path``; with ``inode``, only while it is still that file (not a good copy another
    process has renamed into its place since)."""
    try:
        if inode is not None and path.stat().st_ino != inode:
            return
        path.unlink()
    except OSError:
        pass


def files(root: Path | None = None) -> list[Path]:
    root = root or cache_root()
    return sorted(root.glob("*/*.kvc")) if root.is_dir() else []


def evict(root: Path, limit: int) -> int:
    """Delete least recently used files until the cache is within ``limit`` bytes."""
    entries = []
    for p in files(root):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    removed = 0
    for _, size, p in sorted(entries):
        if total <= limit:
            break
        _unlink(p)
        total -= size
        removed += 1
    return removed


def listing(root: Path | None = None) -> list[dict]:
    """What `infer cache list` shows: one row per saved prefix."""
    rows = []
    for p in files(root):
        try:
            h = read_header(p).header
            st = p.stat()
        except (OSError, ValueError):
            continue
        rows.append({"file": str(p), "model": h.get("model_path"), "tokens": len(h["tokens"]),
                     "size": st.st_size, "last_used": st.st_mtime, "settings": h.get("settings")})
    return sorted(rows, key=lambda r: -r["last_used"])


def clear(root: Path | None = None) -> tuple[int, int]:
    """Delete every cache file; returns (files, bytes)."""
    n = freed = 0
    for p in files(root):
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        n += 1
        freed += size
    return n, freed
