#!/usr/bin/env python3
"""Speculative decoding benchmark: infer against llama.cpp's own llama-speculative-simple.

Pairs are made from the test models by llama.cpp's quantizer (tests/derived.py): Gemma 3 270M
F32 with its Q4_K_M as draft, SmolLM2-135M F32 with its Q4_1, and SmolLM2 F16 with Q4_1 (where
speculation should step aside); prompt lookup runs on SmolLM2 Q4_1 against llama.cpp's
ngram-simple on the copy/edit prompts. Greedy, same prompt tokens (the chat template rendered
into the text, so both sides read the same tokens), same thread count, same token count.

Three prompt sets: TUNING, which the policy's constants were chosen on; HELD_OUT, which
tuning never looked at (letters, explanations, code, lists, dialogue, copy/edit tasks); and
FRESH, written after the latest tuning and run only to measure it. Every
repetition runs every prompt of a set on every side, the sides in an order that rotates from
one repetition to the next; a side's speed in a repetition is the tokens of all prompts over
their decode time together. Figures are medians over --reps repetitions, ratios are taken per
repetition against the baseline of the same repetition; "min" is the worst repetition.

Stability: each (side, prompt) is one command run --reps times; its spread is the largest
distance of a run's decode speed from that command's median. Plain decoding's spread on the
same prompts in the same minutes is the machine's own noise, and native speculation's (at its
best draft length) what llama.cpp's fixed policy gets from it. "Same decisions" counts the
prompts whose every run made the same choices: as many rounds, drafted and accepted tokens,
and the same switches at the same tokens. Where they are the same, runs of a command differ in
speed only by the machine's noise, not by anything the policy did.

Greedy text can part at near-ties (a batch of drafts is computed in another order than single
tokens), so "same text" counts the prompts whose text equals plain decoding in every run.

    flock /tmp/infer-cpu.lock .venv/bin/python scripts/bench_speculative.py [--reps 5]
        [--tokens 256] [--threads 2] [--sets tuning,held-out,fresh,fresh-copy]
        [--pairs gemma,smollm2-f32,smollm2-f16,lookup]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.derived import expand  # noqa: E402

STORE = ROOT / ".cache" / "test-home" / "store"
SMOL = STORE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = STORE / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"

MILL = " ".join([
    "The old mill stood by the river for two hundred years, and every spring the water rose to turn",
    "its great wooden wheel. The miller ground wheat and barley for the farms of the whole valley,",
    "and on market days the carts lined up along the lane from the bridge to the church. When the",
    "railway came to the next town, the carts went there instead, and one by one the farms sold",
    "their grain to the big steam mills in the city. The wheel turned more slowly each year until,",
    "one dry summer, it stopped altogether and never moved again.",
])
HARBOUR = " ".join([
    "Every morning the fishing boats left the harbour before dawn, their lamps swaying over the dark",
    "water. By noon the first of them came back, low in the water, and the women on the quay sorted",
    "the catch into wooden crates packed with ice. The best fish went by lorry to the restaurants of",
    "the capital; the rest was sold at the market behind the lighthouse, where the gulls waited on",
    "every roof. In winter the storms kept the boats in for weeks at a time, and the men mended nets",
    "in the sheds and told the same stories they had told the winter before.",
])
RECIPE = "\n".join([
    "Pancakes (serves 4)",
    "- 200 g flour",
    "- 2 eggs",
    "- 300 ml milk",
    "- 1 pinch of salt",
    "- 20 g melted butter",
    "1. Whisk the flour, eggs and salt, then add the milk a little at a time.",
    "2. Stir in the melted butter and rest the batter for 30 minutes.",
    "3. Heat a pan, pour in a ladle of batter and cook each side for one minute.",
])

# (kind, prompt). Tuning: what the policy's constants were chosen on.
TUNING = [
    ("explanation", "The history of the printing press begins"),
    ("story", "Write a short story about a robot who learns to paint."),
    ("code", "def fibonacci(n):"),
    ("list", "The three most important causes of the French Revolution were"),
    ("copy/edit", f"Here is a passage:\n\n{MILL}\n\nRepeat the passage exactly, but write "
                  f"'stream' instead of 'river'."),
]
# Held out: never run while tuning.
HELD_OUT = [
    ("letter", "Write a letter to your landlord asking for the broken heating to be repaired "
               "before winter."),
    ("letter", "Write a short thank-you letter to a teacher who helped you learn to read."),
    ("explanation", "Explain how vaccines train the immune system, for a curious twelve-year-old."),
    ("explanation", "What is the difference between weather and climate?"),
    ("code", "Write a Python function that reads a CSV file and returns the average of every "
             "numeric column."),
    ("list", "List ten tips for keeping houseplants healthy, one line each."),
    ("dialogue", "Write a dialogue between a customer and a baker who has run out of bread."),
    ("copy/edit", f"Here is a passage:\n\n{HARBOUR}\n\nCopy the passage word for word, but "
                  f"change 'harbour' to 'port' everywhere."),
    ("copy/edit", f"Here is a recipe:\n\n{RECIPE}\n\nRewrite the recipe exactly as it is, but "
                  f"for 8 people: double every quantity."),
]
NOTICE = " ".join([
    "The library will close early on Friday, 14 March, at 3 pm, so that the heating system can",
    "be serviced. Books due that day may be returned on Saturday without a fine. The reading room",
    "on the first floor stays closed until Monday morning, and the printers will be switched off",
    "from noon on Friday.",
])
# A second held-out set, written after the policy of 2026-12-03 was tuned and never run while
# tuning it: a policy tuned on the first two sets is measured on prompts it has never met.
FRESH = [
    ("letter", "Write a letter to a neighbour apologising for the noise of last night's party."),
    ("explanation", "Explain why the sky is blue, in three short paragraphs."),
    ("explanation", "How does a bicycle stay upright when it is moving?"),
    ("code", "Write a JavaScript function that removes duplicate values from an array."),
    ("list", "Give eight ideas for a rainy Sunday afternoon with children."),
    ("dialogue", "Write a short conversation between two friends planning a camping trip."),
    ("story", "Tell a short fable about a fox and a crow who share a secret."),
    ("copy/edit", f"Here is a notice:\n\n{NOTICE}\n\nCopy the notice word for word, but change "
                  f"'Friday' to 'Thursday' everywhere."),
]
INVOICE_CODE = "\n".join([
    "def invoice_total(lines, tax_rate):",
    "    total = 0",
    "    for line in lines:",
    "        price = line['price'] * line['quantity']",
    "        if line.get('discount'):",
    "            price -= price * line['discount']",
    "        total += price",
    "    tax = total * tax_rate",
    "    return round(total + tax, 2)",
])
EMAIL = " ".join([
    "Dear Ms Patel, thank you for your order of twelve garden chairs. They will be delivered on",
    "Tuesday between 9 am and 1 pm; the driver will call you half an hour before he arrives. If",
    "nobody is at home on Tuesday, please tell us by replying to this email, and we will arrange",
    "another day. Kind regards, the Dispatch Team.",
])
# Copy/edit prompts written after prompt lookup's n-gram length was chosen (2026-12-06) and never
# run while choosing it: the fresh set has only one.
FRESH_COPY = [
    ("copy/edit", f"Here is a Python function:\n\n{INVOICE_CODE}\n\nRewrite it exactly as it is, "
                  f"but rename the variable 'total' to 'subtotal' everywhere."),
    ("copy/edit", f"Here is an email:\n\n{EMAIL}\n\nCopy the email word for word, but change "
                  f"'Tuesday' to 'Wednesday' everywhere."),
]
SETS = {"tuning": TUNING, "held-out": HELD_OUT, "fresh": FRESH, "fresh-copy": FRESH_COPY}

TEMPLATES = {  # the chat template each family's GGUF carries, for one user turn
    "gemma": "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n",
    "smollm2": "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
}


def native_bin() -> Path:
    built = ROOT / ".cache" / "native" / "src" / "build" / "bin"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "native.sh")], capture_output=True,
                         text=True)
    if out.returncode == 0:
        return Path(out.stdout.strip().splitlines()[-1])
    if (built / "llama-speculative-simple").exists():  # a build that native.sh would redo
        print(f"native.sh failed; using the tools already built in {built}", file=sys.stderr)
        return built
    raise SystemExit(f"native.sh failed:\n{out.stderr[-2000:]}")


def native(bin_dir: Path, target: Path, spec: list[str], args, prompt: str) -> dict:
    """Tokens decoded and seconds, as llama-speculative-simple reports them."""
    cmd = [str(bin_dir / "llama-speculative-simple"), "-m", str(target), "-p", prompt,
           "-n", str(args.tokens), "--temp", "0", "-t", str(args.threads), "--ignore-eos",
           "-c", "2048", *spec]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", out.stdout + out.stderr)
    if not m:
        raise SystemExit(f"llama-speculative-simple printed no speed:\n{out.stderr[-2000:]}")
    acc = re.search(r"accept\s*=\s*([\d.]+)%", out.stderr)
    return {"tokens": int(m.group(1)), "seconds": float(m.group(2)),
            "acceptance": float(acc.group(1)) / 100 if acc else None}


def infer(target: Path, extra: list[str], args, prompt: str) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "infer"), "run", str(target), prompt, "--raw", "--temp", "0",
           "--repeat-penalty", "1", "-n", str(args.tokens), "--threads", str(args.threads),
           "--no-prompt-cache", "--ctx", "2048", "--ignore-eos", "--json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"infer failed: {out.stderr[-2000:]}")
    doc = json.loads(out.stdout)
    st = doc["stats"]
    return {"tokens": st["generated_tokens"] - 1, "seconds": st["decode_s"],
            "spec": st.get("speculative"), "text": doc["text"]}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> float:
    """Largest distance of a run from the median, as a fraction of it."""
    m = median(xs)
    return max(abs(x / m - 1) for x in xs) if xs and m else float("nan")


def decisions(stats: dict | None) -> tuple:
    """What a run's policy chose: its rounds, drafted and accepted tokens, and its switches."""
    if not stats:
        return ()
    return (stats["rounds"], stats["drafted"], stats["accepted"],
            tuple((s["token"], s["to"]) for s in stats["switches"]))


