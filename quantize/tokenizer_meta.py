"""Tokenizer metadata for GGUF from a checkpoint's tokenizer.json / tokenizer_config.json.

Byte-level BPE from tokenizer.json, and SentencePiece from tokenizer.model (read here with a
few lines of protobuf decoding, no sentencepiece package). The pre-tokenizer name llama.cpp needs is recognised from the
structure of tokenizer.json's pre_tokenizer (llama.cpp's converter hashes token ids of a check
text instead; both name the same splitting rules for the families below: llama-bpe, qwen2,
tekken, gpt-4o, smollm, gpt-2).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from infer_cli.errors import BadCheckpoint

# More token ids than any real vocabulary (Gemma 3 has 262,144): a crafted id cannot make the
# converter allocate a token list without bound.
MAX_VOCAB = 1 << 24

# Fragments of the split regexes that tell the families apart.
_LLAMA3 = r"\p{N}{1,3}"
_QWEN2 = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
# Tekken (Mistral Nemo, Mistral Small 3.x, Devstral, Ministral as Hugging Face publishes them):
# words split at case changes, single digits, no English contractions.
_TEKKEN_WORD = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
_CONTRACTIONS = "'s|'t|'re|'ve|'m|'ll|'d"


# GPT-4o's o200k rule (Phi-4, Phi-4-mini): the same case-aware words, each with an optional
# English contraction, and numbers in runs of up to three digits.
_GPT4O_WORD = _TEKKEN_WORD + "(?i:" + _CONTRACTIONS + ")?"


def _is_gpt4o(regex: str) -> bool:
    return _GPT4O_WORD in regex and _LLAMA3 in regex and r"(?=(?:\d{3})" not in regex


def _is_tekken(regex: str) -> bool:
    return (_TEKKEN_WORD in regex and r"|\p{N}|" in regex and r"\p{N}{" not in regex
            and _CONTRACTIONS not in regex.lower())


def pre_tokenizer_name(pre: dict | None) -> str:
    if not pre:
        return "default"
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    splits = [json.dumps(p.get("pattern", {})) for p in parts if p.get("type") == "Split"]
    regex = "".join(json.loads(s).get("Regex", "") for s in splits)
    if _is_tekken(regex):
        return "tekken"
    if _is_gpt4o(regex):
        return "gpt-4o"
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
    scores: list[float] | None = None       # SentencePiece only
    add_space_prefix: bool | None = None

    def write(self, w) -> None:
        w.add_tokenizer_model("llama" if self.scores is not None else "gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.merges:
            w.add_token_merges(self.merges)
        setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id,
                   "unk": w.add_unk_token_id, "pad": w.add_pad_token_id}
        for k, v in self.special.items():
            setters[k](v)
        if self.add_bos is not None:
            w.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _varint(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def _fields(b: bytes):
    """(field number, wire type, value) of one protobuf message; value is bytes for wire type 2."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(b, i)
            v, i = b[i:i + n], i + n
        elif wt == 5:
            v, i = struct.unpack("<f", b[i:i + 4])[0], i + 4
        else:
            raise ValueError(f"protobuf wire type {wt}")
        yield num, wt, v


