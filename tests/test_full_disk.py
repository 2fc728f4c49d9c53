"""A full disk, for real: a small tmpfs mounted as the Hugging Face cache, the output folder,
INFER_HOME (the prompt cache) and a batch output folder. Each operation starts with room (its
estimate beforehand passes), then another program fills the disk while it writes: it must end
with the one-line error and exit 74 (the prompt cache: after the answer, which is kept whole), remove
its partial file, and leave what was there before intact.

Needs root and a kernel that lets the test mount; skipped with the reason otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

EXIT_IO = 74


def _mount(folder: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount refused: {proc.stderr.strip() or proc.returncode}")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size) -> a fresh tmpfs folder under tmp_path; all unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        folder = tmp_path / name
        _mount(folder, size)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave: int) -> Path:
    """Another program takes all but ``leave`` bytes of the file system holding ``folder``."""
    filler = folder / "filler.bin"
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(filler, "ab") as f:
        want = max(0, free - leave)
        try:
            os.posix_fallocate(f.fileno(), f.tell(), want)
        except OSError:
            block = b"\0" * (1 << 20)
            try:
                while want > 0:
                    want -= f.write(block[:want])
            except OSError:
                pass
    return filler


def wait_for(predicate, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def one_line_error(proc_stderr: str) -> str:
    lines = [ln for ln in proc_stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    assert "Traceback" not in proc_stderr, proc_stderr
    return lines[0]


def _popen(*args: str, env: dict) -> subprocess.Popen:
    import sys

    return subprocess.Popen([sys.executable, "-m", "infer_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def _gguf(n_floats: int, name: str = "tiny") -> bytes:
    import struct

    def s(t: str) -> bytes:
        return struct.pack("<Q", len(t)) + t.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, 1, 2)
    out += s("general.architecture") + struct.pack("<I", 8) + s("llama")
    out += s("general.name") + struct.pack("<I", 8) + s(name)
    out += s("w.weight") + struct.pack("<I", 1) + struct.pack("<q", n_floats) + struct.pack("<IQ", 0, 0)
    out += b"\0" * (-len(out) % 32)
    return out + os.urandom(4 * n_floats)


def test_pull_that_runs_out_of_space(infer, hub, tmpfs):
    cache = tmpfs("hf-home", "6m")
    env = {"HF_HOME": str(cache)}
    before = _gguf(64 << 10, "before")          # 256 KiB, pulled while there is room
    big = _gguf(3 << 18, "big")                   # 3 MiB: fits the free space when it starts
    hub.add_repo("org/disk-GGUF", {"before-Q8_0.gguf": before, "big-Q8_0.gguf": big})
    first = infer("pull", "org/disk-GGUF/before-Q8_0.gguf", "--json", env=env)
    assert first.returncode == 0, first.stderr
    kept = Path(json.loads(first.stdout)["paths"][0])

    hub.rate = 1 << 20  # a slow link: the disk fills while the file arrives
    proc = _popen("pull", "org/disk-GGUF/big-Q8_0.gguf", env=env)
    blobs = cache / "hub" / "models--org--disk-GGUF" / "blobs"
    assert wait_for(lambda: any(p.name.endswith(".incomplete") and p.stat().st_size > 0
                                for p in blobs.glob("*"))), "the download never started"
    filler = fill(cache, 64 << 10)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_IO, err
    assert "filled up" in one_line_error(err)
    assert not [p for p in blobs.glob("*") if p.name.endswith(".incomplete")]  # partial removed
    assert hashlib.sha256(kept.read_bytes()).digest() == hashlib.sha256(before).digest()

    filler.unlink()  # room again: the same command now ends verified
    hub.rate = None
    again = infer("pull", "org/disk-GGUF/big-Q8_0.gguf", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert Path(json.loads(again.stdout)["paths"][0]).read_bytes() == big


def test_quantization_that_runs_out_of_space(infer, smollm2_f16, tmpfs):
    out = tmpfs("out", "240m")
    earlier = out / "earlier.gguf"
    earlier.write_bytes(b"an earlier output" * 100)
    proc = _popen("quantize", str(smollm2_f16), "--to", "Q8_0", "-o", str(out), "--no-report",
                  env={})
    assert wait_for(lambda: any(p.name.endswith(".partial") and p.stat().st_size > (4 << 20)
                                for p in out.iterdir()), 120), "quantization never wrote"
    fill(out, 1 << 20)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_IO, err
    assert "filled up" in one_line_error(err)
    left = sorted(p.name for p in out.iterdir())
    assert left == ["earlier.gguf", "filler.bin"], left  # no partial, no target
    assert earlier.read_bytes() == b"an earlier output" * 100


PROMPT = ("The history of the printing press begins in the fifteenth century, when movable type "
          "changed how books were made, how ideas spread and who could read them. ") * 2


def test_prompt_cache_save_on_a_full_disk_costs_only_the_entry(infer, smollm2_gguf, tmpfs):
    home = tmpfs("infer-home", "16m")
    env = {"INFER_HOME": str(home)}
    first = infer("run", str(smollm2_gguf), PROMPT, "-n", "2", "--temp", "0", env=env)
    assert first.returncode == 0, first.stderr
    entries = sorted((home / "prompt-cache").glob("*/*.kvc"))
    assert len(entries) == 1
    saved = entries[0].read_bytes()
    fill(home, 64 << 10)  # far less than one entry (about 1 MiB for this prompt)
    second = infer("run", str(smollm2_gguf), PROMPT + "And then?", "-n", "2", "--temp", "0", env=env)
    assert second.returncode == EXIT_IO, second.stderr  # the disk is full: said, with exit 74
    assert second.stdout.strip()  # and the answer, never lost to the cache
    assert "Traceback" not in second.stderr
    [error] = [ln for ln in second.stderr.splitlines() if ln.startswith("Error:")]
    assert "filled up" in error
    files = sorted(p.name for p in (home / "prompt-cache").glob("*/*") if p.is_file())
    assert files == [entries[0].name], files  # no partial entry beside the earlier one
    assert entries[0].read_bytes() == saved


def test_batch_output_that_runs_out_of_space(infer, smollm2_gguf, tmpfs, tmp_path):
    out_dir = tmpfs("batch-out", "1m")
    out = out_dir / "results.jsonl"
    earlier = json.dumps({"id": "earlier", "text": "x", "finish_reason": "stop"}) + "\n"
    out.write_text(earlier)
    lines = [json.dumps({"id": i, "prompt": f"Count to {i}:", "max_tokens": 24}) for i in range(80)]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    fill(out_dir, 8 << 10)  # room for a few result lines, not for all 80
    proc = infer("batch", str(smollm2_gguf), str(source), "-o", str(out), "--temp", "0",
                 "--parallel", "4", timeout=300)
    assert proc.returncode == EXIT_IO, proc.stderr
    assert "filled up" in one_line_error(proc.stderr)
    data = out.read_text()
    assert data.startswith(earlier) and data.endswith("\n")  # whole lines only
    records = [json.loads(ln) for ln in data.splitlines()]
    assert 1 < len(records) < 81
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no lock or partial left
