#!/usr/bin/env python3
"""Fuzz what infer reads from files it did not write: property-based and mutation-based inputs.

    .venv/bin/python scripts/fuzz.py TARGET --cases N [--seed S] [--timeout SEC] [--mem MIB]
    .venv/bin/python scripts/fuzz.py TARGET --replay [PATH]   # saved failing cases again

Targets: gguf-header (the bounded GGUF reader), gguf-load (the reader, then a real llama.cpp
load of what it accepts), checkpoint (a Hugging Face folder through the converter's reading:
safetensors header, config.json, tokenizer.json, tokenizer_config.json, tokenizer.model),
models-toml, prompt-cache, imatrix, batch-lines.

A share of the cases comes from hypothesis strategies (structured inputs drawn from a fixed
seed), the rest from mutating valid seed inputs: bit flips, interesting integers written over
the fields of the format (counts, lengths, types, dims, offsets), cuts, insertions, and for JSON
and TOML inputs, values replaced deep inside the parsed tree. Everything is derived from
``--seed``, so a run is repeatable.

Cases run in a child process (one at a time, the child reused until something goes wrong) with
an address-space limit (RLIMIT_AS) and a per-case time limit, so a native crash, a hang or a
runaway allocation is caught, counted, and the case saved under .cache/fuzz/TARGET/ for replay.
Every case must end either accepted or rejected with one of infer's own errors (a one-line
message, an exit code from the error table); any other exception is a "traceback".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAVE_ROOT = ROOT / ".cache" / "fuzz"
# Cases kept as regression tests (replayed by tests/test_fuzz.py).
REGRESSION_ROOT = ROOT / "tests" / "fuzz_cases"
FAILURES = ("crash", "hang", "traceback", "memory", "bad-error")

Case = dict  # file name -> bytes

# ----------------------------------------------------------------------------------------------
# Mutation


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024,
               4095, 4096, 65535, 65536, 2**24, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]


def interesting_int(rng: random.Random, original: int | None = None) -> int:
    choices = INTERESTING
    if original is not None:
        near = [original + 1, original - 1, original * 2, original // 2, original + 32,
                original ^ (1 << rng.randrange(64)), max(0, original - 32)]
        choices = choices + [n for n in near if n >= 0]
    return rng.choice(choices) if rng.random() < 0.9 else rng.getrandbits(rng.choice((8, 16, 32, 64)))


def put_int(buf: bytearray, off: int, width: int, value: int) -> None:
    if off < 0 or off + width > len(buf):
        return
    buf[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def mutate_bytes(rng: random.Random, data: bytes, fields: list[tuple[int, int]] | None = None,
                 region: int | None = None) -> bytes:
    """1-3 mutations of ``data``; ``fields`` are (offset, width) of the format's integers and are
    the preferred targets; ``region`` keeps byte-level edits within the first bytes."""
    buf = bytearray(data)
    span = min(len(buf), region or len(buf)) or 1
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.random()
        if fields and op < 0.45:
            off, width = rng.choice(fields)
            old = int.from_bytes(buf[off:off + width], "little") if off + width <= len(buf) else 0
            put_int(buf, off, width, interesting_int(rng, old))
        elif op < 0.6 and buf:
            i = rng.randrange(span)
            if i < len(buf):
                buf[i] ^= 1 << rng.randrange(8)
        elif op < 0.7 and buf:
            i = rng.randrange(span)
            if i < len(buf):
                buf[i] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x20, rng.randrange(256)))
        elif op < 0.78 and buf:
            width = rng.choice((1, 2, 4, 8))
            put_int(buf, rng.randrange(span), width, interesting_int(rng))
        elif op < 0.86 and buf:
            del buf[rng.randrange(min(span, len(buf))):]  # truncate
        elif op < 0.92 and buf:
            i = rng.randrange(min(span, len(buf)))
            del buf[i:i + rng.choice((1, 4, 8, 64, 4096))]
        else:
            i = rng.randrange(min(span, len(buf)) + 1)
            if buf and rng.random() < 0.5:
                j = rng.randrange(len(buf))
                chunk = bytes(buf[j:j + rng.choice((1, 8, 64, 512))])
            else:
                chunk = bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8, 32))))
            buf[i:i] = chunk
    return bytes(buf)


WEIRD_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2, 3, 7, 2**31, 2**63, -2**63, 10**12,
                           10**30, 0.0, -0.5, 1.5, 1e308, float("inf"), float("nan"), "", "x",
                           "\u0000", "\ud800", "\u2581", "<s>", "a" * 300, [], [1, 2], ["a", "b"],
                           [[1]], {}, {"a": 1}, {"content": "x"}, {"type": "BPE"}]


def random_json_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.7:
        return rng.choice(WEIRD_VALUES)
    if r < 0.85:
        return [random_json_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["a", "type", "id", "content", "vocab", ""]): random_json_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _paths(obj: Any, prefix: tuple = (), out: list | None = None, limit: int = 4000) -> list:
    out = [] if out is None else out
    if len(out) >= limit or len(prefix) > 40:  # mutations can nest values deeply
        return out
    out.append(prefix)
    if isinstance(obj, dict):
        for k, v in list(obj.items())[:200]:
            _paths(v, prefix + (k,), out, limit)
    elif isinstance(obj, list):
        idx = range(len(obj)) if len(obj) <= 50 else sorted({0, 1, len(obj) - 1, *[
            (len(obj) * i) // 40 for i in range(40)]})
        for i in idx:
            _paths(obj[i], prefix + (i,), out, limit)
    return out


def mutate_tree(rng: random.Random, obj: Any, n: int | None = None) -> Any:
    """``obj`` (a JSON-like tree) with 1-3 nodes replaced, deleted or duplicated."""
    import copy

    obj = copy.deepcopy(obj)
    for _ in range(n or rng.choice((1, 1, 2, 3))):
        paths = _paths(obj)
        path = rng.choice(paths)
        if not path:
            obj = random_json_value(rng) if rng.random() < 0.1 else obj
            continue
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        r = rng.random()
        old = parent[key]
        if r < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif r < 0.25 and isinstance(parent, list):
            del parent[key]
        elif r < 0.45 and isinstance(old, (int, float)) and not isinstance(old, bool):
            parent[key] = rng.choice([-old, old * 1000, 0, -1, 2**31, 2**63, old + 1, float(old),
                                      str(old), 10**9])
        elif r < 0.55 and isinstance(old, str):
            parent[key] = rng.choice(["", old * 2, old[:1], old + "\u0000", old.upper(), 7])
        elif r < 0.6 and isinstance(parent, dict):
            parent[rng.choice(["", "zz", str(key) + "_", "\ud800"])] = old
        else:
            parent[key] = random_json_value(rng)
    return obj


def dump_json(obj: Any, rng: random.Random) -> bytes:
    # allow_nan: NaN and Infinity are what a sloppy writer produces; Python's json reads them.
    try:
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    except (ValueError, TypeError, RecursionError):
        text = "{}"
    return text.encode("utf-8", "surrogatepass")


def toml_dump(obj: dict) -> str:
    """A TOML document of ``obj`` (inline tables below the top level; no library needed)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(max(min(v, 2**63 - 1), -2**63))
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)} = {value(x)}"
                                   for k, x in v.items() if x is not None) + "}"
        return '""'

    lines, tables = [], []
    for k, v in obj.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{json.dumps(str(k), ensure_ascii=False)} = {value(v)}")
    for k, v in tables:
        lines.append(f"[{json.dumps(str(k), ensure_ascii=False)}]")
        for k2, v2 in v.items():
            if v2 is not None:
                lines.append(f"{json.dumps(str(k2), ensure_ascii=False)} = {value(v2)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# GGUF: a writer that allows invalid values, and a walker that finds the format's fields


_VT_STRUCT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_bytes(kvs: list[tuple[str, int, Any]], tensors: list[tuple[str, list[int], int, int]],
               version: int = 3, alignment: int = 32, data: bytes = b"") -> bytes:
    """Serialise a GGUF from raw parts; nothing is checked (values may lie)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)))

    def s(text: str | bytes) -> bytes:
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        return struct.pack("<Q", len(raw)) + raw

    def val(vt: int, v: Any) -> bytes:
        if vt == 8:
            return s(v if isinstance(v, (str, bytes)) else str(v))
        if vt == 9:
            if not isinstance(v, tuple):  # a bare number as an array: a count with no elements
                return struct.pack("<IQ", 4, int(v) % 2**64)
            et, items = v
            return struct.pack("<IQ", et, len(items)) + b"".join(val(et, x) for x in items)
        code = _VT_STRUCT.get(vt)
        if code is None:
            return b"\x00" * 4
        try:
            return struct.pack("<" + code, v)
        except struct.error:
            return struct.pack("<" + code, 0)

    for key, vt, v in kvs:
        out += s(key) + struct.pack("<I", vt) + val(vt, v)
    for name, dims, ttype, off in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(
            struct.pack("<q", max(min(d, 2**63 - 1), -2**63)) for d in dims)
        out += struct.pack("<IQ", ttype, off % 2**64)
    out += b"\x00" * (-len(out) % max(alignment, 1))
    return bytes(out) + data


def gguf_fields(buf: bytes, roles: bool = False) -> tuple[list, int]:
    """(offset, width) of every integer field in a valid GGUF header (counts, key and string
    lengths, value types, array element types and counts, scalar values, tensor n_dims, dims,
    types and offsets), and the header's end. Long arrays contribute a few elements only. With
    ``roles``, each field is (offset, width, role): "value" for a metadata scalar or array
    element, "dim", "type" and "offset" for the tensor table, "layout" for the rest."""
    fields: list = [(4, 4, "layout"), (8, 8, "layout"), (16, 8, "layout")]
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24

    def string(pos: int, keep: bool = True) -> int:
        if keep:
            fields.append((pos, 8, "layout"))
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n

    def value(pos: int, vt: int, keep: bool) -> int:
        if vt == 8:
            return string(pos, keep)
        if vt == 9:
            if keep:
                fields.extend([(pos, 4, "layout"), (pos + 4, 8, "layout")])
            et, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if et in _VT_STRUCT:
                width = struct.calcsize(_VT_STRUCT[et])
                picks = {0, 1, 2, 3, n // 2, n - 1} if n else set()
                for i in sorted(picks):
                    fields.append((pos + i * width, width, "value"))
                return pos + n * width
            for i in range(n):
                pos = value(pos, et, keep and i < 4)
            return pos
        width = struct.calcsize(_VT_STRUCT[vt])
        if keep:
            fields.append((pos, width, "value"))
        return pos + width

    for _ in range(n_kv):
        pos = string(pos)
        (vt,) = struct.unpack_from("<I", buf, pos)
        fields.append((pos, 4, "layout"))
        pos = value(pos + 4, vt, True)
    for _ in range(n_tensors):
        pos = string(pos)
        (nd,) = struct.unpack_from("<I", buf, pos)
        fields.append((pos, 4, "layout"))
        pos += 4
        for d in range(nd):
            fields.append((pos + 8 * d, 8, "dim"))
        pos += 8 * nd
        fields.extend([(pos, 4, "type"), (pos + 4, 8, "offset")])
        pos += 12
    if not roles:
        fields = [(o, w) for o, w, _ in fields]
    return fields, pos


def tiny_gguf() -> bytes:
    """A small valid GGUF with every value type, nested arrays and three tensor types."""
    kvs = [("general.architecture", 8, "llama"), ("general.name", 8, "tiny"),
           ("general.alignment", 4, 32), ("llama.context_length", 4, 128),
           ("llama.block_count", 4, 1), ("llama.embedding_length", 4, 32),
           ("llama.attention.head_count", 4, 2), ("x.u8", 0, 7), ("x.i8", 1, -7), ("x.u16", 2, 7),
           ("x.i16", 3, -7), ("x.i32", 5, -7), ("x.f32", 6, 0.5), ("x.bool", 7, True),
           ("x.u64", 10, 7), ("x.i64", 11, -7), ("x.f64", 12, 0.25),
           ("llama.attention.head_count_kv", 9, (5, [1, 2])),
           ("tokenizer.ggml.tokens", 9, (8, ["<s>", "a", "b", "ab"])),
           ("x.nested", 9, (9, [(4, [1, 2]), (8, ["q"])])), ("general.file_type", 4, 3)]
    f32 = struct.pack("<32f", *range(32))
    q4 = bytes(range(20)) * 2  # two Q4_1 blocks of 32: 20 bytes each
    f16 = b"\x00\x3c" * 32
    tensors = [("token_embd.weight", [32, 1], 0, 0), ("blk.0.attn_q.weight", [64], 3, 128),
               ("output_norm.weight", [32], 1, 192)]
    data = f32.ljust(128, b"\x00") + q4.ljust(64, b"\x00") + f16
    return gguf_bytes(kvs, tensors, data=data)


# ----------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    name: str
    prepare: Callable[[Path], None]            # builds seed inputs in a folder (parent side)
    generate: Callable[[Path, random.Random, int, int], Iterator[Case]]  # (ctx, rng, n, seed)
    check: Callable[[Case, Path, Path], str]    # (case, ctx, scratch) -> "ok" (worker side)
    timeout: float = 10.0
    mem_mib: int = 2048
    suite_cases: int = 200


def hypothesis_cases(strategy, n: int, seed: int) -> list:
    """Up to ``n`` values drawn from ``strategy`` by hypothesis, repeatably from ``seed``."""
    if n <= 0:
        return []
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    out: list = []

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value):
        out.append(value)

    collect()
    return out[:n]


def _split(n: int) -> tuple[int, int]:
    """(from hypothesis, from mutation): a third of the cases are property-based."""
    h = n // 3
    return h, n - h


# -- gguf-header ---------------------------------------------------------------------------------

def _smollm2() -> Path | None:
    p = ROOT / ".cache" / "test-home" / "store" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def _prepare_gguf(ctx: Path) -> None:
    (ctx / "tiny.gguf").write_bytes(tiny_gguf())
    real = _smollm2()
    if real is not None:
        from infer_cli.models.gguf_info import read_gguf

        info = read_gguf(real)
        with real.open("rb") as f:
            (ctx / "real.head").write_bytes(f.read(info.data_offset))
        (ctx / "real.size").write_text(str(info.file_size))


def _gguf_strategy():
    from hypothesis import strategies as st

    key = st.one_of(st.sampled_from(["general.architecture", "general.alignment", "llama.block_count",
                                     "tokenizer.ggml.tokens", "general.file_type", "split.count",
                                     "llama.context_length", "x"]), st.text(max_size=12))
    scalar_vt = st.sampled_from(sorted(_VT_STRUCT))

    def kv():
        return st.one_of(
            st.tuples(key, scalar_vt, st.integers(-2**63, 2**64)),
            st.tuples(key, st.just(8), st.text(max_size=20)),
            st.tuples(key, st.just(9), st.tuples(scalar_vt, st.lists(st.integers(-5, 300), max_size=6))),
            st.tuples(key, st.just(9), st.tuples(st.just(8), st.lists(st.text(max_size=5), max_size=6))),
            st.tuples(key, st.integers(0, 20), st.integers(0, 5)))

    dims = st.lists(st.one_of(st.sampled_from([0, 1, 2, 32, 64, 256]), st.integers(-2, 2**63 - 1)),
                    max_size=6)
    tensor = st.tuples(st.text(min_size=0, max_size=70), dims,
                       st.one_of(st.sampled_from([0, 1, 2, 3, 8, 12, 30]), st.integers(0, 2**32 - 1)),
                       st.one_of(st.sampled_from([0, 32, 64, 128]), st.integers(0, 2**64 - 1)))
    return st.tuples(st.lists(kv(), max_size=8), st.lists(tensor, max_size=4),
                     st.sampled_from([1, 2, 3, 4, 2**31]), st.integers(0, 4096),
                     st.booleans())


def _gen_gguf(ctx: Path, rng: random.Random, n: int, seed: int, *, load: bool = False) -> Iterator[Case]:
    seeds = []
    tiny = (ctx / "tiny.gguf").read_bytes()
    if not load:
        seeds.append((tiny, len(tiny)))
    if (ctx / "real.head").is_file():
        head = (ctx / "real.head").read_bytes()
        seeds.append((head, int((ctx / "real.size").read_text())))
    n_h, n_m = _split(n)
    if load:
        # hypothesis draws patches (field, value) over the real model's fields
        from hypothesis import strategies as st

        head, size = seeds[0]
        fields = [(o, w) for o, w, role in gguf_fields(head, roles=True)[0] if role == "value"]
        patches = hypothesis_cases(st.lists(st.tuples(st.integers(0, len(fields) - 1),
                                                      st.sampled_from(INTERESTING)), min_size=1,
                                            max_size=3), n_h, seed)
        for plist in patches:
            buf = bytearray(head)
            for fi, v in plist:
                put_int(buf, *fields[fi], v)
            yield {"model.gguf": bytes(buf), "size": str(size).encode()}
    else:
        for kvs, tensors, version, pad, real_offsets in hypothesis_cases(_gguf_strategy(), n_h, seed):
            if real_offsets:
                off, fixed = 0, []
                for name, dims, tt, _ in tensors:
                    fixed.append((name, dims, tt, off))
                    off += 64
                tensors = fixed
            try:
                raw = gguf_bytes(kvs, tensors, version=version)
            except (struct.error, OverflowError, ValueError):
                continue
            yield {"model.gguf": raw, "size": str(len(raw) + pad).encode()}
    field_cache = [gguf_fields(s[0]) for s in seeds]
    if load:
        rf = gguf_fields(seeds[0][0], roles=True)[0]
        all_fields = [(o, w) for o, w, _ in rf]
        value_fields = [(o, w) for o, w, role in rf if role == "value"]
        table_fields = [(o, w) for o, w, role in rf if role in ("dim", "type", "offset")]
        tensor_dims, cur = [], []
        for o, w, role in rf:  # dims of one tensor are consecutive, ended by its type
            if role == "dim":
                cur.append(o)
            elif role == "type":
                tensor_dims.append(cur)
                cur = []
    for _ in range(n_m if n_h else n):
        k = rng.randrange(len(seeds))
        (head, size), (fields, _) = seeds[k], field_cache[k]
        if load:
            # the brief: tensor info, counts, offsets, types, dims; same length keeps data in place
            buf = bytearray(head)
            for _ in range(rng.choice((1, 1, 2, 3))):
                r = rng.random()
                if r < 0.1:  # swap two dims of a tensor: same bytes, another shape
                    t = rng.choice(tensor_dims)
                    if len(t) >= 2:
                        a, b = rng.sample(t, 2)
                        buf[a:a + 8], buf[b:b + 8] = buf[b:b + 8], buf[a:a + 8]
                    continue
                pool = value_fields if r < 0.75 else table_fields if r < 0.9 else all_fields
                off, width = rng.choice(pool)
                old = int.from_bytes(buf[off:off + width], "little")
                if rng.random() < 0.5:
                    new = rng.choice([0, 1, 2, old + 1, old - 1 if old else 0, old * 2, old // 2,
                                      (1 << (8 * width)) - 1, 1 << (8 * width - 1)])
                else:
                    new = interesting_int(rng, old)
                put_int(buf, off, width, new)
            if rng.random() < 0.1:
                buf = bytearray(mutate_bytes(rng, bytes(buf)))
            new_size = size if rng.random() < 0.9 else rng.randrange(size)
            yield {"model.gguf": bytes(buf), "size": str(new_size).encode()}
        else:
            data = mutate_bytes(rng, head, fields)
            new_size = size + len(data) - len(head)
            if rng.random() < 0.15:
                new_size = rng.randrange(max(new_size, 1) * 2)
            yield {"model.gguf": data, "size": str(max(new_size, len(data))).encode()}


def _write_gguf_case(case: Case, scratch: Path) -> Path:
    path = scratch / "model.gguf"
    head = case["model.gguf"]
    size = int(case.get("size", b"0") or 0)
    with open(path, "wb") as f:
        f.write(head)
        if size > len(head):
            f.truncate(size)  # a sparse tail: the reader never reads weight data
    return path


def _check_gguf_header(case: Case, ctx: Path, scratch: Path) -> str:
    from infer_cli.models.gguf_info import quant_label, read_gguf, summary

    path = _write_gguf_case(case, scratch)
    for arrays in (False, True) if len(case["model.gguf"]) < (1 << 16) else (False,):
        info = read_gguf(path, arrays=arrays)
        json.dumps(summary(info))
        quant_label(info)
        info.vocab_size, info.head_count_kv, info.key_length, info.split_info()
    return "ok"


_MODEL_CACHE: dict = {}


def _check_gguf_load(case: Case, ctx: Path, scratch: Path) -> str:
    from infer_cli.engine.model import Model
    from infer_cli.models.gguf_info import read_gguf
    from infer_cli.options import Options

    path = _write_gguf_case(case, scratch)
    info = read_gguf(path)  # a rejection here is the reader doing its job
    m = Model(path, Options(gpu_layers=0, warmup=False), info=info)
    try:
        ids = m.tokenize("Hello, world! 123")
        for t in ids[:8]:
            m.piece(t)
    finally:
        close = getattr(m, "close", None)
        if close:
            close()
    return "ok"


# -- checkpoint ----------------------------------------------------------------------------------

def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_piece(piece: str, score: float, typ: int) -> bytes:
    raw = piece.encode()
    body = b"\x0a" + _pb_varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _pb_varint(typ)
    return b"\x0a" + _pb_varint(len(body)) + body


def _prepare_checkpoint(ctx: Path) -> None:
    import numpy as np

    from quantize.safetensors_io import write

    rng = np.random.default_rng(0)
    chars = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
        ["Ġ", "Ġt", "th", "the", "Ġthe", "he"]
    vocab = {t: i for i, t in enumerate(chars)}
    n_vocab, d, ff = len(chars), 32, 48
    t = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, d)).astype(np.float16),
         "model.norm.weight": np.ones(d, dtype=np.float32),
         "lm_head.weight": rng.standard_normal((n_vocab, d)).astype(np.float16)}
    p = "model.layers.0."
    t |= {p + "input_layernorm.weight": np.ones(d, dtype=np.float32),
          p + "post_attention_layernorm.weight": np.ones(d, dtype=np.float32),
          p + "self_attn.q_proj.weight": rng.standard_normal((d, d)).astype(np.float16),
          p + "self_attn.k_proj.weight": rng.standard_normal((16, d)).astype(np.float16),
          p + "self_attn.v_proj.weight": rng.standard_normal((16, d)).astype(np.float16),
          p + "self_attn.o_proj.weight": rng.standard_normal((d, d)).astype(np.float16),
          p + "mlp.gate_proj.weight": rng.standard_normal((ff, d)).astype(np.float16),
          p + "mlp.up_proj.weight": rng.standard_normal((ff, d)).astype(np.float16),
          p + "mlp.down_proj.weight": rng.standard_normal((d, ff)).astype(np.float16)}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
           "intermediate_size": ff, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "vocab_size": n_vocab, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    tok = {"version": "1.0", "added_tokens": [{"id": 1, "content": "<s>", "special": True},
                                              {"id": 2, "content": "</s>", "special": True}],
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"}}, {"type": "ByteLevel"}]},
           "model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ t", "t h", "th e", ["Ġ", "the"], "h e"]}}
    tcfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "added_tokens_decoder": {"1": {"content": "<s>", "special": True}}}
    spm = b"".join(_pb_piece(c, -float(i), 2 if i == 0 else 3 if i < 3 else 1)
                   for i, c in enumerate(chars))
    bpe = ctx / "bpe"
    bpe.mkdir(parents=True, exist_ok=True)
    write(bpe / "model.safetensors", t)
    (bpe / "config.json").write_text(json.dumps(cfg))
    (bpe / "tokenizer.json").write_text(json.dumps(tok))
    (bpe / "tokenizer_config.json").write_text(json.dumps(tcfg))
    spmdir = ctx / "spm"
    spmdir.mkdir(exist_ok=True)
    for f in ("model.safetensors", "config.json", "tokenizer_config.json"):
        shutil.copy(bpe / f, spmdir / f)
    (spmdir / "tokenizer.model").write_bytes(spm)


def _config_strategy():
    from hypothesis import strategies as st

    num = st.one_of(st.integers(-2, 64), st.sampled_from([0, 2**31, 2**63, 10**12]),
                    st.floats(allow_nan=True), st.text(max_size=3), st.none(), st.booleans())
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "vocab_size", "head_dim", "bos_token_id", "eos_token_id", "tie_word_embeddings"]
    rope = st.one_of(st.none(), st.just("x"), st.fixed_dictionaries({}, optional={
        "rope_type": st.sampled_from(["llama3", "linear", "yarn", "", 3]), "type": st.text(max_size=5),
        "factor": num, "low_freq_factor": num, "high_freq_factor": num,
        "original_max_position_embeddings": num}))
    return st.tuples(st.fixed_dictionaries({}, optional={**{k: num for k in keys}, "rope_scaling": rope,
                                                         "architectures": st.one_of(
                                                             st.just(["LlamaForCausalLM"]), st.lists(st.text(max_size=4), max_size=2),
                                                             st.text(max_size=3), st.none())}),
                     st.sampled_from(["bpe", "spm"]))


def _gen_checkpoint(ctx: Path, rng: random.Random, n: int, seed: int) -> Iterator[Case]:
    seeds = {k: {p.name: p.read_bytes() for p in (ctx / k).iterdir()} for k in ("bpe", "spm")}
    n_h, n_m = _split(n)
    for overrides, kind in hypothesis_cases(_config_strategy(), n_h, seed):
        case = dict(seeds[kind])
        cfg = json.loads(case["config.json"])
        cfg.update(overrides)
        case["config.json"] = dump_json(cfg, rng)
        yield case
    for _ in range(n_m):
        case = dict(seeds[rng.choice(("bpe", "spm"))])
        for _ in range(rng.choice((1, 1, 2))):
            name = rng.choice(sorted(case))
            data = case[name]
            try:
                tree = json.loads(data) if name.endswith(".json") else None
            except ValueError:
                tree = None
            if tree is not None and rng.random() < 0.8:
                case[name] = dump_json(mutate_tree(rng, tree), rng)
            elif name == "model.safetensors" and len(data) >= 8 and \
                    (hn := struct.unpack_from("<Q", data)[0]) < len(data):
                if rng.random() < 0.6:
                    try:
                        header = json.loads(data[8:8 + hn])
                    except ValueError:
                        header = {}
                    blob = dump_json(mutate_tree(rng, header), rng)
                    if rng.random() < 0.7:
                        blob = blob + b" " * max(0, hn - len(blob))
                    case[name] = struct.pack("<Q", len(blob)) + blob + data[8 + hn:]
                else:
                    case[name] = mutate_bytes(rng, data, [(0, 8)], region=8 + hn)
            else:
                case[name] = mutate_bytes(rng, data)
        if rng.random() < 0.05:
            del case[rng.choice(sorted(case))]
        yield case


def _check_checkpoint(case: Case, ctx: Path, scratch: Path) -> str:
    from infer_cli.models.gguf_info import read_gguf
    from quantize.convert import convert_checkpoint

    folder = scratch / "ckpt"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for name, data in case.items():
        (folder / name).write_bytes(data)
    out = scratch / "out.F16.gguf"
    try:
        res = convert_checkpoint(folder, out, "F16")
        read_gguf(res.path)  # what the converter writes must itself be a valid GGUF
    finally:
        if out.exists():
            out.unlink()
    return "ok"


# -- models-toml ---------------------------------------------------------------------------------

def _prepare_toml(ctx: Path) -> None:
    (ctx / "user.toml").write_text(
        'default = "mine"\n'
        '[models.mine]\ncontext = 4096\ndescription = "x"\naliases = ["m", "mine2"]\n'
        '[models.mine.hub]\nrepo = "org/repo"\nquant = "Q4_K_M"\n'
        '[models.mine.sampling]\ntemperature = 0.7\ntop_p = 0.9\n'
        '[models.pkg]\n[models.pkg.package]\nname = "p"\nwheels = ["w.whl"]\nmembers = ["m.gguf"]\n'
        'file = "m.gguf"\nsha256 = "' + "a" * 64 + '"\n')
    from infer_cli.models.registry import shipped_models_toml

    shutil.copy(shipped_models_toml(), ctx / "shipped.toml")


def _toml_strategy():
    from hypothesis import strategies as st

    leaf = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.text(max_size=10),
                     st.booleans(), st.lists(st.text(max_size=5), max_size=3))
    entry = st.dictionaries(st.sampled_from(["context", "hub", "package", "sampling", "aliases",
                                             "description", "draft", "x"]),
                            st.one_of(leaf, st.dictionaries(st.sampled_from(
                                ["repo", "quant", "file", "wheels", "members", "sha256", "name",
                                 "temperature", "top_k", "seed", "revision"]), leaf, max_size=5)),
                            max_size=5)
    return st.tuples(st.dictionaries(st.text(max_size=8), entry, max_size=3),
                     st.one_of(st.none(), st.text(max_size=6)))


def _gen_toml(ctx: Path, rng: random.Random, n: int, seed: int) -> Iterator[Case]:
    import tomllib

    seeds = [(ctx / "user.toml").read_bytes(), (ctx / "shipped.toml").read_bytes()]
    n_h, n_m = _split(n)
    for models, default in hypothesis_cases(_toml_strategy(), n_h, seed):
        doc: dict = {"models": models}
        if default is not None:
            doc = {"default": default, **doc}
        yield {"models.toml": _toml_nested(doc).encode()}
    trees = [tomllib.loads(s.decode()) for s in seeds]
    for _ in range(n_m):
        i = rng.randrange(len(seeds))
        if rng.random() < 0.6:
            yield {"models.toml": _toml_nested(mutate_tree(rng, trees[i])).encode("utf-8", "surrogatepass")}
        else:
            yield {"models.toml": mutate_bytes(rng, seeds[i])}


def _toml_nested(doc: dict) -> str:
    """TOML with [models.NAME] sections (as users write it), via toml_dump per table."""
    if not isinstance(doc, dict):
        doc = {"models": doc}
    top = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    text = toml_dump(top)
    for k, v in doc.items():
        if isinstance(v, dict):
            for name, entry in v.items():
                q = f"{json.dumps(str(k), ensure_ascii=False)}.{json.dumps(str(name), ensure_ascii=False)}"
                if isinstance(entry, dict):
                    body = toml_dump(entry)
                    # toml_dump's own [tables] become sub-tables of this entry
                    body = body.replace("\n[", f"\n[{q}.").replace("[" + q + ".", "[" + q + ".", 1) \
                        if not body.startswith("[") else f"[{q}." + body[1:].replace("\n[", f"\n[{q}.")
                    text += f"[{q}]\n" + body
                else:
                    text += f"[{json.dumps(str(k), ensure_ascii=False)}]\n" \
                            f"{json.dumps(str(name), ensure_ascii=False)} = {json.dumps(entry) if isinstance(entry, (str, int, float)) else '1'}\n"
    return text


def _check_toml(case: Case, ctx: Path, scratch: Path) -> str:
    from infer_cli.models.registry import load_catalog, parse_ref

    path = scratch / "models.toml"
    path.write_bytes(case["models.toml"])
    cat = load_catalog(user=path)
    for name in list(getattr(cat, "entries", {}) or {})[:20]:
        parse_ref(name, cat)
    return "ok"


# -- prompt-cache --------------------------------------------------------------------------------

MODEL_ID, SETTINGS = "m" * 64, {"type_k": "f16", "type_v": "f16", "n_seq": 1}


def _kvc(tokens: list[int], state: bytes, **over) -> bytes:
    header = {"format": 1, "model": MODEL_ID, "model_path": "/x.gguf", "settings": SETTINGS,
              "tokens": tokens, "state_size": len(state),
              "state_sha256": hashlib.sha256(state).hexdigest(), "created": 1.0, **over}
    body = json.dumps(header).encode()
    return b"INFERKV\x01" + struct.pack("<I", len(body)) + body + state


def _prepare_prompt_cache(ctx: Path) -> None:
    (ctx / "seed.kvc").write_bytes(_kvc(list(range(100, 164)), bytes(range(256)) * 4))


def _gen_prompt_cache(ctx: Path, rng: random.Random, n: int, seed: int) -> Iterator[Case]:
    from hypothesis import strategies as st

    seed_bytes = (ctx / "seed.kvc").read_bytes()
    n_h, n_m = _split(n)
    json_val = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                                      st.floats(), st.text(max_size=8)),
                            lambda c: st.one_of(st.lists(c, max_size=4),
                                                st.dictionaries(st.text(max_size=4), c, max_size=3)),
                            max_leaves=8)
    strat = st.tuples(st.fixed_dictionaries({}, optional={
        "format": st.one_of(st.just(1), json_val), "model": st.one_of(st.just(MODEL_ID), json_val),
        "settings": st.one_of(st.just(SETTINGS), json_val),
        "tokens": st.one_of(st.lists(st.integers(-2**40, 2**40), max_size=80), json_val),
        "state_size": st.one_of(st.integers(-5, 2**64), json_val),
        "state_sha256": json_val}), st.binary(max_size=64), st.booleans())
    for over, state, fix_sha in hypothesis_cases(strat, n_h, seed):
        over = dict(over)
        if fix_sha:
            over.pop("state_sha256", None)
            over.pop("state_size", None)
        tokens = over.pop("tokens", list(range(100, 164)))
        yield {"entry.kvc": _kvc(tokens, state, **over)}
    (hn,) = struct.unpack_from("<I", seed_bytes, 8)
    header = json.loads(seed_bytes[12:12 + hn])
    state = seed_bytes[12 + hn:]
    for _ in range(n_m):
        if rng.random() < 0.5:
            h = mutate_tree(rng, header)
            body = dump_json(h, rng)
            yield {"entry.kvc": b"INFERKV\x01" + struct.pack("<I", len(body)) + body + state}
        else:
            yield {"entry.kvc": mutate_bytes(rng, seed_bytes, [(8, 4)], region=12 + hn + 16)}


class _FakeSession:
    """What PromptCache.restore needs of a Session: the prefix rule and a state loader that
    checks what llama.cpp's would be handed (bytes and a list of token ids)."""

    align, can_trim = 32, True

    def __init__(self):
        self.tokens: list[int] = []

    def reusable(self, cached, tokens, *, aligned: bool = False) -> int:
        from infer_cli.engine.context import common_prefix

        common = common_prefix(cached, tokens)
        return common if common == len(tokens) or not aligned else common - common % self.align

    def load_state(self, data, tokens) -> bool:
        import ctypes

        assert isinstance(data, bytes)
        (ctypes.c_int32 * len(tokens))(*tokens)  # what a token array for llama.cpp must take
        self.tokens = list(tokens)
        return True

    def trim(self, n: int) -> bool:
        self.tokens = self.tokens[:n]
        return True


def _check_prompt_cache(case: Case, ctx: Path, scratch: Path) -> str:
    from infer_cli.engine.prompt_cache import PromptCache, listing

    root = scratch / "pc"
    shutil.rmtree(root, ignore_errors=True)
    cache = PromptCache(Path("/x.gguf"), MODEL_ID, SETTINGS, root=root, limit=1 << 30)
    cache.folder.mkdir(parents=True)
    (cache.folder / ("a" * 32 + ".kvc")).write_bytes(case["entry.kvc"])
    json.dumps(listing(root))
    notes: list[str] = []
    cache.restore(_FakeSession(), list(range(100, 200)), notes)
    return "ok"


# -- imatrix -------------------------------------------------------------------------------------

def _imatrix_gguf(entries: dict[str, tuple[list[float], list[float]]]) -> bytes:
    kvs = [("general.type", 8, "imatrix"), ("imatrix.chunk_count", 4, 4),
           ("imatrix.chunk_size", 4, 512)]
    tensors, data, off = [], b"", 0
    for name, (sums, counts) in entries.items():
        for suffix, values, dims in ((".in_sum2", sums, [len(sums) // len(counts), len(counts)]),
                                     (".counts", counts, [1, len(counts)])):
            blob = struct.pack(f"<{len(values)}f", *values)
            tensors.append((name + suffix, dims, 0, off))
            blob = blob.ljust(-(-len(blob) // 32) * 32, b"\x00")
            data += blob
            off += len(blob)
    return gguf_bytes(kvs, tensors, data=data)


def _imatrix_legacy(entries: list[tuple[str, int, list[float]]]) -> bytes:
    out = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(vals))
        out += struct.pack(f"<{len(vals)}f", *vals)
    return out


def _prepare_imatrix(ctx: Path) -> None:
    (ctx / "seed.gguf").write_bytes(_imatrix_gguf({
        "blk.0.attn_q.weight": ([float(i) for i in range(64)], [4.0, 4.0]),
        "blk.0.ffn_up.weight": ([1.0] * 32, [0.0])}))
    (ctx / "seed.dat").write_bytes(_imatrix_legacy([("blk.0.attn_q.weight", 4, [1.0] * 32),
                                                    ("output.weight", 0, [2.0] * 16)]))


def _gen_imatrix(ctx: Path, rng: random.Random, n: int, seed: int) -> Iterator[Case]:
    from hypothesis import strategies as st

    n_h, n_m = _split(n)
    fl = st.floats(width=32, allow_nan=True)
    legacy = st.lists(st.tuples(st.text(max_size=20), st.integers(-2**31, 2**31 - 1),
                                st.lists(fl, max_size=40)), max_size=4)
    gg = st.dictionaries(st.text(max_size=20), st.tuples(st.lists(fl, min_size=1, max_size=64),
                                                        st.lists(fl, min_size=1, max_size=4)),
                         max_size=3)
    for kind, value in hypothesis_cases(st.one_of(st.tuples(st.just("dat"), legacy),
                                                  st.tuples(st.just("gguf"), gg)), n_h, seed):
        try:
            raw = _imatrix_legacy(value) if kind == "dat" else _imatrix_gguf(value)
        except (struct.error, ZeroDivisionError):
            continue
        yield {"imatrix": raw}
    seeds = [(ctx / "seed.gguf").read_bytes(), (ctx / "seed.dat").read_bytes()]
    fields = gguf_fields(seeds[0])[0]
    for _ in range(n_m):
        i = rng.randrange(2)
        yield {"imatrix": mutate_bytes(rng, seeds[i], fields if i == 0 else
                                       [(0, 4), (4, 4), (27, 4), (31, 4)])}


def _check_imatrix(case: Case, ctx: Path, scratch: Path) -> str:
    from quantize.imatrix import load_imatrix

    path = scratch / "imatrix.gguf"
    path.write_bytes(case["imatrix"])
    out = load_imatrix(path)
    for v in out.values():
        assert v.ndim == 1
    return "ok"


# -- batch-lines ---------------------------------------------------------------------------------

_BATCH_SEED = [
    {"id": 1, "prompt": "Hello", "max_tokens": 8, "temperature": 0.5, "stop": ["\n"]},
    {"id": "b", "messages": [{"role": "user", "content": "hi"}], "system": "be brief", "seed": 3},
    {"prompt": "x", "top_p": 0.9, "top_k": 40, "min_p": 0.1, "stop": "."},
]


def _gen_batch(ctx: Path, rng: random.Random, n: int, seed: int) -> Iterator[Case]:
    from hypothesis import strategies as st

    n_h, n_m = _split(n)
    val = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                 st.text(max_size=8)),
                       lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c, max_size=3)),
                       max_leaves=6)
    obj = st.dictionaries(st.sampled_from(["id", "prompt", "messages", "max_tokens", "stop",
                                           "system", "temperature", "top_p", "top_k", "min_p",
                                           "seed", "other"]), val, max_size=5)
    line = st.one_of(obj.map(json.dumps), st.text(max_size=30))
    for lines in hypothesis_cases(st.lists(line, max_size=5), n_h, seed):
        yield {"input.jsonl": "\n".join(lines).encode("utf-8", "surrogatepass")}
    for _ in range(n_m):
        lines = [json.dumps(mutate_tree(rng, o)) if rng.random() < 0.7 else json.dumps(o)
                 for o in _BATCH_SEED]
        raw = "\n".join(lines).encode()
        if rng.random() < 0.3:
            raw = mutate_bytes(rng, raw)
        yield {"input.jsonl": raw}


