"""The result of `infer bench` as one JSON-ready document: the model, machine and llama.cpp
build it was measured on, the settings, every section with every repetition, and the summary
table (a row per technique: speed gain, quality impact, memory change).

Results are saved under ``$INFER_HOME/bench/``, one file per (model fingerprint, machine,
llama.cpp build), the last run's; a new run is compared with the one saved before it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from infer_cli.bench.measure import median
from infer_cli.errors import NoSavedResult  # noqa: F401  (raised by the command through here)
from infer_cli.paths import infer_home

FORMAT = 1
# A speed that moved by more than this between two runs is reported as changed.
CHANGE = 0.10




def bench_dir() -> Path:
    return infer_home() / "bench"


def quant_cache(fingerprint: str) -> Path:
    """Where the temporary quants of one model are made (and kept for the next run)."""
    return bench_dir() / "quants" / fingerprint[:16]


# --- identity -------------------------------------------------------------------------------

def fingerprint(path: Path) -> str:
    from infer_cli.engine.prompt_cache import model_identity
    from infer_cli.models.gguf_info import read_gguf

    return model_identity(Path(path), read_gguf(path).data_offset)


def machine(rpc=()) -> dict:
    """What makes two machines' speeds comparable: processor, cores, memory, GPUs, and the RPC
    workers the layers went to (a run over workers is compared with runs over the same ones)."""
    from infer_cli.plan import hardware

    mi = hardware.detect(llama=False)
    d = {"cpu": mi.cpu_model, "physical_cores": mi.physical_cores, "logical_cores": mi.logical_cores,
         "ram_gib": round(mi.ram_total / (1 << 30)), "gpus": [g.name for g in mi.gpus]}
    if rpc:
        d["rpc"] = [str(e) for e in rpc]
    d["key"] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    return d


def build() -> dict:
    from infer_cli.engine.binding import build_info, require

    b = build_info(require())
    key = (b.commit or b.binding or "unknown").replace("/", "_")[:12]
    return {"binding": b.binding, "commit": b.commit, "backends": b.backends, "key": key}


def result_path(fp: str, machine_key: str, build_key: str) -> Path:
    return bench_dir() / f"{fp[:16]}-{machine_key}-{build_key}.json"


# --- the document ---------------------------------------------------------------------------

def document(*, model: dict, machine_info: dict, build_info: dict, settings: dict,
             sections: list[dict], started: float, interrupted: bool, notes: list[str],
             estimate_s: float | None = None) -> dict:
    doc = {"format": FORMAT, "model": model, "machine": machine_info, "build": build_info,
           "settings": settings, "started": _iso(started), "finished": _iso(time.time()),
           "seconds": round(time.time() - started, 2), "estimate_s": estimate_s,
           "interrupted": interrupted, "notes": notes, "sections": sections}
    doc["summary"] = summary(doc)
    return doc


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _ratio(a, b) -> float | None:
    a, b = median(a), median(b)
    return a / b if a and b else None


def _change(new, old) -> float | None:
    return (new / old - 1.0) if new is not None and old else None


def summary(doc: dict) -> list[dict]:
    """The seed's table: one row per technique against its section's baseline."""
    rows: list[dict] = []
    for sec in doc["sections"]:
        name = sec["name"]
        if sec["status"] != "done":
            rows.append(_row(_technique(name), name, skipped=sec.get("reason") or sec["status"]))
            continue
        base = next((r for r in sec["rows"] if r["label"] == sec.get("baseline")), None)
        bm = base["metrics"] if base else {}
        for r in sec["rows"]:
            if base is not None and r is base:
                continue
            m = r["metrics"]
            tech = _technique(name, r["label"])
            if r.get("skipped"):
                rows.append(_row(tech, name, skipped=r["skipped"]))
                continue
            if name == "precision":
                q, bq = m.get("quality") or {}, bm.get("quality") or {}
                rows.append(_row(tech, name, speed_gain=_ratio(m.get("decode_tps"), bm.get("decode_tps")),
                                 speed_basis="decode", kl_mean=q.get("kl_mean"), kl_p99=q.get("kl_p99"),
                                 top1=q.get("top1"),
                                 ppl_change=_change(q.get("ppl"), bq.get("ppl")),
                                 memory_change=_change(m.get("memory_bytes"), bm.get("memory_bytes")),
                                 memory_basis="weights + KV + buffers",
                                 baseline=base["label"] if base else None))
            elif name == "kv":
                q = m.get("quality") or {}
                rows.append(_row(tech, name, speed_gain=_ratio(m.get("decode_tps"), bm.get("decode_tps")),
                                 speed_basis=f"decode at {doc['settings'].get('ctx')} tokens of context",
                                 kl_mean=q.get("kl_mean"), kl_p99=q.get("kl_p99"), top1=q.get("top1"),
                                 ppl_change=_change(q.get("ppl"), q.get("ref_ppl")),
                                 memory_change=_change(m.get("kv_bytes"), bm.get("kv_bytes")),
                                 memory_basis="KV cache", baseline="f16"))
            elif name == "flash-attn":
                key = "prefill_long_tps" if m.get("prefill_long_tps") else "prefill_tps"
                basis = (f"prefill of {doc['settings'].get('ctx')} tokens" if key == "prefill_long_tps"
                         else "prefill")
                rows.append(_row(tech, name, speed_gain=_ratio(m.get(key), bm.get(key)), speed_basis=basis,
                                 decode_gain=_ratio(m.get("decode_long_tps") or m.get("decode_tps"),
                                                    bm.get("decode_long_tps") or bm.get("decode_tps")),
                                 quality="none (same math)",
                                 memory_change=_change(m.get("compute_bytes"), bm.get("compute_bytes")),
                                 memory_basis="compute buffer", baseline="off"))
            elif name == "batching":
                rows.append(_row(tech, name, speed_gain=_ratio(m.get("throughput_tps"), bm.get("throughput_tps")),
                                 speed_basis="total throughput",
                                 per_sequence=_ratio(m.get("per_sequence_tps"), bm.get("per_sequence_tps")),
                                 quality="none",
                                 memory_change=_change(m.get("kv_bytes"), bm.get("kv_bytes")),
                                 memory_basis="KV cache", baseline="1 sequence"))
            elif name == "speculative":
                extra = m.get("draft_memory_bytes")
                rows.append(_row(tech, name, speed_gain=m.get("speedup"), speed_basis="decode",
                                 acceptance=median(m.get("acceptance")),
                                 quality="none (target's output)",
                                 memory_added=extra, memory_basis="draft model" if extra else "none",
                                 baseline="plain decoding"))
    return rows


def _technique(section: str, label: str | None = None) -> str:
    if section == "precision":
        return f"Quantization {label}" if label else "Quantization"
    if section == "kv":
        return f"KV cache {label}" if label else "KV cache quantization"
    if section == "flash-attn":
        return "Flash attention"
    if section == "batching":
        return f"Batching {label} sequences" if label else "Batching"
    if section == "speculative":
        if label is None:
            return "Speculative decoding"
        return "Prompt lookup (copy task)" if label.startswith("prompt lookup") else f"Speculative decoding, {label}"
    return section


def _row(technique: str, section: str, **fields) -> dict:
    row = {"technique": technique, "section": section, "speed_gain": None, "speed_basis": None,
           "quality": None, "kl_mean": None, "ppl_change": None, "memory_change": None,
           "memory_basis": None, "skipped": None}
    row.update(fields)
    return row


# --- saving and comparing -------------------------------------------------------------------

def save(doc: dict) -> Path:
    from infer_cli.files import atomic_write

    path = result_path(doc["model"]["fingerprint"], doc["machine"]["key"], doc["build"]["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc, indent=1, default=str))
    return path


def load(path: Path) -> dict | None:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "sections" not in doc:
        return None
    return doc


def last(fp: str, machine_key: str, build_key: str, *, any_machine: bool = False) -> tuple[dict | None, Path | None]:
    """The saved result for this model, machine and build; with ``any_machine`` the newest for
    this model from any machine or build when there is none for this one."""
    path = result_path(fp, machine_key, build_key)
    doc = load(path) if path.exists() else None
    if doc is not None or not any_machine:
        return doc, (path if doc is not None else None)
    found = sorted(bench_dir().glob(f"{fp[:16]}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in found:
        doc = load(p)
        if doc is not None:
            return doc, p
    return None, None


def carry_over(old: dict, new: dict) -> dict:
    """``new`` with the sections it did not measure (another --only) taken from ``old``, each
    marked with the run it comes from, so that the saved result stays whole."""
    from infer_cli.bench import SECTIONS

    have = {s["name"] for s in new["sections"]}
    merged = list(new["sections"])
    for sec in old.get("sections", []):
        if sec["name"] not in have and sec.get("status") != "interrupted":
            merged.append({**sec, "carried_from": sec.get("carried_from") or old.get("finished")})
    order = {n: i for i, n in enumerate(SECTIONS)}
    merged.sort(key=lambda s: order.get(s["name"], len(order)))
    out = {**new, "sections": merged}
    out["summary"] = summary(out)
    return out


SPEEDS = ("prefill_tps", "decode_tps", "prefill_long_tps", "decode_long_tps", "throughput_tps",
          "per_sequence_tps", "plain_tps", "speculative_tps")


def compare(old: dict, new: dict) -> dict:
    """What changed between two results of the same model: every speed measured in both, and
    the quality numbers; changes beyond 10% are listed."""
    changes, same = [], 0
    for sec in new["sections"]:
        osec = next((s for s in old.get("sections", []) if s["name"] == sec["name"]), None)
        if osec is None:
            continue
        for r in sec["rows"]:
            orow = next((x for x in osec["rows"] if x["label"] == r["label"]), None)
            if orow is None:
                continue
            for key in SPEEDS + ("kl_mean",):
                a = _value(orow["metrics"], key)
                b = _value(r["metrics"], key)
                if a is None or b is None:
                    continue
                rel = (b / a - 1.0) if a else (0.0 if b == 0 else None)
                if key == "kl_mean":
                    moved = abs(b - a) > max(0.001, CHANGE * max(abs(a), 1e-9))
                else:
                    moved = rel is None or abs(rel) > CHANGE
                if moved:
                    changes.append({"section": sec["name"], "row": r["label"], "metric": key,
                                    "old": a, "new": b, "change": rel})
                else:
                    same += 1
    keys = ("quick", "reps", "ctx", "threads", "quants")
    differ = [k for k in keys if old.get("settings", {}).get(k) != new.get("settings", {}).get(k)]
    return {"previous": old.get("finished"), "changed": changes, "unchanged": same,
            "settings_differ": differ}


def _value(metrics: dict, key: str):
    if key == "kl_mean":
        return (metrics.get("quality") or {}).get("kl_mean")
    return median(metrics.get(key))
