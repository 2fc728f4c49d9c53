"""Tiny random Llama-3-shaped and Qwen2-shaped checkpoints (numpy weights, a byte-level BPE
tokenizer trained here with the `tokenizers` package) convert to GGUF and run in llama.cpp:
token ids equal the `tokenizers` ids, and llama.cpp's logits equal a numpy forward pass of the
Hugging Face model (which checks the q/k permutation, GQA, biases and Llama 3.1's rope_freqs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3,
          "def main(argv):\n    for i in range(10):\n        print(i, argv[i])\n",
          "In 2024 there were 1,234,567 people; 3.14159 is pi. It's what they'd've said.",
          "Ünïcödé façade naïve — 日本語のテキスト, emoji 🙂 and tabs\tand  spaces",
          "I'm sure you'll see we're done. They've gone, haven't they?"] * 4
TEXTS = ["Hello, world! Ünïcödé ✓ 日本語 🙂", "def f(x):\n    return x ** 2  # 12345",
         "a    b\t\tc\n\n\nd  ", "3.14159 and 2,718,281 items 0000001", "It's THEY'LL we'D",
         "   leading spaces\r\nwindows lines", "unknown: ℵ₀ ∑ ⊗ ǅ"]


def _tokenizer(split: str, specials: list[str], nfc: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(specials)
    return tok


def _draws(seed: int):
    """Random weights rounded to F16, so the F16 GGUF holds exactly these values."""
    rng = np.random.default_rng(seed)

    def w(*shape, s=0.15):
        return (rng.standard_normal(shape) * s).astype(np.float16).astype(np.float32)
    return w


def _save(folder: Path, t: dict, cfg: dict, tokenizer_config: dict, files: dict[str, bytes]) -> None:
    """A Hugging Face checkpoint folder: F16 matrices (F32 vectors), config, tokenizer files."""
    from quantize.safetensors_io import write

    folder.mkdir(parents=True)
    write(folder / "model.safetensors", {k: v.astype(np.float16) if v.ndim == 2 else v for k, v in t.items()})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, data in files.items():
        (folder / name).write_bytes(data)


def tiny_checkpoint(folder: Path, kind: str) -> tuple[Path, dict]:
    w = _draws({"llama3": 7, "qwen2": 11}.get(kind, 13))
    if kind == "llama3":
        tok = _tokenizer(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>"], False)
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rope_theta": 10000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "tie_word_embeddings": False}
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True}
    else:
        tok = _tokenizer(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], True)
        arch = "Qwen3ForCausalLM" if kind == "qwen3" else "Qwen2ForCausalLM"
        cfg = {"architectures": [arch], "model_type": kind, "rope_theta": 1000000.0,
               "tie_word_embeddings": True}
        tcfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
                "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}
    n_vocab, d, n_head, n_kv, hd, ff, n_layer = tok.get_vocab_size(), 64, 4, 2, 16, 96, 2
    if kind == "qwen3":  # a head size other than hidden / heads, as Qwen3's configs have
        hd = 24
        cfg["head_dim"] = hd
    cfg.update({"hidden_size": d, "num_attention_heads": n_head, "num_key_value_heads": n_kv,
                "intermediate_size": ff, "num_hidden_layers": n_layer, "vocab_size": n_vocab,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-5})

    t = {"model.embed_tokens.weight": w(n_vocab, d, s=0.5), "model.norm.weight": 1 + w(d, s=0.1)}
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(n_vocab, d, s=0.3)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "post_attention_layernorm.weight": 1 + w(d, s=0.1),
              p + "self_attn.q_proj.weight": w(n_head * hd, d), p + "self_attn.k_proj.weight": w(n_kv * hd, d),
              p + "self_attn.v_proj.weight": w(n_kv * hd, d), p + "self_attn.o_proj.weight": w(d, n_head * hd),
              p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
              p + "mlp.down_proj.weight": w(d, ff)}
        if kind == "qwen2":
            t |= {p + "self_attn.q_proj.bias": w(n_head * hd, s=0.3), p + "self_attn.k_proj.bias": w(n_kv * hd, s=0.3),
                  p + "self_attn.v_proj.bias": w(n_kv * hd, s=0.3)}
        if kind == "qwen3":
            t |= {p + "self_attn.q_norm.weight": 1 + w(hd, s=0.2), p + "self_attn.k_norm.weight": 1 + w(hd, s=0.2)}
    _save(folder, t, cfg, tcfg, {"tokenizer.json": tok.to_str().encode()})
    return folder, t


def _rope_inv_freq(cfg):
    from quantize.convert import llama3_rope_factors

    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        inv = inv / llama3_rope_factors(cfg)
    return inv


def _reference_logits(t: dict, cfg: dict, ids: list[int]) -> np.ndarray:
    """Hugging Face's Llama / Qwen2 / Qwen3 forward pass in float64 numpy."""
    d, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, n = cfg.get("head_dim") or d // nh, cfg["rms_norm_eps"], len(ids)
    g = {k: v.astype(np.float64) for k, v in t.items()}
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w  # noqa: E731
    ang = np.arange(n)[:, None] * _rope_inv_freq(cfg)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # (heads, n, hd), rotate_half
        rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rot * sin

    x = g["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, g[p + "input_layernorm.weight"])
        proj = lambda name, heads: ((h @ g[p + name + ".weight"].T + g.get(p + name + ".bias", 0))  # noqa: E731
                                    .reshape(n, heads, hd).transpose(1, 0, 2))
        q, k, v = proj("self_attn.q_proj", nh), proj("self_attn.k_proj", nkv), proj("self_attn.v_proj", nkv)
        if p + "self_attn.q_norm.weight" in g:  # Qwen3: RMSNorm over each head, before rotary
            q, k = norm(q, g[p + "self_attn.q_norm.weight"]), norm(k, g[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        x = x + a.transpose(1, 0, 2).reshape(n, nh * hd) @ g[p + "self_attn.o_proj.weight"].T
        h = norm(x, g[p + "post_attention_layernorm.weight"])
        gate = h @ g[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ g[p + "mlp.up_proj.weight"].T)) @ g[p + "mlp.down_proj.weight"].T
    head = g.get("lm_head.weight", g["model.embed_tokens.weight"])
    return norm(x, g["model.norm.weight"]) @ head.T


def _assert_logits_match(m, opts, ids, ref):
    """llama.cpp's logits at every position of ``ids`` against a numpy reference forward pass:
    within 2% of the largest logit, and the same argmax at 90% of positions or more."""
    from infer_cli.engine import Session

    s = Session(m, opts)
    try:
        s.decode_all(ids)
        got = np.stack([np.ctypeslib.as_array(s.L.llama_get_logits_ith(s.ptr, i), shape=(m.n_vocab,))
                        for i in range(len(ids))]).astype(np.float64)
    finally:
        s.close()
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.02 * scale, (np.abs(got - ref).max(), scale)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    return got



@pytest.mark.parametrize("kind, pre", [("llama3", "llama-bpe"), ("qwen2", "qwen2"), ("qwen3", "qwen2")])

def test_tiny_checkpoint_converts_tokenizes_and_matches_reference(kind, pre, tmp_path):
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    from infer_cli.engine import Options, Model, Session
    from quantize.convert import convert_checkpoint

    folder, weights = tiny_checkpoint(tmp_path / kind, kind)
    cfg = json.loads((folder / "config.json").read_text())
    out = convert_checkpoint(folder, tmp_path / f"{kind}.F16.gguf", "F16").path

    r = GGUFReader(str(out))
    assert r.fields["tokenizer.ggml.pre"].contents() == pre
    names = {t.name for t in r.tensors}
    assert ("rope_freqs.weight" in names) == (kind == "llama3")
    assert ("blk.0.attn_q_norm.weight" in names) == (kind == "qwen3")
    assert ("blk.0.attn_q.bias" in names) == (kind == "qwen2")
    assert r.fields["general.architecture"].contents() == {"llama3": "llama"}.get(kind, kind)
    assert ("output.weight" in names) == (kind == "llama3")

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    opts = Options(warmup=False, n_ctx=256, threads=2)
    m = Model(out, opts)
    try:
        for text in TEXTS + CORPUS[:5]:
            assert m.tokenize(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids, text
        qwen = kind.startswith("qwen")
        specials = m.tokenize("<|im_start|>x<|im_end|>" if qwen else "<|end_of_text|>x")
        bos = hf.token_to_id("<|begin_of_text|>")
        assert specials[:1] == ([bos] if kind == "llama3" else specials[:1])
        assert qwen == (specials[0] == hf.token_to_id("<|im_start|>"))

        ids = hf.encode(TEXTS[0] + " " + TEXTS[1], add_special_tokens=False).ids[:24]
        ref = _reference_logits(weights, cfg, ids)
        _assert_logits_match(m, opts, ids, ref)
        s = Session(m, opts)
        try:
            # a few greedy tokens
            s.decode(ids[:4])
            for _ in range(8):
                nxt, _ = s.top()
                s.decode_one(nxt)
            assert len(s.tokens) == 12
        finally:
            s.close()
    finally:
        m.close()


# --- Gemma 2 ------------------------------------------------------------------------------------

_WORDS = ["\u2581the", "\u2581quick", "\u2581brown", "\u2581fox", "\u2581jumps", "\u2581over", "\u2581lazy", "\u2581dog"]
# every prefix of every word (longer ones scoring higher), so that SentencePiece's pair merges
# reach the whole words, then two control tokens of Gemma's chat format
GEMMA_PIECES = (sorted({c for w in _WORDS for c in w})
                + sorted({w[:k] for w in _WORDS for k in range(2, len(w) + 1)}, key=lambda x: (len(x), x))
                + ["<start_of_turn>", "<end_of_turn>"])


def _gemma2_checkpoint(folder: Path) -> tuple[Path, dict, dict]:
    """Gemma 2 in miniature: a SentencePiece vocabulary (controls, <unk>, byte fallback, words),
    two layers (the first with a 6-token sliding window), strong soft-capping so that it shows."""
    from tests.quantize_export import sentencepiece_model

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + GEMMA_PIECES
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (len(GEMMA_PIECES) - 2) + [3, 3]
    scores = [0.0] * 260 + [float(len(t)) for t in GEMMA_PIECES[:-2]] + [0.0, 0.0]
    w = _draws(17)
    n_vocab, d, nh, nkv, hd, ff = len(tokens), 64, 4, 2, 16, 96
    cfg = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": d,
           "intermediate_size": ff, "num_hidden_layers": 2, "num_attention_heads": nh,
           "num_key_value_heads": nkv, "head_dim": hd, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": n_vocab,
           "sliding_window": 6, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
           "query_pre_attn_scalar": hd, "hidden_activation": "gelu_pytorch_tanh",
           "tie_word_embeddings": True}

    t = {"model.embed_tokens.weight": w(n_vocab, d, s=0.5), "model.norm.weight": w(d, s=0.1)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": w(d, s=0.1), p + "post_attention_layernorm.weight": w(d, s=0.1),
              p + "pre_feedforward_layernorm.weight": w(d, s=0.1),
              p + "post_feedforward_layernorm.weight": w(d, s=0.1),
              p + "self_attn.q_proj.weight": w(nh * hd, d, s=0.5), p + "self_attn.k_proj.weight": w(nkv * hd, d, s=0.5),
              p + "self_attn.v_proj.weight": w(nkv * hd, d), p + "self_attn.o_proj.weight": w(d, nh * hd),
              p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
              p + "mlp.down_proj.weight": w(d, ff)}
    _save(folder, t, cfg, {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
                           "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False},
          {"tokenizer.model": sentencepiece_model(tokens, scores, types)})
    return folder, t, cfg


def _gemma2_reference_logits(t: dict, cfg: dict, ids: list[int]) -> np.ndarray:
    """Hugging Face's Gemma 2 forward pass in float64 numpy."""
    d, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, n, win = cfg["rms_norm_eps"], len(ids), cfg["sliding_window"]
    g = {k: v.astype(np.float64) for k, v in t.items()}
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 + w)  # noqa: E731
    cap = lambda x, c: np.tanh(x / c) * c  # noqa: E731
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rope = lambda x: x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin  # noqa: E731
    i_, j_ = np.arange(n)[:, None], np.arange(n)[None, :]
    x = g["model.embed_tokens.weight"][ids] * np.sqrt(d)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        allowed = (j_ <= i_) & ((i_ - j_ < win) if layer % 2 == 0 else True)
        h = norm(x, g[p + "input_layernorm.weight"])
        proj = lambda name, heads: (h @ g[p + name + ".weight"].T).reshape(n, heads, hd).transpose(1, 0, 2)  # noqa: E731
        q, k, v = rope(proj("self_attn.q_proj", nh)), rope(proj("self_attn.k_proj", nkv)), proj("self_attn.v_proj", nkv)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = cap(q @ k.transpose(0, 2, 1) * cfg["query_pre_attn_scalar"] ** -0.5, cfg["attn_logit_softcapping"])
        s = np.where(allowed, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, nh * hd)
        x = x + norm(a @ g[p + "self_attn.o_proj.weight"].T, g[p + "post_attention_layernorm.weight"])
        h = norm(x, g[p + "pre_feedforward_layernorm.weight"])
        f = (gelu(h @ g[p + "mlp.gate_proj.weight"].T) * (h @ g[p + "mlp.up_proj.weight"].T)) @ g[p + "mlp.down_proj.weight"].T
        x = x + norm(f, g[p + "post_feedforward_layernorm.weight"])
    logits = norm(x, g["model.norm.weight"]) @ g["model.embed_tokens.weight"].T
    return cap(logits, cfg["final_logit_softcapping"])


def test_tiny_gemma2_converts_tokenizes_and_matches_reference(tmp_path):
    from gguf import GGUFReader

    from infer_cli.engine import Options, Model
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = _gemma2_checkpoint(tmp_path / "gemma2")
    out = convert_checkpoint(folder, tmp_path / "gemma2.F16.gguf", "F16").path
    r = GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith(("gemma2.", "tokenizer.ggml.model"))}
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["gemma2.attention.sliding_window"] == 6 and f["gemma2.attention.key_length"] == 16
    assert f["gemma2.attn_logit_softcapping"] == 2.0 and f["gemma2.final_logit_softcapping"] == 3.0
    names = {t.name for t in r.tensors}
    assert {"blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight", "blk.1.ffn_norm.weight"} <= names
    assert "output.weight" not in names
    del r

    opts = Options(warmup=False, n_ctx=256, threads=2)
    m = Model(out, opts)
    try:
        vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
        word = lambda w: 260 + GEMMA_PIECES.index(w)  # noqa: E731
        # no space prefix for Gemma: the first word is spelled out, the others whole
        assert m.tokenize("the quick fox") == [vocab["<bos>"], word("t"), word("h"), word("e"),
                                               word("\u2581quick"), word("\u2581fox")]
        assert m.tokenize("<start_of_turn>ü", add_special=False) == [word("<start_of_turn>"), 4 + 0xC3, 4 + 0xBC]

        ids = [2] + [int(i) for i in np.random.default_rng(3).integers(4, m.n_vocab, 23)]
        ref = _gemma2_reference_logits(weights, cfg, ids)
        got = _assert_logits_match(m, opts, ids, ref)
        # the sliding window matters here: without it the reference differs from llama.cpp's logits
        no_window = _gemma2_reference_logits(weights, dict(cfg, sliding_window=10 ** 6), ids)
        assert np.abs(no_window - got).max() > 5 * np.abs(got - ref).max()
    finally:
        m.close()


# --- Llama 2 (SentencePiece tokenizer.model) ----------------------------------------------------

_L2_WORDS = ["\u2581hello", "\u2581world", "\u2581the", "\u2581lazy", "\u2581dog", "\u2581leading", "\u2581spaces"]
# single characters (digits among them, as Llama 2 has only single digits), every prefix of every
# word, runs of '\u2581', and two overlapping pieces whose scores decide which merge wins
LLAMA2_PIECES = (sorted({c for w in _L2_WORDS for c in w} | set("0123456789xyz"))
                 + sorted({w[:k] for w in _L2_WORDS for k in range(2, len(w) + 1)}, key=lambda x: (len(x), x))
                 + ["\u2581\u2581", "\u2581\u2581\u2581\u2581", "xy", "yz", "é"])
LLAMA2_TEXTS = ["hello world", " hello", "   leading spaces", "the lazy dog 2024", "xyz yz xy",
                "héllo wörld ✓ 日本", "12 + 345 = 357\n\tx", "dog🙂dog", "hello  world    the"]


def _llama2_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + LLAMA2_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(LLAMA2_PIECES)
    # as in Llama 2's model: bytes and controls score 0, pieces -i (earlier pieces merge first),
    # except that "yz" outranks "xy"
    scores = [0.0] * 259 + [-float(i) for i in range(len(LLAMA2_PIECES))]
    scores[tokens.index("yz")] = 0.5
    return tokens, scores, types


def _spm_reference(text: str, tokens: list[str], scores: list[float]) -> list[int]:
    """SentencePiece BPE as Llama 2's tokenizer.model runs it: spaces to '\u2581' with a space prefix,
    characters merged pairwise, always the best-scoring pair whose union is a piece (leftmost on
    ties), and whatever is left outside the vocabulary spelled in <0xXX> byte tokens."""
    ids = {t: i for i, t in enumerate(tokens) if i >= 259}
    syms = list("\u2581" + text.replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            j = ids.get(syms[i] + syms[i + 1])
            if j is not None and (best is None or scores[j] > scores[ids[syms[best] + syms[best + 1]]]):
                best = i
        if best is None:
            break
        syms[best:best + 2] = [syms[best] + syms[best + 1]]
    out = []
    for s in syms:
        out += [ids[s]] if s in ids else [3 + b for b in s.encode("utf-8")]
    return out


def _llama2_checkpoint(folder: Path) -> tuple[Path, dict, dict]:
    from tests.quantize_export import sentencepiece_model

    tokens, scores, types = _llama2_vocab()
    w = _draws(23)
    n_vocab, d, nh, ff, n_layer = len(tokens), 64, 4, 96, 2
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
           "intermediate_size": ff, "num_hidden_layers": n_layer, "num_attention_heads": nh,
           "num_key_value_heads": nh, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "vocab_size": n_vocab, "bos_token_id": 1, "eos_token_id": 2,
           "tie_word_embeddings": False}

    t = {"model.embed_tokens.weight": w(n_vocab, d, s=0.5), "model.norm.weight": 1 + w(d, s=0.1),
         "lm_head.weight": w(n_vocab, d, s=0.3)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": 1 + w(d, s=0.1), p + "post_attention_layernorm.weight": 1 + w(d, s=0.1),
              p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(d, d),
              p + "self_attn.v_proj.weight": w(d, d), p + "self_attn.o_proj.weight": w(d, d),
              p + "mlp.gate_proj.weight": w(ff, d), p + "mlp.up_proj.weight": w(ff, d),
              p + "mlp.down_proj.weight": w(d, ff)}
    # Llama-2-7b-hf's tokenizer_config.json, abridged (no add_prefix_space: llama.cpp's default)
    tcfg = {"add_bos_token": True, "add_eos_token": False, "legacy": False, "pad_token": None,
            "bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"}, "unk_token": {"content": "<unk>"},
            "tokenizer_class": "LlamaTokenizer",
            "added_tokens_decoder": {str(i): {"content": c, "special": True}
                                     for i, c in enumerate(["<unk>", "<s>", "</s>"])}}
    _save(folder, t, cfg, tcfg, {"tokenizer.model": sentencepiece_model(tokens, scores, types)})
    return folder, t, cfg


