#!/usr/bin/env python3
"""Speculative decoding benchmark: infer against llama.cpp's own llama-speculative-simple.

Pairs are made from the test models by llama.cpp's quantizer (tests/derived.py): Gemma 3 270M
F32 with its Q4_K_M as draft, SmolLM2-135M F32 with its Q4_1, and SmolLM2 F16 with Q4_1 (where
speculation should step aside). Greedy, same prompts, same thread count, same token count; runs
alternate between the two sides. One repetition runs every prompt on every side; its speed is
the tokens of all prompts over their decode time together, and each figure is the median of
--reps repetitions.

Several prompts, because one is a coin toss: greedy text reaches near-ties (two tokens within
1e-3 in logit), and a batch of drafts is computed in a different order than single tokens, so a
speculative run can take the other branch at such a tie, in llama.cpp's own run as in ours, and
from there the texts (and how repetitive, so how predictable, they are) differ.

    .venv/bin/python scripts/bench_speculative.py [--reps 3] [--tokens 256] [--threads 2]
        [--pairs gemma,smollm2-f32,smollm2-f16,lookup]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.derived import expand  # noqa: E402

STORE = ROOT / ".cache" / "test-home" / "store"
SMOL = STORE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = STORE / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
PROMPTS = ["The history of the printing press begins",
           "Write a short story about a robot who learns to paint.",
           "def fibonacci(n):",
           "The three most important causes of the French Revolution were"]
PASSAGE = " ".join([
    "The old mill stood by the river for two hundred years, and every spring the water rose to turn",
    "its great wooden wheel. The miller ground wheat and barley for the farms of the whole valley,",
    "and on market days the carts lined up along the lane from the bridge to the church. When the",
    "railway came to the next town, the carts went there instead, and one by one the farms sold",
    "their grain to the big steam mills in the city. The wheel turned more slowly each year until,",
    "one dry summer, it stopped altogether and never moved again. The miller's daughter kept the",
    "house and planted roses against the stone walls, and children from the village came to fish",
    "in the mill pond and to listen to her stories about the busy years. Travellers who stopped",
    "on the bridge often asked why such a fine building stood empty, and she would tell them that",
    "a mill is only a mill while the river and the people need it, and that both had moved on.",
] * 2)
COPY_PROMPT = (f"Here is a passage:\n\n{PASSAGE}\n\nRepeat the passage exactly, but write 'stream' "
               f"instead of 'river'.\n\nPassage:\n")


def native_bin() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "native.sh")], capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()
    return Path(out[-1])


def native(bin_dir: Path, target: Path, draft: Path | None, n_max: int, args,
           prompt: str) -> tuple[int, float]:
    """Tokens decoded and seconds, as llama-speculative-simple reports them."""
    cmd = [str(bin_dir / "llama-speculative-simple"), "-m", str(target), "-p", prompt,
           "-n", str(args.tokens), "--temp", "0", "-t", str(args.threads), "--ignore-eos",
           "-c", "2048", "--spec-draft-n-max", str(n_max)]
    cmd += ["-md", str(draft), "--spec-type", "draft-simple"] if draft else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", out.stdout + out.stderr)
    if not m:
        raise SystemExit(f"llama-speculative-simple printed no speed:\n{out.stderr[-2000:]}")
    return int(m.group(1)), float(m.group(2))


def infer(target: Path, extra: list[str], args, prompt: str, ignore_eos: bool = True) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "infer"), "run", str(target), prompt, "--raw", "--temp", "0",
           "--repeat-penalty", "1", "-n", str(args.tokens), "--threads", str(args.threads),
           "--no-prompt-cache", "--ctx", "2048", "--json", *extra]
    if ignore_eos:
        cmd.append("--ignore-eos")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"infer failed: {out.stderr[-2000:]}")
    doc = json.loads(out.stdout)
    st = doc["stats"]
    return {"tps": st["decode_tps"], "tokens": st["generated_tokens"] - 1, "seconds": st["decode_s"],
            "spec": st.get("speculative"), "text": doc["text"]}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-max", default="4,8,16", help="native draft lengths to try")
    ap.add_argument("--pairs", default="gemma,smollm2-f32,smollm2-f16,lookup")
    args = ap.parse_args()
    bin_dir = native_bin()
    pairs = [("gemma", "gemma3 F32 / Q4_K_M", expand(GEMMA, "F32"), GEMMA),
             ("smollm2-f32", "smollm2 F32 / Q4_1", expand(SMOL, "F32"), SMOL),
             ("smollm2-f16", "smollm2 F16 / Q4_1", expand(SMOL, "F16"), SMOL)]
    wanted = set(args.pairs.split(","))
    n_maxes = [int(x) for x in args.n_max.split(",")]
    rows, raw = [], {}
    for key, label, target, draft in pairs:
        if key not in wanted:
            continue
        sides = ["plain", "draft", *(f"native{n}" for n in n_maxes)]
        r = {**{k: [] for k in sides}, "identical": [], "spec": []}
        for _ in range(args.reps):
            tok = {k: 0 for k in sides}
            sec = {k: 0.0 for k in sides}
            for prompt in PROMPTS:
                plain = infer(target, [], args, prompt)
                spec = infer(target, ["--draft", str(draft)], args, prompt)
                for k, res in (("plain", plain), ("draft", spec)):
                    tok[k] += res["tokens"]
                    sec[k] += res["seconds"]
                r["identical"].append(plain["text"] == spec["text"])
                r["spec"].append(spec["spec"])
                for n in n_maxes:
                    t, s_ = native(bin_dir, target, draft, n, args, prompt)
                    tok[f"native{n}"] += t
                    sec[f"native{n}"] += s_
            for k in sides:
                r[k].append(tok[k] / sec[k])
        best_n = max(n_maxes, key=lambda n: median(r[f"native{n}"]))
        nat = median(r[f"native{best_n}"])
        specs = [x for x in r["spec"] if x]
        acc = sum(x["accepted"] for x in specs) / max(1, sum(x["drafted"] for x in specs))
        offs = sum(1 for x in specs if x.get("switched_off"))
        rows.append((label, median(r["plain"]), nat, best_n, median(r["draft"]),
                     f"{sum(r['identical'])}/{len(r['identical'])}", acc,
                     f"switched off in {offs}/{len(specs)} runs" if offs else ""))
        raw[label] = r
    # Prompt lookup on a copy task.
    look = {"plain": [], "lookup": [], "identical": True}
    for _ in range(args.reps if "lookup" in wanted else 0):
        p = infer(SMOL, [], args, COPY_PROMPT, ignore_eos=False)
        q = infer(SMOL, ["--lookup"], args, COPY_PROMPT, ignore_eos=False)
        look["plain"].append(p["tps"])
        look["lookup"].append(q["tps"])
        look["identical"] &= p["text"] == q["text"]
        look["last_spec"] = q["spec"]
    raw["lookup"] = look

    print(f"\nSpeculative decoding, greedy, {len(PROMPTS)} prompts x {args.tokens} tokens, "
          f"{args.threads} threads, median of {args.reps} (infer alternating with "
          f"llama-speculative-simple)\n")
    print("| pair | infer plain t/s | native spec t/s (best n_max) | infer spec t/s | vs native | "
          "vs plain | same text | acceptance | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, plain, nat, best_n, spec, same, acc, note in rows:
        print(f"| {label} | {plain:.1f} | {nat:.1f} ({best_n}) | {spec:.1f} | {spec / nat:.2f} | "
              f"{spec / plain:.2f} | {same} | {acc:.0%} | {note} |")
    if look["plain"]:
        lp, lq = median(look["plain"]), median(look["lookup"])
        sp = look["last_spec"] or {}
        print(f"| prompt lookup, copy task (smollm2 Q4_1) | {lp:.1f} | | {lq:.1f} | | "
              f"{lq / lp:.2f} | {look['identical']} | {sp.get('acceptance', 0):.0%} | |")
    (ROOT / ".cache" / "bench_speculative.json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()
