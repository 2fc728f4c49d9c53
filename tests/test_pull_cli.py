"""`infer pull` / run / list / show / rm on hub models, end to end: the real SmolLM2 GGUF served
by the fake hub on 127.0.0.1, `infer` in a subprocess, llama.cpp loading what was pulled."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"


@pytest.fixture
def smol_hub(hub, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    hub.add_repo(REPO, {FILE: data, "README.md": b"# a model card\n"})
    hub.sha256 = hashlib.sha256(data).hexdigest()
    return hub


def _blob_paths(hf_home):
    return list((hf_home / "hub").glob("models--*/blobs/*"))


def test_pull_then_use_the_cache_without_the_network(infer, smol_hub, smollm2_gguf, tmp_path):
    proc = infer("pull", f"{REPO}:q4_1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    path = doc["paths"][0]
    assert "models--test-org--SmolLM2-135M-Instruct-GGUF/snapshots/" in path
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == smol_hub.sha256

    smol_hub.clear_log()
    run = infer("run", f"{REPO}:Q4_1", "Hello", "-n", "4", "--temp", "0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert smol_hub.log == []  # a cached model runs without asking the hub

    listed = json.loads(infer("list", "--json").stdout)["models"]
    assert [(m["name"], m["quant"], m["source"]) for m in listed] == [(f"{REPO}/{FILE}", "Q4_1", "hub")]
    assert listed[0]["last_used"] is not None
    shown = json.loads(infer("show", f"{REPO}:Q4_1", "--json").stdout)
    assert shown["architecture"] == "llama" and shown["block_count"] == 30

    removed = infer("rm", f"{REPO}:Q4_1", "--yes", "--json")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(removed.stdout)["freed"] == smollm2_gguf.stat().st_size
    assert _blob_paths(tmp_path / "hf-home") == []
    assert json.loads(infer("list", "--json").stdout)["models"] == []


def test_missing_quant_lists_what_the_repo_has(infer, smol_hub):
    proc = infer("pull", f"{REPO}:Q8_0")
    assert proc.returncode == 3
    assert "has no Q8_0 GGUF (it has: Q4_1)" in proc.stderr
    assert f"infer pull {REPO}:Q4_1" in proc.stderr


def test_unknown_repo(infer, smol_hub):
    proc = infer("pull", "test-org/does-not-exist")
    assert proc.returncode == 3 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_offline_pull(infer, smol_hub):
    offline = {"HF_HUB_OFFLINE": "1"}
    proc = infer("pull", f"{REPO}:Q4_1", env=offline)
    assert proc.returncode == 3 and "HF_HUB_OFFLINE" in proc.stderr
    assert infer("pull", f"{REPO}:Q4_1").returncode == 0
    smol_hub.clear_log()
    again = infer("pull", f"{REPO}:Q4_1", "--json", env=offline)
    assert again.returncode == 0, again.stderr
    assert smol_hub.log == []


def test_ctrl_c_during_pull_keeps_the_bytes_and_the_next_pull_resumes(smol_hub, smollm2_gguf, tmp_path):
    smol_hub.rate = 4 << 20  # 4 MiB/s: the 94 MiB file takes long enough to interrupt
    proc = subprocess.Popen([sys.executable, "-m", "infer_cli", "pull", f"{REPO}:Q4_1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    blobs = tmp_path / "hf-home" / "hub" / "models--test-org--SmolLM2-135M-Instruct-GGUF" / "blobs"
    deadline = time.monotonic() + 60
    partial = []
    while time.monotonic() < deadline:
        partial = [p for p in blobs.glob("*.incomplete") if p.stat().st_size > (2 << 20)] if blobs.exists() else []
        if partial:
            break
        time.sleep(0.05)
    assert partial, "the pull never started writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    kept = partial[0].stat().st_size
    assert 0 < kept < smollm2_gguf.stat().st_size
    assert not [p for p in blobs.iterdir() if not p.name.endswith(".incomplete") and not p.name.endswith(".lock")]

    smol_hub.rate = None
    smol_hub.clear_log()
    done = subprocess.run([sys.executable, "-m", "infer_cli", "pull", f"{REPO}:Q4_1", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ranges = [r.range for r in smol_hub.file_gets(FILE) if r.range]
    assert ranges and int(ranges[0].split("=")[1].rstrip("-")) >= kept
    path = json.loads(done.stdout)["paths"][0]
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == smol_hub.sha256
