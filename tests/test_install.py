"""infer as a user installs it: the wheel (not the editable checkout) in a fresh virtual
environment, run from a folder outside the checkout. Catches what an editable install hides: a
subpackage or the shipped models.toml left out of the wheel.

The same through `pipx install` and `uv tool install` (each from PyPI into a throwaway venv when
not on PATH), with their homes in the test's tmp folder.

llama-cpp-python is not rebuilt: scripts/setup.sh keeps the wheel it built in .cache/wheels,
which every install here takes (pip directly; pipx and uv through --find-links, with building
llama-cpp-python forbidden); the other dependencies come from the package index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".cache" / "wheels"
# What a wheel is built from: the project's own files, without the checkout's build leftovers.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "models.toml", "infer_cli", "quantize")


def _llama_wheel() -> Path:
    wheels = sorted(WHEELS.glob("llama_cpp_python-*.whl"))
    if not wheels:
        pytest.skip(f"no llama-cpp-python wheel in {WHEELS} (scripts/setup.sh builds one)")
    return wheels[-1]


def _copy_sources(tmp: Path) -> Path:
    """The files a wheel is built from, copied out of the checkout (deleted after the install)."""
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
    return src


def _check_run(args: list[str], **kw) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}{proc.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh virtual environment with infer installed from its wheel."""
    llama = _llama_wheel()
    tmp = tmp_path_factory.mktemp("install")
    src = _copy_sources(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _check_run([*pip, "--no-deps", str(llama)], env=_clean_env())
    _check_run([*pip, "--find-links", str(WHEELS), str(src)], env=_clean_env())
    shutil.rmtree(src)  # nothing may still come from the copied sources
    return venv / "bin"


def _tool(name: str, tmp: Path) -> str:
    """The pipx or uv command: the one on PATH, else one installed from PyPI into a venv here."""
    found = shutil.which(name)
    if found:
        return found
    venv = tmp / f"{name}-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    _check_run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                "--disable-pip-version-check", name], env=_clean_env())
    return str(venv / "bin" / name)


@pytest.fixture(scope="module", params=["pipx", "uv"])
def tool_installed(request, tmp_path_factory) -> tuple[Path, Path]:
    """(bin folder, the tool's folder that holds the app's venv) after `pipx install` or
    `uv tool install` of the project, everything the tool writes kept under tmp."""
    name = request.param
    wheels = _llama_wheel().parent
    tmp = tmp_path_factory.mktemp(name)
    tool = _tool(name, tmp)
    src = _copy_sources(tmp)
    home, bin_dir = tmp / "home", tmp / "bin"
    if name == "pipx":
        env = {"PIPX_HOME": home, "PIPX_BIN_DIR": bin_dir, "PIPX_MAN_DIR": tmp / "man"}
        # pipx may not pass pip's environment settings on: the wheel folder goes in --pip-args,
        # and --only-binary makes a missing or unusable wheel fail the install instead of
        # building the index's sdist (for a long while); the other dependencies come from the index.
        pip_args = f"--find-links {shlex.quote(str(wheels))} --only-binary llama-cpp-python"
        args = ["install", "--python", sys.executable, f"--pip-args={pip_args}", str(src)]
    else:
        env = {"UV_TOOL_DIR": home, "UV_TOOL_BIN_DIR": bin_dir, "UV_CACHE_DIR": tmp / "cache",
               "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1"}
        # The index has llama-cpp-python's sdist of the same version: --no-build-package makes
        # uv take the local wheel or fail, never compile.
        args = ["tool", "install", "--python", sys.executable, "--find-links", str(wheels),
                "--no-build-package", "llama-cpp-python", str(src)]
    _check_run([tool, *args], env=_clean_env(**{k: str(v) for k, v in env.items()}), cwd=tmp)
    shutil.rmtree(src)
    return bin_dir, home


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _assert_llama_from_wheel(root: Path) -> None:
    """The libllama installed under ``root`` is the wheel's file: no compilation happened."""
    with zipfile.ZipFile(_llama_wheel()) as whl:
        expected = _sha256(whl.read("llama_cpp/lib/libllama.so"))
    found = sorted(root.glob("**/site-packages/llama_cpp/lib/libllama.so"))
    assert found, f"no llama_cpp installed under {root}"
    assert all(_sha256(f.read_bytes()) == expected for f in found), "llama-cpp-python was rebuilt"


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


def _infer(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(bin_dir / "infer"), *args], capture_output=True, text=True,
                          cwd=cwd, env=_clean_env(COLUMNS="100"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def _check_installed_app(bin_dir: Path, cwd: Path) -> None:
    """`infer --version` and `infer list --aliases` of an installed app, run from ``cwd``."""
    from infer_cli import PINNED_LLAMA_CPP, __version__
    from infer_cli.models.registry import load_catalog

    version = _infer(bin_dir, "--version", cwd=cwd).stdout.splitlines()
    assert version[:2] == [f"infer {__version__}", f"llama-cpp-python {PINNED_LLAMA_CPP}"]
    assert version[2].startswith("llama.cpp commit ")
    shipped = sorted(load_catalog(user=cwd / "none.toml").entries)
    doc = json.loads(_infer(bin_dir, "list", "--aliases", "--json", cwd=cwd).stdout)
    assert sorted(a["name"] for a in doc["aliases"]) == shipped, "the install lost the shipped aliases"
    text = _infer(bin_dir, "list", "--aliases", cwd=cwd).stdout
    assert all(name in text for name in shipped)


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
    _check_installed_app(installed, tmp_path)
    facts = json.loads(_infer(installed, "show", str(smollm2_gguf), "--json", cwd=tmp_path).stdout)
    assert facts["architecture"] == "llama" and facts["n_params"] == 134515008
    assert "architecture" in _infer(installed, "show", str(smollm2_gguf), cwd=tmp_path).stdout


def test_pipx_and_uv_tool_install_give_a_working_infer(tool_installed, tmp_path):
    bin_dir, home = tool_installed
    _assert_llama_from_wheel(home)
    _check_installed_app(bin_dir, tmp_path)
