"""The Hugging Face Hub side of model resolution and download.

Library code: no printing; functions return values and raise the typed errors of ``infer_cli.errors``.

Files land in huggingface_hub's own cache layout under ``paths.hf_cache_dir()``::

    models--org--repo/blobs/<etag>                    the bytes (etag = sha256 for LFS files)
    models--org--repo/blobs/<etag>.incomplete         a partial download, kept across runs to resume
    models--org--repo/snapshots/<commit>/<filename>   relative symlink to the blob
    models--org--repo/refs/<revision>                 the commit that revision pointed at

so ``huggingface_hub``, ``hf`` and llama.cpp share them. huggingface_hub 2.4's own ``hf_hub_download``
throws partial bytes away when a download fails; ``pull`` keeps them in ``<etag>.incomplete`` and continues
with an HTTP Range request next time, verifies the sha256, and only then renames the file into place.

Quant selection (``select``): a quant label such as ``Q4_K_M`` is matched case-insensitively against the
label found in each GGUF path, whole labels only (``Q4_K`` never picks ``Q4_K_M``, ``Q4_0`` never picks
``IQ4_0``). If no label equals it, a delimiter-bounded match anywhere in the path is tried, so ``Q4_K_XL``
finds ``model-UD-Q4_K_XL.gguf``. With neither quant nor filename the default is the first present of
``DEFAULT_QUANTS`` (Q4_K_M, Q4_K_S, Q5_K_M, Q4_0, Q8_0); failing those, the smallest GGUF of at least
``MIN_DEFAULT_BITS`` (3) bits per weight (unlabelled files count as eligible); failing that, the
highest-bit one. Projector and importance-matrix GGUFs (``mmproj``, ``imatrix`` in the name) are never
picked by quant or default. A split GGUF (``-00001-of-00003.gguf``) is always selected whole.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator
from urllib.parse import urlsplit

from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    FileMetadataError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, repo_folder_name
from huggingface_hub.utils import WeakFileLock, build_hf_headers, get_session, hf_raise_for_status

try:  # huggingface_hub 2.x ships its HTTP stack as httpx2; 1.x used httpx, with the same API
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from infer_cli import paths
from infer_cli.files import atomic_write, free_bytes, is_disk_full
from infer_cli.errors import (
    BadReference,
    ChecksumMismatch,
    DownloadFailed,
    InferError,
    ModelNotFound,
    NotCachedOffline,
    DiskFull,
    NotEnoughDisk,
    QuantNotFound,
    RepoNotFound,
    human_bytes,
)

DEFAULT_REVISION = "main"
DEFAULT_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q8_0")
MIN_DEFAULT_BITS = 3.0

# In-process retries of a broken transfer: give up after RETRIES attempts in a row that brought no new
# byte (any progress resets the count, as in huggingface_hub's http_get). Waits double from
# RETRY_WAIT_S up to RETRY_WAIT_MAX_S. Module-level so tests can set the wait to 0.
RETRIES = 5
RETRY_WAIT_S = 1.0
RETRY_WAIT_MAX_S = 8.0
PROGRESS_EVERY_S = 0.1  # throttle for the progress callback
API_TIMEOUT_S = 30.0  # the repo listing with blobs=true can be slow for big repos

_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SAFE_ETAG_RE = re.compile(r"[A-Za-z0-9._-]+")

# A quant label, bounded by non-alphanumerics. Suffix parts are limited to the ones llama.cpp-style
# names use, so "Q4_K_M_imatrix" yields Q4_K_M and a bare "Q2" (as in a model name) yields nothing.
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])("
    r"(?:UD-)?(?:[IT]?Q\d(?:_(?:XXS|XS|XL|NL|K|S|M|L|\d+))+|BF16|FP?16|FP?32|MXFP4(?:_MOE)?)"
    r")(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SPLIT_RE = re.compile(r"-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_AUX_WORDS = ("mmproj", "imatrix")

# Approximate bits per weight, for ordering labels and for the default's quality floor.
_BITS = {
    "IQ1_S": 1.56, "IQ1_M": 1.75, "TQ1_0": 1.69, "TQ2_0": 2.06, "IQ2_XXS": 2.06, "IQ2_XS": 2.31,
    "IQ2_S": 2.5, "IQ2_M": 2.7, "Q2_K_S": 2.6, "Q2_K": 2.96, "Q2_K_L": 3.0, "IQ3_XXS": 3.06,
    "IQ3_XS": 3.3, "Q3_K_S": 3.41, "IQ3_S": 3.44, "IQ3_M": 3.66, "Q3_K_M": 3.74, "Q3_K_L": 4.03,
    "Q3_K_XL": 4.1, "IQ4_XS": 4.25, "MXFP4": 4.25, "MXFP4_MOE": 4.25, "IQ4_NL": 4.5, "Q4_0": 4.5,
    "Q4_K_S": 4.58, "Q4_K_M": 4.85, "Q4_K_L": 4.9, "Q4_K_XL": 4.95, "Q4_1": 5.0, "Q5_0": 5.5,
    "Q5_K_S": 5.54, "Q5_K_M": 5.69, "Q5_K_L": 5.8, "Q5_K_XL": 5.85, "Q5_1": 6.0, "Q6_K": 6.56,
    "Q6_K_L": 6.7, "Q6_K_XL": 6.75, "Q8_0": 8.5, "Q8_K_XL": 8.8, "BF16": 16.0, "F16": 16.0,
    "FP16": 16.0, "F32": 32.0, "FP32": 32.0,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------- data


@dataclass
class HubFile:
    repo_id: str
    filename: str  # path inside the repo, "/"-separated
    size: int | None
    sha256: str | None


@dataclass
class HubSelection:
    repo_id: str
    revision: str  # what was asked for ("main", a tag, a commit)
    files: list[HubFile]  # one file, or every shard of a split GGUF in order
    commit: str | None = None  # what ``revision`` resolved to; ``pull`` downloads exactly this commit

    @property
    def total_size(self) -> int:
        """Bytes of all files (files of unknown size count as 0)."""
        return sum(f.size or 0 for f in self.files)

    @property
    def filename(self) -> str:
        """The file llama.cpp opens: the single file, or the first shard."""
        return self.files[0].filename

    @property
    def quant(self) -> str | None:
        return quant_of(self.filename)


@dataclass
class CachedGGUF:
    """One model in the HF cache: a single .gguf, or the shards of a split one grouped together."""

    repo_id: str
    filename: str  # repo path; the first shard for a split GGUF
    commit: str  # the snapshot folder it is in
    revisions: list[str]  # refs pointing at that commit, e.g. ["main"]
    path: Path  # snapshot path of ``filename``: what llama.cpp opens
    paths: list[Path]  # every file of the model present in the snapshot, in shard order
    size: int  # bytes over ``paths``
    last_modified: float  # newest mtime of the files (epoch seconds)
    last_accessed: float  # newest atime of the files
    complete: bool = True  # False when shards of a split GGUF are missing from the snapshot

    @property
    def quant(self) -> str | None:
        return quant_of(self.filename)


# ----------------------------------------------------------------------------------------------- quants


def quant_of(filename: str) -> str | None:
    """The quant label of a GGUF path, upper-cased ("Q4_K_M", "UD-Q4_K_XL", "F16"), or None.

    The last label in the file name wins; if the name has none, the last one in its folders."""
    path = PurePosixPath(filename)
    for part in (path.name, *reversed(path.parent.parts)):
        labels = _QUANT_RE.findall(part)
        if labels:
            return labels[-1].upper()
    return None


def quant_bits(label: str | None) -> float | None:
    """Approximate bits per weight of a quant label, or None when unknown."""
    if not label:
        return None
    label = label.upper().removeprefix("UD-")
    if label in _BITS:
        return _BITS[label]
    m = re.match(r"[IT]?Q(\d)", label)
    return float(m.group(1)) + 0.5 if m else None


def list_quants(filenames: Iterable[str]) -> list[str]:
    """Quant labels present among GGUF paths, e.g. ["Q2_K", "Q4_K_M", "Q8_0"], lowest bits first.

    Projector/imatrix GGUFs and non-GGUF paths are ignored; shards count once."""
    labels = {
        label
        for name in filenames
        if _is_gguf(name) and not _is_aux(name) and (label := quant_of(name)) is not None
    }
    return sorted(labels, key=lambda q: (quant_bits(q) or math.inf, q))


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _is_aux(name: str) -> bool:
    base = PurePosixPath(name).name.lower()
    return any(word in base for word in _AUX_WORDS)


# ----------------------------------------------------------------------------------------------- selection


@dataclass
class GGUFUnit:
    """A loadable model: one .gguf, or all shards of a split one (``missing`` names absent shards).

    ``aux`` marks projector and importance-matrix GGUFs, which are never a model to run."""

    files: list[HubFile]
    missing: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.files[0].filename

    @property
    def label(self) -> str | None:
        return quant_of(self.name)

    @property
    def size(self) -> float:
        sizes = [f.size for f in self.files]
        return math.inf if any(s is None for s in sizes) else float(sum(sizes))  # type: ignore[arg-type]

    @property
    def aux(self) -> bool:
        return _is_aux(self.name)


def gguf_units(files: Iterable[HubFile]) -> list[GGUFUnit]:
    """The GGUFs among ``files`` as loadable units, in path order: shards of one split (same
    prefix and count) become one unit; files that are not .gguf are left out."""
    singles: list[GGUFUnit] = []
    splits: dict[tuple[str, str], dict[int, HubFile]] = {}
    for f in files:
        if not _is_gguf(f.filename):
            continue
        m = _SPLIT_RE.search(f.filename)
        if m is None:
            singles.append(GGUFUnit([f]))
        else:
            key = (f.filename[: m.start()].lower(), m.group("count"))
            splits.setdefault(key, {})[int(m.group("index"))] = f
    units = list(singles)
    for shards in splits.values():
        units.append(_split_unit(shards))
    return sorted(units, key=_path_key)


def _split_unit(shards: dict[int, HubFile]) -> GGUFUnit:
    sample = next(iter(shards.values())).filename
    m = _SPLIT_RE.search(sample)
    assert m is not None
    count = int(m.group("count"))
    width = len(m.group("index"))

    def shard_name(i: int) -> str:
        return sample[: m.start("index")] + f"{i:0{width}d}" + sample[m.end("index") :]

    missing = [shard_name(i) for i in range(1, count + 1) if i not in shards]
    return GGUFUnit([shards[i] for i in sorted(shards)], missing)


def _path_key(unit: GGUFUnit) -> tuple[int, str]:
    # Files at the repo root before files in folders, then by name: a stable, unsurprising order.
    return (unit.name.count("/"), unit.name)


def _loose_match(quant: str, path: str) -> bool:
    """``quant`` appears in ``path`` between delimiters, and is not the head of a longer label
    ("Q4_K" must not match "Q4_K_M": a following "_" plus alphanumeric disqualifies)."""
    pattern = r"(?<![A-Za-z0-9])" + re.escape(quant) + r"(?![A-Za-z0-9]|_[A-Za-z0-9])"
    return re.search(pattern, path, re.IGNORECASE) is not None


def _preferred(units: list[GGUFUnit]) -> GGUFUnit:
    """The default among ``units``: see the module docstring for the order."""
    for quant in DEFAULT_QUANTS:
        hits = [u for u in units if u.label == quant]
        if hits:
            return min(hits, key=_path_key)
    eligible = [u for u in units if (quant_bits(u.label) or math.inf) >= MIN_DEFAULT_BITS]
    if eligible:
        return min(eligible, key=lambda u: (u.size, quant_bits(u.label) or math.inf, _path_key(u)))
    return max(units, key=lambda u: (quant_bits(u.label) or 0.0, -u.size))


def _describe(repo_id: str, quant: str | None, filename: str | None, revision: str | None) -> str:
    what = f"{repo_id}/{filename}" if filename else f"{repo_id}:{quant}" if quant else repo_id
    return f"{what}@{revision}" if revision else what


def _choose(
    repo_id: str, files: list[HubFile], quant: str | None, filename: str | None, revision: str | None
) -> list[HubFile]:
    """Apply the selection rules to a repo's file list; returns the files to fetch, in order."""
    units = gguf_units(files)
    if filename:
        unit = _unit_for_filename(repo_id, files, units, filename, revision)
    else:
        models = [u for u in units if not u.aux]
        available = list_quants(f.filename for f in files)
        if quant:
            wanted = quant.upper()
            matched = [u for u in models if u.label == wanted] or [
                u for u in models if _loose_match(quant, u.name)
            ]
        else:
            matched = models
        if not matched:
            # No quant asked and no GGUF at all: report it as the default quant missing, with nothing
            # available, which the CLI turns into "convert it".
            raise QuantNotFound(repo_id, quant or DEFAULT_QUANTS[0], available)
        unit = _preferred(matched)
    if unit.missing:
        raise ModelNotFound(
            f"{repo_id}/{unit.name}",
            f"the split GGUF is incomplete in the repo: {', '.join(unit.missing)} missing",
        )
    return list(unit.files)


