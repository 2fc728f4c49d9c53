#!/usr/bin/env python3
"""How often greedy text in a batch equals the same prompt's text alone.

For each model: 8 prompts, each generated alone (a one-sequence context, step by step, keeping
the gap between the best and second-best logit at every step) and all 8 together in one
8-sequence context through the scheduler, 64 tokens, end-of-text ignored. Done with short
prompts (the context stays under 512 cells) and with prompts of ~600 tokens (over 512).
Prints per case how many of the 8 match token for token and, for each that does not, the first
step where they part and the alone run's logit gap there.

    .venv/bin/python scripts/batch_identity.py [--models PATH ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Write a short letter to a neighbour about a lost cat.",
           "Explain why the sea is salty.",
           "def merge_sort(xs):",
           "List five vegetables that grow in winter:",
           "A: Where are you going?\nB:",
           "Repeat this sentence with 'red' replaced by 'blue': the red car stopped at the red light.",
           "The three laws of motion are",
           "Translate to French: good morning, my friend."]
FILLER = ("Background: the committee met on Tuesday to review the annual budget, the new library "
          "wing, the park maintenance schedule and the proposal for longer opening hours. ")


def alone(model, opts, tokens, n):
    import numpy as np

    from infer_cli import engine

    s = engine.Session(model, opts)
    s.prefill(list(tokens))
    out, gaps = [], []
    for _ in range(n):
        logits = np.ctypeslib.as_array(model.L.llama_get_logits_ith(s.ptr, -1), shape=(model.n_vocab,))
        top2 = np.partition(logits, -2)[-2:]
        tok = int(logits.argmax())
        out.append(tok)
        gaps.append(float(top2[1] - top2[0]))
        s.decode_one(tok)
    s.close()
    return out, gaps


def together(model, opts, prompts, n):
    from infer_cli import engine
    from infer_cli.engine.scheduler import Scheduler

    ctx = engine.Context(model, opts)
    ctx.warm_up()
    sched = Scheduler(model, ctx, share_prefixes=False)
    seqs = [sched.submit(engine.Request(tuple(t), engine.Sampling(temperature=0), n, (), True)) for t in prompts]
    sched.run()
    out = [s.tokens[s.n_prompt:] for s in seqs]
    sched.close()
    ctx.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=[
        ".cache/test-home/store/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ".cache/test-home/store/smollm2/SmolLM2-135M-Instruct.Q4_1.F16.gguf",
        ".cache/test-home/store/gemma3-270m/gemma-3-270m-q4_k_m.gguf"])
    ap.add_argument("-n", type=int, default=64)
    args = ap.parse_args()
    from infer_cli import engine
    from infer_cli.options import Options

    for path in args.models:
        if not Path(path).exists():
            print(f"{path}: missing (the test suite makes the F16 expansion)")
            continue
        model = engine.Model(path, Options())
        for label, prefix in (("under 512 cells", ""), ("over 512 cells", FILLER * 24)):
            prompts = [model.tokenize(prefix + p) for p in PROMPTS]
            solo_opts = Options(n_ctx=2048, threads=2)
            batch_opts = Options(n_ctx=8 * (max(len(p) for p in prompts) + args.n) + 256, n_seq=8, threads=2)
            solo = [alone(model, solo_opts, p, args.n) for p in prompts]
            both = together(model, batch_opts, prompts, args.n)
            same = 0
            notes = []
            for i, ((a, gaps), b) in enumerate(zip(solo, both)):
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
                if k is None:
                    same += 1
                else:
                    notes.append(f"prompt {i}: parts at token {k}, logit gap there {gaps[k]:.3f}")
            print(f"{Path(path).name}, {label} (prompts {min(map(len, prompts))}-{max(map(len, prompts))} "
                  f"tokens): {same}/8 identical" + ("; " + "; ".join(notes) if notes else ""))
        model.close()


if __name__ == "__main__":
    main()