def _check_batch(case: Case, ctx: Path, scratch: Path) -> str:
    import io

    from infer_cli.engine.batch import completed_ids, read_jobs
    from infer_cli.errors import InferError

    text = case["input.jsonl"].decode("utf-8", "replace")
    for skip in (True, False):
        try:
            jobs = read_jobs(iter(io.StringIO(text)), "input.jsonl", skip_bad=skip)
            for j in jobs:
                j.key
        except InferError:
            if skip:
                raise
            raise
    completed_ids(iter(io.StringIO(text)))
    return "ok"


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("gguf-header", _prepare_gguf, _gen_gguf, _check_gguf_header, suite_cases=300),
    Target("gguf-load", _prepare_gguf, lambda c, r, n, s: _gen_gguf(c, r, n, s, load=True),
           _check_gguf_load, timeout=30.0, mem_mib=4096, suite_cases=24),
    Target("checkpoint", _prepare_checkpoint, _gen_checkpoint, _check_checkpoint, timeout=20.0,
           mem_mib=3072, suite_cases=120),
    Target("models-toml", _prepare_toml, _gen_toml, _check_toml, suite_cases=300),
    Target("prompt-cache", _prepare_prompt_cache, _gen_prompt_cache, _check_prompt_cache,
           suite_cases=300),
    Target("imatrix", _prepare_imatrix, _gen_imatrix, _check_imatrix, suite_cases=300),
    Target("batch-lines", lambda ctx: None, _gen_batch, _check_batch, suite_cases=300),
]}


