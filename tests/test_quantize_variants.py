"""Checkpoint layouts beyond the plain text families, as tiny random checkpoints: the multimodal
Gemma 3 (Gemma3ForConditionalGeneration: the text model nested in text_config, its tensors under
language_model., a vision tower left out) and a Mistral whose tokenizer is a tekken-style
byte-level BPE tokenizer.json. Each converts, tokenizes like the `tokenizers` package and gives
the logits of a numpy forward pass of the Hugging Face model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from tests.test_quantize_tiny import (  # noqa: E402
    CORPUS, GEMMA_PIECES, TEXTS, _assert_logits_match, _draws, _reference_logits, _save)

# --- Gemma 3, multimodal ------------------------------------------------------------------------

# what the tiny checkpoint's text_config leaves out, with the values transformers fills in
GEMMA3_FILLED = {"num_attention_heads": 8, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                 "rope_theta": 1_000_000.0, "rope_local_base_freq": 10000.0,
                 "sliding_window_pattern": 6, "max_position_embeddings": 131072}


def _gemma3_multimodal(folder: Path, layout: str) -> tuple[Path, dict, dict]:
    """Gemma 3 in miniature as Gemma3ForConditionalGeneration: six layers (five sliding-window
    ones, then one global with linear rope scaling), a text_config that names only what the
    real gemma-3-4b-it names (and a head size), weights under ``layout``, and a vision tower.
    Layout "text": the same model as a Gemma3ForCausalLM with a flat, complete config.json."""
    from tests.quantize_export import sentencepiece_model

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + GEMMA_PIECES
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (len(GEMMA_PIECES) - 2) + [3, 3]
    scores = [0.0] * 260 + [float(len(t)) for t in GEMMA_PIECES[:-2]] + [0.0, 0.0]
    w = _draws(29)
    n_vocab, d, hd, ff, n_layer = len(tokens), 64, 16, 96, 6
    nh, nkv = GEMMA3_FILLED["num_attention_heads"], GEMMA3_FILLED["num_key_value_heads"]
    text = {"model_type": "gemma3_text", "hidden_size": d, "intermediate_size": ff,
            "num_hidden_layers": n_layer, "head_dim": hd, "query_pre_attn_scalar": hd,
            "sliding_window": 4, "vocab_size": n_vocab,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
           "mm_tokens_per_image": 256, "text_config": text,
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8, "patch_size": 14}}

    t = {"model.embed_tokens.weight": w(n_vocab, d, s=0.5), "model.norm.weight": w(d, s=0.1)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": w(d, s=0.1), p + "post_attention_layernorm.weight": w(d, s=0.1),
              p + "pre_feedforward_layernorm.weight": w(d, s=0.1),
              p + "post_feedforward_layernorm.weight": w(d, s=0.1),
              p + "self_attn.q_norm.weight": w(hd, s=0.2), p + "self_attn.k_norm.weight": w(hd, s=0.2),
              p + "self_attn.q_proj.weight": w(nh * hd, d, s=0.5), p + "self_attn.k_proj.weight": w(nkv * hd, d, s=0.5),
              p + "self_attn.v_proj.weight": w(nkv * hd, d), p + "self_attn.o_proj.weight": w(d, nh * hd),
              p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
              p + "mlp.down_proj.weight": w(d, ff)}
    if layout == "text":
        flat = {"architectures": ["Gemma3ForCausalLM"], **GEMMA3_FILLED, **text}
        _save(folder, t, flat, {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True},
              {"tokenizer.model": sentencepiece_model(tokens, scores, types)})
        return folder, t, {**GEMMA3_FILLED, **text}
    prefix, side = {"language_model.model": ("language_model.", ""),
                    "model.language_model": ("model.language_", "model.")}[layout]
    stored = {prefix + k: v for k, v in t.items()}
    stored |= {side + "vision_tower.vision_model.embeddings.patch_embedding.weight": w(8, 3, 14, 14),
               side + "vision_tower.vision_model.post_layernorm.weight": w(8),
               side + "multi_modal_projector.mm_input_projection_weight": w(8, d),
               side + "multi_modal_projector.mm_soft_emb_norm.weight": w(8)}
    _save(folder, stored, cfg, {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                                "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False},
          {"tokenizer.model": sentencepiece_model(tokens, scores, types)})
    return folder, t, {**GEMMA3_FILLED, **text}


def gemma3_reference_logits(t: dict, cfg: dict, ids: list[int]) -> np.ndarray:
    """Hugging Face's Gemma 3 text forward pass in float64 numpy: RMSNorm scaled by 1 + w (q and
    k normed per head too), every sliding_window_pattern-th layer global with rope_theta and its
    rope scaling, the others in the sliding window with rope_local_base_freq."""
    d, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, n, win, pattern = cfg["rms_norm_eps"], len(ids), cfg["sliding_window"], cfg["sliding_window_pattern"]
    g = {k: v.astype(np.float64) for k, v in t.items()}
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 + w)  # noqa: E731
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731

    def rope(x, base, factor):
        inv = 1.0 / base ** (np.arange(0, hd, 2) / hd) / factor
        ang = np.arange(n)[:, None] * inv[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    scaling = cfg.get("rope_scaling") or {}
    factor = float(scaling.get("factor", 1.0)) if scaling.get("rope_type") == "linear" else 1.0
    i_, j_ = np.arange(n)[:, None], np.arange(n)[None, :]
    x = g["model.embed_tokens.weight"][ids] * np.sqrt(d)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sliding = (layer + 1) % pattern != 0
        allowed = (j_ <= i_) & ((i_ - j_ < win) if sliding else True)
        base, f = (cfg["rope_local_base_freq"], 1.0) if sliding else (cfg["rope_theta"], factor)
        h = norm(x, g[p + "input_layernorm.weight"])
        proj = lambda name, heads: (h @ g[p + name + ".weight"].T).reshape(n, heads, hd).transpose(1, 0, 2)  # noqa: E731
        q = rope(norm(proj("self_attn.q_proj", nh), g[p + "self_attn.q_norm.weight"]), base, f)
        k = rope(norm(proj("self_attn.k_proj", nkv), g[p + "self_attn.k_norm.weight"]), base, f)
        v = proj("self_attn.v_proj", nkv)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = np.where(allowed, q @ k.transpose(0, 2, 1) * cfg["query_pre_attn_scalar"] ** -0.5, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, nh * hd)
        x = x + norm(a @ g[p + "self_attn.o_proj.weight"].T, g[p + "post_attention_layernorm.weight"])
        h = norm(x, g[p + "pre_feedforward_layernorm.weight"])
        f_ = gelu(h @ g[p + "mlp.gate_proj.weight"].T) * (h @ g[p + "mlp.up_proj.weight"].T)
        f_ = f_ @ g[p + "mlp.down_proj.weight"].T
        x = x + norm(f_, g[p + "post_feedforward_layernorm.weight"])
    return norm(x, g["model.norm.weight"]) @ g["model.embed_tokens.weight"].T


@pytest.mark.parametrize("layout", ["text", "language_model.model", "model.language_model"])
def test_gemma3_multimodal_converts_its_text_model(layout, tmp_path):
    """Both multimodal layouts give what the same model as a text checkpoint gives."""
    from gguf import GGUFReader

    from infer_cli.engine import Model, Options
    from quantize.convert import checkpoint_notes, convert_checkpoint

    folder, weights, cfg = _gemma3_multimodal(tmp_path / "gemma3mm", layout)
    res = convert_checkpoint(folder, tmp_path / "gemma3mm.F16.gguf", "F16")
    assert res.warnings == checkpoint_notes(folder) and len(res.warnings) == (layout != "text")
    assert all("text model" in w and "mmproj" in w for w in res.warnings)
    r = GGUFReader(str(res.path))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("gemma3.")}
    assert r.fields["general.architecture"].contents() == "gemma3"
    assert (f["gemma3.attention.head_count"], f["gemma3.attention.head_count_kv"]) == (8, 4)  # filled in
    assert f["gemma3.context_length"] == 131072 and f["gemma3.rope.freq_base"] == 1_000_000.0
    assert f["gemma3.attention.sliding_window"] == 4 and f["gemma3.attention.key_length"] == 16
    assert f["gemma3.rope.scaling.factor"] == 8.0
    assert abs(f["gemma3.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    names = {t.name for t in r.tensors}
    assert len(names) == len(weights) and "blk.5.attn_q_norm.weight" in names
    assert not any("vision" in n or "mm_" in n for n in names)
    del r

    opts = Options(warmup=False, n_ctx=256, threads=2)
    m = Model(res.path, opts)
    try:
        word = lambda w: 260 + GEMMA_PIECES.index(w)  # noqa: E731
        assert m.tokenize("the quick fox") == [2, word("t"), word("h"), word("e"),
                                               word("\u2581quick"), word("\u2581fox")]
        ids = [2] + [int(i) for i in np.random.default_rng(5).integers(4, m.n_vocab, 23)]
        ref = gemma3_reference_logits(weights, cfg, ids)
        got = _assert_logits_match(m, opts, ids, ref)
        # the global layer's scaled rope and the sliding window both show in the logits
        for other in (dict(cfg, rope_scaling=None), dict(cfg, sliding_window=10 ** 6)):
            assert np.abs(gemma3_reference_logits(weights, other, ids) - got).max() > 5 * np.abs(got - ref).max()
    finally:
        m.close()


@pytest.mark.parametrize("targets", ["F16,Q8_0", "Q8_0"])
def test_gemma3_multimodal_cli_says_what_is_left_out(infer, tmp_path, targets):
    """Once, before the work, whether the conversion is an output or a scratch file."""
    folder, _, _ = _gemma3_multimodal(tmp_path / "gemma3mm", "language_model.model")
    r = infer("quantize", str(folder), "--to", targets, "-o", str(tmp_path / "out"), "--no-report")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("only its text model is converted") == 1, r.stderr
    assert r.stderr.index("mmproj") < r.stderr.index("wrote "), r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"gemma3mm.{t}.gguf" for t in targets.split(",")]


def test_gemma3_multimodal_text_config_must_be_an_object(infer, tmp_path):
    folder, _, _ = _gemma3_multimodal(tmp_path / "gemma3mm", "language_model.model")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, text_config=[1, 2])))
    r = infer("quantize", str(folder), "--to", "F16", "-o", str(tmp_path / "out"), "--no-report")
    assert r.returncode != 0
    assert r.stderr.startswith("Error:") and "text_config" in r.stderr.splitlines()[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "gemma3mm.F16.gguf").exists()


# --- Mistral with a tekken tokenizer.json ----------------------------------------------------------

# Tekken's split rule as tokenizer.json carries it (Mistral Nemo, Mistral Small 3.x)
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
# Case changes inside words, single digits, paths, CJK, emoji, tabs and runs of spaces, and text
# llama.cpp's approximation of the letter-case classes agrees on: it counts a non-ASCII letter as
# both upper and lower case, so an all-capitals word that starts with one ("ÉCOLE") or a
# lower-case letter before a non-ASCII capital ("aÖ") splits differently there.
TEKKEN_TEXTS = TEXTS + ["HelloWorld HTTPServer getHTTPResponseCode iPhone McDonald's",
                        "path/to/file.txt and C:\\Users\\x\n/usr/bin//\n", "1234567890 x2y3 v1.2.3",
                        "Ünïcödé Straße naïve façade Über", "[INST] hi [/INST]</s>",
                        "  tabs\tand\n\n  newlines\r\n", "ALLCAPS Title Case lower"]


# GPT-4o's o200k rule (Phi-4 and Phi-4-mini carry it): case-aware words with contractions,
# numbers in runs of up to three digits
O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
               r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tekken_tokenizer(split: str = TEKKEN_SPLIT):
    """Trained on GPT-2's coarser split, so that its vocabulary holds whole camel-case words and
    digit runs, then given Tekken's split: only a pre-tokenizer that splits as Tekken does gives
    `tokenizers`' ids (Qwen2's or Llama 3's rules would not)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))  # as Tekken's tokenizer.json: a whole-word token wins
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=TEKKEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + TEKKEN_TEXTS[-7:] * 4, trainer)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