def read_sentencepiece(path: Path) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types of a SentencePiece ModelProto (types as in GGUF: 1 normal,
    2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    tokens, scores, types = [], [], []
    try:
        for num, wt, v in _fields(path.read_bytes()):
            if num != 1 or wt != 2:
                continue
            piece, score, typ = "", 0.0, 1
            for n2, _, v2 in _fields(v):
                if n2 == 1:
                    piece = v2.decode("utf-8")
                elif n2 == 2:
                    score = float(v2)
                elif n2 == 3:
                    typ = int(v2)
            tokens.append(piece)
            scores.append(score)
            types.append(typ)
    except (IndexError, ValueError, TypeError, AttributeError, struct.error) as e:
        raise BadCheckpoint(str(path), f"corrupt SentencePiece model ({e})") from None
    if any(not 0 <= t <= 6 for t in types):
        raise BadCheckpoint(str(path), "corrupt SentencePiece model (a piece type outside 0-6)")
    if not tokens:
        raise BadCheckpoint(str(path), "SentencePiece model has no pieces")
    return tokens, scores, types


def _config(folder: Path) -> dict:
    if (folder / "tokenizer_config.json").is_file():
        return json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {}


def _chat_template(folder: Path, cfg: dict) -> str | None:
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template


def _specials(cfg: dict, vocab: dict[str, int]) -> dict[str, int]:
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        val = cfg.get(f"{key}_token")
        if isinstance(val, dict):
            val = val.get("content")
        if isinstance(val, str) and val in vocab:
            special[key] = vocab[val]
    return special


def _looks_special(t: str) -> bool:
    return (t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (t.startswith("<|") and t.endswith("|>"))
            or (t.startswith("<\uff5c") and t.endswith("\uff5c>"))
            or (t.startswith("<unused") and t.endswith(">")))


def read_sentencepiece_tokenizer(folder: Path, vocab_size: int, *, llama: bool = False) -> Tokenizer:
    """As llama.cpp's converter reads a SentencePiece checkpoint: the pieces of tokenizer.model
    (user-defined pieces count as normal there), then added_tokens.json and tokenizer_config.json's
    added_tokens_decoder over them (control if special or special-looking, else user-defined with
    '\u2581' turned back into spaces; score -1000), padded to vocab_size with [PADn].

    ``llama`` (Llama 2, Mistral v0.1 and the like) differs from Gemma as llama.cpp's LlamaModel
    converter does: add_space_prefix only where tokenizer_config.json says add_prefix_space (else
    unwritten, and llama.cpp's default for a "llama" vocabulary, a space prefix, holds); add_bos /
    add_eos only where tokenizer_config.json says so (llama.cpp's defaults: BOS yes, EOS no); and
    special ids missing from tokenizer_config.json taken from config.json's ``*_token_id``."""
    pieces, piece_scores, piece_types = read_sentencepiece(folder / "tokenizer.model")
    n = vocab_size or len(pieces)
    tokens = [f"[PAD{i}]" for i in range(n)]
    scores, types = [-10000.0] * n, [5] * n
    for i, (t, sc, ty) in enumerate(zip(pieces[:n], piece_scores, piece_types)):
        tokens[i], scores[i], types[i] = t, sc, 1 if ty == 4 else ty
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        for t, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if 0 <= i < n:
                tokens[i], scores[i], types[i] = t, -1000.0, 4
    cfg = _config(folder)
    for sid, a in (cfg.get("added_tokens_decoder") or {}).items():
        i, t = int(sid), a["content"]
        if not 0 <= i < n:
            continue
        if a.get("special") or _looks_special(t):
            types[i] = 3
        else:
            t, types[i] = t.replace("\u2581", " "), 4
        tokens[i], scores[i] = t, -1000.0
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    add_bos = cfg.get("add_bos_token")
    if llama:
        special = _specials(cfg, vocab)
        model_cfg = folder / "config.json"
        hp = json.loads(model_cfg.read_text(encoding="utf-8")) if model_cfg.is_file() else {}
        for key in ("bos", "eos", "unk", "pad"):
            tid = hp.get(f"{key}_token_id")
            if key not in special and isinstance(tid, int) and 0 <= tid < n:
                special[key] = tid
        flag = lambda k: cfg.get(k) if isinstance(cfg.get(k), bool) else None  # noqa: E731
        return Tokenizer(tokens, types, [], "default", special, flag("add_bos_token"),
                         flag("add_eos_token"), _chat_template(folder, cfg), scores,
                         flag("add_prefix_space"))
    return Tokenizer(tokens, types, [], "default", _specials(cfg, vocab),
                     True if add_bos is None else add_bos, cfg.get("add_eos_token", False),
                     _chat_template(folder, cfg), scores, False)


def read_tokenizer(folder: Path, vocab_size: int, *, sentencepiece: bool = False,
                   llama: bool = False) -> Tokenizer:
    """``sentencepiece``: Gemma's reading of tokenizer.model; ``llama``: Llama 2 / Mistral's, which
    (as in llama.cpp's converter) takes tokenizer.model over tokenizer.json wherever it exists."""
    if (sentencepiece or llama) and (folder / "tokenizer.model").is_file():
        return read_sentencepiece_tokenizer(folder, vocab_size, llama=llama and not sentencepiece)
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
    bad = next(((t, i) for t, i in vocab.items()
                if not isinstance(t, str) or type(i) is not int or not 0 <= i < MAX_VOCAB), None)
    if bad is not None or not vocab:
        raise BadCheckpoint(str(tj), f"token {bad[0]!r} has id {bad[1]!r}; ids are integers "
                            f"from 0 to {MAX_VOCAB - 1:,}" if bad else "its vocabulary is empty")
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until filled
    for tok, i in vocab.items():
        tokens[i] = tok
        a = added.get(tok)
        types[i] = 1 if a is None else (3 if a.get("special") else 4)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg = _config(folder)
    return Tokenizer(tokens, types, merges, pre_tokenizer_name(data.get("pre_tokenizer")),
                     _specials(cfg, vocab), cfg.get("add_bos_token"), cfg.get("add_eos_token"),
                     _chat_template(folder, cfg))
