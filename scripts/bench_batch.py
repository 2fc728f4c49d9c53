#!/usr/bin/env python3
"""Continuous batching against llama.cpp's own `llama-batched-bench`, in one run.

For each model and each number of parallel sequences B: native batched-bench with B prompts of
128 tokens and 128 generated tokens each (S_TG, generation tokens/s), then infer's scheduler on
the same shapes (B sequences submitted at once, greedy, end-of-text ignored; generation rate
over the steps where every sequence is generating), one count at a time with the sides back to
back in an order that reverses every repetition, median of --reps. Prompts come
from two sets: one the scheduler was developed on and a held-out one (different texts); both
are reported. Also: 32 prompts sharing a 400-token prefix with sharing on and off, and the
scheduler's own time per step at 16 sequences (whole step minus llama_decode).

    .venv/bin/python scripts/bench_batch.py [--models smollm2,gemma3-270m] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TUNING = ("The history of the printing press begins in the fifteenth century, when movable type "
          "changed how books were made, how ideas spread and who could read them. ")
HELD_OUT = ("A recipe for bread needs flour, water, salt and yeast; the baker kneads, waits for the "
            "dough to rise, shapes it and bakes it until the crust sings when tapped. ")
SETS = {"tuning": TUNING, "held-out": HELD_OUT}


def native_bin() -> Path:
    out = subprocess.run([str(ROOT / "scripts/native.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def model_path(alias: str) -> Path:
    from infer_cli.models import store

    return store.resolve(alias).path


def native_tg(binary: Path, model: Path, counts: list[int], threads: int, n_ctx: int) -> dict[int, float]:
    cmd = [str(binary / "llama-batched-bench"), "-m", str(model), "-c", str(n_ctx), "-b", "2048",
           "-ub", "512", "-npp", "128", "-ntg", "128", "-npl", ",".join(map(str, counts)),
           "-t", str(threads), "-kvu"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed: {out.stderr[-400:]}")
    rates = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and cells[0] == "128" and cells[2].isdigit():
            rates[int(cells[2])] = float(cells[7])  # S_TG t/s
    return rates


def prompts(model, text: str, n: int, length: int = 128) -> list[tuple[int, ...]]:
    base = model.tokenize(text * 40, add_special=False)
    return [tuple(base[i * 7:i * 7 + length]) for i in range(n)]


def ours_tg(model, ctx, reqs) -> tuple[float, float]:
    """(generation tokens/s over all-generating steps, scheduler share of step time)."""
    from infer_cli.engine import Request, Sampling
    from infer_cli.engine.scheduler import Scheduler

    sched = Scheduler(model, ctx, share_prefixes=False)
    seqs = [sched.submit(Request(t, Sampling(temperature=0), 128, (), True)) for t in reqs]
    gen_s = gen_tokens = 0.0
    own = total = 0.0
    while sched.busy:
        all_generating = all(s.generating for s in sched.running) and not sched.waiting
        n = len(sched.running)
        d0, t0 = sched.stats.decode_s, time.perf_counter()
        sched.step()
        dt = time.perf_counter() - t0
        if all_generating and n == len(reqs):
            gen_s += dt
            gen_tokens += n
            own += dt - (sched.stats.decode_s - d0)
            total += dt
    assert all(s.n_generated == 128 for s in seqs)
    sched.close()
    return gen_tokens / gen_s, own / total if total else 0.0


def shared_prefix(model, ctx, share: bool, text: str) -> float:
    from infer_cli.engine import Request, Sampling
    from infer_cli.engine.scheduler import Scheduler

    prefix = model.tokenize(text * 30, add_special=False)[:400]
    qs = model.tokenize(HELD_OUT * 4 + TUNING * 4, add_special=False)
    reqs = [Request(tuple(prefix + qs[i * 3:i * 3 + 12]), Sampling(temperature=0), 16, (), True)
            for i in range(32)]
    sched = Scheduler(model, ctx, share_prefixes=share)
    t0 = time.perf_counter()
    for r in reqs:
        sched.submit(r)
    sched.run()
    sched.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--counts", default="1,4,8,16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from infer_cli import engine
    from infer_cli.options import Options

    counts = [int(c) for c in args.counts.split(",")]
    binary = native_bin()
    rows = []
    for alias in args.models.split(","):
        path = model_path(alias)
        n_ctx = 16 * 256 + 512
        opts = Options(n_ctx=n_ctx, n_seq=max(counts), threads=args.threads, gpu_layers=0)
        model = engine.Model(path, opts)
        # a context per count, as llama-batched-bench -npl B has (n_seq_max = B: the size of a
        # sliding-window cache follows it)
        ctxs = {b: engine.Context(model, replace(opts, n_seq=b)) for b in counts}
        for c in ctxs.values():
            c.warm_up()
        ctx = ctxs[max(counts)]
        native = {b: [] for b in counts}
        ours = {(s, b): [] for s in ("tuning", "held-out") for b in counts}
        own16 = []
        for rep in range(args.reps):
            # the three sides of one count run back to back (seconds apart, not minutes), in an
            # order that reverses every repetition, so a machine whose speed drifts over a run
            # moves each pair together and favours no side
            for b in counts:
                sides = ["native", "tuning", "held-out"]
                for side in sides if rep % 2 == 0 else sides[::-1]:
                    if side == "native":
                        rate = native_tg(binary, path, [b], args.threads, n_ctx)[b]
                        native[b].append(rate)
                    else:
                        rate, own = ours_tg(model, ctxs[b], prompts(model, SETS[side], b))
                        ours[(side, b)].append(rate)
                        if b == 16:
                            own16.append(own)
                    print(f"rep {rep + 1} {alias} x{b} {side}: {rate:.1f} t/s", file=sys.stderr, flush=True)
        single = statistics.median(ours[("held-out", 1)])
        for b in counts:
            nat = statistics.median(native[b])
            for name in ("tuning", "held-out"):
                o = statistics.median(ours[(name, b)])
                # within one repetition native and infer ran seconds apart: the median of those
                # ratios is less moved by a machine whose speed drifts over the whole run
                pair = statistics.median(x / y for x, y in zip(ours[(name, b)], native[b]))
                rows.append({"model": alias, "set": name, "sequences": b, "native_tg": round(nat, 1),
                             "infer_tg": round(o, 1), "ratio": round(o / nat, 3),
                             "paired": round(pair, 3),
                             "vs_single": round(o / single, 2)})
        on = statistics.median(shared_prefix(model, ctx, True, HELD_OUT) for _ in range(args.reps))
        off = statistics.median(shared_prefix(model, ctx, False, HELD_OUT) for _ in range(args.reps))
        rows.append({"model": alias, "shared_prefix_on_s": round(on, 2), "shared_prefix_off_s": round(off, 2),
                     "ratio": round(on / off, 3),
                     "scheduler_share_16": round(statistics.median(own16), 4) if own16 else None})
        for c in ctxs.values():
            c.close()
        model.close()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| model | prompts | sequences | native S_TG t/s | infer t/s | ratio | paired | vs infer x1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "sequences" in r:
            print(f"| {r['model']} | {r['set']} | {r['sequences']} | {r['native_tg']} | {r['infer_tg']} "
                  f"| {r['ratio']} | {r['paired']} | {r['vs_single']} |")
    print("ratio: median infer / median native; paired: median of the per-repetition ratios")
    for r in rows:
        if "shared_prefix_on_s" in r:
            print(f"{r['model']}: 32 prompts sharing a 400-token prefix: {r['shared_prefix_on_s']} s shared, "
                  f"{r['shared_prefix_off_s']} s not ({r['ratio']}x)")
            if r["scheduler_share_16"] is not None:
                print(f"{r['model']}: scheduler's own share of a step at 16 sequences (step time "
                      f"outside llama_decode): {r['scheduler_share_16']:.1%}")


if __name__ == "__main__":
    main()