def _mistral_tekken(folder: Path, split: str = TEKKEN_SPLIT) -> tuple[Path, dict, dict]:
    """Mistral Nemo in miniature: a head size other than hidden / heads (as Nemo's 128 against
    5120 / 32), grouped-query attention, untied output, tokenizer.json only."""
    tok = _tekken_tokenizer(split)
    w = _draws(31)
    n_vocab, d, nh, nkv, hd, ff, n_layer = tok.get_vocab_size(), 64, 4, 2, 24, 96, 2
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": d,
           "intermediate_size": ff, "num_hidden_layers": n_layer, "num_attention_heads": nh,
           "num_key_value_heads": nkv, "head_dim": hd, "max_position_embeddings": 1024,
           "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0, "vocab_size": n_vocab,
           "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "sliding_window": None}
    t = {"model.embed_tokens.weight": w(n_vocab, d, s=0.5), "model.norm.weight": 1 + w(d, s=0.1),
         "lm_head.weight": w(n_vocab, d, s=0.3)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "post_attention_layernorm.weight": 1 + w(d, s=0.1),
              p + "self_attn.q_proj.weight": w(nh * hd, d), p + "self_attn.k_proj.weight": w(nkv * hd, d),
              p + "self_attn.v_proj.weight": w(nkv * hd, d), p + "self_attn.o_proj.weight": w(d, nh * hd),
              p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
              p + "mlp.down_proj.weight": w(d, ff)}
    tcfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
            "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}
    _save(folder, t, cfg, tcfg, {"tokenizer.json": tok.to_str().encode()})
    return folder, t, cfg


