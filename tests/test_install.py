"""infer as a user installs it: the wheel (not the editable checkout) in a fresh virtual
environment, run from a folder outside the checkout. Catches what an editable install hides: a
subpackage or the shipped models.toml left out of the wheel.

llama-cpp-python is not rebuilt: scripts/setup.sh keeps the wheel it built in .cache/wheels,
installed here first; the other dependencies come from the package index (pip's cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".cache" / "wheels"
# What a wheel is built from: the project's own files, without the checkout's build leftovers.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "models.toml", "infer_cli", "quantize")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh virtual environment with infer installed from its wheel."""
    llama = sorted(WHEELS.glob("llama_cpp_python-*.whl"))
    if not llama:
        pytest.skip(f"no llama-cpp-python wheel in {WHEELS} (scripts/setup.sh builds one)")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            # symlinks kept as links: the wheel build must copy models.toml's target itself
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for args in ([*pip, "--no-deps", str(llama[-1])],
                 [*pip, "--find-links", str(WHEELS), str(src)]):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=_clean_env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
    shutil.rmtree(src)  # nothing may still come from the copied sources
    return venv / "bin"


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


def _infer(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(bin_dir / "infer"), *args], capture_output=True, text=True,
                          cwd=cwd, env=_clean_env(COLUMNS="100"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    code = ("import importlib.metadata as md, importlib.resources as r, infer_cli;"
            "print(infer_cli.__file__);"
            "print(r.files('infer_cli.models').joinpath('models.toml').is_file());"
            "d = md.distribution('infer-cli');"
            "print(d.metadata['License-Expression']);"
            "print(any(str(f).endswith('licenses/LICENSE') for f in d.files))")
    out = subprocess.run([str(installed / "python"), "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=_clean_env(), check=True).stdout.split()
    assert Path(out[0]).is_relative_to(installed.parent) and not Path(out[0]).is_relative_to(ROOT)
    assert out[1:] == ["True", "MIT", "True"]


def test_installed_infer_runs_from_any_folder(installed, tmp_path, smollm2_gguf):
    from infer_cli import PINNED_LLAMA_CPP, __version__
    from infer_cli.models.registry import load_catalog

    version = _infer(installed, "--version", cwd=tmp_path).stdout.splitlines()
    assert version[:2] == [f"infer {__version__}", f"llama-cpp-python {PINNED_LLAMA_CPP}"]
    assert version[2].startswith("llama.cpp commit ")

    shipped = sorted(load_catalog(user=tmp_path / "none.toml").entries)
    doc = json.loads(_infer(installed, "list", "--aliases", "--json", cwd=tmp_path).stdout)
    assert sorted(a["name"] for a in doc["aliases"]) == shipped, "the wheel lost the shipped aliases"
    text = _infer(installed, "list", "--aliases", cwd=tmp_path).stdout
    assert all(name in text for name in shipped)

    facts = json.loads(_infer(installed, "show", str(smollm2_gguf), "--json", cwd=tmp_path).stdout)
    assert facts["architecture"] == "llama" and facts["n_params"] == 134515008
    assert "architecture" in _infer(installed, "show", str(smollm2_gguf), cwd=tmp_path).stdout
