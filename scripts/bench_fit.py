"""Accuracy of `infer fit`'s memory plan against llama.cpp's own dry run.

For SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M and two synthetic models with real shapes
(Llama-3-8B, Gemma-3-27B; sparse files, see tests/synthetic.py), over n_ctx 512/4096/32768,
KV f16/q8_0/q4_0, flash attention on/off (off: quantized K only, V stays f16 as llama.cpp
requires), n_ubatch 128/512, prints ours beside llama.cpp's numbers and the worst error per
component, "decode" being the compute buffer reserved for one output per ubatch (what ordinary
generation writes, ``fit.decode_compute_bytes``). With --rss, also loads the two real models
with mmap off (n_ctx 512/4096, n_ubatch 512/128, KV f16/q8_0), fills the context (the prompt in
ubatches, then a few generated tokens) and compares the process RSS with our allocated total and
with our resident estimate.

    .venv/bin/python scripts/bench_fit.py [--rss] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from infer_cli.plan import fit
from infer_cli.models.gguf_info import read_gguf  # noqa: E402

STORE = ROOT / ".cache" / "test-home" / "store"
REAL = {"smollm2": STORE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3-270m": STORE / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"}
BOUNDS = {"kv": 0.01, "compute": 0.05, "total": 0.03, "decode": 0.15}
RSS_BOUND = 0.10  # issue 4: RSS after loading with mmap off within 10% of our figure


def grid() -> list[fit.Options]:
    out = []
    for n_ctx, kv, fa, ub in itertools.product((512, 4096, 32768), ("f16", "q8_0", "q4_0"),
                                                ("on", "off"), (128, 512)):
        out.append(fit.Options(n_ctx=n_ctx, n_ubatch=ub, cache_type_k=kv,
                               cache_type_v=kv if fa == "on" else "f16", flash_attn=fa))
    return out


def models(synthetic_dir: Path) -> dict[str, Path]:
    from tests import synthetic

    found = {k: v for k, v in REAL.items() if v.exists()}
    synthetic_dir.mkdir(parents=True, exist_ok=True)
    for shape in synthetic.SHAPES.values():
        found[shape.name] = synthetic.write(shape, synthetic_dir / f"{shape.name}.gguf")
    return found


def compare(path: Path, configs: list[fit.Options]) -> list[dict]:
    """One row per config: ours and llama.cpp's KV, compute, output, total (+ weights)."""
    info = read_gguf(path)
    m = fit.facts(info)
    cpu_only = fit.Hardware("cpu", ram=1 << 50)
    rows = []
    for chk in fit.check(str(path), configs, decode=True):
        o = chk.options
        p = fit.plan(m, cpu_only, o)
        ours = {"kv": p.cpu.kv, "compute": p.cpu.compute, "output": p.cpu.output}
        decode = fit.decode_compute_bytes(m, o)
        row = {"n_ctx": o.n_ctx, "kv_type": o.cache_type_k, "fa": o.flash_attn,
               "ubatch": o.n_ubatch, "ok": chk.ok, "ours": ours}
        if chk.ok:
            theirs = {"kv": chk.kv, "compute": chk.compute, "output": chk.output}
            ours["total"] = m.weights_bytes + sum(ours.values())
            theirs["total"] = m.weights_bytes + sum(v or 0 for v in theirs.values())
            row["llama"] = theirs
            row["err"] = {k: (ours[k] - theirs[k]) / theirs[k] for k in ("kv", "compute", "total")
                          if theirs.get(k)}
            row["decode"] = {"ours": decode, "llama": chk.compute_decode}
            if chk.compute_decode:
                row["err"]["decode"] = (decode - chk.compute_decode) / chk.compute_decode
        else:
            row["error"] = chk.error
        rows.append(row)
    return rows


def rss_configs() -> list[fit.Options]:
    return [fit.Options(n_ctx=n, n_ubatch=ub, cache_type_k=kv, cache_type_v=kv, mmap=False)
            for n, ub, kv in itertools.product((512, 4096), (512, 128), ("f16", "q8_0"))]


def rss_run(path: Path, o: fit.Options, *, timeout: float = 300) -> dict:
    """One real load in a subprocess (``_RSS_CHILD``): its RSS before the model, after the
    context, and with the context full; llama.cpp's logged KV and compute buffers."""
    import subprocess

    code = _RSS_CHILD.format(path=str(path), n_ctx=o.n_ctx, ub=o.n_ubatch, k=o.cache_type_k,
                             v=o.cache_type_v, fa=o.flash_attn)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}


def rss_rows(configs: list[fit.Options]) -> list[dict]:
    """Real loads (mmap off, context filled) in a subprocess each: RSS against our allocated
    total and our resident estimate (fit.Memory.total / .resident of the CPU)."""
    out = []
    for name, path in REAL.items():
        if not path.exists():
            continue
        m = fit.facts(read_gguf(path))
        for o in configs:
            row = {"model": name, "n_ctx": o.n_ctx, "kv_type": o.cache_type_k, "fa": o.flash_attn,
                   "ubatch": o.n_ubatch}
            r = rss_run(path, o)
            if "error" in r:
                out.append({**row, "error": r["error"]})
                continue
            p = fit.plan(m, fit.Hardware("cpu", ram=1 << 50), o)
            out.append({**row, **r, "total": p.cpu.total, "resident": p.cpu.resident,
                        "kv_ours": p.cpu.kv, "runtime_ours": fit.RUNTIME_RSS,
                        "err_total": (p.cpu.total - r["rss"]) / r["rss"],
                        "err_resident": (p.cpu.resident - r["rss"]) / r["rss"]})
    return out