def same_decisions(specs: list, n_prompts: int) -> int:
    """Prompts whose every run (``specs`` holds rep after rep, each of ``n_prompts`` runs)
    made the same decisions."""
    runs = [specs[i::n_prompts] for i in range(n_prompts)]  # each prompt's runs, rep by rep
    return sum(len({decisions(s) for s in r}) == 1 for r in runs)


def pairs(args):
    """(key, label, target, {side: command}) for every wanted pair."""
    n_max = [int(x) for x in args.n_max.split(",")]
    size_m = [int(x) for x in args.size_m.split(",")]
    out = []
    for key, label, target, draft, family in (
            ("gemma", "gemma3 F32 / Q4_K_M", lambda: expand(GEMMA, "F32"), GEMMA, "gemma"),
            ("smollm2-f32", "smollm2 F32 / Q4_1", lambda: expand(SMOL, "F32"), SMOL, "smollm2"),
            ("smollm2-f16", "smollm2 F16 / Q4_1", lambda: expand(SMOL, "F16"), SMOL, "smollm2")):
        sides = {"plain": ("infer", []), "spec": ("infer", ["--draft", str(draft)])}
        if family == "smollm2" and args.n_max_smollm2:
            n_max = [int(x) for x in args.n_max_smollm2.split(",")]
        for n in n_max:
            sides[f"native{n}"] = ("native", ["-md", str(draft), "--spec-type", "draft-simple",
                                              "--spec-draft-n-max", str(n)])
        out.append((key, label, target, family, sides, False))
    sides = {"plain": ("infer", []), "spec": ("infer", ["--lookup"])}
    for m in size_m:
        sides[f"native{m}"] = ("native", ["--spec-type", "ngram-simple",
                                          "--spec-ngram-simple-size-m", str(m)])
    out.append(("lookup", "lookup, copy/edit (smollm2 Q4_1)", lambda: SMOL, "smollm2", sides, True))
    wanted = set(args.pairs.split(","))
    return [p for p in out if p[0] in wanted]


