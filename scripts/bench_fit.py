"""Accuracy of `infer fit`'s memory plan against llama.cpp's own dry run.

For SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M and two synthetic models with real shapes
(Llama-3-8B, Gemma-3-27B; sparse files, see tests/synthetic.py), over n_ctx 512/4096/32768,
KV f16/q8_0/q4_0, flash attention on/off (off: quantized K only, V stays f16 as llama.cpp
requires), n_ubatch 128/512, prints ours beside llama.cpp's numbers and the worst error per
component. With --rss, also loads the real models with mmap off and compares the process RSS
with our total.

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

from infer_cli import fit  # noqa: E402
from infer_cli.gguf_info import read_gguf  # noqa: E402

STORE = ROOT / ".cache" / "test-home" / "store"
REAL = {"smollm2": STORE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3-270m": STORE / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"}
BOUNDS = {"kv": 0.01, "compute": 0.05, "total": 0.03}


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
    for chk in fit.check(str(path), configs):
        o = chk.options
        p = fit.plan(m, cpu_only, o)
        ours = {"kv": p.cpu.kv, "compute": p.cpu.compute, "output": p.cpu.output}
        row = {"n_ctx": o.n_ctx, "kv_type": o.cache_type_k, "fa": o.flash_attn,
               "ubatch": o.n_ubatch, "ok": chk.ok, "ours": ours}
        if chk.ok:
            theirs = {"kv": chk.kv, "compute": chk.compute, "output": chk.output}
            ours["total"] = m.weights_bytes + sum(ours.values())
            theirs["total"] = m.weights_bytes + sum(v or 0 for v in theirs.values())
            row["llama"] = theirs
            row["err"] = {k: (ours[k] - theirs[k]) / theirs[k] for k in ("kv", "compute", "total")
                          if theirs.get(k)}
        else:
            row["error"] = chk.error
        rows.append(row)
    return rows


def rss_rows(configs: list[fit.Options]) -> list[dict]:
    """Real loads (mmap off, one full-ubatch decode) in a subprocess each; RSS against our total."""
    import subprocess

    out = []
    for name, path in REAL.items():
        if not path.exists():
            continue
        m = fit.facts(read_gguf(path))
        for o in configs:
            code = _RSS_CHILD.format(path=str(path), n_ctx=o.n_ctx, ub=o.n_ubatch,
                                     k=o.cache_type_k, v=o.cache_type_v, fa=o.flash_attn)
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  cwd=ROOT, timeout=300)
            try:
                r = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                out.append({"model": name, "n_ctx": o.n_ctx, "error": proc.stderr[-300:]})
                continue
            p = fit.plan(m, fit.Hardware("cpu", ram=1 << 50), o)
            out.append({"model": name, "n_ctx": o.n_ctx, "kv_type": o.cache_type_k,
                        "fa": o.flash_attn, "ubatch": o.n_ubatch, "rss": r["rss"],
                        "ours": p.cpu.total, "kv_logged": r["kv"], "compute_logged": r["compute"],
                        "err": (p.cpu.total - r["rss"]) / r["rss"]})
    return out


_RSS_CHILD = """
import json, psutil
from infer_cli import engine
o = engine.EngineOptions(n_ctx={n_ctx}, n_ubatch={ub}, cache_type_k={k!r}, cache_type_v={v!r},
                         flash_attn={fa!r}, mmap=False, gpu_layers=0, threads=2)
m = engine.Model({path!r}, o)
s = engine.Session(m, o)
s.decode(m.tokenize("hello " * 2000)[:{ub}])  # one full ubatch: the compute buffer is touched
print(json.dumps({{"rss": psutil.Process().memory_info().rss, "kv": s.kv_bytes,
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
    rss = rss_rows([fit.Options(n_ctx=n, n_ubatch=512) for n in (512, 4096)]) if args.rss else []
    if args.json:
        print(json.dumps({"table": table, "worst": worst, "rss": rss}, indent=1))
        return 0
    print(f"{'model':20} {'ctx':>6} {'kv':5} {'fa':3} {'ub':>4} | {'KV ours':>9} {'llama':>9} {'err':>7} |"
          f" {'compute':>9} {'llama':>9} {'err':>7} | {'total err':>9}   (MiB)")
    for name, rows in table.items():
        for r in rows:
            o, t, e = r["ours"], r.get("llama", {}), r.get("err", {})
            print(f"{name:20} {r['n_ctx']:>6} {r['kv_type']:5} {r['fa']:3} {r['ubatch']:>4} | "
                  f"{_mib(o['kv']):>9} {_mib(t.get('kv')):>9} {_pct(e.get('kv')):>7} | "
                  f"{_mib(o['compute']):>9} {_mib(t.get('compute')):>9} {_pct(e.get('compute')):>7} | "
                  f"{_pct(e.get('total')):>9}" + ("" if r["ok"] else f"  llama.cpp: {r.get('error')}"))
    print("\nworst |error|: " + ", ".join(f"{k} {v * 100:.2f}% (bound {BOUNDS[k] * 100:.0f}%)"
                                           for k, v in worst.items()))
    for r in rss:
        if "error" in r:
            print(f"RSS {r['model']} ctx {r['n_ctx']}: failed: {r['error']}")
        else:
            print(f"RSS {r['model']:12} ctx {r['n_ctx']:>6} ub {r['ubatch']}: process {_mib(r['rss'])} MiB, "
                  f"ours {_mib(r['ours'])} MiB, {_pct(r['err'])} (bound 10%)")
    return 0 if all(worst[k] <= BOUNDS[k] for k in BOUNDS) else 1


if __name__ == "__main__":
    sys.exit(main())
