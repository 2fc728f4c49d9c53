"""Many processes at once: two pulls of one file, `infer rm` of a model another process is
running, two quantizations to one output, two `infer batch` on one output file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.test_full_disk import _gguf, wait_for


def _popen(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "infer_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_two_pulls_of_one_file_download_it_once(infer, hub, tmp_path):
    data = _gguf(1 << 20, "shared")  # 4 MiB, at 4 MiB/s: both pulls overlap
    hub.add_repo("org/shared-GGUF", {"shared-Q8_0.gguf": data})
    hub.rate = 4 << 20
    ref = "org/shared-GGUF/shared-Q8_0.gguf"
    a = _popen("pull", ref, "--json")
    time.sleep(0.3)
    b = _popen("pull", ref, "--json")
    outs = [p.communicate(timeout=120) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, [o[1][-500:] for o in outs]
    paths = {json.loads(o[0])["paths"][0] for o in outs}
    assert len(paths) == 1
    assert hashlib.sha256(Path(paths.pop()).read_bytes()).digest() == hashlib.sha256(data).digest()
    blobs = [p for p in (tmp_path / "hf-home" / "hub").glob("models--*/blobs/*")]
    assert len(blobs) == 1 and blobs[0].stat().st_size == len(data)  # no doubled bytes
    gets = hub.file_gets("shared-Q8_0.gguf")
    assert len(gets) == 1, [(g.status, g.range) for g in gets]  # one download; the other waited


def test_rm_of_a_model_another_process_is_running(infer, smollm2_in_home):
    runner = _popen("run", "smollm2", "Tell me a long story.", "-n", "48", "--ignore-eos",
                    "--temp", "0", "--no-prompt-cache")
    # wait until it generates (the model is loaded and mapped)
    first = runner.stdout.read(1)
    assert first, runner.stderr.read()
    rm = infer("rm", "smollm2", "--yes")
    rest, err = runner.communicate(timeout=180)
    assert runner.returncode == 0, err  # the runner never crashes
    assert "Traceback" not in rm.stderr and "Traceback" not in err
    assert len(first + rest) > 20
    listed = json.loads(infer("list", "--json").stdout)["models"]
    if rm.returncode == 0:  # removed: gone from the list and the disk; the runner kept its map
        assert listed == [] and not smollm2_in_home.exists()
    else:  # refused: the message names the process
        assert str(runner.pid) in rm.stderr, rm.stderr
        assert [m["name"] for m in listed] == ["smollm2"]


def test_two_quantizations_to_one_output(infer, smollm2_f16, tmp_path):
    from infer_cli.models.gguf_info import read_gguf

    out = tmp_path / "q"
    out.mkdir()
    procs = [_popen("quantize", str(smollm2_f16), "--to", "Q4_0", "-o", str(out), "--no-report")
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0, results
    # the other one is refused: the output is locked (75) or already there (2); or, started
    # after the first let go of it, it made the same file again (0)
    assert codes[1] in (0, 2, 75), results
    assert all("Traceback" not in err for _, err in results)
    assert sorted(p.name for p in out.iterdir()) == ["SmolLM2-135M-Instruct.Q4_1.Q4_0.gguf"]
    assert read_gguf(out / "SmolLM2-135M-Instruct.Q4_1.Q4_0.gguf").n_params > 100_000_000


def test_second_batch_on_one_output_is_refused(infer, smollm2_gguf, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"Say {i}:", "max_tokens": 16}) + "\n"
                           for i in range(16)))
    out = tmp_path / "out.jsonl"
    first = _popen("batch", str(smollm2_gguf), str(src), "-o", str(out), "--temp", "0")
    lock = tmp_path / ".out.jsonl.lock"
    assert wait_for(lambda: lock.exists() and lock.read_text().strip(), 60)
    second = infer("batch", str(smollm2_gguf), str(src), "-o", str(out), "--temp", "0")
    assert second.returncode == 75, second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    ids = [json.loads(ln)["id"] for ln in out.read_text().splitlines()]
    assert sorted(ids) == list(range(16))
    assert not lock.exists()


def test_prompt_cache_savers_evictor_and_reader_race(smollm2_gguf, tmp_path):
    """Two processes saving the same prompt-cache entry over and over (each a new file renamed
    over the name), one evicting everything, one restoring: every state the reader loads gives
    exactly the logits of a fresh computation, and no entry is ever taken for corrupt."""
    root = tmp_path / "prompt-cache"
    root.mkdir()

    def role(name: str, seconds: float) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tests.cache_race", name, str(smollm2_gguf),
                                 str(root), str(seconds)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)

    # a first entry, so the reader has something to find from its first round
    seed = role("writer", 0)
    assert seed.wait(timeout=300) == 0, seed.stderr.read()
    procs = [role("writer", 6), role("writer", 6), role("evictor", 8), role("reader", 6)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    reader = results[-1]
    assert reader["wrong"] == 0, reader
    assert reader["hits"] > 0, reader  # the race was run, not only missed
    assert not [n for n in reader["notes"] if "corrupt" in n or "refused" in n], reader["notes"]
