"""Hugging Face checkpoint folder -> GGUF, without torch.

Tensors are read one at a time from memory-mapped safetensors and written straight to the
output, so memory stays near the size of the largest tensor. Supported so far: the Llama
family (Llama 2/3/3.1+ with llama3 rope scaling, Mistral, SmolLM; a SentencePiece tokenizer.model,
as Llama 2 and Mistral v0.1 have, is taken over tokenizer.json as llama.cpp's converter does),
Qwen2 / Qwen2.5 / Qwen3 with byte-level BPE tokenizers, and Gemma 2 / Gemma 3 (text) with their
SentencePiece tokenizer.model. A multimodal Gemma 3 (Gemma3ForConditionalGeneration) converts as
its text model: text_config over the top level with the defaults transformers fills in, tensors
under ``language_model.`` renamed, the vision tower and projector left out with a note.

Mixtures of experts: Qwen2-MoE (with its sigmoid-gated shared expert), Qwen3-MoE and Mixtral.
moe.py checks the expert tensors against config.json and stacks each layer's per-expert matrices
into llama.cpp's 3-D ``ffn_{gate,up,down}_exps``, loaded one stacked tensor at a time (so memory
stays near the largest stacked tensor); routers stay F32 at every output type. Phi-3 / Phi-4
(phi3.py): fused qkv and gate_up as they are, partial rotary, longrope's long and short factor
tensors.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from infer_cli.errors import BadCheckpoint, UnsupportedArchitecture
from infer_cli.files import atomic_output, exclusive

from .llama_quant import QuantResult, check_disk
from .safetensors_io import TensorRef, load_f32, read_header


@dataclass(frozen=True)
class Family:
    arch: str            # GGUF architecture name
    permute_qk: bool     # Llama's rotary layout differs from the HF one
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's RMSNorm scales by 1 + w)


FAMILIES = {
    "LlamaForCausalLM": Family("llama", True),
    "MistralForCausalLM": Family("llama", True),
    "Qwen2ForCausalLM": Family("qwen2", False),
    "Qwen3ForCausalLM": Family("qwen3", False),   # Qwen2 plus per-head q_norm / k_norm, no qkv bias
    # mixtures of experts (quantize/moe.py stacks the per-expert tensors)
    "Qwen2MoeForCausalLM": Family("qwen2moe", False),  # plus a shared expert with a sigmoid gate
    "Qwen3MoeForCausalLM": Family("qwen3moe", False),
    "MixtralForCausalLM": Family("llama", True),
    "Phi3ForCausalLM": Family("phi3", False),     # Phi-3 and Phi-4: fused qkv and gate_up (quantize/phi3.py)
    "Gemma2ForCausalLM": Family("gemma2", False, 1.0),
    "Gemma3ForCausalLM": Family("gemma3", False, 1.0),
    "Gemma3ForConditionalGeneration": Family("gemma3", False, 1.0),  # its text model only
}

GEMMA = ("gemma2", "gemma3")

# Multimodal checkpoints whose text model is converted alone: the keys their config.json nests in
# text_config, with what transformers' text config class fills in where a key is absent
# (gemma-3-4b-it names six). The vision tower and projector would make a separate mmproj GGUF.
MULTIMODAL_TEXT_DEFAULTS = {
    "Gemma3ForConditionalGeneration": {
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256,
        "sliding_window": 4096, "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0},
}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


def supported() -> list[str]:
    return sorted(FAMILIES)


# --- reading the folder ----------------------------------------------------------------------

def _json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise BadCheckpoint(str(path.parent), f"{path.name} is missing")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BadCheckpoint(str(path), f"not valid JSON ({e})") from None


def tensor_refs(folder: Path) -> dict[str, TensorRef]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_json(index).get("weight_map", {}).values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise BadCheckpoint(str(folder), f"shard {missing[0]} is missing")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise BadCheckpoint(str(folder), "no *.safetensors files")
    refs: dict[str, TensorRef] = {}
    for f in files:
        refs.update(read_header(folder / f))
    return refs


def family_of(config: dict) -> Family:
    archs = config.get("architectures") or [config.get("model_type", "?")]
    fam = FAMILIES.get(archs[0])
    if fam is None:
        raise UnsupportedArchitecture(str(archs[0]), supported())
    return fam


def multimodal_arch(config) -> str | None:
    """The class name of a multimodal checkpoint whose text model alone is converted, else None."""
    archs = config.get("architectures") if isinstance(config, dict) else None
    if isinstance(archs, list) and archs and archs[0] in MULTIMODAL_TEXT_DEFAULTS:
        return archs[0]
    return None


def text_config(path: Path, config):
    """config.json as the text model sees it: a multimodal checkpoint's text_config over its top
    level (as llama.cpp's converter merges them) with the defaults its config class fills in;
    any other config unchanged."""
    arch = multimodal_arch(config)
    if arch is None:
        return config
    nested = config.get("text_config") or {}
    if not isinstance(nested, dict):
        raise BadCheckpoint(str(path), "text_config must be an object")
    top = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    return {**top, **MULTIMODAL_TEXT_DEFAULTS[arch], **nested, "architectures": [arch]}


def multimodal_note(config) -> str | None:
    """What converting a multimodal checkpoint leaves out, or None for a text model."""
    arch = multimodal_arch(config)
    if arch is None:
        return None
    return (f"{arch} is a vision-language model: only its text model is converted; the vision "
            "tower and multimodal projector are left out (they would make a separate mmproj GGUF)")


def checkpoint_notes(folder: Path) -> list[str]:
    """Notes about converting ``folder`` a person should see before it starts (from config.json
    alone; a folder the converter will refuse has none)."""
    path = Path(folder) / "config.json"
    try:
        raw = _json(path)
        check_config(path, text_config(path, raw))
        note = multimodal_note(raw)
    except BadCheckpoint:
        return []
    return [note] if note else []


def _text_tensor_name(hf: str, multimodal: bool) -> str | None:
    """A multimodal checkpoint's tensor under its text model's name (``language_model.model.*``
    and ``model.language_model.*`` both become ``model.*``), None for the vision side's."""
    if not multimodal:
        return hf
    if hf.startswith(_VISION_PREFIXES):
        return None
    return hf.replace("language_model.", "", 1)


# --- tensors ----------------------------------------------------------------------------------

def _permute(w, n_head: int):
    """HF's rotary layout (halves) to llama.cpp's (interleaved pairs), for q and k."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def _plan_tensors(refs: dict[str, TensorRef], fam: Family, config: dict) -> list[tuple[str, TensorRef]]:
    import gguf

    n_layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[fam.arch.upper()], n_layers)
    plan = []
    multimodal = multimodal_arch(config) is not None
    for hf_name, ref in refs.items():
        hf = _text_tensor_name(hf_name, multimodal)
        if hf is None or hf.endswith("rotary_emb.inv_freq"):
            continue
        if hf == "lm_head.weight" and (config.get("tie_word_embeddings") or fam.arch in GEMMA):
            continue  # llama.cpp's Gemma graphs always use the embedding as the output
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadCheckpoint(hf, f"tensor {hf} has no GGUF name for {fam.arch}")
        plan.append((name, ref))
    return plan


def rope_params(c: dict) -> dict:
    p = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    p = dict(p.get("full_attention", p))
    if "rope_type" not in p and "type" in p:
        p["rope_type"] = p["type"]
    return p


def llama3_rope_factors(c: dict):
    """Per-frequency divisors for Llama 3.1+'s rope scaling (the ``rope_freqs`` tensor), by the
    rule of llama.cpp's converter: long wavelengths scaled by ``factor``, short ones kept, a smooth
    blend between."""
    import math

    import numpy as np

    p = rope_params(c)
    base = float(p.get("rope_theta", c.get("rope_theta", 10000.0)))
    dim = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    factor = float(p.get("factor", 8.0))
    lo, hi = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old = float(p.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass(frozen=True)
class Extra:
    """A tensor the converter makes rather than reads (ref-compatible where the writer needs it)."""
    name: str
    data: object

    @property
    def shape(self):
        return tuple(self.data.shape)


def _transform(name: str, hf: str, data, fam: Family, config: dict):
    if fam.norm_shift and hf.endswith("norm.weight"):
        return data + fam.norm_shift
    if fam.arch in GEMMA and hf.endswith("embed_tokens.weight"):
        return data[:config["_n_vocab"]]   # rows past the tokenizer's vocabulary are dropped
    if fam.permute_qk and hf.endswith("q_proj.weight"):
        return _permute(data, int(config["num_attention_heads"]))
    if fam.permute_qk and hf.endswith("k_proj.weight"):
        n_kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        return _permute(data, n_kv)
    return data


# Kept in F32 at every output type, as llama.cpp's converter and quantizer keep them: a rounded
# router can pick other experts.
_F32_ALWAYS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def _encode(data, out_type: str, name: str):
    """(array to write, ggml type) for one tensor; 1-D tensors stay F32, as llama.cpp keeps them."""
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if data.ndim <= 1 or out_type == "F32" or name.endswith(_F32_ALWAYS):
        return np.ascontiguousarray(data, dtype=np.float32), T.F32
    if out_type == "F16":
        return np.ascontiguousarray(data.astype(np.float16)), T.F16
    if out_type == "BF16":
        return gguf.quants.quantize(data, T.BF16), T.BF16
    if out_type == "Q8_0":
        if data.shape[-1] % 32:
            return np.ascontiguousarray(data.astype(np.float16)), T.F16
        return gguf.quants.quantize(data, T.Q8_0), T.Q8_0
    raise ValueError(out_type)


# --- the writer -------------------------------------------------------------------------------

FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}


# Upper bounds for config.json's sizes: far above any real model, low enough that a crafted
# value cannot make the converter allocate or loop without end.
_CONFIG_INTS = {"hidden_size": 1 << 18, "intermediate_size": 1 << 20, "num_hidden_layers": 1 << 12,
                "num_attention_heads": 1 << 12}
_OPTIONAL_INTS = {"num_key_value_heads": 1 << 12, "head_dim": 1 << 16, "vocab_size": 1 << 24,
                  "max_position_embeddings": (1 << 31) - 1, "sliding_window": (1 << 31) - 1}
_OPTIONAL_FLOATS = ("rms_norm_eps", "rope_theta", "attn_logit_softcapping", "final_logit_softcapping")
# What a malformed value deep in a checkpoint's files raises in the code that reads it.
_DATA_ERRORS = (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError,
                RecursionError, ZeroDivisionError, struct.error)


def check_config(path: Path, c) -> None:
    """BadCheckpoint unless config.json holds what the converter reads, with sane types and sizes."""
    import math

    if not isinstance(c, dict):
        raise BadCheckpoint(str(path), "config.json is not a JSON object")
    archs = c.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs)):
        raise BadCheckpoint(str(path), "architectures must be a non-empty list of class names")
    for key, limit in (*_CONFIG_INTS.items(), *_OPTIONAL_INTS.items()):
        v = c.get(key)
        if v is None and key in _OPTIONAL_INTS:
            continue
        lowest = 0 if key == "vocab_size" else 1
        if type(v) is not int or not lowest <= v <= limit:
            raise BadCheckpoint(str(path), f"{key} is {json.dumps(v)[:40] if v is not None else 'missing'}; "
                                f"it must be an integer from {lowest} to {limit:,}")
    for key in _OPTIONAL_FLOATS:
        v = c.get(key)
        if v is not None and (type(v) not in (int, float) or not math.isfinite(v)):
            raise BadCheckpoint(str(path), f"{key} must be a number")
    for key in ("rope_scaling", "rope_parameters"):
        if c.get(key) is not None and not isinstance(c[key], dict):
            raise BadCheckpoint(str(path), f"{key} must be an object")


def convert_checkpoint(folder: Path, dst: Path, out_type: str = "F16", *, name: str | None = None,
                       progress: Callable[[int, int], None] | None = None) -> QuantResult:
    """Write ``folder`` as a GGUF of ``out_type`` (F32, F16, BF16, Q8_0) at ``dst``, atomically.

    A folder whose files are malformed (a value of the wrong type or shape deep in a JSON file,
    tensors that disagree with config.json) is refused with BadCheckpoint, never a traceback."""
    try:
        return _convert(Path(folder), Path(dst), out_type, name, progress)
    except _DATA_ERRORS as e:
        reason = str(e)[:200] or type(e).__name__
        raise BadCheckpoint(str(folder), f"its files do not describe a model the converter can "
                            f"write ({type(e).__name__}: {reason})") from None


def _convert(folder: Path, dst: Path, out_type: str, name: str | None,
             progress: Callable[[int, int], None] | None) -> QuantResult:
    import gguf

    raw_config = _json(folder / "config.json")
    config = text_config(folder / "config.json", raw_config)
    check_config(folder / "config.json", config)
    fam = family_of(config)
    refs = tensor_refs(folder)
    from . import moe, phi3

    refs = moe.stack_experts(refs, config, str(folder))
    if fam.arch == "phi3":
        phi3.check_tensors(refs, config, str(folder))
    plan = _plan_tensors(refs, fam, config)
    if fam.arch == "llama" and rope_params(config).get("rope_type", "").lower() == "llama3":
        plan.append(("rope_freqs.weight", Extra("rope_freqs", llama3_rope_factors(config))))
    if fam.arch == "phi3":
        plan += [(n, Extra(n.removesuffix(".weight"), a)) for n, a in phi3.rope_factor_tensors(config, str(folder))]
    if fam.arch == "qwen2moe" and "output.weight" not in dict(plan):
        # llama.cpp's qwen2moe graph requires an output matrix: a tied embedding is written twice
        plan += [("output.weight", r) for n, r in plan if n == "token_embd.weight"]
    from .tokenizer_meta import read_tokenizer

    tok = read_tokenizer(folder, int(config.get("vocab_size") or 0), sentencepiece=fam.arch in GEMMA,
                         llama=fam.arch in ("llama", "phi3"))
    if fam.arch in GEMMA:
        config = dict(config, _n_vocab=len(tok.tokens))
        plan = [(n, _Truncated(r, len(tok.tokens)) if n == "token_embd.weight" else r) for n, r in plan]
    dst.parent.mkdir(parents=True, exist_ok=True)
    bpw = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5}[out_type]
    n_params = sum(_count(r.shape) for _, r in plan)
    check_disk(dst.parent, int(n_params * bpw / 8) + (64 << 20))
    t0 = time.perf_counter()
    with exclusive(dst), atomic_output(dst) as tmp:
        w = gguf.GGUFWriter(str(tmp), fam.arch)
        _metadata(w, fam, config, name or folder.name, out_type)
        tok.write(w)
        encoded_shapes = []
        for name, ref in plan:
            # Shapes and byte counts first (the header precedes the data), from a dry encode of
            # a zero row block: cheap, and exact for every output type.
            import numpy as np

            probe = np.zeros((1,) * (len(ref.shape) - 1) + (ref.shape[-1],), dtype=np.float32)
            arr, typ = _encode(probe, out_type, name)
            per_row = arr.nbytes
            rows = _count(ref.shape) // ref.shape[-1]
            dtype = (np.dtype(np.float32) if typ == gguf.GGMLQuantizationType.F32
                     else np.dtype(np.float16) if typ == gguf.GGMLQuantizationType.F16 else np.dtype(np.uint8))
            # gguf-py reads a uint8 (BF16, Q8_0) tensor's shape in bytes: its rows' byte length last
            shape = tuple(ref.shape) if dtype != np.uint8 else tuple(ref.shape[:-1]) + (per_row,)
            w.add_tensor_info(name, shape, dtype, per_row * rows, raw_dtype=typ)
            encoded_shapes.append(typ)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, ((name, ref), typ) in enumerate(zip(plan, encoded_shapes)):
            hf = ref.name
            raw = (ref.data if isinstance(ref, Extra) else ref.load() if isinstance(ref, moe.LAZY)
                   else load_f32(ref.ref if isinstance(ref, _Truncated) else ref))
            data = _transform(name, hf, raw, fam, config)
            arr, got = _encode(data, out_type, name)
            assert got == typ
            w.write_tensor_data(arr)
            del data, arr
            if progress:
                progress(i + 1, len(plan))
        w.close()
    note = multimodal_note(raw_config)
    return QuantResult(dst, out_type, time.perf_counter() - t0, dst.stat().st_size, n_params,
                       warnings=[note] if note else [])


@dataclass(frozen=True)
class _Truncated:
    """A ref whose leading dimension is cut to ``rows`` (Gemma's embedding past the vocabulary)."""
    ref: TensorRef
    rows: int

    @property
    def name(self):
        return self.ref.name

    @property
    def shape(self):
        return (min(self.rows, self.ref.shape[0]),) + tuple(self.ref.shape[1:])


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _metadata(w, fam: Family, c: dict, model_name: str, out_type: str) -> None:
    n_head = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // n_head)
    gemma = fam.arch in GEMMA
    w.add_name(model_name)
    default_ctx = {"gemma3": 131072, "gemma2": 8192}.get(fam.arch, 4096)
    w.add_context_length(int(c.get("max_position_embeddings", default_ctx)))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(c.get("num_key_value_heads") or n_head))
    if gemma:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if fam.arch == "gemma2":
            # llama.cpp: sliding window on every other layer (0, 2, ...), soft-capped attention
            w.add_attn_logit_softcapping(float(c.get("attn_logit_softcapping") or 50.0))
            w.add_final_logit_softcapping(float(c.get("final_logit_softcapping") or 30.0))
            w.add_sliding_window(int(c.get("sliding_window") or 4096))
        else:
            if c.get("final_logit_softcapping"):
                w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
            if c.get("sliding_window_pattern") != 1 and c.get("sliding_window"):
                w.add_sliding_window(int(c["sliding_window"]))
    else:
        from . import phi3

        w.add_rope_dimension_count(phi3.rope_dims(c) if fam.arch == "phi3" else head_dim)
        if c.get("head_dim"):  # Qwen3 and others whose head size is not hidden / heads
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6 if gemma else 1e-5)))
    rp = rope_params(c)
    w.add_rope_freq_base(float(c.get("rope_theta") or rp.get("rope_theta")
                               or (1_000_000.0 if fam.arch == "gemma3" else 10000.0)))
    import gguf

    kind, factor = str(rp.get("rope_type", "")).lower(), rp.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    if fam.arch == "phi3":
        phi3.metadata(w, c)
    from . import moe

    moe.metadata(w, c)
    if c.get("vocab_size") and not gemma:
        w.add_vocab_size(int(c["vocab_size"]))
    w.add_file_type(FILE_TYPES[out_type])
