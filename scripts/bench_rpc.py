#!/usr/bin/env python3
"""A model split over two RPC workers on 127.0.0.1: same text, decode speed, planned sizes.

Two `infer worker` processes (llama.cpp's RPC server, in-process) serve loopback ports. For
SmolLM2-135M Q4_1 and Gemma 3 270M Q4_K_M, each repetition runs, in a rotating order:

- infer, all local: `infer run MODEL PROMPT --temp 0 -n N --json`;
- infer over the workers: the same with `--rpc A,B --tensor-split 1,1` (every layer on the
  workers, half each; the engine in its child process, as `infer run --rpc` always runs);
- llama.cpp's own client over the same workers: `llama-completion --rpc A,B -ts 1,1 -ngl 99`
  (from scripts/native.sh, built with GGML_RPC from the vendored llama.cpp).

Greedy text through the workers must equal the local text, and that of a local run with
`--no-repack` (the file's weight layout, which a worker computes with: where the local CPU
backend repacks a type, Q4_K for one, its kernels round otherwise). Decode speeds are medians over
--reps; "vs native" is infer --rpc over llama-completion --rpc (the goal: >= 0.95), "vs local"
what the RPC path costs against the all-local run. Last, the per-device weights and KV that
`plan.rpc_fit` predicts are compared with the buffer sizes llama.cpp logs when it loads the
model over the workers (goal: within 2%).

    flock /tmp/infer-cpu.lock .venv/bin/python scripts/bench_rpc.py [--reps 3] [--tokens 128]
        [--threads 1] [--models smollm2,gemma3[,gemma3-f32]]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.derived import expand  # noqa: E402

STORE = ROOT / ".cache" / "test-home" / "store"
GEMMA = STORE / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
# name: (file, the precision it is expanded to first, or None). F32 weights are not repacked by
# the local CPU backend, so a worker and the local run compute with the same kernels.
MODELS = {"smollm2": (STORE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf", None),
          "gemma3": (GEMMA, None),
          "gemma3-f32": (GEMMA, "F32")}
PROMPT = ("The old mill stood by the river for two hundred years, and every spring the water rose "
          "to turn its great wooden wheel. Tell the rest of its story.")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(port: int, threads: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "infer_cli", "worker", "--port", str(port),
                             "--threads", str(threads)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the worker on port {port} did not start")


def infer_run(model: Path, args, rpc: str | None, *, repack: bool = True) -> dict:
    cmd = [sys.executable, "-m", "infer_cli", "run", str(model), PROMPT, "--raw", "--temp", "0",
           "-n", str(args.tokens), "--ignore-eos", "--threads", str(args.threads), "--json",
           "--no-prompt-cache", "--ctx", "1024"]
    if rpc:
        cmd += ["--rpc", rpc, "--tensor-split", "1,1"]
    if not repack:
        cmd += ["--no-repack"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"infer run failed ({p.returncode}): {p.stderr[-1500:]}")
    doc = json.loads(p.stdout)
    return {"text": doc["text"], "tps": doc["stats"]["decode_tps"], "n": doc["stats"]["generated_tokens"]}


_EVAL = re.compile(r"\beval time =\s*([\d.]+) ms /\s*(\d+) (?:runs|tokens)")


def native_run(bin_dir: Path, model: Path, args, rpc: str) -> dict:
    cmd = [str(bin_dir / "llama-completion"), "-m", str(model), "-p", PROMPT, "-n", str(args.tokens),
           "--temp", "0", "--ignore-eos", "-t", str(args.threads), "-c", "1024", "--rpc", rpc,
           "-ngl", "99", "-ts", "1,1", "-no-cnv", "--no-warmup"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    m = None
    for m in _EVAL.finditer(p.stderr):
        pass
    if p.returncode != 0 or m is None:
        raise SystemExit(f"llama-completion failed ({p.returncode}): {p.stderr[-1500:]}")
    ms, n = float(m.group(1)), int(m.group(2))
    return {"tps": n / (ms / 1000), "n": n}


_SIZES = r"""
import json, sys
from infer_cli.engine import llama_log
from infer_cli.engine.model import Model
from infer_cli.engine.context import Context
from infer_cli.options import Options
from infer_cli.engine.runner import read_header, settle
from infer_cli.models.gguf_info import read_gguf
path, rpc = sys.argv[1], tuple(sys.argv[2].split(","))
llama_log.install()
info = read_gguf(path)
opts = settle(Options(n_ctx=1024, rpc=rpc, tensor_split=(1.0, 1.0), threads=1), info)
mark = llama_log.mark()
m = Model(path, opts, info=info)
c = Context(m, opts)
print(json.dumps(llama_log.since(mark)))
"""


def logged_sizes(model: Path, rpc: str) -> dict[str, dict[str, float]]:
    """llama.cpp's 'model buffer size' and 'KV buffer size' lines of each worker, MiB by endpoint."""
    p = subprocess.run([sys.executable, "-c", _SIZES, str(model), rpc], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"the sizes run failed: {p.stderr[-1500:]}")
    out: dict[str, dict[str, float]] = {}
    for ln in json.loads(p.stdout.strip().splitlines()[-1]):
        # 'RPC0[127.0.0.1:50052] model buffer size = 33.82 MiB' (the worker's own device index)
        m = re.search(r"RPC\d+\[([^\]]+)\]\s+(model|KV) buffer size =\s*([\d.]+) MiB", ln)
        if m:
            out.setdefault(m.group(1), {}).setdefault(m.group(2), 0.0)
            out[m.group(1)][m.group(2)] += float(m.group(3))
    return out


