#!/usr/bin/env python3
"""Cross-check of `infer bench`'s speeds: its prefill and decode figures against llama.cpp's
own llama-bench for the same configuration, side by side.

    .venv/bin/python scripts/bench_crosscheck.py                     # SmolLM2 Q4_1, 2 threads
    .venv/bin/python scripts/bench_crosscheck.py --model PATH.gguf --reps 5 --fa on,off
    .venv/bin/python scripts/bench_crosscheck.py --json

For each flash-attention setting, llama-bench (`-p PP -n TG -r 1`, infer's engine defaults
given explicitly: n_batch 2048, n_ubatch 512, f16 KV cache) alternates with the very function
the bench's precision and flash-attention sections time a configuration with
(``infer_cli.bench.measure.prefill_decode``: a cold prompt of exactly PP tokens, then TG greedy
tokens after a short prompt); the order flips every repetition. The bench and llama-bench agree
when each median is within 10% of the other's (the issue's target). llama-bench comes from
scripts/native.sh (the same llama.cpp commit as the binding, built the same way); --build builds
it when it is missing (about ten minutes on two cores).

Not a timed test: a shared machine moves these numbers by several percent. Run it on a quiet
machine (and, here, under `flock /tmp/infer-cpu.lock`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NATIVE_BIN = ROOT / ".cache" / "native" / "src" / "build" / "bin"
DEFAULT_MODEL = ROOT / ".cache" / "test-home" / "store" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TOLERANCE = 0.10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama_bench(args) -> Path:
    exe = Path(args.native_bin) / "llama-bench"
    if exe.is_file():
        return exe
    if not args.build:
        sys.exit(f"no llama-bench in {args.native_bin}: run scripts/native.sh (or pass --build)")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "native.sh")], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()
    exe = Path(out[-1]) / "llama-bench"
    if not exe.is_file():
        sys.exit(f"scripts/native.sh built no llama-bench ({exe})")
    return exe


def native_once(exe: Path, model: Path, pp: int, tg: int, threads: int, fa: str) -> tuple[float, float]:
    """One repetition of llama-bench: (prefill t/s of ppPP, decode t/s of tgTG)."""
    cmd = [str(exe), "-m", str(model), "-p", str(pp), "-n", str(tg), "-t", str(threads),
           "-r", "1", "-b", "2048", "-ub", "512", "-fa", fa, "-ctk", "f16", "-ctv", "f16",
           "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)
    if p.returncode != 0:
        sys.exit(f"llama-bench failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    rows = json.loads(p.stdout)
    pre = next(r["avg_ts"] for r in rows if r.get("n_prompt") == pp and r.get("n_gen") == 0)
    dec = next(r["avg_ts"] for r in rows if r.get("n_gen") == tg and r.get("n_prompt") == 0)
    return float(pre), float(dec)


class Ours:
    """The bench's own measurement of one configuration, loaded once."""

    def __init__(self, model: Path, pp: int, tg: int, threads: int, fa: str):
        from infer_cli.bench import measure
        from infer_cli.options import Options
        from quantize.report import default_eval_text

        self.measure, self.pp, self.tg = measure, pp, tg
        self.text = default_eval_text()
        n_ctx = -(-(pp + tg + 16) // 256) * 256
        self.loaded = measure.Loaded(model, Options(n_ctx=n_ctx, threads=threads, flash_attn=fa,
                                                    gpu_layers=0))

    def once(self) -> tuple[float, float]:
        return self.measure.prefill_decode(self.loaded, self.text, self.pp, self.tg)

    def close(self) -> None:
        self.loaded.close()


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="a GGUF file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--fa", default="on,off", help="flash attention settings, comma-separated")
    ap.add_argument("--native-bin", default=str(NATIVE_BIN))
    ap.add_argument("--build", action="store_true", help="build llama-bench when it is missing")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model = Path(args.model)
    if not model.is_file():
        sys.exit(f"no model file {model}")
    exe = llama_bench(args)
    rows = []
    for fa in [f.strip() for f in args.fa.split(",") if f.strip()]:
        ours = Ours(model, args.pp, args.tg, args.threads, fa)
        got = {"native": ([], []), "infer": ([], [])}
        try:
            for rep in range(args.reps):
                for side in (("native", "infer") if rep % 2 == 0 else ("infer", "native")):
                    log(f"fa {fa}, rep {rep + 1}/{args.reps}: {side}")
                    pre, dec = (native_once(exe, model, args.pp, args.tg, args.threads, fa)
                                if side == "native" else ours.once())
                    got[side][0].append(pre)
                    got[side][1].append(dec)
        finally:
            ours.close()
        for i, what in ((0, f"prefill pp{args.pp}"), (1, f"decode tg{args.tg}")):
            nat, inf = got["native"][i], got["infer"][i]
            ratio = statistics.median(inf) / statistics.median(nat)
            rows.append({"flash_attn": fa, "measure": what, "native": nat, "infer": inf,
                         "ratio": ratio, "within": abs(ratio - 1) <= TOLERANCE})
    if args.json:
        print(json.dumps({"model": str(model), "threads": args.threads, "reps": args.reps,
                          "rows": rows}, indent=2))
    else:
        print(f"{model.name}, {args.threads} threads, median of {args.reps} (range)")
        print(f"{'flash':6} {'measure':14} {'llama-bench t/s':>22} {'infer bench t/s':>22} {'ratio':>6}  within 10%")
        for r in rows:
            print(f"{r['flash_attn']:6} {r['measure']:14} {fmt(r['native']):>22} {fmt(r['infer']):>22} "
                  f"{r['ratio']:6.3f}  {'yes' if r['within'] else 'NO'}")
    return 0 if all(r["within"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
