"""Huge pages for the weights: when infer starts itself again with glibc's tunable, and what the
engine then does with the weights (read into memory, not mapped), on the real llama.cpp."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infer_cli import engine, hugepages

ASKED = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


@linux_only
@pytest.mark.parametrize("argv, env, mode, glibc, want", [
    (["run", "m", "hi"], {}, "madvise", (2, 36), True),
    (["serve", "m"], {}, "madvise", (2, 35), True),
    (["-q", "batch", "m"], {}, "madvise", (2, 40), True),
    (["list"], {}, "madvise", (2, 36), False),            # loads no model
    (["--version"], {}, "madvise", (2, 36), False),
    (["run", "--help"], {}, "madvise", (2, 36), False),
    (["run", "m"], {"INFER_HUGE_PAGES": "0"}, "madvise", (2, 36), False),
    (["run", "m"], ASKED, "madvise", (2, 36), False),      # started again already: no loop
    (["run", "m"], {}, "always", (2, 36), False),          # every process has them
    (["run", "m"], {}, "never", (2, 36), False),
    (["run", "m"], {}, None, (2, 36), False),              # no THP in this kernel
    (["run", "m"], {}, "madvise", (2, 34), False),         # glibc without the tunable
    (["run", "m"], {}, "madvise", (0, 0), False),          # not glibc (no version to read)
])
def test_when_infer_starts_again_with_the_tunable(argv, env, mode, glibc, want):
    assert hugepages.wanted(argv, env=env, mode=mode or "", glibc=glibc) is want


@linux_only
@pytest.mark.parametrize("env, mode, want", [
    (ASKED, "madvise", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=1"}, "madvise", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", False),
    ({}, "madvise", False),
    ({}, "always", True),
    ({"INFER_HUGE_PAGES": "0"}, "always", False),
    (ASKED, "never", False),
])
def test_whether_this_process_has_huge_pages(env, mode, want):
    assert hugepages.active(env, mode=mode) is want


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(f)) == "madvise"
    assert hugepages.thp_mode(str(tmp_path / "absent")) is None


@linux_only
def test_the_engine_reads_cpu_weights_into_huge_pages(smollm2_gguf):
    """In a process started with the tunable (as the console script starts itself), the default
    (auto) reads the weights into memory, and the kernel backs them with huge pages; the
    answer is the one the mapped weights give."""
    if hugepages.thp_mode() not in ("madvise", "always") or (hugepages.glibc_version() or (0, 0)) < (2, 35):
        pytest.skip(f"this kernel/libc gives no huge pages on request (THP {hugepages.thp_mode()}, "
                    f"glibc {hugepages.glibc_version()})")
    code = r"""
import sys
from infer_cli import engine
from infer_cli.engine import llama_log
from infer_cli.options import Options
llama_log.install()
mark = llama_log.mark()
model = engine.Model(sys.argv[1], Options(mmap=None if sys.argv[2] == "auto" else sys.argv[2] == "on"))
lines = [l for l in llama_log.since(mark) if "model buffer size" in l]
huge = next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages"))
s = engine.Session(model, Options(n_ctx=256))
s.decode(model.tokenize("The capital of France is"))
sampler = engine.Sampler(model, engine.Sampling(temperature=0))
print(model.mmap, huge, sampler.sample(s.ptr), lines)
"""
    def child(mode, env):
        out = subprocess.run([sys.executable, "-c", code, str(smollm2_gguf), mode], capture_output=True,
                             text=True, env={**os.environ, **env}, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        mapped, huge, token, lines = out.stdout.split(" ", 3)
        return mapped == "True", int(huge), int(token), lines

    mapped, huge, token, lines = child("auto", ASKED)
    assert not mapped and "CPU_Mapped" not in lines, lines
    assert huge >= 2048, f"only {huge} KiB of huge pages with the weights read into memory"
    mapped, _, token_mapped, lines = child("auto", {})  # no tunable: llama.cpp's own default
    assert mapped and "CPU_Mapped" in lines, lines
    assert token == token_mapped
    mapped, _, _, lines = child("on", ASKED)  # --mmap keeps the mapping
    assert mapped and "CPU_Mapped" in lines, lines
    mapped, _, _, lines = child("auto", {**ASKED, "INFER_HUGE_PAGES": "0"})
    assert mapped, lines


@linux_only
def test_the_console_script_starts_again_and_keeps_its_input(smollm2_in_home, infer):
    """`infer run` through the console script: the prompt piped on stdin survives the exec, and
    llama.cpp reports reading the weights (load_mode none) where huge pages are available."""
    if not hugepages.wanted(["run", "x"]):
        pytest.skip(f"infer does not start again here (THP {hugepages.thp_mode()}, glibc {hugepages.glibc_version()})")
    r = infer("run", "smollm2", "--raw", "--temp", "0", "-n", "4", input="The capital of France is",
              env={"INFER_DEBUG": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "load_mode = none" in r.stderr and "CPU_Mapped" not in r.stderr
    assert r.stdout.strip()
    r = infer("run", "smollm2", "--raw", "--temp", "0", "-n", "4", "Hello", env={"INFER_DEBUG": "1", "INFER_HUGE_PAGES": "0"})
    assert r.returncode == 0 and "CPU_Mapped" in r.stderr


def test_which_weights_stay_mapped(smollm2_gguf, monkeypatch, tmp_path):
    """Auto reads the weights only where the process has huge pages, nothing is offloaded, and
    the files take at most half the memory available; an explicit choice always wins."""
    from infer_cli.engine.model import weights_mapped
    from infer_cli.options import Options

    files = (smollm2_gguf,)
    monkeypatch.setattr(hugepages, "active", lambda: True)
    assert weights_mapped(Options(), files) is False
    assert weights_mapped(Options(mmap=True), files) is True
    assert weights_mapped(Options(rpc=("127.0.0.1:50052",)), files) is True
    assert weights_mapped(Options(), (tmp_path / "gone.gguf",)) is True
    import psutil

    size = smollm2_gguf.stat().st_size
    fake = type("VM", (), {"available": 2 * size - 1})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    assert weights_mapped(Options(), files) is True  # over half of what is available
    assert weights_mapped(Options(), (tmp_path / "gone.gguf",)) is True
    fake.available = 4 * size
    assert weights_mapped(Options(), files) is False
    assert weights_mapped(Options(), files * 3) is True  # every shard counts
    monkeypatch.setattr(hugepages, "active", lambda: False)
    assert weights_mapped(Options(), files) is True
    assert weights_mapped(Options(mmap=False), files) is False
