"""Tests for infer_cli.gguf_info: real models, crafted valid files, and many broken ones.

Every broken file must give BadModelFile with a sensible reason in well under a second.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import random
import struct
import time
import tracemalloc
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf import gguf_reader as _gguf_reader_module
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from infer_cli.errors import BadModelFile
from infer_cli.models.gguf_info import (
    ArrayInfo,
    GGUFInfo,
    TensorInfo,
    parse_header,
    quant_label,
    read_gguf,
    read_split,
    summary,
)

VT = GGUFValueType
QT = GGMLQuantizationType




# ----------------------------------------------------------------------------------------------
# A small GGUF writer built on struct, so tests can write any byte they like.

_FMT = {
    VT.UINT8: "B", VT.INT8: "b", VT.UINT16: "H", VT.INT16: "h", VT.UINT32: "I", VT.INT32: "i",
    VT.FLOAT32: "f", VT.BOOL: "?", VT.UINT64: "Q", VT.INT64: "q", VT.FLOAT64: "d",
}


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: int, v) -> bytes:
    """Encode a value; an ARRAY value is (element type, items)."""
    if vtype == VT.STRING:
        return gstr(v)
    if vtype == VT.ARRAY:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(value(etype, x) for x in items)
    return struct.pack("<" + _FMT[vtype], v)


def kv(key: str | bytes, vtype: int, v) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + value(vtype, v)


def tensor_info(name: str | bytes, shape, ggml_type: int, offset: int) -> bytes:
    return (
        gstr(name)
        + struct.pack("<I", len(shape))
        + struct.pack(f"<{len(shape)}q", *shape)
        + struct.pack("<IQ", ggml_type, offset)
    )


def pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def nbytes(shape, ggml_type) -> int:
    block, size = GGML_QUANT_SIZES[QT(ggml_type)]
    return math.prod(shape) // block * size


def build(
    kvs: list[bytes],
    tensors=(),
    *,
    version: int = 3,
    alignment: int = 32,  # layout only; add a general.alignment kv yourself when not 32
    n_kv: int | None = None,
    n_tensors: int | None = None,
    offsets: list[int] | None = None,
    magic: bytes = b"GGUF",
) -> bytes:
    """A GGUF file: header, kvs, tensor table for (name, shape, type) triples, padding, data."""
    header = magic + struct.pack(
        "<IQQ",
        version,
        len(tensors) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    packed, cur = [], 0
    for _, shape, t in tensors:
        packed.append(cur)
        cur += pad(nbytes(shape, t), alignment)
    offsets = packed if offsets is None else offsets
    table = b"".join(tensor_info(n, s, t, o) for (n, s, t), o in zip(tensors, offsets))
    out = header + b"".join(kvs) + table
    if tensors:
        out += b"\0" * (pad(len(out), alignment) - len(out)) + b"\x11" * cur
    return out


def minimal_kvs() -> list[bytes]:
    return [kv("general.architecture", VT.STRING, "llama")]


ONE_TENSOR = [("output_norm.weight", (8,), QT.F32)]


TINY_TOKENS = [f"tok{i}" for i in range(100)]
TINY_KVS = [
    kv("general.architecture", VT.STRING, "llama"),
    kv("general.name", VT.STRING, "tiny"),
    kv("general.alignment", VT.UINT32, 64),
    kv("general.file_type", VT.UINT32, 7),  # MOSTLY_Q8_0
    kv("t.u8", VT.UINT8, 200),
    kv("t.i8", VT.INT8, -5),
    kv("t.u16", VT.UINT16, 65535),
    kv("t.i16", VT.INT16, -300),
    kv("t.u32", VT.UINT32, 4_000_000_000),
    kv("t.i32", VT.INT32, -7),
    kv("t.f32", VT.FLOAT32, 1.5),
    kv("t.bool", VT.BOOL, True),
    kv("t.u64", VT.UINT64, 2**64 - 1),
    kv("t.i64", VT.INT64, -(2**63)),
    kv("t.f64", VT.FLOAT64, 0.1),
    kv("t.str", VT.STRING, "héllo"),
    kv("t.strs", VT.ARRAY, (VT.STRING, ["a", "bc", ""])),
    kv("t.nested", VT.ARRAY, (VT.ARRAY, [(VT.INT32, [1, 2]), (VT.INT32, [3])])),
    kv("llama.block_count", VT.UINT32, 2),
    kv("llama.context_length", VT.UINT32, 128),
    kv("llama.embedding_length", VT.UINT32, 8),
    kv("llama.attention.head_count", VT.UINT32, 2),
    kv("llama.attention.head_count_kv", VT.ARRAY, (VT.INT32, [2, 1])),
    kv("llama.per_layer_flags", VT.ARRAY, (VT.UINT8, list(range(100)))),
    kv("tokenizer.ggml.model", VT.STRING, "gpt2"),
    kv("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, TINY_TOKENS)),
    kv("tokenizer.ggml.scores", VT.ARRAY, (VT.FLOAT32, [float(i) for i in range(100)])),
]
TINY_TENSORS = [
    ("token_embd.weight", (8, 100), QT.F32),
    ("blk.0.attn_q.weight", (32, 2), QT.Q8_0),
    ("output_norm.weight", (8,), QT.F32),
]


def tiny_bytes(version: int = 3) -> bytes:
    return build(TINY_KVS, TINY_TENSORS, alignment=64, version=version)


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def time_budget(scale: float = 200) -> float:
    """A time limit for reading one small file, relative to this machine's speed right now:
    ``scale`` times a read of the tiny valid model, and never under a second. It tells a reader
    that walks a crafted count (seconds to minutes) from one that stops at once, however loaded
    the machine is."""
    import io

    from infer_cli.models.gguf_info import parse_header

    data = tiny_bytes()
    start = time.perf_counter()
    parse_header(io.BytesIO(data), len(data), "tiny.gguf")  # in memory: no open() to patch
    baseline = time.perf_counter() - start
    return max(1.0, scale * baseline)


def expect_bad(path, *fragments: str, arrays: bool = False) -> BadModelFile:
    """read_gguf(path) raises BadModelFile within ``time_budget()``, its reason containing every
    fragment."""
    budget = time_budget()
    start = time.perf_counter()
    with pytest.raises(BadModelFile) as info:
        read_gguf(path, arrays=arrays)
    elapsed = time.perf_counter() - start
    assert elapsed < budget, f"took {elapsed:.2f} s (budget {budget:.2f}): {info.value.reason}"
    for fragment in fragments:
        assert fragment in info.value.reason, info.value.reason
    assert info.value.path == os.fspath(path)
    return info.value


# ----------------------------------------------------------------------------------------------
# Reference: gguf.GGUFReader, made usable on a 262k vocabulary.


def _plain_map(path, mode="r", **_):
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


def reference_reader(path: Path) -> GGUFReader:
    # GGUFReader spends most of its time in np.memmap's per-slice hooks (8 s on Gemma's vocab);
    # a plain ndarray over an mmap gives the same bytes about 4x faster.
    with mock.patch.object(_gguf_reader_module.np, "memmap", _plain_map):
        return GGUFReader(path)


def assert_matches_reference(info: GGUFInfo, ref: GGUFReader, full: GGUFInfo | None = None):
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(info.metadata) == keys
    assert info.version == ref.fields["GGUF.version"].contents()
    for key in keys:
        field, mine = ref.fields[key], info.metadata[key]
        if field.types[0] == VT.ARRAY:
            label = f"ARRAY[{field.types[-1].name}]"
        else:
            label = field.types[0].name
        assert info.value_types[key] == label, key
        if field.types[0] == VT.ARRAY and len(field.data) > 64:
            assert isinstance(mine, (ArrayInfo, list)), key
            assert len(mine) == len(field.data), key
            if isinstance(mine, ArrayInfo):
                assert mine.type_name == field.types[-1].name, key
            if full is not None:  # spot-check the loaded copy
                count = len(field.data)
                for i in (0, 1, count // 2, count - 1):
                    assert full.metadata[key][i] == field.contents(i), (key, i)
        else:
            assert mine == field.contents(), key
    assert info.alignment == ref.alignment
    assert info.data_offset == ref.data_offset
    assert len(info.tensors) == len(ref.tensors)
    for mine, theirs in zip(info.tensors, ref.tensors):
        assert mine.name == theirs.name
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.ggml_type == int(theirs.tensor_type)
        assert mine.type_name == theirs.tensor_type.name
        assert mine.offset == theirs.data_offset
        assert mine.n_elements == theirs.n_elements
        assert mine.n_bytes == theirs.n_bytes


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> GGUFInfo:
    return read_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf) -> GGUFInfo:
    return read_gguf(gemma3_gguf)


# ----------------------------------------------------------------------------------------------
# Real models


def test_smollm2_matches_gguf_reader(smollm2_gguf, smollm2):
    full = read_gguf(smollm2_gguf, arrays=True)
    assert_matches_reference(smollm2, reference_reader(smollm2_gguf), full)
    # arrays=True loads everything GGUFReader has, in full
    tokens = full.metadata["tokenizer.ggml.tokens"]
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(full.metadata["tokenizer.ggml.merges"]) == 48900


def test_gemma3_matches_gguf_reader(gemma3_gguf, gemma3):
    full = read_gguf(gemma3_gguf, arrays=True)
    assert_matches_reference(gemma3, reference_reader(gemma3_gguf), full)


def test_smollm2_facts(smollm2):
    info = smollm2
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.block_count == 30
    assert info.head_count == 9
    assert info.head_count_kv == 3 and info.head_count_kv_raw == 3
    assert info.embedding_length == 576
    assert info.feed_forward_length == 1536
    assert info.context_length == 8192
    assert info.key_length == info.value_length == 64  # 576 // 9: not stored, derived
    assert info.sliding_window is None
    assert info.vocab_size == 49152
    assert info.tokenizer_model == "gpt2"
    assert "<|im_start|>" in info.chat_template
    assert info.license == "apache-2.0"
    assert info.file_type_name == quant_label(info) == "Q4_1"
    assert 130e6 < info.n_params < 140e6
    assert info.n_params == 134_515_008
    assert len(info.tensors) == 272
    assert info.data_offset == 1_785_664
    assert 4.5 < info.bits_per_weight < 6.5
    assert info.split_info() == (0, 1)
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert tokens == ArrayInfo("STRING", 49152)
    assert info.get("general.languages") == ["en"]  # small arrays are read


def test_gemma3_facts(gemma3):
    info = gemma3
    assert info.architecture == "gemma3"
    assert info.block_count == 18
    assert info.sliding_window == 512
    assert info.vocab_size == 262144
    assert info.head_count == 4 and info.head_count_kv == 1
    assert info.key_length == info.value_length == 256  # stored explicitly, not 640 // 4
    assert info.context_length == 32768
    assert info.tokenizer_model == "llama"
    assert info.chat_template is None  # this conversion carries none
    assert quant_label(info) == "Q4_K_M"
    assert 260e6 < info.n_params < 280e6
    assert info.metadata["tokenizer.ggml.scores"] == ArrayInfo("FLOAT32", 262144)
    assert info.metadata["tokenizer.ggml.token_type"] == ArrayInfo("INT32", 262144)
    assert info.get("general.tags") == ["gemma3", "gemma", "google", "text-generation"]


def test_gemma3_reads_fast(gemma3_gguf):
    """The header reader skips the 262k-entry token arrays: clearly faster than reading
    them, measured side by side (best of three each)."""
    def best(**kw) -> float:
        t = math.inf
        for _ in range(3):
            start = time.perf_counter()
            read_gguf(gemma3_gguf, **kw)
            t = min(t, time.perf_counter() - start)
        return t

    header, whole = best(), best(arrays=True)
    assert header * 1.5 < whole, f"header {header:.3f} s, with arrays {whole:.3f} s"


def test_summary_is_json_and_small(smollm2, gemma3):
    for info in (smollm2, gemma3):
        text = json.dumps(summary(info), allow_nan=False)
        assert len(text) < 64_000  # no vocabularies inside
        facts = json.loads(text)
        assert facts["architecture"] == info.architecture
        assert facts["vocab_size"] == info.vocab_size
        assert facts["quant"] == quant_label(info)
        tokens = facts["metadata"]["tokenizer.ggml.tokens"]
        assert tokens == {"type": "STRING", "count": info.vocab_size}
    assert json.loads(json.dumps(summary(gemma3)))["sliding_window"] == 512


def test_summary_collapses_loaded_arrays(smollm2_gguf):
    facts = summary(read_gguf(smollm2_gguf, arrays=True))
    assert facts["metadata"]["tokenizer.ggml.merges"] == {"type": "STRING", "count": 48900}
    assert facts["metadata"]["tokenizer.ggml.token_type"] == {"type": "INT32", "count": 49152}
    assert facts == summary(read_gguf(smollm2_gguf))  # the same whichever way it was read


# ----------------------------------------------------------------------------------------------
# Truncated copies of the real SmolLM2 file


def _prefix_file(path: Path, header: bytes, cut: int) -> Path:
    """The first ``cut`` bytes of the model; the data region is a sparse hole (never read)."""
    with open(path, "wb") as f:
        f.write(header[:cut])
        f.truncate(cut)
    return path


def test_truncated_smollm2(tmp_path, smollm2_gguf, smollm2):
    info = smollm2
    header = _read_head(smollm2_gguf, info.data_offset)
    table = sum(8 + len(t.name) + 4 + 8 * len(t.shape) + 4 + 8 for t in info.tensors)
    table_start = info.data_offset - table - 32  # within one padding of the real start
    cuts = [1, 3, 4, 7, 8, 15, 16, 23, 24]
    cuts += [int(x) for x in np.linspace(25, table_start, 30)]  # key/values, vocab, merges
    cuts += [int(x) for x in np.linspace(table_start, info.data_offset - 1, 15)]  # tensor table
    target = tmp_path / "cut.gguf"
    for i, cut in enumerate(cuts):
        err = expect_bad(_prefix_file(target, header, cut), arrays=bool(i % 2))
        assert err.reason.startswith("truncated"), (cut, err.reason)
        assert err.truncated and err.at == cut, (cut, err.reason)
    for cut in (info.data_offset, info.data_offset + 1000, info.file_size // 2, info.file_size - 1):
        err = expect_bad(
            _prefix_file(target, header, cut),
            "would lie past the end of the file: the file is truncated",
        )
        assert err.truncated and err.at == cut
    # the whole file, header plus a hole where the weights were, is fine
    assert read_gguf(_prefix_file(target, header, info.file_size)).tensors == info.tensors
    expect_bad(_prefix_file(target, header, 0), "empty")


def _read_head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def test_mutated_smollm2_header_never_crashes(tmp_path, smollm2_gguf, smollm2):
    # Flip bytes in the header and tensor table: the parse succeeds or gives BadModelFile.
    header = bytearray(_read_head(smollm2_gguf, smollm2.data_offset))
    rng = random.Random(7)
    target = tmp_path / "mut.gguf"
    spots = list(range(0, 4096)) + list(range(len(header) - 16384, len(header)))
    for _ in range(20):
        data = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            data[rng.choice(spots)] = rng.randrange(256)
        _prefix_file(target, bytes(data), smollm2.file_size)
        _parse_or_bad(target)


def test_truncation_is_a_field_of_the_error(tmp_path):
    data = tiny_bytes()
    info = read_gguf(write(tmp_path, data))
    last = info.tensors[-1]
    for cut in (0, 3, 20, 200, info.data_offset - 1, info.data_offset, last.offset + last.n_bytes - 1):
        err = expect_bad(write(tmp_path, data[:cut]))
        assert err.truncated and err.at == cut, (cut, err.reason)
    for bad in (b"PK\x03\x04" + b"\0" * 100, build(minimal_kvs(), version=99)):
        err = expect_bad(write(tmp_path, bad))
        assert not err.truncated and err.at is None, err.reason


def test_parse_header_of_a_prefix(tmp_path):
    # The start of a file whose full size is known, as range requests of a remote file give it:
    # running out of bytes is a truncation below that size, and the whole file parses.
    data = tiny_bytes()
    whole = parse_header(io.BytesIO(data), len(data), "org/repo/tiny.gguf")
    assert whole.path == "org/repo/tiny.gguf" and whole.file_size == len(data)
    assert whole.tensors == read_gguf(write(tmp_path, data)).tensors
    # (the tensor table ends within the last alignment, 64 bytes, before the data)
    for n in (0, 7, 100, whole.data_offset // 2, whole.data_offset - 64):
        with pytest.raises(BadModelFile) as e:
            parse_header(io.BytesIO(data[:n]), len(data), "org/repo/tiny.gguf")
        err = e.value
        assert err.truncated and err.at is not None and err.at <= n < len(data), (n, err.reason)
    # The tensor data is never read: the header alone is enough.
    header = io.BytesIO(data[:whole.data_offset])
    assert parse_header(header, len(data), "x").tensors == whole.tensors


# ----------------------------------------------------------------------------------------------
# A crafted valid file


def test_tiny_file_exact_values(tmp_path):
    data = tiny_bytes()
    info = read_gguf(write(tmp_path, data))
    assert info.version == 3
    assert info.file_size == len(data)
    assert info.alignment == 64
    assert info.data_offset % 64 == 0
    m = info.metadata
    assert m["t.u8"] == 200 and m["t.i8"] == -5
    assert m["t.u16"] == 65535 and m["t.i16"] == -300
    assert m["t.u32"] == 4_000_000_000 and m["t.i32"] == -7
    assert m["t.f32"] == 1.5 and m["t.bool"] is True
    assert m["t.u64"] == 2**64 - 1 and m["t.i64"] == -(2**63)
    assert m["t.f64"] == 0.1
    assert m["t.str"] == "héllo"
    assert m["t.strs"] == ["a", "bc", ""]
    assert m["t.nested"] == [[1, 2], [3]]
    assert m["tokenizer.ggml.tokens"] == ArrayInfo("STRING", 100)
    assert m["tokenizer.ggml.scores"] == ArrayInfo("FLOAT32", 100)
    assert m["llama.per_layer_flags"] == list(range(100))  # numeric, not tokenizer.*: kept
    assert list(m) == [_key_of(v) for v in TINY_KVS]

    assert info.architecture == "llama" and info.name == "tiny"
    assert info.block_count == 2 and info.context_length == 128
    assert info.head_count_kv_raw == [2, 1] and info.head_count_kv == 2
    assert info.key_length == info.value_length == 4  # 8 // 2
    assert info.vocab_size == 100
    assert info.chat_template is None and info.license is None and info.sliding_window is None
    assert info.tokenizer_model == "gpt2"
    assert quant_label(info) == "Q8_0"

    d = info.data_offset
    assert info.tensors == [
        TensorInfo("token_embd.weight", (8, 100), 0, "F32", d, 800, 3200),
        TensorInfo("blk.0.attn_q.weight", (32, 2), 8, "Q8_0", d + 3200, 64, 68),
        TensorInfo("output_norm.weight", (8,), 0, "F32", d + 3200 + 128, 8, 32),
    ]
    assert info.n_params == 872 and info.weights_bytes == 3300
    assert info.bits_per_weight == pytest.approx(3300 * 8 / 872)
    assert info.tensor("output_norm.weight").n_bytes == 32 and info.tensor("nope") is None
    assert info.get("missing", 5) == 5 and info.arch_get("block_count") == 2
    assert info.paths == (str(tmp_path / "model.gguf"),)
    assert info.value_types["t.u16"] == "UINT16"
    assert info.value_types["t.str"] == "STRING"
    assert info.value_types["t.nested"] == "ARRAY[ARRAY]"
    assert info.value_types["tokenizer.ggml.tokens"] == "ARRAY[STRING]"
    facts = json.loads(json.dumps(summary(info), allow_nan=False))
    assert facts["head_count_kv_raw"] == [2, 1] and facts["head_count_kv"] == 2
    assert facts["metadata"]["t.nested"] == [[1, 2], [3]]
    assert facts["metadata"]["tokenizer.ggml.tokens"] == {"type": "STRING", "count": 100}
    assert facts["metadata"]["llama.per_layer_flags"] == list(range(100))
    assert facts["metadata_types"]["t.f64"] == "FLOAT64"


def _key_of(encoded_kv: bytes) -> str:
    (n,) = struct.unpack_from("<Q", encoded_kv)
    return encoded_kv[8 : 8 + n].decode()


def test_tiny_file_arrays_true(tmp_path):
    info = read_gguf(write(tmp_path, tiny_bytes()), arrays=True)
    assert info.metadata["tokenizer.ggml.tokens"] == TINY_TOKENS
    assert info.metadata["tokenizer.ggml.scores"] == [float(i) for i in range(100)]


def test_version_2_is_read(tmp_path):
    assert read_gguf(write(tmp_path, tiny_bytes(version=2))).version == 2


def test_no_tensors(tmp_path):
    # A vocab-only file: no tensors, so no padding after the header.
    data = build(minimal_kvs())
    info = read_gguf(write(tmp_path, data))
    assert info.tensors == [] and info.data_offset == len(data)
    assert info.n_params == 0 and info.bits_per_weight is None
    assert quant_label(info) == "unknown"


def test_quant_label_without_file_type(tmp_path):
    tensors = [
        ("token_embd.weight", (64, 4), QT.F16),
        ("blk.0.ffn_up.weight", (256, 8), QT.Q4_K),
        ("blk.0.ffn_down.weight", (256, 8), QT.Q4_K),
        ("output_norm.weight", (64,), QT.F32),
    ]
    info = read_gguf(write(tmp_path, build(minimal_kvs(), tensors)))
    assert quant_label(info) == "Q4_K"  # most bytes among 2-D weights
    assert info.vocab_size == 4  # from token_embd's second dimension


def test_vocab_size_from_arch_key(tmp_path):
    kvs = minimal_kvs() + [kv("llama.vocab_size", VT.UINT32, 321)]
    assert read_gguf(write(tmp_path, build(kvs))).vocab_size == 321


def test_gguf_writer_file_matches_reader(tmp_path):
    path = tmp_path / "w.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_name("written")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(70)])
    writer.add_tensor("token_embd.weight", np.ones((70, 16), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(16, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_gguf(path)
    assert_matches_reference(info, GGUFReader(path), read_gguf(path, arrays=True))
    assert info.name == "written" and info.vocab_size == 70
    assert info.tensor("token_embd.weight").shape == (16, 70)


# ----------------------------------------------------------------------------------------------
# Files that are not GGUF at all


def test_missing_file(tmp_path):
    expect_bad(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path):
    expect_bad(tmp_path, "directory")


def test_empty_file(tmp_path):
    expect_bad(write(tmp_path, b""), "empty")


def test_fifo(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    expect_bad(fifo, "not a regular file")  # and does not block waiting for a writer


def test_permission_denied(tmp_path, monkeypatch):
    path = write(tmp_path, tiny_bytes())
    if os.geteuid() == 0:  # root reads anything: simulate the refusal
        import infer_cli.models.gguf_info as mod

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(mod, "open", refuse, raising=False)
    else:
        path.chmod(0)
    expect_bad(path, "permission denied")


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"PK\x03\x04" + b"\0" * 100, "not a GGUF file (magic is b'PK\\x03\\x04')"),
        (b"hello, this is a text file\n" * 10, "not a GGUF file (magic is b'hell')"),
        (b"\x7fELF" + b"\0" * 60, "not a GGUF file"),
        (b"GGU", "truncated"),
        (b"GGUF\x03\x00", "truncated"),
        (b"GGML" + b"\0" * 30, "not a GGUF file"),
    ],
)
def test_foreign_files(tmp_path, data, fragment):
    expect_bad(write(tmp_path, data), fragment)


def test_real_zip_file(tmp_path):
    import zipfile

    path = tmp_path / "model.gguf"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.txt", "hello")
    expect_bad(path, "not a GGUF file (magic is b'PK\\x03\\x04')")


@pytest.mark.parametrize("size", [1, 5, 24, 100, 4096, 1 << 16, 1 << 20])
def test_random_bytes(tmp_path, size):
    rng = random.Random(size)
    expect_bad(write(tmp_path, rng.randbytes(size)), "not a GGUF file")
    # the same behind a valid magic and version: random counts, lengths and types
    for seed in range(5):
        rng = random.Random(size * 100 + seed)
        expect_bad(write(tmp_path, b"GGUF" + struct.pack("<I", 3) + rng.randbytes(size)))


def _parse_or_bad(path: Path) -> None:
    budget = time_budget()
    start = time.perf_counter()
    try:
        read_gguf(path)
    except BadModelFile:
        pass
    assert time.perf_counter() - start < budget


def test_mutated_tiny_file_never_crashes(tmp_path):
    base = tiny_bytes()
    rng = random.Random(42)
    target = tmp_path / "mut.gguf"
    for i in range(400):
        data = bytearray(base)
        if i % 2:  # a random byte or two
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:  # a plausible count or length turned huge
            pos = rng.randrange(len(data) - 8)
            data[pos : pos + 8] = struct.pack("<Q", rng.choice([2**40, 2**62, 2**64 - 1, 1000]))
        target.write_bytes(bytes(data[: rng.choice([len(data), rng.randrange(1, len(data))])]))
        _parse_or_bad(target)


# ----------------------------------------------------------------------------------------------
# Crafted headers


def test_version_1(tmp_path):
    path = write(tmp_path, build(minimal_kvs(), version=1))
    expect_bad(path, "GGUF version 1 is not supported (2 and 3 are)")


def test_version_99(tmp_path):
    path = write(tmp_path, build(minimal_kvs(), version=99))
    expect_bad(path, "GGUF version 99 is not supported")


def test_version_0(tmp_path):
    expect_bad(write(tmp_path, build(minimal_kvs(), version=0)), "GGUF version 0 is not supported")


def test_big_endian(tmp_path):
    data = b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + b"\0" * 64
    expect_bad(write(tmp_path, data), "big-endian GGUF is not supported")


@pytest.mark.parametrize("arrays", [False, True])
@pytest.mark.parametrize(
    "name, data, fragments",
    [
        ("2^60 tensors", build(minimal_kvs(), n_tensors=2**60), ["truncated", "2^60 tensors"]),
        ("2^64-1 tensors", build(minimal_kvs(), n_tensors=2**64 - 1), ["truncated", "tensors"]),
        ("2^60 kvs", build(minimal_kvs(), n_kv=2**60), ["truncated", "2^60 key/value pairs"]),
        ("more kvs than present", build(minimal_kvs(), n_kv=2), ["truncated", "key/value pair #1"]),
        (
            "string of 2^40 bytes",
            build([b"\x04\0\0\0\0\0\0\0name" + struct.pack("<IQ", VT.STRING, 2**40) + b"abc"]),
            ["truncated", "'name'", "2^40 bytes"],
        ),
        (
            "key of 2^40 bytes",
            build([struct.pack("<Q", 2**40) + b"abc" + b"\0" * 20]),
            ["truncated", "key #0", "2^40 bytes"],
        ),
        (
            "array of 2^62 elements",
            build([gstr("a") + struct.pack("<IIQ", VT.ARRAY, VT.UINT8, 2**62) + b"\0" * 16]),
            ["truncated", "'a'", "2^62 UINT8 elements"],
        ),
        (
            "string array of 2^62 elements",
            build([gstr("a") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2**62) + b"\0" * 16]),
            ["truncated", "2^62 STRING elements"],
        ),
        (
            "nested array of 2^62 elements",
            build(
                [
                    gstr("a")
                    + struct.pack("<IIQ", VT.ARRAY, VT.ARRAY, 1)
                    + struct.pack("<IQ", VT.INT32, 2**62)
                    + b"\0" * 16
                ]
            ),
            ["truncated", "2^62 INT32 elements"],
        ),
        (
            "string in a long array claims 2^40 bytes",
            build(
                [
                    gstr("tokenizer.ggml.tokens")
                    + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 100)
                    + b"".join(gstr("x") for _ in range(50))
                    + struct.pack("<Q", 2**40)
                    + b"".join(gstr("y") for _ in range(49))
                ]
            ),
            ["truncated", "an element of 'tokenizer.ggml.tokens'", "2^40 bytes"],
        ),
        (
            "unknown value type",
            build([gstr("a") + struct.pack("<I", 13) + b"\0" * 8]),
            ["'a'", "unknown value type 13"],
        ),
        (
            "unknown array element type",
            build([gstr("a") + struct.pack("<IIQ", VT.ARRAY, 99, 1) + b"\0" * 8]),
            ["'a'", "array of unknown value type 99"],
        ),
        (
            "arrays nested too deep",
            build(
                [
                    gstr("a")
                    + struct.pack("<I", VT.ARRAY)
                    + struct.pack("<IQ", VT.ARRAY, 1) * 9
                    + struct.pack("<IQ", VT.UINT8, 0)
                ]
            ),
            ["nests arrays more than 8 deep"],
        ),
        ("empty key", build([kv("", VT.UINT8, 1)]), ["key #0 is empty"]),
        ("key not UTF-8", build([kv(b"\xff\xfe", VT.UINT8, 1)]), ["key #0 is not valid UTF-8"]),
        (
            "duplicate key",
            build(
                minimal_kvs()
                + [kv("general.name", VT.STRING, "a"), kv("general.name", VT.STRING, "b")]
            ),
            ["duplicate key 'general.name'"],
        ),
        (
            "alignment 0",
            build(minimal_kvs() + [kv("general.alignment", VT.UINT32, 0)], ONE_TENSOR),
            ["general.alignment is 0; it must be a power of 2"],
        ),
        (
            "alignment 3",
            build(minimal_kvs() + [kv("general.alignment", VT.UINT32, 3)], ONE_TENSOR),
            ["general.alignment is 3; it must be a power of 2"],
        ),
        (
            "alignment of the wrong type",
            build(minimal_kvs() + [kv("general.alignment", VT.UINT64, 32)], ONE_TENSOR),
            ["general.alignment is a UINT64; it must be a UINT32"],
        ),
        (
            "unknown ggml type",
            build(minimal_kvs(), n_tensors=1) + tensor_info("x", (8,), 99, 0),
            ["tensor 'x' has unknown ggml type 99"],
        ),
        (
            "removed ggml type Q4_2",
            build(minimal_kvs(), n_tensors=1) + tensor_info("x", (32,), 4, 0),
            ["tensor 'x' has unknown ggml type 4"],
        ),
        (
            "9 dimensions",
            build(minimal_kvs(), n_tensors=1) + tensor_info("x", (1,) * 9, QT.F32, 0),
            ["tensor 'x' has 9 dimensions; at most 4"],
        ),
        (
            "negative dimension",
            build(minimal_kvs(), n_tensors=1) + tensor_info("x", (8, -1), QT.F32, 0),
            ["tensor 'x' has a negative dimension"],
        ),
        (
            "2^64 elements",
            build(minimal_kvs(), n_tensors=1) + tensor_info("x", (2**32, 2**32), QT.F32, 0),
            ["tensor 'x' has 2^64 elements; llama.cpp allows fewer than 2^63"],
        ),
        (
            "row not a whole number of blocks",
            build(minimal_kvs(), n_tensors=1) + tensor_info("x", (33, 2), QT.Q8_0, 0) + b"\0" * 200,
            ["tensor 'x' rows have 33 elements", "Q8_0 block size 32"],
        ),
        (
            "tensor name of 2^62 bytes",
            build(minimal_kvs(), n_tensors=1) + struct.pack("<Q", 2**62) + b"\0" * 40,
            ["truncated", "tensor #0's name", "2^62 bytes"],
        ),
        (
            "tensor name too long",
            build(minimal_kvs(), [("x" * 64, (8,), QT.F32)]),
            ["tensor #0's name is 64 bytes; llama.cpp allows 63"],
        ),
        (
            "duplicate tensor name",
            build(minimal_kvs(), [("x", (8,), QT.F32), ("x", (8,), QT.F32)]),
            ["duplicate tensor name 'x'"],
        ),
        (
            "tensor offset past EOF",
            build(minimal_kvs(), ONE_TENSOR, offsets=[2**40]),
            [
                "tensor 'output_norm.weight' would lie past the end of the file: "
                "the file is truncated"
            ],
        ),
        (
            "misaligned tensor offset",
            build(minimal_kvs(), [("a", (8,), QT.F32), ("b", (8,), QT.F32)], offsets=[0, 33]),
            ["tensor 'b' is at data offset 33, not a multiple of the alignment 32"],
        ),
        (
            "tensors not packed",
            build(minimal_kvs(), [("a", (8,), QT.F32), ("b", (8,), QT.F32)], offsets=[0, 64])
            + b"\0" * 64,
            ["tensor 'b' is at data offset 64", "packed in order"],
        ),
        (
            "overlapping tensors",
            build(minimal_kvs(), [("a", (64,), QT.F32), ("b", (8,), QT.F32)], offsets=[0, 0]),
            ["tensor 'b' is at data offset 0", "end at 256"],
        ),
        (
            "data section past EOF",
            build(minimal_kvs(), ONE_TENSOR)[: len(build(minimal_kvs(), ONE_TENSOR)) - 33],
            ["truncated"],
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_crafted(tmp_path, name, data, fragments, arrays):
    expect_bad(write(tmp_path, data), *fragments, arrays=arrays)


def test_array_longer_than_llama_cpp_allows(tmp_path):
    # 2^30 + 1 one-byte elements fit in the (sparse) file but llama.cpp refuses them.
    head = build([gstr("tokenizer.x") + struct.pack("<IIQ", VT.ARRAY, VT.UINT8, 2**30 + 1)])
    path = tmp_path / "big.gguf"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + 2**30 + 64)
    expect_bad(path, "2^30")


def test_skipped_arrays_are_not_loaded(tmp_path):
    # 64 MiB of array in a sparse file: arrays=False must step over it, not read it.
    count = 64 << 20
    head = build(
        [kv("general.architecture", VT.STRING, "llama")]
        + [gstr("tokenizer.blob") + struct.pack("<IIQ", VT.ARRAY, VT.UINT8, count)],
        n_kv=3,
    )
    tail = kv("general.name", VT.STRING, "after the blob")
    path = tmp_path / "blob.gguf"
    with open(path, "wb") as f:
        f.write(head)
        f.seek(len(head) + count)
        f.write(tail)
    tracemalloc.start()
    try:
        info = read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.metadata["tokenizer.blob"] == ArrayInfo("UINT8", count)
    assert info.name == "after the blob"
    assert peak < 4 << 20, peak


# ----------------------------------------------------------------------------------------------
# Split files


def _shard(no: int, count: int, tensors, extra=()) -> bytes:
    kvs = minimal_kvs() + [
        kv("split.no", VT.UINT16, no),
        kv("split.count", VT.UINT16, count),
        kv("split.tensors.count", VT.INT32, 3),
        *extra,
    ]
    return build(kvs, tensors)


SHARD_TENSORS = [
    [("token_embd.weight", (8, 10), QT.F32), ("output_norm.weight", (8,), QT.F32)],
    [("output.weight", (8, 10), QT.F16)],
]


def test_read_split(tmp_path):
    paths = [
        write(tmp_path, _shard(i, 2, t), f"m-0000{i + 1}-of-00002.gguf")
        for i, t in enumerate(SHARD_TENSORS)
    ]
    info = read_split(paths)
    names = [t.name for t in info.tensors]
    assert names == ["token_embd.weight", "output_norm.weight", "output.weight"]
    assert [t.shard for t in info.tensors] == [0, 0, 1]
    assert info.paths == tuple(str(p) for p in paths)
    assert info.file_size == sum(p.stat().st_size for p in paths)
    assert info.n_params == 80 + 8 + 80
    assert info.split_info() == (0, 2)
    second = read_gguf(paths[1])  # one shard alone is readable too
    assert second.split_info() == (1, 2) and len(second.tensors) == 1


def test_read_split_errors(tmp_path):
    a = write(tmp_path, _shard(0, 2, SHARD_TENSORS[0]), "a.gguf")
    b = write(tmp_path, _shard(1, 2, SHARD_TENSORS[1]), "b.gguf")
    with pytest.raises(BadModelFile, match="split.count says 2 shards but 1 were given"):
        read_split([a])
    with pytest.raises(BadModelFile, match="split.no is 1"):
        read_split([b, a])
    dup = write(tmp_path, _shard(1, 2, SHARD_TENSORS[0]), "dup.gguf")
    with pytest.raises(BadModelFile, match="tensor 'token_embd.weight' is also in shard 1"):
        read_split([a, dup])
    with pytest.raises(ValueError):
        read_split([])