def test_tiny_llama2_sentencepiece_converts_tokenizes_and_matches_reference(tmp_path):
    from gguf import GGUFReader

    from infer_cli.engine import Options, Model
    from quantize.convert import convert_checkpoint

    folder, weights, cfg = _llama2_checkpoint(tmp_path / "llama2")
    tokens, scores, types = _llama2_vocab()
    # a tokenizer.json beside tokenizer.model does not win (llama.cpp's converter takes the latter)
    _tokenizer(LLAMA3_SPLIT, ["<|end_of_text|>"], False).save(str(folder / "tokenizer.json"))
    out = convert_checkpoint(folder, tmp_path / "llama2.F16.gguf", "F16").path
    r = GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("tokenizer.ggml.")}
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    # <unk> turns control, as added_tokens_decoder calls it special (llama.cpp's converter does so too)
    assert f["tokenizer.ggml.tokens"] == tokens and f["tokenizer.ggml.token_type"] == [3] + types[1:]
    assert np.allclose(f["tokenizer.ggml.scores"], [-1000.0] * 3 + scores[3:])  # added tokens: -1000
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.ggml.add_space_prefix" not in f and "tokenizer.ggml.padding_token_id" not in f
    assert r.fields["general.architecture"].contents() == "llama"
    assert "output.weight" in {t.name for t in r.tensors} and "rope_freqs.weight" not in {t.name for t in r.tensors}
    del r

    # hand-derived ids, which also check the reference tokenizer
    piece = lambda p: 259 + LLAMA2_PIECES.index(p)  # noqa: E731
    assert _spm_reference("hello world", tokens, scores) == [piece("\u2581hello"), piece("\u2581world")]
    assert _spm_reference("xyz", tokens, scores) == [piece("\u2581"), piece("x"), piece("yz")]
    assert _spm_reference("7ü", tokens, scores) == [piece("\u2581"), piece("7"), 3 + 0xC3, 3 + 0xBC]

    opts = Options(warmup=False, n_ctx=256, threads=2)
    m = Model(out, opts)
    try:
        for text in LLAMA2_TEXTS:
            assert m.tokenize(text, add_special=False) == _spm_reference(text, tokens, scores), text
        # BOS by default, a space prefix on the first word, and the pieces of a control token
        assert m.tokenize("the dog") == [1, piece("\u2581the"), piece("\u2581dog")]
        assert m.tokenize("dog</s>", add_special=False) == [piece("\u2581dog"), 2]

        ids = [1] + _spm_reference(" ".join(LLAMA2_TEXTS[:4]), tokens, scores)[:23]
        ref = _reference_logits(weights, cfg, ids)
        _assert_logits_match(m, opts, ids, ref)
    finally:
        m.close()

    # add_prefix_space in tokenizer_config.json (as some Mistral-style checkpoints have) is carried over
    cfg_path = folder / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), add_prefix_space=False)))
    out2 = convert_checkpoint(folder, tmp_path / "llama2-nsp.F16.gguf", "F16").path
    assert GGUFReader(str(out2)).fields["tokenizer.ggml.add_space_prefix"].contents() is False
    m = Model(out2, opts)
    try:
        assert m.tokenize("hello world", add_special=False) == [piece("h"), piece("e"), piece("l"), piece("l"),
                                                                 piece("o"), piece("\u2581world")]
    finally:
        m.close()


