"""fit.plan's per-device prediction against what a CUDA llama.cpp really allocates.

    python3 .gpu/measure.py --out DIR [--deadline EPOCH] [--models DIR] [--cases a,b,...]

For each case: a child process loads the synthetic model with real allocation (mmap on, the
given n_gpu_layers), builds a context, decodes one full ubatch and then one token, and reports
llama.cpp's buffer lines plus the device-wide used memory (nvidia-smi, cudaMemGetInfo) at each
step. The parent computes fit.plan for the same options and writes results.json + table.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(HERE / "py"))

MIB = 1 << 20

# name -> (shape, n_gpu_layers, n_ctx, extra options)
CASES = {
    "llama8b-ngl12": ("llama3-8b-shaped", 12, 4096, {}),
    "gemma27b-ngl20": ("gemma3-27b-shaped", 20, 4096, {}),
    "llama8b-ngl0": ("llama3-8b-shaped", 0, 4096, {}),
    "llama8b-ngl33": ("llama3-8b-shaped", 33, 4096, {}),
    "llama8b-ngl12-ctx32k": ("llama3-8b-shaped", 12, 32768, {}),
    "llama8b-ngl12-fa-off": ("llama3-8b-shaped", 12, 4096, {"flash_attn": "off"}),
    # only the output layer on the GPU, a long context: checks the K/V copy of a CPU layer
    # next to the attention activations (predicted peak 368 MiB against 258.5 for the logits)
    "llama8b-ngl1-ctx64k": ("llama3-8b-shaped", 1, 65536, {}),
    "dry": ("llama3-8b-shaped", 12, 256, {"n_batch": 4, "n_ubatch": 4}),  # CPU dry run only
}
DEFAULT_CASES = [c for c in CASES if c != "dry"]

BUF = re.compile(r"^\s*(\w+):\s+(\S+)\s+(model|KV|compute|output)\s+buffer size\s*=\s*([\d.]+) MiB")


# ----------------------------------------------------------------------------------------------
# device memory probes (no CUDA context in the parent)


def smi_used() -> int | None:
    """Device-wide used memory from nvidia-smi, bytes (None without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return int(out[0].split(",")[0]) * MIB
    except Exception:
        return None


def smi_proc(pid: int) -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        for ln in out.splitlines():
            p, used = [x.strip() for x in ln.split(",")[:2]]
            if p == str(pid):
                return int(used) * MIB
    except Exception:
        pass
    return None


_cudart = None


def cuda_used() -> tuple[int, int] | None:
    """(used, total) from cudaMemGetInfo through the cudart ggml-cuda already loaded."""
    global _cudart
    try:
        if _cudart is None:
            for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
                try:
                    _cudart = ctypes.CDLL(name)
                    break
                except OSError:
                    continue
        if _cudart is None:
            return None
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        if _cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
            return None
        return total.value - free.value, total.value
    except Exception:
        return None


def rss() -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------------------------
# the child: one real load


def child(spec: dict) -> None:
    t0 = time.time()
    snaps = {"start": {"smi": smi_used(), "rss": rss()}}
    import llama_cpp as L

    from infer_cli.engine import llama_log
    from infer_cli.engine import FLASH_ATTN, KV_TYPES

    llama_log.install()
    L.llama_backend_init()

    def snap(name: str) -> None:
        snaps[name] = {"smi": smi_used(), "smi_proc": smi_proc(os.getpid()), "cuda": cuda_used(),
                       "rss": rss(), "t": round(time.time() - t0, 2)}

    p = L.llama_model_default_params()
    p.n_gpu_layers = spec["gpu_layers"]
    p.use_mmap = True
    mark = llama_log.mark()
    model = L.llama_model_load_from_file(spec["path"].encode(), p)
    if not model:
        print(json.dumps({"ok": False, "error": llama_log.last_error(mark), "log": llama_log.since(0)}), flush=True)
        return
    snap("model")
    o = spec["options"]
    c = L.llama_context_default_params()
    c.n_ctx, c.n_batch, c.n_ubatch = o["n_ctx"], o["n_batch"], o["n_ubatch"]
    c.type_k, c.type_v = KV_TYPES[o["cache_type_k"]], KV_TYPES[o["cache_type_v"]]
    c.flash_attn_type = FLASH_ATTN[o["flash_attn"]]
    c.swa_full = o["swa_full"]
    c.n_threads = c.n_threads_batch = spec.get("threads", 8)
    ctx = L.llama_init_from_model(model, c)
    if not ctx:
        print(json.dumps({"ok": False, "error": llama_log.last_error(mark), "log": llama_log.since(0),
                          "snaps": snaps}), flush=True)
        return
    snap("context")
    decodes = {}
    if spec.get("decode", True):
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        ub = min(o["n_ubatch"], o["n_ctx"])
        for name, n in (("decode_ubatch", ub), ("decode_1", 1)):
            batch = L.llama_batch_init(n, 0, 1)
            start = 0 if name == "decode_ubatch" else ub
            for i in range(n):
                batch.token[i] = 3 + (start + i) % (n_vocab - 3)
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if i == n - 1 else 0
            batch.n_tokens = n
            t = time.time()
            rc = L.llama_decode(ctx, batch)
            decodes[name] = {"rc": rc, "s": round(time.time() - t, 3)}
            L.llama_batch_free(batch)
            snap(name)
    log = llama_log.since(0)
    print(json.dumps({"ok": True, "log": log, "snaps": snaps, "decodes": decodes}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip teardown: nothing more to measure


# ----------------------------------------------------------------------------------------------
# the parent


def parse_buffers(log: list[str]) -> dict[str, dict[str, int]]:
    """{kind: {buffer name: bytes}} from llama.cpp's 'X <kind> buffer size = N MiB' lines."""
    out: dict[str, dict[str, int]] = {}
    for ln in log:
        m = BUF.match(ln)
        if m:
            kind, name = m.group(3).lower(), m.group(2)
            out.setdefault(kind, {})
            out[kind][name] = out[kind].get(name, 0) + int(round(float(m.group(4)) * MIB))
    return out


def is_gpu(name: str) -> bool:
    return name.startswith("CUDA") and not name.startswith("CUDA_Host")


def by_device(bufs: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    dev = {"cpu": {}, "gpu": {}}
    for kind, names in bufs.items():
        key = {"model": "weights", "kv": "kv"}.get(kind, kind)
        for name, b in names.items():
            d = dev["gpu" if is_gpu(name) else "cpu"]
            d[key] = d.get(key, 0) + b
    return dev


def gpu_probe() -> dict:
    """Total/free VRAM through torch in a throwaway process (keeps the parent context-free)."""
    code = ("import json,torch\nf,t=torch.cuda.mem_get_info()\n"
            "print(json.dumps({'free':f,'total':t,'name':torch.cuda.get_device_name(0)}))")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
        return json.loads(r.stdout.strip().splitlines()[-1])
    except Exception as e:
        return {"error": repr(e)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="/tmp/gguf")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES))
    ap.add_argument("--deadline", type=float, default=time.time() + 400)
    ap.add_argument("--vram", type=int, default=0, help="override (CPU dry run)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--child", default=None)
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--probe-only", default=None, help="write gpu_probe()'s JSON here and exit")
    ap.add_argument("--probe-file", default=None, help="use this probe JSON when present")
    a = ap.parse_args()
    if a.probe_only:
        Path(a.probe_only).write_text(json.dumps(gpu_probe()))
        return
    if a.child:
        child(json.loads(a.child))
        return

    import psutil

    from infer_cli.plan import fit
    from infer_cli.models.gguf_info import read_gguf
    from tests import synthetic

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    models = Path(a.models)
    models.mkdir(parents=True, exist_ok=True)
    names = [c for c in a.cases.split(",") if c]
    shapes = []
    for n in names:
        if CASES[n][0] not in shapes:
            shapes.append(CASES[n][0])
    for s in shapes:
        t = time.time()
        synthetic.write(synthetic.SHAPES[s], models / f"{s}.gguf")
        print(f"[measure] wrote {s} in {time.time() - t:.1f}s", flush=True)
    if a.write_only:
        return

    if a.vram:
        probe = {"total": a.vram, "free": a.vram, "name": "override"}
    elif a.probe_file and Path(a.probe_file).exists() and "total" in json.loads(Path(a.probe_file).read_text()):
        probe = json.loads(Path(a.probe_file).read_text())
    else:
        probe = gpu_probe()
    print(f"[measure] gpu probe: {probe}", flush=True)
    vram = int(probe.get("total") or 0)
    hw = fit.Hardware(probe.get("name", "gpu"), ram=psutil.virtual_memory().total, vram=vram, backend="cuda")
    results = []
    for name in names:
        shape, ngl, n_ctx, extra = CASES[name]
        left = a.deadline - time.time()
        if left < 25:
            print(f"[measure] skip {name}: {left:.0f}s left", flush=True)
            results.append({"case": name, "skipped": f"{left:.0f}s left"})
            continue
        path = models / f"{shape}.gguf"
        opts = fit.Options(n_ctx=n_ctx, gpu_layers=ngl, **extra)
        info = read_gguf(path)
        p = fit.plan(info, hw, opts)
        spec = {"path": str(path), "gpu_layers": ngl, "options": {**fit.asdict(opts)},
                "decode": not a.no_decode, "threads": a.threads}
        t = time.time()
        try:
            r = subprocess.run([sys.executable, __file__, "--out", a.out, "--child", json.dumps(spec)],
                               capture_output=True, text=True, timeout=max(10, left - 10),
                               env={**os.environ, "INFER_DEBUG": "1"})
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"ok": False, "error": f"rc {r.returncode}: "
                                                       + "\n".join(r.stderr.strip().splitlines()[-80:])}
        except subprocess.TimeoutExpired as e:
            res = {"ok": False, "error": f"timeout after {time.time() - t:.0f}s",
                   "stderr": (e.stderr or b"")[-3000:].decode("utf-8", "replace") if isinstance(e.stderr, bytes) else str(e.stderr)[-3000:]}
        wall = time.time() - t
        log = res.get("log", [])
        bufs = parse_buffers(log)
        theirs = by_device(bufs)
        row = {"case": name, "shape": shape, "gpu_layers": ngl, "n_layer": p.n_layer, "n_ctx": n_ctx,
               "options": fit.asdict(opts), "wall_s": round(wall, 1), "ok": res.get("ok"),
               "error": res.get("error"), "plan": p.as_dict(), "llama_buffers": bufs, "llama_by_device": theirs,
               "snaps": res.get("snaps"), "decodes": res.get("decodes"),
               "log_interesting": [ln for ln in log if "assigned to device" not in ln and ": dev = " not in ln and any(k in ln for k in (
                   "buffer size", "llama_kv_cache", "flash_attn", "Flash", "offload", "graph", "n_ctx",
                   "n_ubatch", "n_batch", "swa", "CUDA", "device", "failed", "error", "pipeline",
                   "fitting", "reserve", "memory"))][:200]}
        results.append(row)
        with open(out / "llama_logs.txt", "a") as f:
            f.write(f"===== {name} =====\n" + "\n".join(log) + "\n" + str(res.get("error") or "") + "\n"
                    + str(res.get("stderr") or "") + "\n")
        print(f"[measure] {name}: ok={res.get('ok')} wall={wall:.1f}s err={res.get('error')}", flush=True)
        print(table_one(row), flush=True)
        (out / "results.json").write_text(json.dumps({"gpu": probe, "results": results}, indent=1))
    md = "\n\n".join(table_one(r) for r in results if "plan" in r)
    (out / "table.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"gpu": probe, "results": results}, indent=1))


def _err(ours: int, theirs: int | None) -> str:
    if theirs is None:
        return "n/a"
    if theirs == 0:
        return "0" if ours == 0 else "inf"
    return f"{100.0 * (ours - theirs) / theirs:+.1f}%"


def table_one(row: dict) -> str:
    p = row["plan"]
    dev = row["llama_by_device"]
    lines = [f"### {row['case']} ({row['shape']}, n_gpu_layers {row['gpu_layers']} of {row['n_layer'] + 1}, "
             f"n_ctx {row['n_ctx']}, fa {row['options']['flash_attn']}; ok={row['ok']})",
             "", "| component | device | ours MiB | llama.cpp MiB | error |", "|---|---|---:|---:|---:|"]
    for d in ("gpu", "cpu"):
        ours = p["devices"][d]
        tot_t = 0
        for comp in ("weights", "kv", "compute", "output"):
            t = dev.get(d, {}).get(comp)
            tot_t += t or 0
            if ours[comp] == 0 and t is None:
                continue
            lines.append(f"| {comp} | {d} | {ours[comp] / MIB:.2f} | "
                         f"{'-' if t is None else f'{t / MIB:.2f}'} | {_err(ours[comp], t)} |")
        b = ours["total"] - ours["overhead"]
        lines.append(f"| buffers (no overhead) | {d} | {b / MIB:.2f} | {tot_t / MIB:.2f} | {_err(b, tot_t)} |")
        if d == "gpu":
            lines.append(f"| overhead allowance | gpu | {ours['overhead'] / MIB:.0f} | | |")
    s = row.get("snaps") or {}
    base = (s.get("start") or {}).get("smi")
    if base is not None:
        for k in ("model", "context", "decode_ubatch", "decode_1"):
            v = (s.get(k) or {}).get("smi")
            if v is not None:
                lines.append(f"| nvidia-smi used - baseline after {k} | gpu | "
                             f"{p['devices']['gpu']['total'] / MIB:.0f} (ours total) | {(v - base) / MIB:.0f} | "
                             f"{_err(p['devices']['gpu']['total'], v - base)} |")
    for k in ("context", "decode_1"):
        cu = (s.get(k) or {}).get("cuda")
        if cu:
            lines.append(f"| cudaMemGetInfo used after {k} (device-wide) | gpu | | {cu[0] / MIB:.0f} | |")
        r = (s.get(k) or {}).get("rss")
        if r:
            lines.append(f"| process RSS after {k} | cpu | {p['devices']['cpu']['total'] / MIB:.0f} (ours total) | "
                         f"{r / MIB:.0f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
