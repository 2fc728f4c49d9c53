"""Tokenizer metadata for GGUF from a checkpoint's tokenizer.json / tokenizer_config.json.

Byte-level BPE only so far. The pre-tokenizer name llama.cpp needs is recognised from the
structure of tokenizer.json's pre_tokenizer (llama.cpp's converter hashes token ids of a check
text instead; both name the same splitting rules for the families below).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from infer_cli.errors import BadCheckpoint

# Fragments of the split regexes that tell the families apart.
_LLAMA3 = r"\p{N}{1,3}"
_QWEN2 = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"


def pre_tokenizer_name(pre: dict | None) -> str:
    if not pre:
        return "default"
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    splits = [json.dumps(p.get("pattern", {})) for p in parts if p.get("type") == "Split"]
    regex = "".join(json.loads(s).get("Regex", "") for s in splits)
    if _LLAMA3 in regex:
        return "llama-bpe"
    if _QWEN2 in regex:
        return "qwen2"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    return "default"


@dataclass
class Tokenizer:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int] = field(default_factory=dict)   # bos, eos, unk, pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None

    def write(self, w) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id,
                   "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
        for k, v in self.special.items():
            setters[k](v)
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def read_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise BadCheckpoint(str(folder), "tokenizer.json is missing (SentencePiece-only "
                            "checkpoints are not supported yet)")
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadCheckpoint(str(tj), f"not valid JSON ({e})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise BadCheckpoint(str(tj), f"tokenizer type {model.get('type')} is not supported yet (BPE only)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a for a in data.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = a["id"]
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until filled
    for tok, i in vocab.items():
        tokens[i] = tok
        a = added.get(tok)
        types[i] = 1 if a is None else (3 if a.get("special") else 4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg = {}
    if (folder / "tokenizer_config.json").is_file():
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        val = cfg.get(f"{key}_token")
        if isinstance(val, dict):
            val = val.get("content")
        if isinstance(val, str) and val in vocab:
            special[key] = vocab[val]
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return Tokenizer(tokens, types, merges, pre_tokenizer_name(data.get("pre_tokenizer")), special,
                     cfg.get("add_bos_token"), cfg.get("add_eos_token"), template)
