"""Read what a GGUF file says about itself, without trusting it.

``read_gguf`` parses the header, the key/value metadata and the tensor table of a GGUF v2/v3
file and never touches weight data. The file is treated as hostile: every count and length is
checked against the bytes that remain before anything is allocated or looped over, so a crafted
or truncated file fails fast (milliseconds) with ``BadModelFile`` and a short reason, and memory
stays bounded by what the file really holds.

The rules follow llama.cpp's loader (ggml/src/gguf.cpp and llama-model-loader), so a file that
passes here is one llama.cpp would at least start to load: tensors packed in order at aligned
offsets, no more than 4 dimensions, known ggml types, rows a whole number of blocks, data inside
the file. One deliberate difference: arrays of arrays are accepted (the spec allows them).

``gguf.GGUFReader`` is not used: on crafted files it raises IndexError, believes a string of
2^40 bytes, or does not return at all.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable

from gguf.constants import LlamaFileType

from infer_cli import ggml
from infer_cli.errors import BadModelFile, human_bytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp keeps names in char[64], NUL included
# llama.cpp refuses longer strings and arrays even when the file is big enough to hold them.
MAX_STRING_LENGTH = 1 << 30
MAX_ARRAY_ELEMENTS = 1 << 30
# Arrays longer than this become ArrayInfo placeholders unless read_gguf(arrays=True).
SMALL_ARRAY = 64
# ...except numeric arrays outside tokenizer.* up to this length: per-layer hyperparameters
# (head_count_kv, sliding-window patterns) of deep models must stay readable.
PER_LAYER_ARRAY = 4096
LLAMA_MAX_LAYERS = 512  # llama.cpp aborts on a block_count of 0 or above this
MAX_ARRAY_NESTING = 8  # the spec allows arrays of arrays; bound the recursion

_READ_CHUNK = 1 << 20  # read-ahead window; the header of a 262k-token vocab is ~6 MiB

# GGUF value types (gguf.constants.GGUFValueType): id -> (name, struct code, size).
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12
_SCALARS: dict[int, tuple[str, str, int]] = {
    _UINT8: ("UINT8", "B", 1), _INT8: ("INT8", "b", 1),
    _UINT16: ("UINT16", "H", 2), _INT16: ("INT16", "h", 2),
    _UINT32: ("UINT32", "I", 4), _INT32: ("INT32", "i", 4),
    _FLOAT32: ("FLOAT32", "f", 4), _BOOL: ("BOOL", "?", 1),
    _UINT64: ("UINT64", "Q", 8), _INT64: ("INT64", "q", 8), _FLOAT64: ("FLOAT64", "d", 8),
}
_TYPE_NAMES = {**{t: v[0] for t, v in _SCALARS.items()}, _STRING: "STRING", _ARRAY: "ARRAY"}
# Fewest bytes one array element of each type can occupy: a string is at least its u64
# length, a nested array at least its u32 type and u64 count.
_MIN_ELEMENT_SIZE = {**{t: v[2] for t, v in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
# name (u64 length) + n_dims (u32) + type (u32) + offset (u64), with no dims and an empty name
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8
# key (u64 length, may be empty: rejected later, with a better message) + type (u32) + a u8
_MIN_KV = 8 + 4 + 1

_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_I64 = struct.Struct("<q").unpack_from


# ----------------------------------------------------------------------------------------------
# Public data


@dataclass(frozen=True)
class ArrayInfo:
    """Stands in for an array that was bounds-checked but not loaded (see ``read_gguf``)."""

    type_name: str  # element type, a gguf.GGUFValueType name: "STRING", "INT32", "ARRAY", ...
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One row of the tensor table. ``shape`` is in GGUF order (ne[0], the row length, first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset in its file
    n_elements: int
    n_bytes: int
    shard: int = 0  # index into GGUFInfo.paths (non-zero only for read_split)


@dataclass(frozen=True)
class GGUFInfo:
    """Header, metadata and tensor table of a GGUF file (or of a set of split shards)."""

    path: str
    file_size: int
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    paths: tuple[str, ...] = ()  # every shard, in order; (path,) for a single file
    # GGUF type of each metadata value: "UINT32", "STRING", "ARRAY[STRING]", "ARRAY[ARRAY]", ...
    value_types: dict[str, str] = field(default_factory=dict)

    # -- lookups --------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """``metadata[key]``, or ``default`` when the key is absent."""
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        """``metadata[f"{architecture}.{suffix}"]``, or ``default`` (also without architecture)."""
        arch = self.architecture
        if arch is None:
            return default
        return self.metadata.get(f"{arch}.{suffix}", default)

    def split_info(self) -> tuple[int, int]:
        """(split.no, split.count): which shard this is, 0-based, of how many; (0, 1) if unsplit."""
        no, count = self.get("split.no"), self.get("split.count")
        no = no if _is_int(no) else 0
        count = count if _is_int(count) and count > 0 else 1
        return no, count

    def tensor(self, name: str) -> TensorInfo | None:
        """The tensor called ``name``, or None."""
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    # -- general --------------------------------------------------------------------------------

    @property
    def architecture(self) -> str | None:
        return _str_or_none(self.get("general.architecture"))

    @property
    def name(self) -> str | None:
        return _str_or_none(self.get("general.name"))

    @property
    def license(self) -> str | None:
        return _str_or_none(self.get("general.license"))

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def weights_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float | None:
        n = self.n_params
        return self.weights_bytes * 8 / n if n else None

    @property
    def file_type_name(self) -> str | None:
        """'Q4_K_M', 'F16', ... from general.file_type; else the dominant 2-D weight type."""
        return _file_type_from_key(self.get("general.file_type")) or _dominant_weight_type(
            self.tensors
        )

    # -- hyperparameters ------------------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        return _int_or_none(self.arch_get("context_length"))

    @property
    def block_count(self) -> int | None:
        return _int_or_none(self.arch_get("block_count"))

    @property
    def embedding_length(self) -> int | None:
        return _int_or_none(self.arch_get("embedding_length"))

    @property
    def feed_forward_length(self) -> int | None:
        # Some architectures store it per layer; report the largest.
        return _scalar_max(self.arch_get("feed_forward_length"))

    @property
    def head_count(self) -> int | None:
        return _scalar_max(self.arch_get("attention.head_count"))

    @property
    def head_count_kv_raw(self) -> Any:
        """attention.head_count_kv as stored: an int, or a per-layer list in hybrid models."""
        return self.arch_get("attention.head_count_kv")

    @property
    def head_count_kv(self) -> int | None:
        """The largest KV head count over layers (defaults to head_count, as in llama.cpp)."""
        raw = self.head_count_kv_raw
        return self.head_count if raw is None else _scalar_max(raw)

    @property
    def key_length(self) -> int | None:
        return _int_or_none(self.arch_get("attention.key_length")) or self._head_dim()

    @property
    def value_length(self) -> int | None:
        return _int_or_none(self.arch_get("attention.value_length")) or self._head_dim()

    def _head_dim(self) -> int | None:
        emb, heads = self.embedding_length, self.head_count
        return emb // heads if emb and heads else None

    @property
    def sliding_window(self) -> int | None:
        return _int_or_none(self.arch_get("attention.sliding_window"))

    # -- mixture of experts ---------------------------------------------------------------------

    @property
    def expert_count(self) -> int:
        """Experts per MoE layer (``{arch}.expert_count``); 0 for a dense model."""
        return _scalar_max(self.arch_get("expert_count")) or 0

    @property
    def expert_used_count(self) -> int:
        """Experts each token is routed to (``{arch}.expert_used_count``); 0 for a dense model."""
        return _scalar_max(self.arch_get("expert_used_count")) or 0

    @property
    def expert_shared_count(self) -> int:
        """Shared experts every token passes through (``{arch}.expert_shared_count``)."""
        return _scalar_max(self.arch_get("expert_shared_count")) or 0

    @property
    def expert_feed_forward_length(self) -> int | None:
        """The feed-forward width of one expert (``{arch}.expert_feed_forward_length``); None
        where the architecture has no such key (Mixtral: ``feed_forward_length`` is it)."""
        return _scalar_max(self.arch_get("expert_feed_forward_length"))

    @property
    def n_expert_params(self) -> int:
        """Parameters in the routed-expert tensors (``blk.N.ffn_{up,down,gate}_exps``: 3-D, one
        matrix per expert); shared experts are not among them."""
        return sum(t.n_elements for t in self.tensors if is_expert_tensor(t.name))

    @property
    def n_active_params(self) -> int:
        """Parameters one token passes through: everything but the routed experts, plus
        ``expert_used_count`` of every ``expert_count`` of those. ``n_params`` for a dense model."""
        n, used = self.expert_count, self.expert_used_count
        experts = self.n_expert_params
        if not (n and used and experts):
            return self.n_params
        return self.n_params - experts + experts * min(used, n) // n

    # -- tokenizer ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int | None:
        tokens = self.get("tokenizer.ggml.tokens")
        if isinstance(tokens, (list, ArrayInfo)):
            return len(tokens)
        size = _int_or_none(self.arch_get("vocab_size"))
        if size is not None:
            return size
        embd = self.tensor("token_embd.weight")
        return embd.shape[1] if embd is not None and len(embd.shape) >= 2 else None

    @property
    def chat_template(self) -> str | None:
        return _str_or_none(self.get("tokenizer.chat_template"))

    @property
    def tokenizer_model(self) -> str | None:
        return _str_or_none(self.get("tokenizer.ggml.model"))


def read_gguf(path: str | os.PathLike[str], *, arrays: bool = False) -> GGUFInfo:
    """Parse the header, metadata and tensor table of the GGUF file at ``path``.

    Reads only the header region (plus at most one 1 MiB read-ahead), never weight data.
    Raises ``BadModelFile`` for anything wrong with the file: missing, unreadable, not GGUF,
    unsupported version, truncated, or inconsistent (see the module docstring).

    With ``arrays=False`` an array longer than 64 elements is checked and skipped and its
    metadata value is an ``ArrayInfo(type_name, count)``; numeric arrays outside ``tokenizer.``
    of up to 4096 elements are read anyway. With ``arrays=True`` every array is a list.
    """
    path = os.fspath(path)
    f, size = _open(path)
    with f:
        try:
            return parse_header(f, size, path, arrays=arrays)
        except OSError as e:
            raise BadModelFile(path, f"read error: {e.strerror or e}") from None


def check_vocabulary(path: str | os.PathLike[str]) -> None:
    """BadModelFile when the vocabulary holds a token twice, which llama.cpp asserts on (an
    abort of the whole process) while loading: a header walk that compares the tokens' bytes,
    done before a model is loaded (``read_gguf`` does not: it reads headers for listings too)."""
    path = os.fspath(path)
    f, size = _open(path)
    with f:
        try:
            _Parser(_Reader(f, size, path), False, unique_tokens=True).parse()
        except OSError as e:
            raise BadModelFile(path, f"read error: {e.strerror or e}") from None


def parse_header(f: BinaryIO, size: int, name: str, *, arrays: bool = False) -> GGUFInfo:
    """Parse a GGUF header from ``f``, a binary file object of ``size`` bytes, as ``read_gguf``
    does; ``name`` stands for the file in messages and in ``GGUFInfo.path``.

    ``f`` needs only ``seek(pos)`` and ``read(n)``. It may hold fewer bytes than ``size`` (the
    start of a remote file): when the parse needs bytes it does not have, the BadModelFile has
    ``truncated`` set and ``at`` below ``size``, and a longer prefix may succeed. Read errors of
    ``f`` propagate as they are.
    """
    return _Parser(_Reader(f, size, name), arrays).parse()


def read_split(paths: Iterable[str | os.PathLike[str]], *, arrays: bool = False) -> GGUFInfo:
    """Read the shards of a split GGUF (``*-00001-of-00003.gguf``, given in order) as one model.

    Metadata comes from the first shard; the tensor tables are concatenated (each TensorInfo's
    ``shard`` indexes ``paths``) and file sizes summed. Raises ``BadModelFile`` for a bad shard,
    a shard count that disagrees with ``split.count``, shards out of order, or a tensor in two
    shards.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("read_split needs at least one path")
    shards = [read_gguf(p, arrays=arrays and i == 0) for i, p in enumerate(paths)]
    _check_split_set(paths, shards)
    tensors: list[TensorInfo] = []
    seen: dict[str, int] = {}
    for i, shard in enumerate(shards):
        for t in shard.tensors:
            if t.name in seen:
                raise BadModelFile(
                    paths[i], f"tensor '{t.name}' is also in shard {seen[t.name] + 1}"
                )
            seen[t.name] = i
            tensors.append(_with_shard(t, i))
    expected = shards[0].get("split.tensors.count")
    if _is_int(expected) and expected != len(tensors):
        raise BadModelFile(
            paths[0],
            f"split.tensors.count says {expected} tensors but the shards hold {len(tensors)}",
        )
    first = shards[0]
    return GGUFInfo(
        path=first.path,
        file_size=sum(s.file_size for s in shards),
        version=first.version,
        alignment=first.alignment,
        data_offset=first.data_offset,
        metadata=first.metadata,
        tensors=tensors,
        paths=tuple(paths),
        value_types=first.value_types,
    )


