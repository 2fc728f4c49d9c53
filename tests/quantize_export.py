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


def export_llama(gguf_path: Path, folder: Path) -> Path:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from quantize.safetensors_io import write

    r = GGUFReader(str(gguf_path))

    def field(key):
        f = r.fields[key]
        v = f.contents()
        return v

    n_head = field("llama.attention.head_count")
    n_kv = field("llama.attention.head_count_kv")
    tensors = {}
    for t in r.tensors:
        data = dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(x) for x in t.shape])))
        data = data.astype(np.float32)
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
