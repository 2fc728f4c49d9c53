"""Mixtures of experts (Qwen2-MoE, Qwen3-MoE, Mixtral) and Phi-3 / Phi-4 through the checkpoint
converter: tiny random checkpoints convert to GGUF, and llama.cpp's logits equal a numpy forward
pass of the Hugging Face model (softmax router, top-k, renormalisation where the config says so,
the shared expert and its sigmoid gate; Phi's fused qkv / gate_up, partial rotary and longrope
factors). Malformed expert checkpoints are refused in one line with nothing at the target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_quantize_tiny import (LLAMA2_TEXTS, LLAMA3_SPLIT, QWEN2_SPLIT, TEXTS, _assert_logits_match,
                                      _draws, _llama2_vocab, _save, _spm_reference, _tokenizer)

tokenizers = pytest.importorskip("tokenizers")

N_EXP, TOP_K, FF_EXP, FF_SHARED = 4, 2, 32, 48


def _rewrite(folder: Path, t: dict) -> None:
    from quantize.safetensors_io import write

    write(folder / "model.safetensors", {k: v.astype(np.float16) if v.ndim == 2 else v for k, v in t.items()})


def _edit_config(folder: Path, **changes) -> None:
    p = folder / "config.json"
    p.write_text(json.dumps(dict(json.loads(p.read_text()), **changes)))


# --- checkpoints --------------------------------------------------------------------------------

def moe_checkpoint(folder: Path, kind: str, *, d: int = 64, ff: int = FF_EXP, n_exp: int = N_EXP,
                   n_layer: int = 2) -> tuple[Path, dict, dict]:
    """A tiny Qwen2-MoE (qkv bias, shared expert; tied embedding), Qwen3-MoE (q/k norms, head_dim
    24, norm_topk_prob) or Mixtral (block_sparse_moe, w1/w2/w3; Llama's rotary permutation)."""
    # seeds whose routing has no near tie in the test's tokens (every k-th pick leads the next
    # expert by 0.03 or more in router logits)
    w = _draws({"qwen2moe": 56, "qwen3moe": 31, "mixtral": 40}[kind])
    nh, nkv, hd = 4, 2, 24 if kind == "qwen3moe" else 16
    if kind == "mixtral":
        tok = _tokenizer(LLAMA3_SPLIT, ["<s>", "</s>"], False)
        cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "rope_theta": 1e6,
               "tie_word_embeddings": False, "num_local_experts": n_exp, "intermediate_size": ff,
               "router_jitter_noise": 0.0}
        tcfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
        block, projs = "block_sparse_moe", ("w1", "w3", "w2")
    else:
        tok = _tokenizer(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], True)
        arch = {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}[kind]
        cfg = {"architectures": [arch], "model_type": kind.replace("moe", "_moe"), "rope_theta": 1e6,
               "tie_word_embeddings": True, "num_experts": n_exp, "moe_intermediate_size": ff,
               "intermediate_size": 96, "norm_topk_prob": kind == "qwen3moe", "decoder_sparse_step": 1,
               "mlp_only_layers": []}
        if kind == "qwen2moe":
            cfg["shared_expert_intermediate_size"] = FF_SHARED
        else:
            cfg["head_dim"] = hd
        tcfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False}
        block, projs = "mlp", ("gate_proj", "up_proj", "down_proj")
    n_vocab = tok.get_vocab_size()
    cfg.update({"hidden_size": d, "num_attention_heads": nh, "num_key_value_heads": nkv,
                "num_hidden_layers": n_layer, "vocab_size": n_vocab, "num_experts_per_tok": TOP_K,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-5})
    t = {"model.embed_tokens.weight": w(n_vocab, d, s=0.5), "model.norm.weight": 1 + w(d, s=0.1)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(n_vocab, d, s=0.3)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "post_attention_layernorm.weight": 1 + w(d, s=0.1),
              p + "self_attn.q_proj.weight": w(nh * hd, d), p + "self_attn.k_proj.weight": w(nkv * hd, d),
              p + "self_attn.v_proj.weight": w(nkv * hd, d), p + "self_attn.o_proj.weight": w(d, nh * hd),
              p + f"{block}.gate.weight": w(n_exp, d, s=0.2)}
        for e in range(n_exp):  # each expert scaled differently, so that a wrong pick shows
            q = f"{p}{block}.experts.{e}."
            s = 0.1 + 0.08 * e
            t |= {q + projs[0] + ".weight": w(ff, d, s=s), q + projs[1] + ".weight": w(ff, d, s=s),
                  q + projs[2] + ".weight": w(d, ff, s=0.3)}
        if kind == "qwen2moe":
            t |= {p + "self_attn.q_proj.bias": w(nh * hd, s=0.3), p + "self_attn.k_proj.bias": w(nkv * hd, s=0.3),
                  p + "self_attn.v_proj.bias": w(nkv * hd, s=0.3),
                  p + "mlp.shared_expert.gate_proj.weight": w(FF_SHARED, d),
                  p + "mlp.shared_expert.up_proj.weight": w(FF_SHARED, d),
                  p + "mlp.shared_expert.down_proj.weight": w(d, FF_SHARED),
                  p + "mlp.shared_expert_gate.weight": w(1, d, s=0.5)}
        if kind == "qwen3moe":
            t |= {p + "self_attn.q_norm.weight": 1 + w(hd, s=0.2), p + "self_attn.k_norm.weight": 1 + w(hd, s=0.2)}
    _save(folder, t, cfg, tcfg, {"tokenizer.json": tok.to_str().encode()})
    return folder, t, cfg