# llama.cpp's LLM_FFN_EXPS_REGEX (common/common.h), what --cpu-moe keeps in host memory: the
# routed experts' up, down, gate (and fused gate_up) tensors, ``ch`` variants included.
EXPERT_TENSOR_PATTERN = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def is_expert_tensor(name: str) -> bool:
    """Whether ``name`` is a routed-expert tensor (``blk.3.ffn_up_exps.weight``, ...)."""
    import re

    return re.search(EXPERT_TENSOR_PATTERN, name) is not None


def quant_label(info: GGUFInfo) -> str:
    """A short quantization label such as 'Q4_1', 'Q4_K_M' or 'F16' ('unknown' if none)."""
    return info.file_type_name or "unknown"


def summary(info: GGUFInfo) -> dict[str, Any]:
    """The facts about ``info`` as a JSON-ready dict (for ``infer show --json``).

    Long arrays appear as {"type": ..., "count": ...}; non-finite floats as strings.
    """
    split_no, split_count = info.split_info()
    facts = {
        "path": info.path,
        "paths": list(info.paths),
        "file_size": info.file_size,
        "gguf_version": info.version,
        "alignment": info.alignment,
        "data_offset": info.data_offset,
        "architecture": info.architecture,
        "name": info.name,
        "license": info.license,
        "quant": quant_label(info),
        "n_params": info.n_params,
        "weights_bytes": info.weights_bytes,
        "bits_per_weight": info.bits_per_weight,
        "n_tensors": len(info.tensors),
        "context_length": info.context_length,
        "block_count": info.block_count,
        "embedding_length": info.embedding_length,
        "feed_forward_length": info.feed_forward_length,
        "head_count": info.head_count,
        "head_count_kv": info.head_count_kv,
        "head_count_kv_raw": info.head_count_kv_raw,
        "key_length": info.key_length,
        "value_length": info.value_length,
        "sliding_window": info.sliding_window,
        "vocab_size": info.vocab_size,
        "expert_count": info.expert_count,
        "expert_used_count": info.expert_used_count,
        "expert_shared_count": info.expert_shared_count,
        "expert_feed_forward_length": info.expert_feed_forward_length,
        "n_expert_params": info.n_expert_params,
        "n_active_params": info.n_active_params,
        "tokenizer_model": info.tokenizer_model,
        "chat_template": info.chat_template,
        "split_no": split_no,
        "split_count": split_count,
        "tensor_types": _tensor_type_counts(info.tensors),
    }
    facts = {k: _json_safe(v) for k, v in facts.items()}
    facts["metadata"] = {
        k: _json_safe(v, info.value_types.get(k, ""))
        for k, v in info.metadata.items()
    }
    facts["metadata_types"] = dict(info.value_types)
    return facts


