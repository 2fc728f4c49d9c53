"""`infer imatrix` against llama.cpp's own llama-imatrix (built by scripts/native.sh from the
same vendored source): the same model, text, chunk size and chunk count.

1. The sums: per tensor, the largest difference of in_sum2 relative to that tensor's largest
   value (bound: 1%); counts must be equal.
2. What they are for: Q2_K and IQ3_XXS quants of the model made with either file, their KL
   divergence against the unquantized model (bound: within 2% of each other).
3. Speed: whole-process wall time of each tool, alternating, medians (ratio native / infer:
   >= 0.9 means infer is at least 90% as fast); infer's own compute time besides.

Usage: .venv/bin/python scripts/bench_imatrix.py [--model F16.gguf] [--chunks N] [--ctx N]
       [--repeats N] [--threads N]
The default model is the SmolLM2 test model expanded to F16 (made once, tests/derived.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
SMOLLM2 = ROOT / ".cache/test-home/store/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def native_bin() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts/native.sh")], capture_output=True, text=True)
    folder = Path(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() \
        else ROOT / ".cache/native/src/build/bin"
    return folder / "llama-imatrix"


def run_native(exe: Path, model: Path, text: Path, out: Path, ctx: int, chunks: int, threads: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(exe), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks",
                    str(chunks), "-t", str(threads), "-o", str(out)], check=True, capture_output=True)
    return time.perf_counter() - t0


def run_infer(model: Path, text: Path, out: Path, ctx: int, chunks: int, threads: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    r = subprocess.run([PY, "-m", "infer_cli", "imatrix", str(model), "--calibration", str(text),
                        "--ctx", str(ctx), "--chunks", str(chunks), "-t", str(threads), "-o",
                        str(out), "--json"], check=True, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t0, json.loads(r.stdout)["seconds"]


def tensors(path: Path) -> dict:
    import numpy as np
    from gguf import GGUFReader

    return {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(str(path)).tensors}


def compare_sums(ours: Path, theirs: Path) -> dict:
    import numpy as np

    a, b = tensors(ours), tensors(theirs)
    if sorted(a) != sorted(b):
        return {"same_tensors": False, "only_infer": sorted(set(a) - set(b))[:5],
                "only_native": sorted(set(b) - set(a))[:5]}
    worst, worst_name, counts_equal = 0.0, None, True
    for name, x in a.items():
        y = b[name]
        if name.endswith(".counts"):
            counts_equal &= bool((x == y).all())
            continue
        d = float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30))
        if d > worst:
            worst, worst_name = d, name
    return {"same_tensors": True, "tensors": len(a) // 2, "counts_equal": counts_equal,
            "max_rel_diff": worst, "worst_tensor": worst_name, "within_1pct": worst <= 0.01}


def compare_quants(model: Path, ours: Path, theirs: Path, work: Path, threads: int) -> dict:
    from quantize.llama_quant import QuantOptions, quantize
    from quantize.report import Reference, default_eval_text
    from quantize.types import lookup

    ref = Reference(model, default_eval_text(), n_tokens=1024, threads=threads, workdir=work)
    out = {}
    try:
        for qt in ("Q2_K", "IQ3_XXS"):
            kl = {}
            for who, imx in (("infer", ours), ("native", theirs)):
                dst = work / f"{who}.{qt}.gguf"
                quantize(model, dst, lookup(qt), QuantOptions(imatrix=imx, threads=threads))
                kl[who] = ref.compare(dst).kl_mean
                dst.unlink()
            rel = abs(kl["infer"] - kl["native"]) / max(kl["native"], 1e-12)
            out[qt] = {"kl_infer": kl["infer"], "kl_native": kl["native"], "rel_diff": rel,
                       "within_2pct": rel <= 0.02}
    finally:
        ref.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-quants", action="store_true", help="skip the KL comparison")
    args = ap.parse_args()

    from quantize.imatrix_make import builtin_text

    if args.model is None:
        from tests.derived import expand

        args.model = expand(SMOLLM2, "F16")
    exe = native_bin()
    if not exe.exists():
        print(f"no {exe}: run scripts/native.sh", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-imatrix-") as tmp:
        work = Path(tmp)
        text = work / "calibration.txt"
        text.write_text(builtin_text(), encoding="utf-8")
        ours, theirs = work / "infer.imatrix.gguf", work / "native.imatrix.gguf"
        wall = {"native": [], "infer": []}
        inner = []
        for _ in range(args.repeats):  # alternating, so a change in the machine's load hits both
            wall["native"].append(run_native(exe, args.model, text, theirs, args.ctx, args.chunks, args.threads))
            w, s = run_infer(args.model, text, ours, args.ctx, args.chunks, args.threads)
            wall["infer"].append(w)
            inner.append(s)
        med = {k: statistics.median(v) for k, v in wall.items()}
        result = {"model": str(args.model), "ctx": args.ctx, "chunks": args.chunks,
                  "threads": args.threads, "repeats": args.repeats,
                  "sums": compare_sums(ours, theirs),
                  "speed": {"native_wall_s": med["native"], "infer_wall_s": med["infer"],
                            "infer_compute_s": statistics.median(inner),
                            "ratio_native_over_infer": med["native"] / med["infer"],
                            "at_least_0.9x": med["native"] / med["infer"] >= 0.9}}
        if not args.no_quants:
            result["quants"] = compare_quants(args.model, ours, theirs, work, args.threads)
    print(json.dumps(result, indent=2))
    ok = result["sums"].get("within_1pct") and result["speed"]["at_least_0.9x"] and \
        all(q["within_2pct"] for q in result.get("quants", {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