def run_pair(bin_dir, target, family, sides, prompts, args) -> dict:
    names = list(sides)
    runs = {k: [] for k in names}             # per repetition: tokens/s over all prompts
    per_prompt = {k: [[] for _ in prompts] for k in names}  # per prompt: tokens/s per rep
    texts = [[] for _ in prompts]             # per prompt: (plain text, spec text) per rep
    specs = []
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        tok = {k: 0 for k in names}
        sec = {k: 0.0 for k in names}
        for i, (_, prompt) in enumerate(prompts):
            text = TEMPLATES[family].format(prompt)
            got = {}
            for k in order:
                how, extra = sides[k]
                got[k] = (infer(target, extra, args, text) if how == "infer"
                          else native(bin_dir, target, extra, args, text))
                tok[k] += got[k]["tokens"]
                sec[k] += got[k]["seconds"]
                per_prompt[k][i].append(got[k]["tokens"] / got[k]["seconds"])
            texts[i].append(got["plain"]["text"] == got["spec"]["text"])
            specs.append(got["spec"]["spec"])
        for k in names:
            runs[k].append(tok[k] / sec[k])
        print(f"  rep {rep + 1}: " + ", ".join(f"{k} {runs[k][-1]:.1f}" for k in names),
              file=sys.stderr, flush=True)
    return {"runs": runs, "per_prompt": per_prompt, "same": texts, "specs": specs}


