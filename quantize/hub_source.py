"""A hub repo id as the source of `infer quantize`: the checkpoint's config, tokenizer files and
safetensors (with their index) fetched through huggingface_hub into its standard cache, so a
second run, `hf`, transformers and llama.cpp share them. HF_HUB_OFFLINE is honoured: then only
a complete cached snapshot is used."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from infer_cli import paths
from infer_cli.errors import BadCheckpoint, NotCachedOffline

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")

CHECKPOINT_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def _wanted(filename: str) -> bool:
    from fnmatch import fnmatchcase

    return "/" not in filename and any(fnmatchcase(filename, p) for p in CHECKPOINT_FILES)


def fetch_checkpoint(repo_id: str, revision: str | None = None,
                     progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The snapshot folder holding ``repo_id``'s checkpoint files at ``revision`` (a branch, tag
    or commit; default main), downloaded when needed (through infer_cli.models.hub: resumable,
    sha256-checked, into huggingface_hub's cache layout), ``progress(filename, bytes done, bytes
    in all)`` called as bytes arrive. A gated or private repo without a token that may read it
    is RepoNotFound, whose hint says how to log in, as for `infer pull`.

    Raises RepoNotFound, NotCachedOffline, DownloadFailed (and the other typed errors of
    ``hub.pull``), or BadCheckpoint when the repository holds no config.json."""
    from infer_cli.models import hub

    if paths.hf_offline():
        return _cached(repo_id, revision)
    commit, files = hub.list_repo_files(repo_id, revision or hub.DEFAULT_REVISION)
    chosen = [f for f in files if _wanted(f.filename)]
    if not any(f.filename == "config.json" for f in chosen):
        raise BadCheckpoint(repo_id, "the repository has no config.json (not a Hugging Face "
                                     "checkpoint; a GGUF repository is used with `infer pull`)")
    if not any(f.filename.endswith(".safetensors") for f in chosen):
        raise BadCheckpoint(repo_id, "the repository has no *.safetensors weights")
    sel = hub.HubSelection(repo_id, revision or hub.DEFAULT_REVISION, chosen, commit=commit)
    got = hub.pull(sel, progress=progress)
    return got[0].parent


def _cached(repo_id: str, revision: str | None) -> Path:
    """Offline: the newest cached snapshot (the one the revision points at first) with a config.json."""
    from infer_cli.models import hub

    for snap in hub.cached_snapshots(repo_id, revision):
        if (snap / "config.json").is_file() and any(snap.glob("*.safetensors")):
            return snap
    at = f" at revision '{revision}'" if revision else ""
    raise NotCachedOffline(f"checkpoint {repo_id}{at}")