# ----------------------------------------------------------------------------------------------
# The worker (child process): runs cases, reports outcomes


class _CaseTimeout(BaseException):
    pass


def _outcome(target: Target, case: Case, ctx: Path, scratch: Path, timeout: float) -> tuple[str, str]:
    from infer_cli.errors import TABLE, InferError, describe

    def alarm(signum, frame):
        raise _CaseTimeout()

    signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        target.check(case, ctx, scratch)
        return "ok", ""
    except _CaseTimeout:
        return "hang", f"over {timeout:g} s (in Python)\n" + traceback.format_exc()[-3000:]
    except InferError as e:
        msg = str(e)
        known = any(c in TABLE for c in type(e).__mro__)
        if not msg or "\n" in msg or not known:
            return "bad-error", f"{type(e).__name__}: {msg!r} (in table: {known})"
        return f"rejected:{describe(e).exit_code}", f"{type(e).__name__}: {msg[:300]}"
    except MemoryError:
        return "memory", traceback.format_exc()[-3000:]
    except BaseException:  # noqa: BLE001 -- every other exception is a finding
        return "traceback", traceback.format_exc()[-4000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _read_exact(f, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def worker(target_name: str, ctx: Path, scratch: Path, timeout: float) -> None:
    target = TARGETS[target_name]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints (and llama.cpp's stdout) must not reach the protocol
    inp = sys.stdin.buffer
    scratch.mkdir(parents=True, exist_ok=True)
    if target_name == "gguf-load":
        from infer_cli.engine import llama_log

        llama_log.install()
    while True:
        try:
            (n,) = struct.unpack("<I", _read_exact(inp, 4))
            meta = json.loads(_read_exact(inp, n))
            case = {name: _read_exact(inp, size) for name, size in meta["files"]}
        except EOFError:
            return
        proto.write(json.dumps({"i": meta["i"], "event": "start"}) + "\n")
        outcome, detail = _outcome(target, case, ctx, scratch, timeout)
        proto.write(json.dumps({"i": meta["i"], "outcome": outcome, "detail": detail}) + "\n")


# ----------------------------------------------------------------------------------------------
# The parent: generates cases, feeds workers, counts and saves


@dataclass
class Result:
    target: str
    cases: int = 0
    counts: dict = field(default_factory=dict)
    saved: list = field(default_factory=list)
    seconds: float = 0.0
    details: list = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(v for k, v in self.counts.items() if k in FAILURES)

    def row(self) -> dict:
        c = self.counts
        return {"target": self.target, "cases": self.cases, "crashes": c.get("crash", 0),
                "hangs": c.get("hang", 0),
                "tracebacks": c.get("traceback", 0) + c.get("bad-error", 0),
                "memory": c.get("memory", 0), "accepted": c.get("ok", 0),
                "rejected": sum(v for k, v in c.items() if k.startswith("rejected")),
                "seconds": round(self.seconds, 1),
                "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else None}


class _Worker:
    def __init__(self, target: Target, ctx: Path, scratch: Path, timeout: float, mem_mib: int,
                 log: Path):
        def limits():
            os.setsid()
            lim = mem_mib << 20
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        import resource  # noqa: F401  (used in the child by limits)

        self.log = open(log, "wb")  # one log per worker: a crash's tail is its own
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "PYTHONFAULTHANDLER": "1",
               "GGML_NO_BACKTRACE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", target.name,
             "--ctx", str(ctx), "--scratch", str(scratch), "--timeout", str(timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
            preexec_fn=limits)
        self.buf = b""

    def send(self, i: int, case: Case) -> bool:
        meta = json.dumps({"i": i, "files": [[k, len(v)] for k, v in case.items()]}).encode()
        try:
            self.proc.stdin.write(struct.pack("<I", len(meta)) + meta + b"".join(case.values()))
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def result(self, deadline: float) -> dict | None:
        """The outcome message, or None on a hang (deadline) or the child's death."""
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                msg = json.loads(line)
                if "outcome" in msg:
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self.log.close()
        return code

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _base_head(ctx: Path) -> bytes | None:
    p = ctx / "real.head"
    return p.read_bytes() if p.is_file() else None


def save_case(target: str, case: Case, outcome: str, detail: str, seed: int, index: int,
              root: Path = SAVE_ROOT, base: bytes | None = None) -> Path:
    """The case as files in a folder; a GGUF the size of the real model's header is saved as
    the bytes that differ from it (patch.json), a few hundred bytes instead of megabytes."""
    digest = hashlib.sha256(b"".join(k.encode() + v for k, v in sorted(case.items()))).hexdigest()[:10]
    folder = root / target / f"{outcome}-s{seed}-i{index}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    case = dict(case)
    head = case.get("model.gguf")
    if base is not None and head is not None and len(head) == len(base):
        runs, i = [], 0
        while i < len(head):
            if head[i] != base[i]:
                j = i
                while j < len(head) and head[j] != base[j]:
                    j += 1
                runs.append([i, head[i:j].hex()])
                i = j
            else:
                i += 1
        del case["model.gguf"]
        case["patch.json"] = json.dumps({"base": "real.head", "patches": runs}).encode()
    for name, data in case.items():
        (folder / name).write_bytes(data)
    (folder / "OUTCOME.txt").write_text(f"{outcome}\n{detail}\n")
    return folder


def load_case(folder: Path, ctx: Path | None = None) -> Case:
    case = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in ("OUTCOME.txt", "EXPECT.txt")}
    if "patch.json" in case:
        spec = json.loads(case.pop("patch.json"))
        buf = bytearray((ctx / spec["base"]).read_bytes())
        for off, hexdata in spec["patches"]:
            data = bytes.fromhex(hexdata)
            buf[off:off + len(data)] = data
        case["model.gguf"] = bytes(buf)
    return case


def prepare(target: Target, work: Path) -> Path:
    ctx = work / "ctx"
    ctx.mkdir(parents=True, exist_ok=True)
    target.prepare(ctx)
    return ctx


def run_cases(target: Target, cases: Iterator[Case], ctx: Path, work: Path, *, seed: int,
              timeout: float | None = None, mem_mib: int | None = None, save: bool = True,
              save_root: Path = SAVE_ROOT, progress: bool = False) -> Result:
    timeout = timeout or target.timeout
    mem = mem_mib or target.mem_mib
    res = Result(target.name)
    t0 = time.monotonic()
    scratch = work / "scratch"
    log = work / "worker.log"
    w = None
    for i, case in enumerate(cases):
        if w is None:
            w = _Worker(target, ctx, scratch, timeout, mem, log)
        msg = None
        if w.send(i, case):
            # a fresh worker imports its libraries first: allow for it
            msg = w.result(time.monotonic() + timeout + 30)
        if msg is None:
            code = w.kill()
            w = None
            if code is not None and code < 0:
                outcome, detail = "crash", f"killed by {signal.Signals(-code).name}"
            elif code is None or code == -signal.SIGKILL:
                outcome, detail = "hang", f"no answer within {timeout:g} s"
            else:
                outcome, detail = "crash", f"worker exited with status {code}"
            if code == -signal.SIGKILL:
                outcome, detail = "hang", f"no answer within {timeout:g} s (killed)"
            try:
                tail = log.read_bytes()[-3000:].decode("utf-8", "replace")
            except OSError:
                tail = ""
            detail += "\n" + tail
        else:
            outcome, detail = msg["outcome"], msg["detail"]
        key = outcome.split(":")[0] if outcome.startswith("rejected") else outcome
        res.counts[outcome if not outcome.startswith("rejected") else outcome] = \
            res.counts.get(outcome, 0) + 1
        res.cases += 1
        if key in FAILURES:
            res.details.append((i, outcome, detail))
            if save:
                res.saved.append(save_case(target.name, case, outcome, detail, seed, i, save_root,
                                           _base_head(ctx) if target.name == "gguf-load" else None))
            if progress:
                print(f"  case {i}: {outcome}: {detail.strip().splitlines()[-1] if detail.strip() else ''}",
                      flush=True)
        if progress and (i + 1) % 500 == 0:
            print(f"  {i + 1} cases, {time.monotonic() - t0:.0f} s, {dict(res.counts)}", flush=True)
    if w is not None:
        w.close()
    res.seconds = time.monotonic() - t0
    return res


def campaign(name: str, cases: int, seed: int = 0, *, timeout: float | None = None,
             mem_mib: int | None = None, save: bool = True, progress: bool = False,
             work: Path | None = None, save_root: Path = SAVE_ROOT) -> Result:
    target = TARGETS[name]
    own = work is None
    work = Path(tempfile.mkdtemp(prefix=f"infer-fuzz-{name}-")) if own else work
    try:
        ctx = prepare(target, work)
        rng = random.Random(f"{name}:{seed}")
        gen = target.generate(ctx, rng, cases, seed)
        return run_cases(target, gen, ctx, work, seed=seed, timeout=timeout, mem_mib=mem_mib,
                         save=save, progress=progress, save_root=save_root)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def replay(name: str, folders: list[Path], *, timeout: float | None = None) -> Result:
    target = TARGETS[name]
    work = Path(tempfile.mkdtemp(prefix=f"infer-fuzz-{name}-"))
    try:
        ctx = prepare(target, work)
        res = run_cases(target, (load_case(f, ctx) for f in folders), ctx, work, seed=-1,
                        timeout=timeout, save=False)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=sorted(TARGETS) + ["all"], nargs="?")
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, help="seconds per case (default: per target)")
    ap.add_argument("--mem", type=int, help="address-space limit in MiB (default: per target)")
    ap.add_argument("--replay", nargs="?", const="", metavar="PATH",
                    help="run saved cases again (default: all under .cache/fuzz/TARGET)")
    ap.add_argument("--json", action="store_true", help="print the result rows as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ctx", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.ctx), Path(args.scratch), args.timeout)
        return 0
    if not args.target:
        ap.error("a target is needed")
    names = sorted(TARGETS) if args.target == "all" else [args.target]
    rows = []
    failed = 0
    for name in names:
        if args.replay is not None:
            base = Path(args.replay) if args.replay else SAVE_ROOT / name
            folders = [base] if (base / "OUTCOME.txt").exists() or (
                base.is_dir() and any(p.is_file() for p in base.iterdir())) and not any(
                p.is_dir() for p in base.iterdir()) else sorted(p for p in base.glob("*") if p.is_dir())
            print(f"{name}: replaying {len(folders)} saved cases", flush=True)
            res = replay(name, folders, timeout=args.timeout)
            for i, outcome, detail in res.details:
                print(f"  {folders[i]}: {outcome}\n    " + "\n    ".join(detail.strip().splitlines()[-6:]))
        else:
            print(f"{name}: {args.cases} cases, seed {args.seed}", flush=True)
            res = campaign(name, args.cases, args.seed, timeout=args.timeout, mem_mib=args.mem,
                           progress=True)
            for p in res.saved:
                print(f"  saved {p}")
        row = res.row()
        rows.append(row)
        failed += res.failures
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "target"), flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
