"""Phi-3 / Phi-4 (Phi3ForCausalLM) for the converter.

The checkpoint's fused tensors already have llama.cpp's layout: ``qkv_proj`` is q, k, v stacked
by rows (llama.cpp's attn_qkv, split in that order), and ``gate_up_proj`` is the gate half then
the up half (llama.cpp's ffn_up under a SWIGLU, which gates with the first half). What needs
care is the rotary embedding: only ``partial_rotary_factor`` of each head rotates (Phi-4 mini),
and the long-context checkpoints' ``longrope`` (once ``su``) scaling becomes two tensors,
``rope_factors_long`` / ``rope_factors_short`` (llama.cpp takes the long ones when the context
exceeds ``original_max_position_embeddings``, as Hugging Face does past that sequence length),
plus the attention factor both scale cos and sin by. ``sliding_window`` is written as llama.cpp's
converter writes it (0 where unset); llama.cpp's phi3 graph does not apply it.
"""

from __future__ import annotations

import math

from infer_cli.errors import BadCheckpoint

LONGROPE = ("longrope", "su")


def _rope(c: dict) -> dict:
    p = c.get("rope_parameters") or c.get("rope_scaling") or {}
    return dict(p) if isinstance(p, dict) else {}


def _kind(c: dict) -> str:
    p = _rope(c)
    return str(p.get("rope_type") or p.get("type") or "").lower()


def head_dim(c: dict) -> int:
    return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


def rope_dims(c: dict, where: str = "config.json") -> int:
    """Rotated dimensions of a head, as Hugging Face computes them (int(head_dim * factor))."""
    f = c.get("partial_rotary_factor", _rope(c).get("partial_rotary_factor", 1.0))
    if type(f) not in (int, float) or not 0 < f <= 1:
        raise BadCheckpoint(where, f"partial_rotary_factor is {f!r}; it must be a number in (0, 1]")
    n = int(head_dim(c) * f)
    if n < 2 or n % 2:
        raise BadCheckpoint(where, f"partial_rotary_factor {f} rotates {n} of {head_dim(c)} "
                            "dimensions per head; it must be an even number")
    return n


def original_ctx(c: dict, where: str = "config.json") -> int | None:
    v = c.get("original_max_position_embeddings", _rope(c).get("original_max_position_embeddings"))
    if v is None:
        return None
    if type(v) is not int or not 1 <= v < 1 << 31:
        raise BadCheckpoint(where, f"original_max_position_embeddings is {v!r}; it must be a positive integer")
    return v


def attention_factor(c: dict) -> float:
    """Hugging Face's longrope attention scaling: ``attention_factor`` if given, else
    sqrt(1 + ln(s) / ln(original)) with s = max_position_embeddings / original (1 when s <= 1)."""
    p = _rope(c)
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])
    orig = original_ctx(c) or int(c.get("max_position_embeddings", 4096))
    s = int(c.get("max_position_embeddings", orig)) / orig
    return math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0


def rope_factor_tensors(c: dict, where: str) -> list:
    """[("rope_factors_long.weight", array), ("rope_factors_short.weight", array)] for a longrope
    config (one factor per rotated pair of dimensions), else []."""
    import numpy as np

    kind, p = _kind(c), _rope(c)
    if kind not in LONGROPE:
        return []
    n = rope_dims(c, where) // 2
    out = []
    for key, name in (("long_factor", "rope_factors_long.weight"), ("short_factor", "rope_factors_short.weight")):
        v = p.get(key)
        ok = (isinstance(v, list) and len(v) == n
              and all(type(x) in (int, float) and math.isfinite(x) and x > 0 for x in v))
        if not ok:
            got = f"{len(v)} values" if isinstance(v, list) else repr(v)[:30]
            raise BadCheckpoint(where, f"rope_scaling.{key} is {got}; {kind} needs {n} positive numbers "
                                f"(one per rotated pair of the {rope_dims(c)} rotary dimensions)")
        out.append((name, np.asarray(v, dtype=np.float32)))
    if original_ctx(c) is None:
        raise BadCheckpoint(where, f"{kind} rope scaling needs original_max_position_embeddings")
    return out


def check_tensors(refs: dict, c: dict, where: str) -> None:
    """The fused matrices' shapes against config.json (a wrong split would load as nonsense)."""
    d, nh = c["hidden_size"], c["num_attention_heads"]
    rope_dims(c, where), original_ctx(c, where)
    nkv, hd, ff = c.get("num_key_value_heads") or nh, head_dim(c), c["intermediate_size"]
    if hd * nh != d:
        raise BadCheckpoint(where, f"head_dim {hd} x {nh} heads is not hidden_size {d}, which llama.cpp's "
                            "phi3 graph needs")
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, want in (("self_attn.qkv_proj.weight", ((nh + 2 * nkv) * hd, d)),
                           ("mlp.gate_up_proj.weight", (2 * ff, d))):
            ref = refs.get(p + name)
            if ref is None:
                raise BadCheckpoint(where, f"tensor {p + name} is missing")
            if tuple(ref.shape) != want:
                raise BadCheckpoint(where, f"tensor {p + name} has shape {list(ref.shape)}; config.json "
                                    f"makes it {list(want)}")


def metadata(w, c: dict) -> None:
    """What llama.cpp's phi3 loader reads beyond the common keys (the rope dimension count is
    written by the caller from ``rope_dims``)."""
    import gguf

    orig = original_ctx(c)
    if orig is not None and _kind(c) != "yarn":  # yarn's is written with its other keys
        w.add_rope_scaling_orig_ctx_len(orig)
    w.add_sliding_window(int(c.get("sliding_window") or 0))
    if _kind(c) in LONGROPE:
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_attn_factors(attention_factor(c))