def phi_checkpoint(folder: Path, kind: str) -> tuple[Path, dict, dict]:
    """``phi3``: Phi-3-mini-4k in miniature (SentencePiece tokenizer.model, full rotary, no rope
    scaling, a sliding_window, untied). ``phi4mini``: Phi-4-mini's shape (byte-level BPE with
    tokenizer_class GPT2Tokenizer, GQA, partial_rotary_factor 0.75, longrope with long and short
    factors, a tied embedding)."""
    from tests.quantize_export import sentencepiece_model

    w = _draws({"phi3": 43, "phi4mini": 47}[kind])
    d, nh, hd, ff, n_layer = 64, 4, 16, 96, 2
    cfg = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": d,
           "intermediate_size": ff, "num_hidden_layers": n_layer, "num_attention_heads": nh,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu"}
    if kind == "phi3":
        # as Phi-3's: the SentencePiece pieces, then <|endoftext|> and further ids up to vocab_size
        # in config.json only (llama.cpp's phi3 vocabulary setup needs <|endoftext|> to exist)
        tokens, scores, types = _llama2_vocab()
        nkv, n_vocab = nh, len(tokens) + 3
        cfg |= {"num_key_value_heads": nkv, "max_position_embeddings": 256, "original_max_position_embeddings": 256,
                "sliding_window": 255, "rope_scaling": None, "tie_word_embeddings": False,
                "vocab_size": n_vocab, "bos_token_id": 1, "eos_token_id": len(tokens)}
        tcfg = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
                "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer",
                "added_tokens_decoder": {str(len(tokens)): {"content": "<|endoftext|>", "special": True}}}
        files = {"tokenizer.model": sentencepiece_model(tokens, scores, types)}
    else:
        tok = _tokenizer(LLAMA3_SPLIT, ["<|endoftext|>", "<|system|>", "<|end|>"], False)
        n_vocab, nkv = tok.get_vocab_size(), 2
        rot = int(hd * 0.75)
        rng = np.random.default_rng(5)
        cfg |= {"num_key_value_heads": nkv, "max_position_embeddings": 1024,
                "original_max_position_embeddings": 256, "partial_rotary_factor": 0.75,
                "sliding_window": None, "tie_word_embeddings": True, "vocab_size": n_vocab,
                "rope_scaling": {"type": "longrope",
                                 "long_factor": [float(x) for x in rng.uniform(2.0, 6.0, rot // 2)],
                                 "short_factor": [float(x) for x in rng.uniform(0.5, 1.5, rot // 2)]}}
        tcfg = {"add_bos_token": False, "eos_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}
        files = {"tokenizer.json": tok.to_str().encode()}
    t = {"model.embed_tokens.weight": w(n_vocab, d, s=0.5), "model.norm.weight": 1 + w(d, s=0.1)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(n_vocab, d, s=0.3)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "post_attention_layernorm.weight": 1 + w(d, s=0.1),
              p + "self_attn.qkv_proj.weight": w((nh + 2 * nkv) * hd, d, s=0.3),
              p + "self_attn.o_proj.weight": w(d, nh * hd),
              p + "mlp.gate_up_proj.weight": w(2 * ff, d), p + "mlp.down_proj.weight": w(d, ff)}
    _save(folder, t, cfg, tcfg, files)
    return folder, t, cfg


# --- the numpy reference ------------------------------------------------------------------------

def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _moe_block(g, p, h, cfg, routes):
    """Hugging Face's sparse MoE block: softmax over all experts, the top k, their weights
    renormalised where the model does so, plus Qwen2-MoE's sigmoid-gated shared expert."""
    silu = lambda x: x / (1 + np.exp(-x))  # noqa: E731
    mixtral = "num_local_experts" in cfg
    block, (gp, up, dp) = ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    n_exp, k = cfg.get("num_local_experts") or cfg["num_experts"], cfg["num_experts_per_tok"]
    logits = h @ g[p + f"{block}.gate.weight"].T
    probs = _softmax(logits)
    top = np.argsort(-probs, -1, kind="stable")[:, :k]
    wts = np.take_along_axis(probs, top, -1)
    if mixtral or cfg.get("norm_topk_prob"):
        wts = wts / wts.sum(-1, keepdims=True)
    srt = np.sort(logits, -1)[:, ::-1]
    routes.append((top, srt[:, k - 1] - srt[:, k]))
    out = np.zeros_like(h)
    for e in range(n_exp):
        q = f"{p}{block}.experts.{e}."
        y = (silu(h @ g[q + gp + ".weight"].T) * (h @ g[q + up + ".weight"].T)) @ g[q + dp + ".weight"].T
        out += (wts * (top == e)).sum(-1, keepdims=True) * y
    if p + "mlp.shared_expert_gate.weight" in g:
        s = "mlp.shared_expert."
        y = (silu(h @ g[p + s + "gate_proj.weight"].T) * (h @ g[p + s + "up_proj.weight"].T)) @ g[p + s + "down_proj.weight"].T
        out += y / (1 + np.exp(-(h @ g[p + "mlp.shared_expert_gate.weight"].T)))
    return out


def reference_logits(t: dict, cfg: dict, ids: list[int], *, long_rope: bool = False, routes=None) -> np.ndarray:
    """The Hugging Face forward pass in float64 numpy for the MoE models and Phi-3: separate or
    fused (Phi) q/k/v, rotary over the first ``partial_rotary_factor`` of each head with longrope's
    factors and attention factor, a dense SwiGLU (Phi's gate_up halves) or the MoE block.
    ``routes`` collects each layer's (top-k experts, router-logit margin of the k-th pick)."""
    from quantize import phi3

    d, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv, n, eps = cfg.get("num_key_value_heads") or nh, len(ids), cfg["rms_norm_eps"]
    hd = cfg.get("head_dim") or d // nh
    rot = int(hd * cfg.get("partial_rotary_factor", 1.0))
    g = {k: v.astype(np.float64) for k, v in t.items()}
    routes = [] if routes is None else routes
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w  # noqa: E731
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, rot, 2) / rot)
    scale = 1.0
    rs = cfg.get("rope_scaling") or {}
    if rs.get("type") == "longrope":
        inv = inv / np.asarray(rs["long_factor" if long_rope else "short_factor"])
        scale = phi3.attention_factor(cfg)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1)) * scale
    sin = np.sin(np.concatenate([ang, ang], -1)) * scale

    def rope(x):
        r, rest = x[..., :rot], x[..., rot:]
        half = np.concatenate([-r[..., rot // 2:], r[..., :rot // 2]], -1)
        return np.concatenate([r * cos + half * sin, rest], -1)

    x = g["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, g[p + "input_layernorm.weight"])
        heads = lambda y, m: y.reshape(n, m, hd).transpose(1, 0, 2)  # noqa: E731
        if p + "self_attn.qkv_proj.weight" in g:  # Phi: q, k, v stacked by rows
            qkv = h @ g[p + "self_attn.qkv_proj.weight"].T
            q, k, v = (heads(qkv[:, :nh * hd], nh), heads(qkv[:, nh * hd:(nh + nkv) * hd], nkv),
                       heads(qkv[:, (nh + nkv) * hd:], nkv))
        else:
            proj = lambda name, m: heads(h @ g[p + name + ".weight"].T + g.get(p + name + ".bias", 0), m)  # noqa: E731
            q, k, v = proj("self_attn.q_proj", nh), proj("self_attn.k_proj", nkv), proj("self_attn.v_proj", nkv)
        if p + "self_attn.q_norm.weight" in g:
            q, k = norm(q, g[p + "self_attn.q_norm.weight"]), norm(k, g[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        a = _softmax(q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask) @ v
        x = x + a.transpose(1, 0, 2).reshape(n, nh * hd) @ g[p + "self_attn.o_proj.weight"].T
        h = norm(x, g[p + "post_attention_layernorm.weight"])
        if p + "mlp.gate_up_proj.weight" in g:  # Phi: the gate half, then the up half
            gate, up = np.split(h @ g[p + "mlp.gate_up_proj.weight"].T, 2, -1)
            x = x + (gate / (1 + np.exp(-gate)) * up) @ g[p + "mlp.down_proj.weight"].T
        else:
            x = x + _moe_block(g, p, h, cfg, routes)
    head = g.get("lm_head.weight", g["model.embed_tokens.weight"])
    return norm(x, g["model.norm.weight"]) @ head.T


# --- mixtures of experts ------------------------------------------------------------------------

@pytest.mark.parametrize("kind, arch", [("qwen2moe", "qwen2moe"), ("qwen3moe", "qwen3moe"), ("mixtral", "llama")])
def test_tiny_moe_converts_and_matches_reference(kind, arch, tmp_path):
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    from infer_cli.engine import Model, Options
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = moe_checkpoint(tmp_path / kind, kind)
    out = convert_checkpoint(folder, tmp_path / f"{kind}.F16.gguf", "F16").path

    r = GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith(arch + ".")}
    assert r.fields["general.architecture"].contents() == arch
    assert f[f"{arch}.expert_count"] == N_EXP and f[f"{arch}.expert_used_count"] == TOP_K
    assert f.get(f"{arch}.expert_feed_forward_length") == (None if kind == "mixtral" else FF_EXP)
    assert f.get(f"{arch}.expert_shared_feed_forward_length") == (FF_SHARED if kind == "qwen2moe" else None)
    tensors = {t.name: t for t in r.tensors}
    d = cfg["hidden_size"]
    # ggml's ne: {cols, rows, experts}; the router kept in F32
    assert [int(x) for x in tensors["blk.1.ffn_gate_exps.weight"].shape] == [d, FF_EXP, N_EXP]
    assert [int(x) for x in tensors["blk.1.ffn_up_exps.weight"].shape] == [d, FF_EXP, N_EXP]
    assert [int(x) for x in tensors["blk.1.ffn_down_exps.weight"].shape] == [FF_EXP, d, N_EXP]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type.name == "F16"
    assert not any("experts." in n or ".ffn_gate.weight" in n for n in tensors)
    assert ("blk.0.ffn_gate_inp_shexp.weight" in tensors) == (kind == "qwen2moe")
    if kind == "qwen2moe":  # the shared expert's gate, a [1, d] matrix in the checkpoint, is F32 too
        assert tensors["blk.0.ffn_gate_inp_shexp.weight"].tensor_type.name == "F32"
    assert ("blk.0.ffn_up_shexp.weight" in tensors) == (kind == "qwen2moe")
    # Qwen2-MoE's graph needs an output matrix even where the checkpoint ties it
    assert "output.weight" in tensors if kind != "qwen3moe" else "output.weight" not in tensors
    # expert 2 of layer 1, read back, is the checkpoint's matrix (stacked on the outer axis)
    gate = "block_sparse_moe.experts.2.w1" if kind == "mixtral" else "mlp.experts.2.gate_proj"
    got = np.asarray(tensors["blk.1.ffn_gate_exps.weight"].data).reshape(N_EXP, FF_EXP, d)[2]
    assert np.array_equal(got.astype(np.float32), weights[f"model.layers.1.{gate}.weight"])
    del r, tensors

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = hf.encode(TEXTS[0] + " " + TEXTS[1] + " " + TEXTS[3], add_special_tokens=False).ids[:32]
    routes: list = []
    ref = reference_logits(weights, cfg, ids, routes=routes)
    # the check proves the routing: every expert is picked somewhere, no pick is a near tie, and
    # routing otherwise (plain top-1, or the other choice of renormalisation) changes the logits
    assert all(set(np.unique(top)) == set(range(N_EXP)) for top, _ in routes)
    assert min(float(margin.min()) for _, margin in routes) > 0.02
    top1 = reference_logits(weights, dict(cfg, num_experts_per_tok=1), ids)
    assert np.abs(top1 - ref).max() > 0.1 * np.abs(ref).max()
    if kind != "mixtral":
        other = reference_logits(weights, dict(cfg, norm_topk_prob=not cfg["norm_topk_prob"]), ids)
        assert np.abs(other - ref).max() > 0.05 * np.abs(ref).max()

    opts = Options(warmup=False, n_ctx=256, threads=2)
    m = Model(out, opts)
    try:
        for text in TEXTS[:4]:
            assert m.tokenize(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids, text
        got = _assert_logits_match(m, opts, ids, ref)
        assert np.abs(got - ref).max() < 0.25 * np.abs(top1 - ref).max()
    finally:
        m.close()


@pytest.mark.parametrize("out_type", ["Q8_0", "BF16"])
def test_moe_to_q8_0_and_bf16_keeps_the_router_f32_and_runs(out_type, tmp_path):
    """The byte-typed outputs (BF16, Q8_0) of 3-D expert tensors: shapes right, routers in F32,
    logits near the reference."""
    from gguf import GGUFReader

    from infer_cli.engine import Model, Options
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = moe_checkpoint(tmp_path / "q", "qwen2moe")
    out = convert_checkpoint(folder, tmp_path / f"q.{out_type}.gguf", out_type).path
    tensors = {t.name: t for t in GGUFReader(str(out)).tensors}
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type.name == out_type
    assert [int(x) for x in tensors["blk.0.ffn_down_exps.weight"].shape] == [FF_EXP, cfg["hidden_size"], N_EXP]
    assert [int(x) for x in tensors["token_embd.weight"].shape] == [cfg["hidden_size"], cfg["vocab_size"]]
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type.name == "F32"
    del tensors
    ids = [int(i) for i in np.random.default_rng(9).integers(0, cfg["vocab_size"], 24)]
    opts = Options(warmup=False, n_ctx=256, threads=2)
    m = Model(out, opts)
    try:
        s_ref = reference_logits(weights, cfg, ids)
        from infer_cli.engine import Session

        s = Session(m, opts)
        try:
            s.decode_all(ids)
            got = np.stack([np.ctypeslib.as_array(s.L.llama_get_logits_ith(s.ptr, i), shape=(m.n_vocab,))
                            for i in range(len(ids))])
        finally:
            s.close()
        assert np.abs(got - s_ref).max() < 0.1 * np.abs(s_ref).max()
    finally:
        m.close()


def _fuse_experts(weights: dict, n_layer: int = 2) -> dict:
    """The same Qwen MoE weights in transformers' fused layout: per layer experts.gate_up_proj
    (experts, 2 x ff, hidden), gate rows first, and experts.down_proj (experts, hidden, ff)."""
    t = {k: v for k, v in weights.items() if ".experts." not in k}
    for i in range(n_layer):
        q = f"model.layers.{i}.mlp.experts."
        t[q + "gate_up_proj"] = np.stack([np.concatenate([weights[f"{q}{e}.gate_proj.weight"],
                                                          weights[f"{q}{e}.up_proj.weight"]]) for e in range(N_EXP)])
        t[q + "down_proj"] = np.stack([weights[f"{q}{e}.down_proj.weight"] for e in range(N_EXP)])
    return t


def test_fused_expert_layout_converts_to_the_same_tensors(tmp_path):
    from gguf import GGUFReader

    from infer_cli.errors import BadCheckpoint
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = moe_checkpoint(tmp_path / "per-expert", "qwen3moe")
    a = convert_checkpoint(folder, tmp_path / "a.F16.gguf", "F16").path
    fused = _fuse_experts(weights)
    _rewrite(folder, {k: v.astype(np.float16) if v.ndim == 3 else v for k, v in fused.items()})
    b = convert_checkpoint(folder, tmp_path / "b.F16.gguf", "F16").path
    ta, tb = ({t.name: t for t in GGUFReader(str(p)).tensors} for p in (a, b))
    assert sorted(ta) == sorted(tb) and "blk.1.ffn_up_exps.weight" in tb
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type and list(t.shape) == list(tb[name].shape), name
        assert np.array_equal(np.asarray(t.data), np.asarray(tb[name].data)), name
    del ta, tb

    fused["model.layers.1.mlp.experts.gate_up_proj"] = fused["model.layers.1.mlp.experts.gate_up_proj"][:, :FF_EXP]
    _rewrite(folder, {k: v.astype(np.float16) if v.ndim == 3 else v for k, v in fused.items()})
    with pytest.raises(BadCheckpoint, match=r"expert tensor model.layers.1.mlp.experts.gate_up_proj has shape "
                                            r"\[4, 32, 64\]; config.json makes it \[4, 64, 64\]"):
        convert_checkpoint(folder, tmp_path / "c.F16.gguf", "F16")
    assert not (tmp_path / "c.F16.gguf").exists()


def test_stacking_streams_one_stacked_tensor_at_a_time(tmp_path):
    """Peak Python memory during the conversion stays near one stacked expert tensor (F32, plus its
    F16 encoding), far below the model's weights."""
    import tracemalloc

    from quantize.convert import convert_checkpoint

    d, ff, n_exp, n_layer = 128, 256, 8, 4
    folder, weights, _ = moe_checkpoint(tmp_path / "big", "qwen3moe", d=d, ff=ff, n_exp=n_exp, n_layer=n_layer)
    stacked = n_exp * ff * d * 4
    total = sum(v.size for v in weights.values()) * 4
    del weights
    assert total > 10 * stacked
    tracemalloc.start()
    try:
        convert_checkpoint(folder, tmp_path / "big.F16.gguf", "F16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2.5 * stacked, (peak, stacked, total)


# --- Phi-3 / Phi-4 ------------------------------------------------------------------------------

def test_tiny_phi3_converts_tokenizes_and_matches_reference(tmp_path):
    from gguf import GGUFReader

    from infer_cli.engine import Model, Options
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = phi_checkpoint(tmp_path / "phi3", "phi3")
    out = convert_checkpoint(folder, tmp_path / "phi3.F16.gguf", "F16").path
    r = GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith(("phi3.", "tokenizer.ggml.model"))}
    assert r.fields["general.architecture"].contents() == "phi3"
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["phi3.rope.dimension_count"] == 16 and f["phi3.attention.sliding_window"] == 255
    assert f["phi3.rope.scaling.original_context_length"] == 256 and "phi3.rope.scaling.type" not in f
    tensors = {t.name: [int(x) for x in t.shape] for t in r.tensors}
    assert tensors["blk.0.attn_qkv.weight"] == [64, 3 * 64] and tensors["blk.0.ffn_up.weight"] == [64, 2 * 96]
    assert "output.weight" in tensors and not any("rope_factors" in n for n in tensors)
    del r

    tokens, scores, _ = _llama2_vocab()
    opts = Options(warmup=False, n_ctx=256, threads=2)
    m = Model(out, opts)
    try:
        assert m.n_vocab == len(tokens) + 3
        for text in LLAMA2_TEXTS:
            assert m.tokenize(text, add_special=False) == _spm_reference(text, tokens, scores), text
        assert m.tokenize("dog<|endoftext|>", add_special=False) == _spm_reference("dog", tokens, scores) + [len(tokens)]
        ids = [1] + _spm_reference(" ".join(LLAMA2_TEXTS[:4]), tokens, scores)[:23]
        _assert_logits_match(m, opts, ids, reference_logits(weights, cfg, ids))
    finally:
        m.close()


def test_tiny_phi4_mini_partial_rotary_and_longrope(tmp_path):
    """Phi-4 mini's shape: 12 of 16 head dimensions rotate, and the context decides between the
    short factors (a context within original_max_position_embeddings) and the long ones."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    from infer_cli.engine import Model, Options
    from quantize.convert import convert_checkpoint
    from quantize.phi3 import attention_factor

    folder, weights, cfg = phi_checkpoint(tmp_path / "phi4mini", "phi4mini")
    out = convert_checkpoint(folder, tmp_path / "phi4mini.F16.gguf", "F16").path
    r = GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("phi3.")}
    assert f["phi3.rope.dimension_count"] == 12 and f["phi3.attention.sliding_window"] == 0
    assert f["phi3.rope.scaling.type"] == "longrope" and f["phi3.rope.scaling.original_context_length"] == 256
    assert f["phi3.context_length"] == 1024
    assert abs(f["phi3.rope.scaling.attn_factor"] - np.sqrt(1 + np.log(4) / np.log(256))) < 1e-6
    assert abs(attention_factor(cfg) - f["phi3.rope.scaling.attn_factor"]) < 1e-6
    tensors = {t.name: t for t in r.tensors}
    for which in ("long", "short"):
        assert np.allclose(np.asarray(tensors[f"rope_factors_{which}.weight"].data), cfg["rope_scaling"][f"{which}_factor"])
    assert "output.weight" not in tensors  # tied: llama.cpp's phi3 graph reuses the embedding
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    del r, tensors

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = hf.encode(TEXTS[0] + " " + TEXTS[1], add_special_tokens=False).ids[:24]
    short = reference_logits(weights, cfg, ids, long_rope=False)
    long = reference_logits(weights, cfg, ids, long_rope=True)
    assert np.abs(short - long).max() > 0.1 * np.abs(short).max()
    for n_ctx, ref in ((256, short), (512, long)):
        opts = Options(warmup=False, n_ctx=n_ctx, threads=2)
        m = Model(out, opts)
        try:
            if n_ctx == 256:
                for text in TEXTS[:4]:
                    assert m.tokenize(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids
            _assert_logits_match(m, opts, ids, ref)
        finally:
            m.close()


# --- bad input ----------------------------------------------------------------------------------

def _damage(folder: Path, weights: dict, cfg: dict, damage: str) -> None:
    mixtral = "num_local_experts" in cfg
    block, up = ("block_sparse_moe", "w3") if mixtral else ("mlp", "up_proj")
    key = "num_local_experts" if mixtral else "num_experts"
    if damage == "more_experts_in_config":
        _edit_config(folder, **{key: N_EXP + 2})
    elif damage == "fewer_experts_in_config":
        _edit_config(folder, **{key: N_EXP - 1})
    elif damage == "missing_router":
        _rewrite(folder, {k: v for k, v in weights.items() if k != f"model.layers.1.{block}.gate.weight"})
    elif damage == "missing_expert":
        _rewrite(folder, {k: v for k, v in weights.items() if k != f"model.layers.1.{block}.experts.2.{up}.weight"})
    elif damage == "wrong_expert_shape":
        t = dict(weights)
        t[f"model.layers.0.{block}.experts.1.{up}.weight"] = np.zeros((FF_EXP + 8, cfg["hidden_size"]), np.float32)
        _rewrite(folder, t)
    elif damage == "missing_shared_gate":
        _rewrite(folder, {k: v for k, v in weights.items() if k != "model.layers.0.mlp.shared_expert_gate.weight"})
    elif damage == "top_k_above_experts":
        _edit_config(folder, num_experts_per_tok=N_EXP + 1)
    elif damage == "norm_topk_prob_off":
        _edit_config(folder, norm_topk_prob=False)


@pytest.mark.parametrize("kind, damage, expect", [
    ("qwen3moe", "more_experts_in_config", "the router model.layers.0.mlp.gate.weight has shape [4, 64]; num_experts 6"),
    ("qwen3moe", "fewer_experts_in_config", "layer 0 has 4 experts (model.layers.0.mlp.experts.3."),
    ("mixtral", "fewer_experts_in_config", "but num_local_experts is 3"),
    ("qwen2moe", "missing_router", "the router model.layers.1.mlp.gate.weight is missing"),
    ("mixtral", "missing_router", "the router model.layers.1.block_sparse_moe.gate.weight is missing"),
    ("qwen3moe", "missing_expert", "expert tensor model.layers.1.mlp.experts.2.up_proj.weight is missing (num_experts is 4)"),
    ("mixtral", "missing_expert", "expert tensor model.layers.1.block_sparse_moe.experts.2.w3.weight is missing"),
    ("qwen2moe", "wrong_expert_shape", "expert tensor model.layers.0.mlp.experts.1.up_proj.weight has shape [40, 64]"),
    ("qwen2moe", "missing_shared_gate", "shared-expert tensor model.layers.0.mlp.shared_expert_gate.weight is missing"),
    ("qwen3moe", "top_k_above_experts", "num_experts_per_tok is 5; it must be an integer from 1 to 4"),
    ("qwen3moe", "norm_topk_prob_off", "norm_topk_prob is false, but llama.cpp's graph for Qwen3MoeForCausalLM"),
])
def test_bad_moe_checkpoint_is_one_line_and_writes_nothing(kind, damage, expect, tmp_path):
    from infer_cli.errors import BadCheckpoint
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = moe_checkpoint(tmp_path / kind, kind)
    _damage(folder, weights, cfg, damage)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(BadCheckpoint) as e:
        convert_checkpoint(folder, out_dir / "x.F16.gguf", "F16")
    msg = str(e.value)
    assert expect in msg and "\n" not in msg, msg
    assert list(out_dir.iterdir()) == []


def test_phi3_bad_rope_factors_and_fused_shapes(tmp_path):
    from infer_cli.errors import BadCheckpoint
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = phi_checkpoint(tmp_path / "phi", "phi4mini")
    out = tmp_path / "out" / "phi.F16.gguf"
    _edit_config(folder, rope_scaling=dict(cfg["rope_scaling"], long_factor=cfg["rope_scaling"]["long_factor"][:-1]))
    with pytest.raises(BadCheckpoint, match=r"rope_scaling.long_factor is 5 values; longrope needs 6 positive"):
        convert_checkpoint(folder, out, "F16")
    _edit_config(folder, rope_scaling=cfg["rope_scaling"])
    t = dict(weights)
    t["model.layers.1.self_attn.qkv_proj.weight"] = t["model.layers.1.self_attn.qkv_proj.weight"][:-16]
    _rewrite(folder, t)
    with pytest.raises(BadCheckpoint, match=r"qkv_proj.weight has shape \[112, 64\]; config.json makes it \[128, 64\]"):
        convert_checkpoint(folder, out, "F16")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_cli_names_the_supported_architectures_and_refuses_a_broken_moe(infer, tmp_path):
    folder, weights, cfg = moe_checkpoint(tmp_path / "ckpt", "mixtral")
    _edit_config(folder, architectures=["DeepseekV3ForCausalLM"])
    out = tmp_path / "out"
    r = infer("quantize", str(folder), "--to", "F16", "-o", str(out), "--no-report")
    assert r.returncode != 0
    first = r.stderr.splitlines()[0]
    assert "architecture 'DeepseekV3ForCausalLM' is not supported" in first, r.stderr
    for arch in ("MixtralForCausalLM", "Phi3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM",
                 "LlamaForCausalLM", "Qwen3ForCausalLM"):
        assert arch in first
    assert "Traceback" not in r.stderr

    _edit_config(folder, architectures=["MixtralForCausalLM"])
    _damage(folder, weights, cfg, "missing_expert")
    r = infer("quantize", str(folder), "--to", "F16", "-o", str(out), "--no-report")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("Error:") and "experts.2.w3.weight is missing" in first, r.stderr
    assert not out.exists() or list(out.iterdir()) == []
