"""Test helper: a GGUF exported as a Hugging Face checkpoint folder (dequantized weights as
safetensors, config.json and tokenizer.json from the GGUF metadata). Llama-arch only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
       "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
       "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
       "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _unpermute(w, n_head):
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)



def _dequantized(reader):
    """Each tensor of a GGUFReader with its values as float32, in Hugging Face's row order."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        yield t, dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)

def export_llama(gguf_path: Path, folder: Path) -> Path:
    from gguf import GGUFReader

    from quantize.safetensors_io import write

    r = GGUFReader(str(gguf_path))

    def field(key):
        f = r.fields[key]
        v = f.contents()
        return v

    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv")
    tensors = {}
    for t, data in _dequantized(r):
        parts = t.name.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{_HF[parts[2]]}.{parts[3]}"
            if parts[2] == "attn_q":
                data = _unpermute(data, n_head)
            elif parts[2] == "attn_k":
                data = _unpermute(data, n_kv)
        else:
            hf = f"{_HF[parts[0]]}.{parts[1]}"
        tensors[hf] = data
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "model.safetensors", tensors)
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": field("llama.embedding_length"),
        "intermediate_size": field("llama.feed_forward_length"),
        "num_hidden_layers": field("llama.block_count"), "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "max_position_embeddings": field("llama.context_length"),
        "rms_norm_eps": field("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": field("llama.rope.freq_base"), "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
    }
    (folder / "config.json").write_text(json.dumps(config))
    added = [{"id": i, "content": tok, "special": ty == 3, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": ty != 3}
             for i, (tok, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    tj = {"version": "1.0", "added_tokens": added, "normalizer": None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Digits", "individual_digits": True},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
          "post_processor": None, "decoder": {"type": "ByteLevel"},
          "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                    "merges": list(merges)}}
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    name = lambda k: tokens[field(k)] if k in r.fields else None  # noqa: E731
    cfg = {"bos_token": name("tokenizer.ggml.bos_token_id"),
           "eos_token": name("tokenizer.ggml.eos_token_id"),
           "unk_token": name("tokenizer.ggml.unknown_token_id"),
           "pad_token": name("tokenizer.ggml.padding_token_id"),
           "chat_template": field("tokenizer.chat_template") if "tokenizer.chat_template" in r.fields else None}
    if "tokenizer.ggml.add_bos_token" in r.fields:
        cfg["add_bos_token"] = bool(field("tokenizer.ggml.add_bos_token"))
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


# --- Gemma 3 ------------------------------------------------------------------------------------

_GEMMA3 = dict(_HF, attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm",
               post_attention_norm="post_attention_layernorm", ffn_norm="pre_feedforward_layernorm",
               post_ffw_norm="post_feedforward_layernorm")


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_bytes(num: int, data: bytes) -> bytes:
    return _pb_varint(num << 3 | 2) + _pb_varint(len(data)) + data


def sentencepiece_model(tokens, scores, types) -> bytes:
    """A SentencePiece ModelProto holding only the pieces (piece, score, type)."""
    import struct

    out = bytearray()
    for t, s, ty in zip(tokens, scores, types):
        piece = _pb_bytes(1, t.encode("utf-8")) + _pb_varint(2 << 3 | 5) + struct.pack("<f", s)
        if ty != 1:
            piece += _pb_varint(3 << 3) + _pb_varint(int(ty))
        out += _pb_bytes(1, piece)
    return bytes(out)


def export_gemma3(gguf_path: Path, folder: Path) -> Path:
    """Gemma 3 GGUF -> HF folder: norm weights minus the 1 llama.cpp's converter adds, the
    SentencePiece vocabulary as tokenizer.model, user-defined tokens in added_tokens_decoder."""
    from gguf import GGUFReader

    from quantize.safetensors_io import write

    r = GGUFReader(str(gguf_path))
    field = lambda key: r.fields[key].contents()  # noqa: E731
    tensors = {}
    for t, data in _dequantized(r):
        parts = t.name.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{_GEMMA3[parts[2]]}.{parts[3]}"
        else:
            hf = f"{_GEMMA3[parts[0]]}.{parts[1]}"
        if hf.endswith("norm.weight"):
            data = data - np.float32(1.0)
        tensors[hf] = data
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "model.safetensors", tensors)
    tokens, scores = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type")
    head_dim = field("gemma3.attention.key_length")
    config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": field("gemma3.embedding_length"),
        "intermediate_size": field("gemma3.feed_forward_length"),
        "num_hidden_layers": field("gemma3.block_count"),
        "num_attention_heads": field("gemma3.attention.head_count"),
        "num_key_value_heads": field("gemma3.attention.head_count_kv"), "head_dim": head_dim,
        "max_position_embeddings": field("gemma3.context_length"),
        "rms_norm_eps": field("gemma3.attention.layer_norm_rms_epsilon"),
        "rope_theta": field("gemma3.rope.freq_base"), "rope_local_base_freq": 10000.0,
        "sliding_window": field("gemma3.attention.sliding_window"), "query_pre_attn_scalar": head_dim,
        "vocab_size": len(tokens), "tie_word_embeddings": True, "final_logit_softcapping": None,
        "attn_logit_softcapping": None, "rope_scaling": None, "hidden_activation": "gelu_pytorch_tanh",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes(sentencepiece_model(tokens, scores, types))
    name = lambda k: tokens[field(k)] if k in r.fields else None  # noqa: E731
    cfg = {"bos_token": name("tokenizer.ggml.bos_token_id"),
           "eos_token": name("tokenizer.ggml.eos_token_id"),
           "unk_token": name("tokenizer.ggml.unknown_token_id"),
           "pad_token": name("tokenizer.ggml.padding_token_id"),
           "add_bos_token": bool(field("tokenizer.ggml.add_bos_token")),
           "add_eos_token": bool(field("tokenizer.ggml.add_eos_token")),
           "added_tokens_decoder": {str(i): {"content": t, "special": False}
                                    for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 4}}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder
