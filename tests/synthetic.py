"""Large GGUF models with realistic shapes and no weights, for memory planning tests.

The files are sparse: header, metadata and tensor table are real, the data region is a hole
of the right length. llama.cpp's dry run (``no_alloc`` + ``load_mode = 0``) reads no weights,
so it plans these models exactly as it would the real ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Each shape: dims of the real model (from its config.json).
@dataclass(frozen=True)
class Shape:
    name: str
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    weight_type: str = "Q4_K"
    sliding_window: int = 0
    swa_pattern: int = 0
    tied_output: bool = False
    # mixture of experts (0: dense): routed experts per layer, used per token, one expert's
    # feed-forward width (0: n_ff, as Mixtral stores it), shared experts and their width
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_expert_shared: int = 0
    n_ff_shexp: int = 0
    byte_tokens: bool = False  # <0x00>..<0xFF> after the specials: any text tokenizes (SPM byte fallback)


LLAMA3_8B = Shape("llama3-8b-shaped", "llama", 4096, 32, 32, 8, 128, 14336, 128256, 8192)
GEMMA3_27B = Shape("gemma3-27b-shaped", "gemma3", 5376, 62, 32, 16, 128, 21504, 262208, 131072,
                   sliding_window=1024, swa_pattern=6, tied_output=True)
SHAPES = {s.name: s for s in (LLAMA3_8B, GEMMA3_27B)}
# Mixture-of-experts shapes: Mixtral is llama with experts (n_ff is one expert's width),
# Qwen3-30B-A3B and Qwen1.5-MoE-A2.7B (qwen2moe: 4 shared experts fused into one FFN of 5632).
MIXTRAL_8X7B = Shape("mixtral-8x7b-shaped", "llama", 4096, 32, 32, 8, 128, 14336, 32000, 32768,
                     n_expert=8, n_expert_used=2)
QWEN3_30B_A3B = Shape("qwen3-30b-a3b-shaped", "qwen3moe", 2048, 48, 32, 4, 128, 6144, 151936, 40960,
                      n_expert=128, n_expert_used=8, n_ff_exp=768)
QWEN2_MOE_A27B = Shape("qwen2moe-a2.7b-shaped", "qwen2moe", 2048, 24, 16, 16, 128, 5632, 151936, 8192,
                       n_expert=60, n_expert_used=4, n_ff_exp=1408, n_expert_shared=4, n_ff_shexp=5632)
MOE_SHAPES = {s.name: s for s in (MIXTRAL_8X7B, QWEN3_30B_A3B, QWEN2_MOE_A27B)}
# Small enough for llama.cpp to load and generate with on two cores (its weights are the
# file's hole: zeros, so the output is meaningless but finite).
TINY_MOE = Shape("tiny-moe", "qwen3moe", 256, 4, 4, 2, 64, 512, 512, 2048, weight_type="Q8_0",
                 n_expert=8, n_expert_used=2, n_ff_exp=256, byte_tokens=True)


def write(shape: Shape, path: Path) -> Path:
    """Write ``shape`` as a sparse GGUF at ``path`` (skipped when it is already there)."""
    import gguf
    import numpy as np

    path = Path(path)
    if path.exists():
        return path
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), shape.arch)
    a = shape.arch
    w.add_name(shape.name)
    w.add_uint32(f"{a}.context_length", shape.n_ctx_train)
    w.add_uint32(f"{a}.embedding_length", shape.n_embd)
    w.add_uint32(f"{a}.block_count", shape.n_layer)
    w.add_uint32(f"{a}.feed_forward_length", shape.n_ff)
    w.add_uint32(f"{a}.attention.head_count", shape.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", shape.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", shape.head_dim)
    w.add_uint32(f"{a}.attention.value_length", shape.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 500000.0 if a == "llama" else 1000000.0)
    w.add_uint32(f"{a}.rope.dimension_count", shape.head_dim)
    w.add_uint32(f"{a}.vocab_size", shape.n_vocab)
    if shape.n_expert:
        w.add_uint32(f"{a}.expert_count", shape.n_expert)
        w.add_uint32(f"{a}.expert_used_count", shape.n_expert_used)
        if shape.n_ff_exp:
            w.add_uint32(f"{a}.expert_feed_forward_length", shape.n_ff_exp)
        if shape.n_expert_shared:
            w.add_uint32(f"{a}.expert_shared_count", shape.n_expert_shared)
            w.add_uint32(f"{a}.expert_shared_feed_forward_length", shape.n_ff_shexp)
    if shape.sliding_window:
        w.add_uint32(f"{a}.attention.sliding_window", shape.sliding_window)
        w.add_float32(f"{a}.rope.freq_base_swa", 10000.0)
    w.add_uint32("general.file_type", int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
    w.add_string("tokenizer.ggml.model", "llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, shape.n_vocab)]
    n_bytes = 256 if shape.byte_tokens else 0
    tokens[3:3 + n_bytes] = [f"<0x{b:02X}>" for b in range(n_bytes)]
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", [0.0] * shape.n_vocab)
    types = np.ones(shape.n_vocab, dtype=np.int32)
    types[:3] = (2, 3, 3)
    types[3:3 + n_bytes] = 6  # BYTE
    w.add_array("tokenizer.ggml.token_type", [int(t) for t in types])
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for name, dims, qtype in _tensors(shape):
        nbytes = _nbytes(dims, qtype)
        # add_tensor_info takes numpy order (outermost first); GGUF stores it reversed.
        w.add_tensor_info(name, list(reversed(dims)), np.dtype(np.float32), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    from infer_cli.models.gguf_info import align  # the data region starts aligned

    header = tmp.stat().st_size
    total = align(header, 32)
    for name, dims, qtype in _tensors(shape):
        total = align(total + _nbytes(dims, qtype), 32)
    with open(tmp, "r+b") as f:
        f.truncate(total)
    os.replace(tmp, path)
    return path


def _nbytes(dims: tuple[int, ...], qtype) -> int:
    from infer_cli import ggml

    n = 1
    for d in dims:
        n *= d
    return ggml.row_bytes(n, int(qtype))


def _tensors(s: Shape):
    """(name, dims in GGUF order (ne0 first), ggml type) for every tensor of the model."""
    from gguf.constants import GGMLQuantizationType as T

    q = T[s.weight_type]
    f32 = T.F32
    q6 = T.Q6_K
    yield "token_embd.weight", (s.n_embd, s.n_vocab), q
    yield "output_norm.weight", (s.n_embd,), f32
    if not s.tied_output:
        yield "output.weight", (s.n_embd, s.n_vocab), q6
    nq, nkv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    for i in range(s.n_layer):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", (s.n_embd,), f32
        yield p + "attn_q.weight", (s.n_embd, nq), q
        yield p + "attn_k.weight", (s.n_embd, nkv), q
        yield p + "attn_v.weight", (s.n_embd, nkv), q6
        yield p + "attn_output.weight", (nq, s.n_embd), q
        if s.arch == "qwen3moe":
            yield p + "attn_q_norm.weight", (s.head_dim,), f32
            yield p + "attn_k_norm.weight", (s.head_dim,), f32
        if s.arch == "gemma3":
            yield p + "attn_q_norm.weight", (s.head_dim,), f32
            yield p + "attn_k_norm.weight", (s.head_dim,), f32
            yield p + "post_attention_norm.weight", (s.n_embd,), f32
            yield p + "post_ffw_norm.weight", (s.n_embd,), f32
        yield p + "ffn_norm.weight", (s.n_embd,), f32
        if s.n_expert:
            yield from _expert_tensors(s, p, q, q6)
            continue
        yield p + "ffn_gate.weight", (s.n_embd, s.n_ff), q
        yield p + "ffn_up.weight", (s.n_embd, s.n_ff), q
        yield p + "ffn_down.weight", (s.n_ff, s.n_embd), q6


def _expert_tensors(s: Shape, p: str, q, q6):
    """A MoE layer's feed-forward: the router, the routed experts as 3-D tensors (one matrix per
    expert, the expert index outermost), and the shared expert with its gate."""
    from gguf.constants import GGMLQuantizationType as T

    ff = s.n_ff_exp or s.n_ff
    yield p + "ffn_gate_inp.weight", (s.n_embd, s.n_expert), T.F32
    yield p + "ffn_gate_exps.weight", (s.n_embd, ff, s.n_expert), q
    yield p + "ffn_up_exps.weight", (s.n_embd, ff, s.n_expert), q
    # Q6_K needs rows of 256: Qwen1.5-MoE's 1408-wide experts take Q8_0 (as its quants do)
    yield p + "ffn_down_exps.weight", (ff, s.n_embd, s.n_expert), q6 if ff % 256 == 0 and q != T.Q8_0 else T.Q8_0
    if s.n_expert_shared:
        yield p + "ffn_gate_inp_shexp.weight", (s.n_embd,), T.F32
        yield p + "ffn_gate_shexp.weight", (s.n_embd, s.n_ff_shexp), q
        yield p + "ffn_up_shexp.weight", (s.n_embd, s.n_ff_shexp), q
        yield p + "ffn_down_shexp.weight", (s.n_ff_shexp, s.n_embd), q6