# The child: the runtime as `infer run` has it (engine, llama_cpp, numpy; psutil to measure),
# RSS before the model (the basis of fit.RUNTIME_RSS), then the model with mmap off and a context
# filled as in ordinary generation: the prompt in ubatches of n_ubatch tokens with the logits of
# the last one, then tokens one at a time up to n_ctx. llama.cpp zeroes its KV buffer when it
# makes the context, so every KV cell is resident from then on, written or not: filling changes
# only which compute pages are touched (a full context makes the attention masks n_ctx wide).
_RSS_CHILD = """
import json, psutil
import llama_cpp  # engine.Model imports it: part of the runtime measured below
from infer_cli import engine
proc = psutil.Process()
runtime = proc.memory_info().rss
o = engine.Options(n_ctx={n_ctx}, n_ubatch={ub}, cache_type_k={k!r}, cache_type_v={v!r},
                         flash_attn={fa!r}, mmap=False, gpu_layers=0, threads=2)
m = engine.Model({path!r}, o)
s = engine.Session(m, o)
context = proc.memory_info().rss
text = m.tokenize("The quick brown fox jumps over the lazy dog, then rests in the shade. " * 64)
n_gen = 8
prompt = (text * (s.n_ctx // len(text) + 1))[:s.n_ctx - n_gen]
s.decode(prompt)
for t in prompt[:n_gen]:
    s.decode_one(t)
print(json.dumps({{"runtime": runtime, "context": context, "rss": proc.memory_info().rss,
                   "n_tokens": len(s.tokens), "n_ctx": s.n_ctx, "kv": s.kv_bytes,
                   "compute": s.compute_bytes}}))
"""


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:+.2f}%"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rss", action="store_true", help="also compare process RSS on real loads")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--synthetic-dir", default=str(ROOT / ".cache" / "synthetic"))
    args = ap.parse_args()
    configs = grid()
    table = {name: compare(path, configs) for name, path in models(Path(args.synthetic_dir)).items()}
    worst = {k: 0.0 for k in BOUNDS}
    for rows in table.values():
        for r in rows:
            for k, e in r.get("err", {}).items():
                worst[k] = max(worst[k], abs(e))
    rss = rss_rows(rss_configs()) if args.rss else []
    rss_ok = all("error" not in r and abs(r["err_resident"]) <= RSS_BOUND for r in rss)
    ok = all(worst[k] <= BOUNDS[k] for k in BOUNDS) and rss_ok
    if args.json:
        print(json.dumps({"table": table, "worst": worst, "rss": rss}, indent=1))
        return 0 if ok else 1
    print(f"{'model':20} {'ctx':>6} {'kv':5} {'fa':3} {'ub':>4} | {'KV ours':>9} {'llama':>9} {'err':>7} |"
          f" {'compute':>9} {'llama':>9} {'err':>7} | {'total err':>9} | {'decode':>8} {'llama':>8} {'err':>7}"
          "   (MiB)")
    for name, rows in table.items():
        for r in rows:
            o, t, e, d = r["ours"], r.get("llama", {}), r.get("err", {}), r.get("decode", {})
            print(f"{name:20} {r['n_ctx']:>6} {r['kv_type']:5} {r['fa']:3} {r['ubatch']:>4} | "
                  f"{_mib(o['kv']):>9} {_mib(t.get('kv')):>9} {_pct(e.get('kv')):>7} | "
                  f"{_mib(o['compute']):>9} {_mib(t.get('compute')):>9} {_pct(e.get('compute')):>7} | "
                  f"{_pct(e.get('total')):>9} | {_mib(d.get('ours')):>8} {_mib(d.get('llama')):>8} "
                  f"{_pct(e.get('decode')):>7}" + ("" if r["ok"] else f"  llama.cpp: {r.get('error')}"))
    print("\nworst |error|: " + ", ".join(f"{k} {v * 100:.2f}% (bound {BOUNDS[k] * 100:.0f}%)"
                                           for k, v in worst.items()))
    if rss:
        print(f"\nRSS with the context full (mmap off, 2 threads), MiB; 'runtime' is the RSS before the "
              f"model (fit.RUNTIME_RSS = {_mib(fit.RUNTIME_RSS)})")
        print(f"{'model':12} {'ctx':>5} {'ub':>4} {'kv':5} | {'runtime':>7} {'RSS':>8} | {'total':>8} {'err':>8} |"
              f" {'resident':>8} {'err':>7}")
    for r in rss:
        head = f"{r['model']:12} {r['n_ctx']:>5} {r['ubatch']:>4} {r['kv_type']:5} |"
        if "error" in r:
            print(f"{head} failed: {r['error']}")
            continue
        print(f"{head} {_mib(r['runtime']):>7} {_mib(r['rss']):>8} | {_mib(r['total']):>8} "
              f"{_pct(r['err_total']):>8} | {_mib(r['resident']):>8} {_pct(r['err_resident']):>7}")
    if rss:
        print(f"worst |RSS error|: resident {max(abs(r.get('err_resident', 1)) for r in rss) * 100:.2f}% "
              f"(bound {RSS_BOUND * 100:.0f}%), allocated total "
              f"{max(abs(r.get('err_total', 1)) for r in rss) * 100:.2f}% (no bound: the worst case)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
