"""Conversion memory and quantization speed of `infer quantize` against llama.cpp's own tools.

1. Peak RSS of converting the SmolLM2 round-trip export to F16, against 3 x the largest tensor
   + 300 MB (measured by /usr/bin/time -v when present, else getrusage of the child).
2. Quantization time to Q4_K_M of the same F16 input: the binding (quantize.llama_quant) against
   native llama-quantize built from the same vendored source (scripts/native.sh), alternating,
   medians.

Usage: .venv/bin/python scripts/bench_quantize.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
MODEL = ROOT / ".cache/test-home/store/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss(cmd: list[str]) -> int:
    if Path("/usr/bin/time").exists():
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
        return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    subprocess.run(cmd, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def native_bin() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts/native.sh")], capture_output=True, text=True)
    folder = Path(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() \
        else ROOT / ".cache/native/src/build/bin"
    return folder / "llama-quantize"


def time_both(native: Path, source: Path, work: Path, threads: int, repeats: int) -> dict:
    """Median times of native llama-quantize and of infer's quantizer, alternating: whole
    process wall time, and the quantization itself (llama-quantize's own 'total time' against
    the time infer spends in llama_model_quantize)."""
    wall = {"native": [], "infer": []}
    inner = {"native": [], "infer": []}
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
            "from pathlib import Path; from quantize.llama_quant import quantize, QuantOptions;"
            "from quantize.types import lookup;"
            "r = quantize(Path(sys.argv[2]), Path(sys.argv[3]), lookup('Q4_K_M'), "
            "QuantOptions(threads=int(sys.argv[4]))); print(r.seconds)")
    for i in range(repeats):
        dst = work / f"n{i}.gguf"
        t0 = time.perf_counter()
        out = subprocess.run([str(native), str(source), str(dst), "Q4_K_M", str(threads)],
                             check=True, capture_output=True, text=True)
        wall["native"].append(time.perf_counter() - t0)
        m = re.search(r"total time =\s+([\d.]+) ms", out.stdout + out.stderr)
        inner["native"].append(float(m.group(1)) / 1000 if m else float("nan"))
        dst.unlink()
        dst = work / f"o{i}.gguf"
        t0 = time.perf_counter()
        out = subprocess.run([PY, "-c", code, str(ROOT), str(source), str(dst), str(threads)],
                             check=True, capture_output=True, text=True)
        wall["infer"].append(time.perf_counter() - t0)
        inner["infer"].append(float(out.stdout.strip().splitlines()[-1]))
        dst.unlink()
    med = statistics.median
    return {k: (med(wall[k]), med(inner[k])) for k in wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from quantize.safetensors_io import read_header
    from tests.quantize_export import export_llama

    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    try:
        hf = export_llama(MODEL, work / "smollm2")
        largest = max(r.n_bytes // (2 if r.dtype in ("F16", "BF16") else 4) * 4
                      for r in read_header(hf / "model.safetensors").values())
        rss = peak_rss([PY, "-m", "infer_cli", "quantize", str(hf), "--to", "F16", "-o",
                        str(work / "conv"), "--no-report"])
        limit = 3 * largest + 300 * 2**20
        print(f"conversion peak RSS {rss / 2**20:.0f} MiB; limit 3 x {largest / 2**20:.0f} MiB + 300 MiB "
              f"= {limit / 2**20:.0f} MiB; met: {rss <= limit}")

        from tests.derived import expand

        native = native_bin()
        threads = os.cpu_count() or 1
        gemma = ROOT / ".cache/test-home/store/gemma3-270m/gemma-3-270m-q4_k_m.gguf"
        # A small input measures mostly process start-up; the 1 GB Gemma F32 measures the work.
        for source in (work / "conv" / "smollm2.F16.gguf", expand(gemma, "F32")):
            t = time_both(native, source, work, threads, args.repeats)
            (nw, ni), (ow, oi) = t["native"], t["infer"]
            print(f"Q4_K_M of {source.name} (median of {args.repeats}): quantization native {ni:.2f} s, "
                  f"infer {oi:.2f} s, ratio {oi / ni:.3f} (target <= 1.05: {oi / ni <= 1.05}); "
                  f"whole process {nw:.2f} s vs {ow:.2f} s (Python start-up and imports included)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