def test_pre_tokenizer_names_tekken_and_not_its_neighbours():
    from quantize.tokenizer_meta import pre_tokenizer_name
    from tests.test_quantize_tiny import LLAMA3_SPLIT, QWEN2_SPLIT

    def pre(regex):
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}

    assert pre_tokenizer_name(pre(TEKKEN_SPLIT)) == "tekken"
    assert pre_tokenizer_name(pre(LLAMA3_SPLIT)) == "llama-bpe"
    assert pre_tokenizer_name(pre(QWEN2_SPLIT)) == "qwen2"
    # GPT-4o's rule has the same case-aware words but contractions and three-digit numbers
    assert pre_tokenizer_name(pre(O200K_SPLIT)) == "gpt-4o"


def test_mistral_tekken_converts_tokenizes_and_matches_reference(tmp_path):
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    from infer_cli.engine import Model, Options
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = _mistral_tekken(tmp_path / "nemo")
    out = convert_checkpoint(folder, tmp_path / "nemo.F16.gguf", "F16").path
    r = GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith(("tokenizer.ggml.", "llama."))}
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "tekken")
    assert f["llama.attention.key_length"] == 24 and f["llama.rope.dimension_count"] == 24
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.token_type"][:5] == [3] * 5
    del r

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    opts = Options(warmup=False, n_ctx=256, threads=2)
    m = Model(out, opts)
    try:
        for text in TEKKEN_TEXTS + CORPUS[:5]:
            assert m.tokenize(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids, text
        assert m.tokenize("[INST] hi [/INST]")[:2] == [1, 3]  # BOS, then the control token whole

        ids = [1] + hf.encode(TEKKEN_TEXTS[-7] + " " + TEXTS[1], add_special_tokens=False).ids[:23]
        _assert_logits_match(m, opts, ids, _reference_logits(weights, cfg, ids))
    finally:
        m.close()


def test_o200k_tokenizer_json_tokenizes_as_hugging_face_does(tmp_path):
    """A tokenizer.json with GPT-4o's split rule (as Phi-4 ships) becomes pre-tokenizer gpt-4o,
    and llama.cpp's ids equal `tokenizers`' (Llama 3's rule, its nearest neighbour, would not)."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    from infer_cli.engine import Model, Options
    from quantize.convert import convert_checkpoint

    folder, _, _ = _mistral_tekken(tmp_path / "o200k", O200K_SPLIT)
    out = convert_checkpoint(folder, tmp_path / "o200k.F16.gguf", "F16").path
    r = GGUFReader(str(out))
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-4o"
    del r
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    m = Model(out, Options(warmup=False, n_ctx=256, threads=2))
    try:
        for text in TEKKEN_TEXTS + CORPUS[:5] + ["I'm sure they'd've said it's 12345678 o'clock"]:
            assert m.tokenize(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids, text
    finally:
        m.close()
