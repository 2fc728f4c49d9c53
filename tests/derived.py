"""Bigger test models made from the shipped ones: llama.cpp expands a quantized GGUF to F16 or
F32 (``allow_requantize``), which gives speculative decoding its target/draft pairs. Made once
and kept beside the originals in .cache/test-home."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

FTYPES = {"F32": 0, "F16": 1}


def expand(src: Path, ftype: str) -> Path:
    """``src`` rewritten at ``ftype`` (F32 or F16), next to it; reused when already there."""
    import llama_cpp

    dest = src.with_name(f"{src.stem}.{ftype}.gguf")
    if dest.exists():
        return dest
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize returned {rc} for {src} -> {ftype}")
    os.replace(tmp, dest)
    return dest