def test_checkpoint_to_f16_is_measured_against_the_conversion(infer, tmp_path):
    """`infer quantize DIR --to F16`: the conversion is the output, and the report's reference
    (a folder cannot be measured); a quantized target beside it is compared with it."""
    folder, _ = tiny_checkpoint(tmp_path / "tiny-qwen3", "qwen3")
    out = tmp_path / "out"
    r = infer("quantize", str(folder), "--to", "F16", "-o", str(out), "--eval-tokens", "256",
              timeout=300)
    assert r.returncode == 0, r.stderr
    f16 = out / "tiny-qwen3.F16.gguf"
    assert "against tiny-qwen3.F16.gguf" in r.stdout and "F16" in r.stdout, r.stdout
    assert sorted(p.name for p in out.iterdir()) == [f16.name]

    out2 = tmp_path / "out2"
    r = infer("quantize", str(folder), "--to", "F16,Q8_0", "-o", str(out2), "--eval-tokens", "256",
              "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    f16 = out2 / "tiny-qwen3.F16.gguf"
    assert doc["reference"] == str(f16)
    rows = {row["name"]: row for row in doc["rows"]}
    assert list(rows) == ["reference", "F16", "Q8_0"]
    assert rows["reference"]["path"] == rows["F16"]["path"] == str(f16)
    assert rows["F16"]["seconds"] > 0 and rows["F16"]["quality"] == rows["reference"]["quality"]
    ref, q8 = rows["reference"]["quality"], rows["Q8_0"]["quality"]
    assert ref["kl_mean"] == 0 and ref["top1"] == 1 and np.isfinite(ref["ppl"]) and ref["ppl"] > 1
    assert 0 <= q8["kl_mean"] < 0.05 and q8["top1"] > 0.8, q8
    assert rows["Q8_0"]["size"] < rows["F16"]["size"]
    assert sorted(p.name for p in out2.iterdir()) == [f16.name, "tiny-qwen3.Q8_0.gguf"]