# ----------------------------------------------------------------------------------------------
# File access


def _open(path: str) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading; BadModelFile for anything that is not a readable regular file."""
    try:
        st = os.stat(path)
        # Check before open(): opening a FIFO for reading would block until a writer comes.
        if stat.S_ISDIR(st.st_mode):
            raise BadModelFile(path, "it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BadModelFile(path, "not a regular file")
        f = open(path, "rb", buffering=0)  # unbuffered: we read in large chunks ourselves
    except FileNotFoundError:
        raise BadModelFile(path, "no such file") from None
    except IsADirectoryError:
        raise BadModelFile(path, "it is a directory") from None
    except PermissionError:
        raise BadModelFile(path, "permission denied") from None
    except OSError as e:
        raise BadModelFile(path, f"cannot open it: {e.strerror or e}") from None
    size = os.fstat(f.fileno()).st_size  # of what we opened, should the path have changed
    if size == 0:
        f.close()
        raise BadModelFile(path, "the file is empty (0 bytes)", truncated=True, at=0)
    return f, size


class _Reader:
    """A little-endian cursor over a file that refuses to go past its end.

    Bytes are read through a window of at least 1 MiB, so a header is a handful of read()
    calls; skipping (``advance``) costs nothing, which keeps memory bounded for skipped arrays.
    ``where`` names what is being parsed, for the truncation message.
    """

    def __init__(self, f: BinaryIO, size: int, path: str):
        self.f, self.size, self.path = f, size, path
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0
        self.where = "the header"

    def bad(self, reason: str) -> BadModelFile:
        return BadModelFile(self.path, reason)

    def truncated(self, reason: str, at: int | None = None) -> BadModelFile:
        """The bytes end (at ``at``, by default the file's size) before what the header needs."""
        return BadModelFile(self.path, reason, truncated=True, at=self.size if at is None else at)

    def remaining(self) -> int:
        return self.size - self.pos

    def window(self, n: int) -> int:
        """Make bytes [pos, pos+n) available in ``buf``; return the index of ``pos`` in it."""
        if n > self.size - self.pos:
            raise self.truncated(
                f"truncated: the file ends at byte {self.size:,}, inside {self.where}"
            )
        off = self.pos - self.base
        if off < 0 or off + n > len(self.buf):
            self.buf = self._read_at(self.pos, min(max(n, _READ_CHUNK), self.size - self.pos), n)
            self.base, off = self.pos, 0
        return off

    def _read_at(self, pos: int, want: int, need: int) -> bytes:
        self.f.seek(pos)
        parts, got = [], 0
        while got < want:
            part = self.f.read(want - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        if got < need:  # the file shrank since we measured it
            raise self.truncated(
                f"truncated: the file ends at byte {pos + got:,}, inside {self.where}", at=pos + got
            )
        return b"".join(parts)

    def advance(self, n: int) -> None:
        if n > self.size - self.pos:
            raise self.truncated(
                f"truncated: the file ends at byte {self.size:,}, inside {self.where}"
            )
        self.pos += n

    def u32(self) -> int:
        off = self.window(4)
        self.pos += 4
        return _U32(self.buf, off)[0]

    def u64(self) -> int:
        off = self.window(8)
        self.pos += 8
        return _U64(self.buf, off)[0]

    def i64(self) -> int:
        off = self.window(8)
        self.pos += 8
        return _I64(self.buf, off)[0]

    def raw(self, n: int) -> bytes:
        off = self.window(n)
        self.pos += n
        return self.buf[off:off + n]

    def string_bytes(self, what: str) -> bytes:
        n = self.u64()
        self._check_string_length(n, what)
        return self.raw(n)

    def _check_string_length(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.truncated(
                f"truncated: {what} claims a string of {_count(n)} bytes "
                f"but only {human_bytes(self.size - self.pos)} remain"
            )
        if n > MAX_STRING_LENGTH:
            raise self.bad(f"{what} is a string of {_count(n)} bytes; llama.cpp allows 1 GiB")

    def strings(self, count: int, keep: bool, what: str, unique: bool = False) -> list[str] | None:
        """Walk ``count`` length-prefixed strings; return them decoded if ``keep``. ``unique``:
        refuse two equal strings (their bytes are compared, nothing is decoded).

        This is the hot loop for 262k-token vocabularies, hence locals instead of method calls;
        the window is only refilled when a length or a kept string crosses its end.
        """
        if unique:  # (bytes up to a NUL, as llama.cpp reads a token through a C string)
            keep = True
            seen: dict[bytes, int] = {}
        out: list[str] | None = [] if keep else None
        buf, base, pos, size = self.buf, self.base, self.pos, self.size
        blen, u64 = len(buf), _U64
        for _ in range(count):
            off = pos - base
            if off < 0 or off + 8 > blen:
                self.pos = pos
                off = self.window(8)
                buf, base = self.buf, self.base
                blen = len(buf)
            n = u64(buf, off)[0]
            pos += 8
            if n > size - pos or n > MAX_STRING_LENGTH:
                self.pos = pos
                self._check_string_length(n, what)
            if keep:
                off = pos - base
                if off + n > blen:
                    self.pos = pos
                    off = self.window(n)
                    buf, base = self.buf, self.base
                    blen = len(buf)
                if unique:
                    # as llama.cpp sees it: through a C string, cut at the first NUL
                    raw = buf[off:off + n]
                    z = raw.find(b"\0")
                    if z >= 0:
                        raw = raw[:z]
                    first = seen.get(raw)
                    if first is not None:
                        self.pos = pos
                        raise self.bad(f"{what} #{len(out)} repeats #{first} "
                                       f"({raw[:40].decode('utf-8', 'replace')!r}); llama.cpp "
                                       "aborts on a vocabulary with a token twice")
                    seen[raw] = len(out)
                    out.append("")
                else:
                    out.append(buf[off:off + n].decode("utf-8", "replace"))
            pos += n
        self.pos = pos
        return None if unique else out

    def scalars(self, vtype: int, count: int, keep: bool) -> list[Any] | None:
        _, code, width = _SCALARS[vtype]
        if not keep:
            self.advance(count * width)
            return None
        off = self.window(count * width)
        self.pos += count * width
        return list(struct.unpack_from(f"<{count}{code}", self.buf, off))

    def scalar(self, vtype: int) -> Any:
        _, code, width = _SCALARS[vtype]
        off = self.window(width)
        self.pos += width
        return struct.unpack_from("<" + code, self.buf, off)[0]


# ----------------------------------------------------------------------------------------------
# Parsing


class _Parser:
    def __init__(self, r: _Reader, arrays: bool, unique_tokens: bool = False):
        self.r, self.arrays, self.unique_tokens = r, arrays, unique_tokens

    def parse(self) -> GGUFInfo:
        r = self.r
        version = self._magic_and_version()
        r.where = "the header"
        n_tensors, n_kv = r.u64(), r.u64()
        self._check_count(n_kv, _MIN_KV, "key/value pairs")
        self._check_count(n_tensors, _MIN_TENSOR_INFO, "tensors")
        metadata, value_types = self._metadata(n_kv)
        self._check_model_keys(metadata)
        alignment = self._alignment(metadata)
        r.where = "the tensor table"
        self._check_count(n_tensors, _MIN_TENSOR_INFO, "tensors")  # again, now that we know more
        raw = self._tensor_table(n_tensors)
        # llama.cpp pads to the alignment only when there is tensor data to align.
        data_offset = align(r.pos, alignment) if n_tensors else r.pos
        if data_offset > r.size:
            raise r.truncated(
                f"truncated: tensor data would start at byte {data_offset:,} "
                f"but the file ends at {r.size:,}"
            )
        tensors = self._place_tensors(raw, data_offset, alignment)
        return GGUFInfo(
            path=r.path, file_size=r.size, version=version, alignment=alignment,
            data_offset=data_offset, metadata=metadata, tensors=tensors, paths=(r.path,),
            value_types=value_types,
        )

    def _magic_and_version(self) -> int:
        r = self.r
        head = r.raw(min(8, r.size))
        if head[:4] != GGUF_MAGIC[: len(head[:4])]:
            raise r.bad(f"not a GGUF file (magic is {head[:4]!r})")
        if len(head) < 8:
            raise r.truncated(
                f"truncated: the file has only {_plural(r.size, 'byte')}, less than a GGUF header"
            )
        version = _U32(head, 4)[0]
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack_from(">I", head, 4)[0] in (1, 2, 3):
                raise r.bad("big-endian GGUF is not supported")
            raise r.bad(f"GGUF version {version} is not supported (2 and 3 are)")
        return version

    def _check_count(self, n: int, min_size: int, what: str) -> None:
        # Python ints do not overflow, so n * min_size is exact even for n = 2^64 - 1.
        if n * min_size > self.r.remaining():
            raise self.r.truncated(
                f"truncated: the header says {_count(n)} {what} "
                f"but the file has {human_bytes(self.r.size)}"
            )

    # -- key/value pairs ------------------------------------------------------------------------

    def _metadata(self, n_kv: int) -> tuple[dict[str, Any], dict[str, str]]:
        """(values, GGUF type label of each value), in file order."""
        r, metadata, types = self.r, {}, {}
        for i in range(n_kv):
            r.where = f"key/value pair #{i}"
            key = self._name(r.string_bytes(f"key #{i}"), f"key #{i}")
            if not key:
                raise r.bad(f"key #{i} is empty")
            if key in metadata:
                raise r.bad(f"duplicate key '{key}'")
            r.where = f"the value of '{key}'"
            vtype = r.u32()
            if key == "general.alignment" and vtype != _UINT32:
                # llama.cpp reads it with gguf_get_val_u32 and refuses any other type.
                raise r.bad(
                    f"general.alignment is a {_TYPE_NAMES.get(vtype, vtype)}; it must be a UINT32"
                )
            if vtype == _ARRAY:
                metadata[key], etype = self._array(key, depth=0)
                types[key] = f"ARRAY[{_TYPE_NAMES[etype]}]"
            else:
                metadata[key], types[key] = self._single(vtype, key), _TYPE_NAMES.get(vtype, "")
        return metadata, types

    def _single(self, vtype: int, key: str) -> Any:
        r = self.r
        if vtype in _SCALARS:
            return r.scalar(vtype)
        if vtype == _STRING:
            return r.string_bytes(f"the value of '{key}'").decode("utf-8", "replace")
        raise r.bad(f"'{key}' has unknown value type {vtype}")

    def _array(self, key: str, depth: int) -> tuple[Any, int]:
        """(a list or an ArrayInfo, element type) for the array at the cursor."""
        r = self.r
        if depth >= MAX_ARRAY_NESTING:
            raise r.bad(f"'{key}' nests arrays more than {MAX_ARRAY_NESTING} deep")
        etype, count = r.u32(), r.u64()
        if etype not in _MIN_ELEMENT_SIZE:
            raise r.bad(f"'{key}' is an array of unknown value type {etype}")
        type_name = _TYPE_NAMES[etype]
        if count * _MIN_ELEMENT_SIZE[etype] > r.remaining():
            raise r.truncated(
                f"truncated: '{key}' claims an array of {_count(count)} {type_name} elements "
                f"but only {human_bytes(r.remaining())} remain"
            )
        if count > MAX_ARRAY_ELEMENTS:
            raise r.bad(f"'{key}' has {_count(count)} elements; llama.cpp allows 2^30")
        keep = self._keep_array(key, etype, count)
        if etype == _STRING and key == "tokenizer.ggml.tokens" and self.unique_tokens:
            r.strings(count, False, "token", unique=True)  # checked, not kept
            return ArrayInfo(type_name, count), etype
        if etype == _STRING:
            values = r.strings(count, keep, f"an element of '{key}'")
        elif etype == _ARRAY:
            # Walked element by element; each inner array is bounds-checked the same way.
            values = [self._array(key, depth + 1)[0] for _ in range(count)]
        else:
            values = r.scalars(etype, count, keep)
        return (values if keep else ArrayInfo(type_name, count)), etype

    def _keep_array(self, key: str, etype: int, count: int) -> bool:
        if self.arrays or count <= SMALL_ARRAY:
            return True
        return etype in _SCALARS and count <= PER_LAYER_ARRAY and not key.startswith("tokenizer.")

    def _check_model_keys(self, metadata: dict[str, Any]) -> None:
        """Hyperparameters llama.cpp asserts on (an abort of the whole process, not an error it
        reports) are refused here."""
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str):
            return
        layers = metadata.get(f"{arch}.block_count")
        if layers is not None and (not _is_int(layers) or not 0 < layers <= LLAMA_MAX_LAYERS):
            raise self.r.bad(f"{arch}.block_count is {layers!r}; llama.cpp needs 1 to "
                             f"{LLAMA_MAX_LAYERS}")

    def _alignment(self, metadata: dict[str, Any]) -> int:
        if "general.alignment" not in metadata:
            return DEFAULT_ALIGNMENT
        value = metadata["general.alignment"]  # a u32, checked in _metadata
        if value <= 0 or value & (value - 1):
            raise self.r.bad(f"general.alignment is {value}; it must be a power of 2")
        return value

    # -- tensor table ---------------------------------------------------------------------------

    def _tensor_table(self, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        """(name, shape, ggml type, offset relative to the data section) for each tensor."""
        r, rows, names = self.r, [], set()
        for i in range(n_tensors):
            r.where = f"the tensor table (tensor #{i})"
            raw_name = r.string_bytes(f"tensor #{i}'s name")
            if len(raw_name) >= GGML_MAX_NAME:
                raise r.bad(
                    f"tensor #{i}'s name is {len(raw_name)} bytes; "
                    f"llama.cpp allows {GGML_MAX_NAME - 1}"
                )
            name = self._name(raw_name, f"tensor #{i}'s name")
            if name in names:
                raise r.bad(f"duplicate tensor name '{name}'")
            names.add(name)
            shape = self._shape(name)
            ggml_type = r.u32()
            try:
                ggml.block(ggml_type)
            except (KeyError, ValueError):  # an id ggml does not have, or one without a known size
                raise r.bad(f"tensor '{name}' has unknown ggml type {ggml_type}") from None
            rows.append((name, shape, ggml_type, r.u64()))
        return rows

    def _shape(self, name: str) -> tuple[int, ...]:
        r = self.r
        n_dims = r.u32()
        if n_dims > GGML_MAX_DIMS:
            raise r.bad(
                f"tensor '{name}' has {n_dims} dimensions; at most {GGML_MAX_DIMS} are allowed"
            )
        shape = tuple(r.i64() for _ in range(n_dims))
        if any(d < 0 for d in shape):
            raise r.bad(f"tensor '{name}' has a negative dimension")
        n_elements = math.prod(shape)
        if n_elements >= 1 << 63:
            raise r.bad(
                f"tensor '{name}' has {_count(n_elements)} elements; "
                "llama.cpp allows fewer than 2^63"
            )
        return shape

    def _place_tensors(self, rows, data_offset: int, alignment: int) -> list[TensorInfo]:
        r, tensors, expected = self.r, [], 0
        for name, shape, ggml_type, rel in rows:
            block, type_size = ggml.block(ggml_type)
            type_name = ggml.TYPE_NAMES[ggml_type]
            row = shape[0] if shape else 1
            if row % block:
                raise r.bad(
                    f"tensor '{name}' rows have {row} elements, "
                    f"not a multiple of the {type_name} block size {block}"
                )
            n_elements = math.prod(shape)
            n_bytes = n_elements // block * type_size
            if rel % alignment:
                raise r.bad(
                    f"tensor '{name}' is at data offset {rel}, "
                    f"not a multiple of the alignment {alignment}"
                )
            end = data_offset + rel + n_bytes
            if end > r.size:
                raise r.truncated(
                    f"tensor '{name}' would lie past the end of the file: the file is truncated "
                    f"(the tensor ends at byte {end:,}, the file has {r.size:,})"
                )
            # llama.cpp requires tensors packed in table order, each padded to the alignment.
            if rel != expected:
                raise r.bad(
                    f"tensor '{name}' is at data offset {rel:,} but the tensors before it end "
                    f"at {expected:,} (llama.cpp needs them packed in order)"
                )
            expected += align(n_bytes, alignment)
            offset = data_offset + rel
            tensors.append(
                TensorInfo(name, shape, ggml_type, type_name, offset, n_elements, n_bytes)
            )
        return tensors

    def _name(self, raw: bytes, what: str) -> str:
        # Keys and tensor names are identifiers: refuse rather than guess at bad UTF-8.
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.r.bad(f"{what} is not valid UTF-8") from None


# ----------------------------------------------------------------------------------------------
# Helpers


def _check_split_set(paths: list[str], shards: list[GGUFInfo]) -> None:
    declared = shards[0].get("split.count")
    if _is_int(declared) and declared != len(shards):
        raise BadModelFile(
            paths[0], f"split.count says {declared} shards but {len(shards)} were given"
        )
    for i, shard in enumerate(shards):
        no = shard.get("split.no")
        if _is_int(no) and no != i:
            raise BadModelFile(
                paths[i], f"expected shard {i + 1} of {len(shards)} but split.no is {no} (0-based)"
            )


def _with_shard(t: TensorInfo, shard: int) -> TensorInfo:
    return TensorInfo(
        t.name, t.shape, t.ggml_type, t.type_name, t.offset, t.n_elements, t.n_bytes, shard
    )


def _file_type_from_key(value: Any) -> str | None:
    if not _is_int(value):
        return None
    try:
        ftype = LlamaFileType(value)
    except ValueError:
        return None
    if ftype is LlamaFileType.GUESSED:
        return None
    if ftype is LlamaFileType.ALL_F32:
        return "F32"
    return ftype.name.removeprefix("MOSTLY_")


def _dominant_weight_type(tensors: list[TensorInfo]) -> str | None:
    """The type holding the most bytes among 2-D weight matrices (what a quant label means)."""
    by_type: Counter[str] = Counter()
    for t in tensors:
        if len(t.shape) == 2 and t.name.endswith(".weight"):
            by_type[t.type_name] += t.n_bytes
    if not by_type:
        return None
    return by_type.most_common(1)[0][0]


def _tensor_type_counts(tensors: list[TensorInfo]) -> dict[str, int]:
    return dict(Counter(t.type_name for t in tensors).most_common())


def _json_safe(value: Any, type_label: str = "") -> Any:
    """``value`` with ArrayInfo and long lists as {"type", "count"} and NaN/inf as strings.

    Lists are cut where read_gguf(arrays=False) cuts them (``type_label`` says the GGUF type),
    so a summary looks the same whichever way the file was read.
    """
    if isinstance(value, ArrayInfo):
        return {"type": value.type_name, "count": value.count}
    if isinstance(value, list):
        etype = _element_type(type_label)
        limit = SMALL_ARRAY if etype in ("STRING", "ARRAY") else PER_LAYER_ARRAY
        if len(value) > limit:
            return {"type": etype, "count": len(value)}
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _element_type(type_label: str) -> str:
    """'ARRAY[STRING]' -> 'STRING'."""
    return type_label[6:-1] if type_label.startswith("ARRAY[") else ""


def _scalar_max(value: Any) -> int | None:
    """An int, or the largest int of a per-layer list; None when unknown."""
    if _is_int(value):
        return value
    if isinstance(value, list):
        ints = [v for v in value if _is_int(v)]
        return max(ints) if ints else None
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_or_none(value: Any) -> int | None:
    return value if _is_int(value) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def align(n: int, alignment: int) -> int:
    """``n`` rounded up to a multiple of ``alignment``: where GGUF puts the next tensor's data."""
    return (n + alignment - 1) // alignment * alignment


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _count(n: int) -> str:
    """A count for a message: 2^60 for the powers of two that crafted files like, else 1,234."""
    if n >= 1 << 20 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    return f"{n:,}"