def summarize(label, r, n_prompts) -> dict:
    runs = r["runs"]
    natives = [k for k in runs if k.startswith("native")]
    best = max(natives, key=lambda k: median(runs[k]))
    vs_native = [s / n for s, n in zip(runs["spec"], runs[best])]
    vs_plain = [s / p for s, p in zip(runs["spec"], runs["plain"])]
    specs = [x for x in r["specs"] if x]
    offs = sum(1 for x in specs if any(s["to"] == "off" for s in x["switches"]))
    ons = sum(1 for x in specs if any(s["to"] == "on" for s in x["switches"]))
    rechecked = sum(1 for x in specs if x.get("rechecks"))
    spec_spread = [spread(xs) for xs in r["per_prompt"]["spec"]]
    plain_spread = [spread(xs) for xs in r["per_prompt"]["plain"]]
    native_spread = [spread(xs) for xs in r["per_prompt"][best]]
    return {
        "label": label, "plain": median(runs["plain"]), "native": median(runs[best]),
        "best": best[len("native"):], "spec": median(runs["spec"]),
        "vs_native": median(vs_native), "vs_native_min": min(vs_native),
        "vs_plain": median(vs_plain), "vs_plain_min": min(vs_plain),
        "same": f"{sum(all(x) for x in r['same'])}/{n_prompts}",
        "decisions": f"{same_decisions(r['specs'], n_prompts)}/{n_prompts}",
        "acceptance": sum(x["accepted"] for x in specs) / max(1, sum(x["drafted"] for x in specs)),
        "offs": f"{offs}/{len(specs)}", "ons": f"{ons}/{len(specs)}",
        "rechecked": f"{rechecked}/{len(specs)}",
        "spread": max(spec_spread), "within8": f"{sum(s <= 0.08 for s in spec_spread)}/{n_prompts}",
        "plain_spread": max(plain_spread),
        "plain_within8": f"{sum(s <= 0.08 for s in plain_spread)}/{n_prompts}",
        "native_spread": max(native_spread),
        "native_within8": f"{sum(s <= 0.08 for s in native_spread)}/{n_prompts}",
    }


HEADER = ("| pair | plain t/s | native t/s (best n) | infer spec t/s | vs native (min) | "
          "vs plain (min) | same text as plain | acceptance | off / back on (runs) | "
          "cost re-checked (runs) | same decisions | spec spread, within 8% | "
          "plain spread, within 8% | native spread, within 8% |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(s: dict) -> str:
    return (f"| {s['label']} | {s['plain']:.1f} | {s['native']:.1f} ({s['best']}) | "
            f"{s['spec']:.1f} | {s['vs_native']:.2f} ({s['vs_native_min']:.2f}) | "
            f"{s['vs_plain']:.2f} ({s['vs_plain_min']:.2f}) | {s['same']} | "
            f"{s['acceptance']:.0%} | {s['offs']} / {s['ons']} | {s['rechecked']} | "
            f"{s['decisions']} | "
            f"{s['spread']:.1%}, {s['within8']} | {s['plain_spread']:.1%}, "
            f"{s['plain_within8']} | {s['native_spread']:.1%}, {s['native_within8']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-max", default="8,16", help="native draft lengths to try")
    ap.add_argument("--n-max-smollm2", default=None, help="the same for the SmolLM2 pairs "
                    "(default: --n-max)")
    ap.add_argument("--size-m", default="16,48", help="native ngram-simple draft lengths to try")
    ap.add_argument("--pairs", default="gemma,smollm2-f32,smollm2-f16,lookup")
    ap.add_argument("--sets", default="tuning,held-out")
    ap.add_argument("--prompts", type=int, default=0, help="only the first N of each set (0: all)")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "bench_speculative.json"),
                    help="the tables and every run, rewritten after each pair")
    args = ap.parse_args()
    bin_dir = native_bin()
    raw, tables = {}, {}
    out = Path(args.out)
    t0 = time.time()
    for set_name in args.sets.split(","):
        rows = tables.setdefault(set_name, [])
        for key, label, target, family, sides, copy_only in pairs(args):
            prompts = [p for p in SETS[set_name] if p[0] == "copy/edit" or not copy_only]
            if args.prompts:
                prompts = prompts[:args.prompts]
            print(f"{set_name}: {label}, {len(prompts)} prompts", file=sys.stderr, flush=True)
            r = run_pair(bin_dir, target(), family, sides, prompts, args)
            raw[f"{set_name}: {label}"] = r
            rows.append(summarize(label, r, len(prompts)))
            # A long run cut short keeps every pair it finished: the row now, the file as it is.
            print(HEADER + "\n" + row(rows[-1]), file=sys.stderr, flush=True)
            out.write_text(json.dumps({"tables": tables, "raw": raw}, indent=1, default=str))
    print(f"\nSpeculative decoding, greedy, {args.tokens} tokens a prompt, {args.threads} threads, "
          f"median of {args.reps} repetitions ({time.time() - t0:.0f} s), infer alternating with "
          f"llama-speculative-simple\n")
    for set_name, rows in tables.items():
        print(f"{set_name} ({len(SETS[set_name])} prompts; lookup on its copy/edit ones)\n")
        print(HEADER)
        for s in rows:
            print(row(s))
        print()


if __name__ == "__main__":
    main()
