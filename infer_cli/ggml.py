"""ggml's tensor types: ids, names and block sizes, taken from the gguf package's constants.

The one table for every place that needs a type id or a type's size (the KV cache options, the
memory plan, the GGUF reader, quantization). Imports gguf (and numpy): import this inside the
commands that need it, not at CLI start-up.
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# Types the vendored llama.cpp (0c1e570) has beyond the ones the gguf package may know.
_NEWER = {"NVFP4": 40, "Q1_0": 41, "Q2_0": 42}
# GGML_TYPE_COUNT of the vendored llama.cpp: terminates llama.cpp's tensor-type override list.
TYPE_COUNT = 43

TYPE_IDS: dict[str, int] = {**_NEWER, **{t.name: int(t.value) for t in GGMLQuantizationType}}
TYPE_NAMES: dict[int, str] = {v: k for k, v in TYPE_IDS.items()}

# Float types: rewriting a tensor stored in one of these loses nothing it had not lost already.
FLOAT_TYPES = frozenset(TYPE_IDS[n] for n in ("F32", "F16", "BF16"))

# The types llama.cpp's KV cache accepts (--cache-type-k / -v), lowercase as its tools spell them.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
# A V cache in one of these works without flash attention; quantized ones need it.
UNQUANTIZED_KV = ("f32", "f16", "bf16")


def type_id(name: str) -> int:
    """The ggml type id of ``name`` (any case); KeyError for an unknown name."""
    return TYPE_IDS[name.upper()]


def block(type_or_name: int | str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type; KeyError if gguf has no size."""
    tid = type_id(type_or_name) if isinstance(type_or_name, str) else type_or_name
    return GGML_QUANT_SIZES[GGMLQuantizationType(tid)]


def row_bytes(n: int, type_or_name: int | str) -> int:
    """Bytes of ``n`` elements of one row in this type (n a multiple of its block size)."""
    size, nbytes = block(type_or_name)
    return n // size * nbytes