def _unit_for_filename(
    repo_id: str, files: list[HubFile], units: list[GGUFUnit], filename: str, revision: str | None
) -> GGUFUnit:
    by_name = {f.filename: f for f in files}
    hit = by_name.get(filename.strip("/"))
    if hit is None:
        # Repo paths are case-sensitive, but accept a unique case-insensitive match for convenience.
        folded = [f for f in files if f.filename.lower() == filename.strip("/").lower()]
        hit = folded[0] if len(folded) == 1 else None
    if hit is None:
        ggufs = [u.name for u in units]
        have = ", ".join(ggufs[:8]) + (", …" if len(ggufs) > 8 else "") if ggufs else "no GGUF files"
        at = f" at revision '{revision}'" if revision else ""
        raise ModelNotFound(f"{repo_id}/{filename}", f"no such file in the repo{at} (it has: {have})")
    for unit in units:
        if any(f.filename == hit.filename for f in unit.files):
            return unit
    return GGUFUnit([hit])  # not a .gguf: fetched as named


# ----------------------------------------------------------------------------------------------- select


def select(
    repo_id: str,
    *,
    quant: str | None = None,
    filename: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> HubSelection:
    """Decide which file(s) of ``repo_id`` to use, from the repo listing (one API call).

    ``filename`` names an exact path in the repo; otherwise ``quant`` (or the default order) picks a GGUF.
    Offline (HF_HUB_OFFLINE), or when the Hub cannot be reached, the choice is made among the files in the
    local cache instead. Raises RepoNotFound, QuantNotFound, ModelNotFound, NotCachedOffline,
    DownloadFailed (Hub unreachable and nothing cached) or BadReference (malformed repo id)."""
    if paths.hf_offline():
        return _select_cached(repo_id, quant, filename, revision)
    what = _describe(repo_id, quant, filename, revision)
    rev = revision or DEFAULT_REVISION
    try:
        commit, files = _list_repo(repo_id, rev, token)
    except _Unreachable as err:
        # Like hf_hub_download: when the Hub is unreachable, what is already cached still works.
        try:
            return _select_cached(repo_id, quant, filename, revision)
        except NotCachedOffline:
            raise DownloadFailed(what, err.reason) from None
    return HubSelection(repo_id, rev, _choose(repo_id, files, quant, filename, rev), commit=commit)


class _Unreachable(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def list_repo_files(
    repo_id: str, revision: str = DEFAULT_REVISION, *, token: str | bool | None = None
) -> tuple[str | None, list[HubFile]]:
    """The commit ``revision`` of ``repo_id`` points at, and every file of it with its size and,
    for LFS files, its sha256. One API call; no cache fallback (``select`` has that).

    Raises RepoNotFound, BadReference, NotCachedOffline (HF_HUB_OFFLINE) or DownloadFailed (the
    Hub cannot be reached or answered with an error)."""
    try:
        return _list_repo(repo_id, revision, token)
    except _Unreachable as err:
        raise DownloadFailed(repo_id, err.reason) from None


def _list_repo(repo_id: str, revision: str, token: str | bool | None) -> tuple[str | None, list[HubFile]]:
    """The commit ``revision`` points at, and every file with size and sha256 (LFS files)."""
    api = HfApi(endpoint=paths.hf_endpoint(), library_name="infer", library_version=_version())
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=token, timeout=API_TIMEOUT_S)
    except (httpx.TransportError, HfHubHTTPError) as err:
        if _is_transient(err):
            raise _Unreachable(_reason(err)) from None
        raise _translate(err, repo_id=repo_id, revision=revision, what=repo_id) from None
    except (HFValidationError, OfflineModeIsEnabled, httpx.RequestError) as err:
        raise _translate(err, repo_id=repo_id, revision=revision, what=repo_id) from None
    files = [
        HubFile(
            repo_id,
            s.rfilename,
            s.lfs.size if s.lfs else s.size,
            s.lfs.sha256.lower() if s.lfs and s.lfs.sha256 else None,
        )
        for s in info.siblings or []
    ]
    return info.sha, files


def _select_cached(repo_id: str, quant: str | None, filename: str | None, revision: str | None) -> HubSelection:
    """``select`` over the snapshots in the local cache: the one ``revision`` (default main) points at
    first; without an explicit revision, any other snapshot next, newest first."""
    for snapshot in cached_snapshots(repo_id, revision):
        files = _snapshot_files(repo_id, snapshot)
        try:
            chosen = _choose(repo_id, files, quant, filename, revision)
        except (QuantNotFound, ModelNotFound):
            continue
        return HubSelection(repo_id, revision or DEFAULT_REVISION, chosen, commit=snapshot.name)
    raise NotCachedOffline(_describe(repo_id, quant, filename, revision))


def cached_snapshots(repo_id: str, revision: str | None = None) -> list[Path]:
    """The snapshot folders of ``repo_id`` in the local cache that an offline lookup may use: the
    one ``revision`` (default main) points at first; without an explicit revision, every other
    snapshot after it, newest first. No network. Raises BadReference for a malformed repo id."""
    storage = _storage(repo_id)
    return [storage / "snapshots" / commit for commit in _candidate_commits(storage, revision)]


def _candidate_commits(storage: Path, revision: str | None) -> list[str]:
    snapshots = storage / "snapshots"
    if not snapshots.is_dir():
        return []
    wanted = _resolve_ref(storage, revision or DEFAULT_REVISION)
    if revision is not None:
        return [wanted] if wanted else []
    others = sorted(
        (d for d in snapshots.iterdir() if d.is_dir() and d.name != wanted),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    return ([wanted] if wanted else []) + [d.name for d in others]


def _snapshot_files(repo_id: str, snapshot: Path) -> list[HubFile]:
    """Complete files of one snapshot (a link whose blob is gone does not count)."""
    out = []
    for path in _walk_files(snapshot):
        if not path.is_file():
            continue
        blob = os.path.basename(os.readlink(path)) if path.is_symlink() else ""
        out.append(
            HubFile(
                repo_id,
                path.relative_to(snapshot).as_posix(),
                path.stat().st_size,
                blob if _SHA256_RE.fullmatch(blob) else None,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------- pull


ProgressFn = Callable[[str, int, int], None]


@dataclass
class _Plan:
    file: HubFile
    commit: str
    pointer: Path  # snapshots/<commit>/<filename>
    blob: Path | None = None  # blobs/<etag>; None when the pointer is already complete
    url: str = ""
    size: int | None = None
    sha256: str | None = None
    action: str = "cached"  # "cached", "link" (blob present), "download"

    @property
    def partial(self) -> Path:
        assert self.blob is not None
        return self.blob.with_name(self.blob.name + ".incomplete")

    def missing_bytes(self) -> int:
        if self.action != "download" or self.size is None:
            return 0
        have = self.partial.stat().st_size if self.partial.is_file() else 0
        return self.size - have if have <= self.size else self.size


def pull(
    sel: HubSelection,
    *,
    token: str | bool | None = None,
    progress: ProgressFn | None = None,
    free_space: Callable[[Path], int] = free_bytes,
) -> list[Path]:
    """Make every file of ``sel`` complete in the HF cache; returns their snapshot paths, in order.

    Files already cached cost no download. A partial download left by an interrupted earlier run is
    resumed with a Range request. Before any byte is written, the bytes still missing are checked
    against ``free_space(cache_dir)``. Each finished file is verified against its sha256 when known.
    ``progress(filename, bytes_done, bytes_total)`` is called as bytes arrive (throttled), starting at
    the resumed offset; bytes_total is 0 when unknown. Files already cached get no progress call.
    Missing ``size``/``sha256`` of ``sel.files`` are filled in from the Hub's answers.

    Raises NotCachedOffline (offline and not cached), NotEnoughDisk, DownloadFailed, ChecksumMismatch,
    RepoNotFound (repo/revision gone, gated or private), ModelNotFound (file gone)."""
    if paths.hf_offline():
        found = cached_paths(sel)
        if found is None:
            raise NotCachedOffline(_describe(sel.repo_id, None, sel.filename, sel.revision))
        return found
    cache = paths.hf_cache_dir()
    storage = _storage(sel.repo_id)
    plans = [_plan(sel, f, storage, token) for f in sel.files]
    needed = sum(p.missing_bytes() for p in plans)
    if needed:
        free = free_space(cache)
        if free < needed:
            raise NotEnoughDisk(str(cache), needed, free)
    headers = auth_headers(token)
    for plan in plans:
        _execute(plan, storage, headers, progress)
    for commit in {p.commit for p in plans}:
        _write_ref(storage, sel.revision, commit)
    return [p.pointer for p in plans]


def _plan(sel: HubSelection, f: HubFile, storage: Path, token: str | bool | None) -> _Plan:
    """Find out what fetching ``f`` takes: nothing, a link to a blob we have, or a download."""
    if sel.commit:
        pointer = _pointer(storage, sel.commit, f.filename)
        if _complete(pointer, f.size) and _intact(pointer, f.sha256, f.size):
            return _Plan(f, sel.commit, pointer)
    meta = _head(sel, f, token)
    if not meta.commit_hash:  # not a Hub (a proxy page, a plain web server): same as missing metadata
        missing = FileMetadataError("no X-Repo-Commit header")
        raise _translate(missing, repo_id=sel.repo_id, revision=sel.revision, what=f.filename)
    commit = meta.commit_hash
    etag = meta.etag or ""
    if not _SAFE_ETAG_RE.fullmatch(etag) or etag in (".", ".."):
        raise DownloadFailed(f.filename, f"the Hub sent an unusable ETag {etag!r}")
    size = meta.size if meta.size is not None else f.size
    sha = f.sha256 or (etag.lower() if _SHA256_RE.fullmatch(etag.lower()) else None)
    f.size = f.size if f.size is not None else size
    f.sha256 = sha
    plan = _Plan(f, commit, _pointer(storage, commit, f.filename), storage / "blobs" / etag, size=size, sha256=sha)
    plan.url = hf_hub_url(sel.repo_id, f.filename, revision=commit, endpoint=paths.hf_endpoint())
    if not _intact(plan.blob, sha, size):  # type: ignore[arg-type]
        # another program truncated or rewrote the cached bytes: fetch them again
        plan.blob.unlink(missing_ok=True)  # type: ignore[union-attr]
    if _complete(plan.pointer, size):
        plan.action = "cached"
    elif _complete(plan.blob, size):  # type: ignore[arg-type]
        plan.action = "link"
    else:
        plan.action = "download"
    return plan


def _intact(path: Path, sha256: str | None, size: int | None) -> bool:
    """A cached file still holds its verified bytes (True when there is none or no sha to check)."""
    if sha256 is None or not path.exists():
        return True
    from infer_cli.models import integrity

    return integrity.matches(path, sha256, size)


def _head(sel: HubSelection, f: HubFile, token: str | bool | None):
    """HEAD the file at the selected commit: commit, etag (sha256 for LFS), size."""
    url = hf_hub_url(sel.repo_id, f.filename, revision=sel.commit or sel.revision, endpoint=paths.hf_endpoint())
    try:
        return get_hf_file_metadata(
            url, token=token, library_name="infer", library_version=_version(), endpoint=paths.hf_endpoint()
        )
    except (HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, FileMetadataError, httpx.RequestError) as err:
        raise _translate(err, repo_id=sel.repo_id, revision=sel.revision, what=f.filename) from None


def _execute(plan: _Plan, storage: Path, headers: dict[str, str], progress: ProgressFn | None) -> None:
    if plan.action == "cached":
        return
    assert plan.blob is not None
    if plan.action == "link":
        _link(plan.blob, plan.pointer, new_blob=False)
        return
    plan.blob.parent.mkdir(parents=True, exist_ok=True)
    lock = paths.hf_cache_dir() / ".locks" / storage.name / f"{plan.blob.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    # Same lock file as hf_hub_download, so two pulls (ours or theirs) never append to one partial.
    with WeakFileLock(lock):
        if not _complete(plan.blob, plan.size):
            _download(plan, headers, progress)
        _link(plan.blob, plan.pointer, new_blob=True)


class _Retry(Exception):
    """A failure worth another attempt (connection dropped, 5xx, short body)."""


class _Transfer:
    """The partial file being appended to, its running sha256, and progress reporting."""

    def __init__(self, fh, plan: _Plan, progress: ProgressFn | None):
        self.fh, self.plan, self.progress = fh, plan, progress
        self.hasher = hashlib.sha256()
        self.offset = 0
        self._last_report = 0.0

    def prime(self) -> None:
        """Hash the bytes a previous run left, so the final digest covers the whole file."""
        size = self.fh.seek(0, os.SEEK_END)
        if self.plan.size is not None and size > self.plan.size:
            self.restart()  # longer than the file can be: not a prefix of it
            return
        self.fh.seek(0)
        while chunk := self.fh.read(1 << 20):
            self.hasher.update(chunk)
        self.offset = size
        self.report(force=True)

    def restart(self) -> None:
        self.fh.seek(0)
        self.fh.truncate()
        self.hasher = hashlib.sha256()
        self.offset = 0

    def write(self, chunk: bytes) -> None:
        self.fh.write(chunk)
        self.hasher.update(chunk)
        self.offset += len(chunk)
        self.report()

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is not None and (force or now - self._last_report >= PROGRESS_EVERY_S):
            self._last_report = now
            self.progress(self.plan.file.filename, self.offset, self.plan.size or 0)

    @property
    def done(self) -> bool:
        return self.plan.size is not None and self.offset == self.plan.size


def _download(plan: _Plan, headers: dict[str, str], progress: ProgressFn | None) -> None:
    """Fetch ``plan`` into ``<blob>.incomplete`` (resuming it), verify, then rename it to the blob."""
    partial = plan.partial
    try:
        with open(partial, "r+b" if partial.exists() else "w+b") as fh:
            transfer = _Transfer(fh, plan, progress)
            transfer.prime()
            if not transfer.done:
                _fetch_with_retries(plan, headers, transfer)
            fh.flush()
            transfer.report(force=True)
            digest = transfer.hasher.hexdigest()
    except OSError as e:
        if not is_disk_full(e):
            raise
        # Out of room: the partial goes too (it holds the space the user now needs), and the
        # next run, on a disk with room, downloads it again.
        partial.unlink(missing_ok=True)
        raise DiskFull(str(partial.parent), plan.file.filename) from None
    if plan.sha256 and digest != plan.sha256:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(plan.file.filename, plan.sha256, digest)
    os.replace(partial, plan.blob)  # type: ignore[arg-type]
    if plan.sha256:
        from infer_cli.models import integrity

        integrity.record(plan.blob, digest)  # type: ignore[arg-type]


def _fetch_with_retries(plan: _Plan, headers: dict[str, str], transfer: _Transfer) -> None:
    failures = 0
    while True:
        before = transfer.offset
        try:
            _fetch_once(plan, headers, transfer)
            return
        except (_Retry, httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as err:
            failures = 0 if transfer.offset > before else failures + 1
            if failures > RETRIES:
                kept = f"{human_bytes(transfer.offset)} of {human_bytes(plan.size or 0)} kept"
                raise DownloadFailed(plan.file.filename, f"{_reason(err)}; gave up after {RETRIES} retries, {kept}")
            time.sleep(min(RETRY_WAIT_S * 2 ** max(failures - 1, 0), RETRY_WAIT_MAX_S))
        except (HfHubHTTPError, httpx.RequestError, OfflineModeIsEnabled) as err:
            raise _translate(err, repo_id=plan.file.repo_id, revision=plan.commit, what=plan.file.filename) from None


def _fetch_once(plan: _Plan, headers: dict[str, str], transfer: _Transfer) -> None:
    """One GET from ``transfer.offset`` to the end. The resolve URL is pinned to the commit and
    re-resolved on every attempt, so a signed CDN redirect never goes stale during a long pull; httpx
    drops the Authorization header when that redirect leaves the Hub's origin."""
    request_headers = {**headers, "Accept-Encoding": "identity"}  # byte offsets must mean file offsets
    if transfer.offset:
        request_headers["Range"] = f"bytes={transfer.offset}-"
    with get_session().stream(
        "GET", plan.url, headers=request_headers, timeout=hf_constants.HF_HUB_DOWNLOAD_TIMEOUT, follow_redirects=True
    ) as response:
        if response.status_code in _RETRY_STATUSES:
            raise _Retry(f"the server answered HTTP {response.status_code}")
        if response.status_code == 416:
            transfer.restart()  # the server's file is not longer than our partial: start over
            raise _Retry("the server refused to resume (HTTP 416)")
        hf_raise_for_status(response)
        if transfer.offset and response.status_code != 206:
            transfer.restart()  # Range ignored: the body is the whole file
        elif transfer.offset and not _range_starts_at(response, transfer.offset):
            transfer.restart()
            raise _Retry("the server resumed at the wrong offset")
        for chunk in response.iter_bytes():
            transfer.write(chunk)
    if plan.size is not None and transfer.offset > plan.size:
        transfer.restart()
        raise DownloadFailed(plan.file.filename, "the server sent more bytes than the file has")
    if plan.size is not None and transfer.offset < plan.size:
        raise _Retry("the server ended the transfer early")


def _range_starts_at(response: httpx.Response, offset: int) -> bool:
    m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return m is not None and int(m.group(1)) == offset


# ----------------------------------------------------------------------------------------------- cache


def offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub's own flag is frozen at its import)."""
    return paths.hf_offline()


def find_cached(repo_id: str, *, quant: str | None = None, filename: str | None = None,
                revision: str | None = None) -> tuple[Path, ...] | None:
    """The complete cached files that ``select`` would pick offline, or None. No network:
    what is local is used as it is; `infer pull` is what checks the Hub for a newer commit."""
    try:
        sel = _select_cached(repo_id, quant, filename, revision)
    except (NotCachedOffline, QuantNotFound, ModelNotFound):
        return None
    found = cached_paths(sel)
    return tuple(found) if found else None


def cached_paths(sel: HubSelection) -> list[Path] | None:
    """Snapshot paths of ``sel``'s files if every one is complete in the cache, else None. No network."""
    storage = _storage(sel.repo_id)
    commit = sel.commit or _resolve_ref(storage, sel.revision)
    if commit is None:
        return None
    out = []
    for f in sel.files:
        path = _pointer(storage, commit, f.filename)
        if not _complete(path, f.size):
            return None
        out.append(path)
    return out


def list_cached_ggufs() -> list[CachedGGUF]:
    """Every .gguf in the HF cache, one entry per model per snapshot; the shards of a split GGUF are
    grouped into one entry (``paths``), named by its first shard. Sorted by repo, file, commit."""
    cache = paths.hf_cache_dir()
    if not cache.is_dir():
        return []
    out: list[CachedGGUF] = []
    for storage in sorted(cache.glob("models--*")):
        repo_id = _repo_id_of(storage)
        refs = _refs_by_commit(storage)
        snapshots = storage / "snapshots"
        for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            files = _snapshot_files(repo_id, snapshot)
            for unit in gguf_units(files):
                out.append(_cached_entry(repo_id, snapshot, refs.get(snapshot.name, []), unit))
    return sorted(out, key=lambda c: (c.repo_id, c.filename, c.commit))


def _cached_entry(repo_id: str, snapshot: Path, revisions: list[str], unit: GGUFUnit) -> CachedGGUF:
    files = [snapshot / f.filename for f in unit.files]
    stats = [p.stat() for p in files]
    return CachedGGUF(
        repo_id=repo_id,
        filename=unit.name,
        commit=snapshot.name,
        revisions=sorted(revisions),
        path=files[0],
        paths=files,
        size=sum(s.st_size for s in stats),
        last_modified=max(s.st_mtime for s in stats),
        last_accessed=max(s.st_atime for s in stats),
        complete=not unit.missing,
    )


def remove_cached(repo_id: str, filename: str) -> int:
    """Delete ``filename`` of ``repo_id`` from every cached snapshot, and each blob no remaining snapshot
    links to. A shard of a split GGUF removes all its shards. Empty snapshots go with the refs pointing
    at them, and the repo folder goes when nothing is left. Returns the bytes freed.

    Raises ModelNotFound when the file is in no snapshot."""
    storage = _storage(repo_id)
    names = _names_to_remove(filename)
    pointers = [
        p
        for snapshot in _snapshot_dirs(storage)
        for p in _walk_files(snapshot)
        if p.relative_to(snapshot).as_posix().lower() in names
    ]
    if not pointers:
        raise ModelNotFound(f"{repo_id}/{filename}", "not in the local cache")
    freed = 0
    blobs: set[Path] = set()
    for pointer in pointers:
        if pointer.is_symlink():
            blobs.add(Path(os.path.normpath(pointer.parent / os.readlink(pointer))))
        elif pointer.is_file():  # a copy made where symlinks are unavailable
            freed += pointer.stat().st_size
        pointer.unlink()
    still_linked = _linked_blobs(storage)
    for blob in blobs:
        if blob not in still_linked and blob.is_file():
            freed += blob.stat().st_size
            blob.unlink()
    _prune(storage, {p.parent for p in pointers})
    return freed


def _names_to_remove(filename: str) -> set[str]:
    """The lower-cased repo paths to delete: the file, or every shard name of its split (up to count)."""
    name = filename.strip("/")
    m = _SPLIT_RE.search(name)
    if m is None:
        return {name.lower()}
    count, width = int(m.group("count")), len(m.group("index"))
    return {
        (name[: m.start("index")] + f"{i:0{width}d}" + name[m.end("index") :]).lower() for i in range(1, count + 1)
    }


def _linked_blobs(storage: Path) -> set[Path]:
    out = set()
    for snapshot in _snapshot_dirs(storage):
        for p in _walk_files(snapshot):
            if p.is_symlink():
                out.add(Path(os.path.normpath(p.parent / os.readlink(p))))
    return out


def _prune(storage: Path, folders: set[Path]) -> None:
    """Remove folders emptied by a deletion, up to the snapshot; then refs to vanished snapshots; then
    the repo folder if neither snapshots nor blobs (partial downloads included) remain."""
    snapshots = storage / "snapshots"
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != snapshots and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    live = {d.name for d in _snapshot_dirs(storage)}
    for ref in _walk_files(storage / "refs"):
        if ref.read_text().strip() not in live:
            ref.unlink()
    blobs = storage / "blobs"
    if not live and not (blobs.is_dir() and any(blobs.iterdir())):
        shutil.rmtree(storage, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- helpers


def _storage(repo_id: str) -> Path:
    try:
        return paths.hf_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")
    except HFValidationError as err:
        raise BadReference(repo_id, _first_line(err)) from None


def _pointer(storage: Path, commit: str, filename: str) -> Path:
    # A hostile listing or server must not make us write outside the snapshot.
    parts = PurePosixPath(filename).parts
    if not parts or ".." in parts or PurePosixPath(filename).is_absolute() or not _SAFE_ETAG_RE.fullmatch(commit):
        raise DownloadFailed(filename, "unsafe path in the repo listing")
    return storage / "snapshots" / commit / Path(*parts)


def _complete(path: Path, size: int | None) -> bool:
    """``path`` (through its symlink) is a file of the expected size."""
    try:
        st = path.stat()
    except OSError:
        return False
    return path.is_file() and (size is None or st.st_size == size)


def _link(blob: Path, pointer: Path, *, new_blob: bool) -> None:
    """Point ``pointer`` at ``blob`` with a relative symlink, as huggingface_hub does. Where symlinks
    are unavailable (Windows without developer mode), move a new blob into place or copy a shared one,
    which is also huggingface_hub's fallback."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    except OSError:
        if new_blob:
            shutil.move(str(blob), str(pointer))
        else:
            shutil.copyfile(blob, pointer)


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """refs/<revision> = commit, written atomically; nothing to record when revision is the commit."""
    if revision == commit or _COMMIT_RE.fullmatch(revision):
        return
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    atomic_write(ref, commit)


def _resolve_ref(storage: Path, revision: str) -> str | None:
    """The commit a revision names in the cache: a snapshot folder name itself, or refs/<revision>."""
    if (storage / "snapshots" / revision).is_dir() and _COMMIT_RE.fullmatch(revision):
        return revision
    ref = storage / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        return commit or None
    return None


def _refs_by_commit(storage: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    refs = storage / "refs"
    for ref in _walk_files(refs):
        out.setdefault(ref.read_text().strip(), []).append(ref.relative_to(refs).as_posix())
    return out


def _snapshot_dirs(storage: Path) -> list[Path]:
    snapshots = storage / "snapshots"
    return sorted(d for d in snapshots.iterdir() if d.is_dir()) if snapshots.is_dir() else []


def _walk_files(root: Path) -> Iterator[Path]:
    """Files and file symlinks under ``root`` (symlinked folders are not followed)."""
    if not root.is_dir():
        return
    for folder, _dirs, names in os.walk(root):
        for name in sorted(names):
            yield Path(folder) / name


def _repo_id_of(storage: Path) -> str:
    return "/".join(storage.name.split(hf_constants.REPO_ID_SEPARATOR)[1:])


def auth_headers(token: str | bool | None = None) -> dict[str, str]:
    """The headers of a request to the Hub: user agent, and Authorization when a token is known
    (token=None lets huggingface_hub resolve it: HF_TOKEN, then the stored login)."""
    return build_hf_headers(token=token, library_name="infer", library_version=_version())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("infer", "infer-cli"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "dev"


# ----------------------------------------------------------------------------------------------- errors


def _is_transient(err: Exception) -> bool:
    if isinstance(err, httpx.TransportError):
        return not isinstance(err, (httpx.ProxyError, httpx.UnsupportedProtocol))
    return isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code in _RETRY_STATUSES


def _translate(err: Exception, *, repo_id: str, revision: str | None, what: str) -> InferError:
    """A huggingface_hub / httpx error as one of ours, with a short reason and no traceback text."""
    if isinstance(err, HFValidationError):
        return BadReference(repo_id, _first_line(err))
    if isinstance(err, OfflineModeIsEnabled):
        return NotCachedOffline(what)
    if isinstance(err, RevisionNotFoundError):
        return RepoNotFound(repo_id, revision)
    if isinstance(err, RepositoryNotFoundError):  # includes GatedRepoError
        return RepoNotFound(repo_id)
    if isinstance(err, RemoteEntryNotFoundError):
        return ModelNotFound(f"{repo_id}/{what}", f"not in the repo at revision '{revision}'")
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):  # private/gated without access; plain-http endpoints miss the Hub's mapping
            return RepoNotFound(repo_id)
        return DownloadFailed(what, f"the Hub answered HTTP {status}")
    if isinstance(err, FileMetadataError):
        return DownloadFailed(what, f"{paths.hf_endpoint()} did not send the file's metadata (is it a Hub?)")
    return DownloadFailed(what, _reason(err))


def _reason(err: Exception) -> str:
    if isinstance(err, HfHubHTTPError) and err.response is not None:
        return f"the Hub answered HTTP {err.response.status_code}"
    if isinstance(err, httpx.ConnectError):
        return f"cannot connect to {urlsplit(paths.hf_endpoint()).netloc or paths.hf_endpoint()}"
    if isinstance(err, httpx.TimeoutException):
        return "the connection timed out"
    if isinstance(err, (httpx.RemoteProtocolError, httpx.NetworkError)):
        return "the connection was lost"
    if isinstance(err, _Retry):
        return str(err)
    return f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