def planned_sizes(model: Path, rpc: str) -> dict[str, dict[str, float]]:
    from infer_cli.engine import rpc as rpcmod
    from infer_cli.models.gguf_info import read_gguf
    from infer_cli.options import Options
    from infer_cli.plan import hardware, rpc_fit

    devices = rpc_fit.devices_of(rpcmod.probe_all(rpc))
    p = rpc_fit.plan(read_gguf(str(model)), devices, hardware.detect(llama=False).hardware(),
                     Options(n_ctx=1024, rpc=tuple(rpc.split(",")), tensor_split=(1.0, 1.0)))
    mib = 1 << 20
    return {d.device.endpoint: {"model": d.memory.weights / mib, "KV": d.memory.kv / mib} for d in p.devices}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="threads of each worker and of the client")
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--native-bin", help="folder with llama-completion (default: scripts/native.sh)")
    args = ap.parse_args()

    bin_dir = Path(args.native_bin) if args.native_bin else None
    if bin_dir is None:
        p = subprocess.run(["bash", str(ROOT / "scripts" / "native.sh")], stdout=subprocess.PIPE, text=True)
        bin_dir = Path(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else None
    have_native = bin_dir is not None and (bin_dir / "llama-completion").exists()
    ports = [free_port(), free_port()]
    workers = [start_worker(p, args.threads) for p in ports]
    rpc = ",".join(f"127.0.0.1:{p}" for p in ports)
    results = {}
    try:
        for name in args.models.split(","):
            model, ftype = MODELS[name]
            if ftype:
                model = expand(model, ftype)
            sides = ["local", "rpc"] + (["native"] if have_native else [])
            speeds: dict[str, list[float]] = {s: [] for s in sides}
            texts: dict[str, list[str]] = {"local": [], "rpc": []}
            for rep in range(args.reps):
                order = sides[rep % len(sides):] + sides[:rep % len(sides)]
                for side in order:
                    if side == "native":
                        r = native_run(bin_dir, model, args, rpc)
                    else:
                        r = infer_run(model, args, rpc if side == "rpc" else None)
                        texts[side].append(r["text"])
                    speeds[side].append(r["tps"])
                    log(f"{name} rep {rep + 1} {side}: {r['tps']:.1f} tokens/s")
            med = {s: statistics.median(v) for s, v in speeds.items()}
            same = all(t == texts["local"][0] for t in texts["local"] + texts["rpc"])
            # The same kernels: a worker computes with the file's layout, which the local CPU
            # backend keeps only with --no-repack (else it repacks Q4_K and others, other rounding)
            plain = infer_run(model, args, None, repack=False)["text"]
            same_kernels = all(t == plain for t in texts["rpc"])
            planned, logged = planned_sizes(model, rpc), logged_sizes(model, rpc)
            errs = {}
            for dev, kinds in planned.items():
                for kind, value in kinds.items():
                    got = logged.get(dev, {}).get(kind)
                    errs[f"{dev} {kind}"] = (value, got, None if not got else (value - got) / got)
            results[name] = {"median_tps": med, "same_text": same,
                             "same_text_as_local_no_repack": same_kernels,
                             "vs_native": med["rpc"] / med["native"] if "native" in med else None,
                             "vs_local": med["rpc"] / med["local"], "sizes_mib": errs}
    finally:
        for w in workers:
            w.terminate()
            w.wait(timeout=10)
    print(json.dumps(results, indent=2))
    for name, r in results.items():
        m = r["median_tps"]
        line = (f"{name}: local {m['local']:.1f}, rpc {m['rpc']:.1f}"
                + (f", native rpc {m['native']:.1f}" if "native" in m else "") + " tokens/s; "
                + (f"rpc/native {r['vs_native']:.3f}, " if r["vs_native"] else "")
                + f"rpc/local {r['vs_local']:.3f}; same text: {r['same_text']} "
                + f"(as local --no-repack: {r['same_text_as_local_no_repack']})")
        log(line)
        for key, (plan, got, err) in r["sizes_mib"].items():
            log(f"  {key}: planned {plan:.2f} MiB, llama.cpp {got if got is None else f'{got:.2f}'} MiB"
                + (f" ({err:+.2%})" if err is not None else ""))


if __name__ == "__main__":
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    main()
