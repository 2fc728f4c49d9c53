"""Importance matrices made through llama.cpp, as llama-imatrix makes them.

llama.cpp calls ``cb_eval`` (a field of llama_context_params) for every node of the graph it
is about to compute: once with ``ask`` true (do we want this node's result?) and, where we said
yes, again with ``ask`` false once the node is computed. We want the matrix products whose
first operand is a model weight: for each, the squared activations of the second operand
(``src[1]``) summed per column, and how many rows went in. A mixture-of-experts product
(MUL_MAT_ID) adds each token's row to the expert the router chose for it (``src[2]``).

The text is cut into chunks of ``ctx`` tokens, each decoded from BOS; as llama-imatrix does,
several chunks go into one batch of up to 2048 tokens, each as its own sequence, and the
logits of each chunk's second half give a running perplexity. The file written is llama.cpp's
GGUF imatrix format, byte for byte what llama-imatrix's ``save_imatrix`` writes.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from infer_cli.errors import BadOption, BrokenInstall, ModelLoadFailed

DEFAULT_CTX = 512
BATCH = 2048          # llama-imatrix's logical batch: ctx-token chunks decoded side by side
UBATCH = 512
MIN_ROWS = 16         # llama-imatrix ignores matrix products of fewer tokens
BUILTIN_NAME = "infer:calibration.txt"

# (chunks done, chunks in all, running perplexity)
ChunkProgress = Callable[[int, int, float], None]

# --- ggml's tensor, as ggml.h lays it out ------------------------------------------------------

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_OP_PARAMS = 64
GGML_OBJECT_SIZE = 32   # struct ggml_object, which ggml_tensor_overhead() adds
OP_MUL_MAT = 29         # enum ggml_op (checked against ggml_op_name at start)
OP_MUL_MAT_ID = 30
TYPE_F32 = 0            # enum ggml_type
TYPE_I32 = 26


class GgmlTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def weight_name(name: bytes) -> bytes:
    """A backend's decorated tensor name to the model's (``CUDA0#blk.0.attn_k.weight#0`` ->
    ``blk.0.attn_k.weight``), as llama-imatrix filters it."""
    p = name.find(b"#")
    if p < 0:
        return name
    rest = name[p + 1:]
    q = rest.find(b"#")
    return rest if q < 0 else rest[:q]


class _Ggml:
    """The few libggml calls the collector needs, checked against this struct layout once."""

    def __init__(self, L):
        from infer_cli.engine.binding import FIX, native_library

        lib = native_library(L, "libggml")
        if lib is None:
            raise BrokenInstall("llama-cpp-python ships no libggml to read tensors from", FIX)
        try:
            lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
            lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
            lib.ggml_backend_tensor_get.restype = None
            lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                                    ctypes.c_size_t, ctypes.c_size_t]
            lib.ggml_nbytes.restype = ctypes.c_size_t
            lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
            lib.ggml_op_name.restype = ctypes.c_char_p
            lib.ggml_op_name.argtypes = [ctypes.c_int]
            lib.ggml_tensor_overhead.restype = ctypes.c_size_t
            lib.ggml_tensor_overhead.argtypes = []
        except AttributeError as e:
            raise BrokenInstall(f"libggml lacks a function infer needs ({e})", FIX) from None
        if (lib.ggml_op_name(OP_MUL_MAT) != b"MUL_MAT" or lib.ggml_op_name(OP_MUL_MAT_ID) != b"MUL_MAT_ID"
                or lib.ggml_tensor_overhead() != ctypes.sizeof(GgmlTensor) + GGML_OBJECT_SIZE):
            raise BrokenInstall("this libggml's tensor layout is not the one infer reads", FIX)
        self.lib = lib


# --- the statistics ---------------------------------------------------------------------------

@dataclass
class Stat:
    """One weight's sums of squared activations (``n_mat`` x ``ne0``, flattened) and the rows
    that went into each matrix (one count for a dense weight, one per expert)."""

    values: "object"   # numpy float64 array
    counts: "object"   # numpy int64 array


def moe_sums(x, ids, n_as: int):
    """Per-expert sums of squares for one MUL_MAT_ID product: ``x`` (n_tokens, ne11, ne0) the
    activations, ``ids`` (n_tokens, n_ids) the chosen experts; the activation of slot ``idx`` is
    row ``idx % ne11`` (ne11 is 1 when every chosen expert gets the same input). Returns
    (sums (n_as, ne0) float32, counts (n_as,) int64)."""
    import numpy as np

    n_tokens, ne11, ne0 = x.shape
    n_ids = ids.shape[1]
    ex = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)  # (token, slot) order
    if ex.size and (ex.min() < 0 or ex.max() >= n_as):
        raise ValueError(f"an expert id outside 0..{n_as - 1}")
    counts = np.bincount(ex, minlength=n_as).astype(np.int64)
    sums = np.zeros((n_as, ne0), dtype=np.float32)
    if not ex.size:
        return sums, counts
    order = np.argsort(ex, kind="stable")
    tok = order // n_ids
    sub = (order % n_ids) % ne11
    rows = x[tok, sub]  # (n_rows, ne0), grouped by expert
    nz = np.flatnonzero(counts)
    starts = (np.cumsum(counts) - counts)[nz]
    sums[nz] = np.add.reduceat(rows * rows, starts, axis=0)
    return sums, counts


class Collector:
    """The ``cb_eval`` callback and what it gathers. Errors inside the callback (which must
    never raise into llama.cpp) are kept in ``error`` and raised after the decode returns."""

    def __init__(self, L, path: Path):
        import numpy as np

        self.np = np
        self.ggml = _Ggml(L).lib
        self.path = path
        self.stats: dict[str, Stat] = {}
        self.error: BaseException | None = None
        self._last = None  # (key, squared sums) of the last dense src1: q, k and v share theirs
        from infer_cli.engine.sigint import shield

        shield(Collector._callback)  # a Ctrl-C in here waits for llama_decode to return
        self.callback = L.ggml_backend_sched_eval_callback(self._callback)

    # the callback --------------------------------------------------------------------------

    def _callback(self, t, ask, _user_data) -> bool:
        if self.error is not None:
            return not ask  # wanted nothing more; never stop a computation half-way
        try:
            node = GgmlTensor.from_address(t)
            if ask:
                return self._wanted(node)
            self._collect(node)
        except BaseException as e:  # noqa: BLE001 - raised again after llama_decode returns
            self.error = e
        return True

    def _wanted(self, node: GgmlTensor) -> bool:
        op = node.op
        if op != OP_MUL_MAT and op != OP_MUL_MAT_ID:
            return False
        src0, src1 = node.src[0], node.src[1]
        if not src0 or not src1:
            return False
        s1 = GgmlTensor.from_address(src1)
        if s1.type != TYPE_F32:
            return False
        if op == OP_MUL_MAT and s1.ne[1] < MIN_ROWS:
            return False
        return weight_name(GgmlTensor.from_address(src0).name).startswith(b"blk.")

    def _view(self, t: GgmlTensor, dtype, shape_dims: int = GGML_MAX_DIMS):
        """A numpy view of a tensor's data (host memory), or of a copy of it (device memory);
        axes reversed to numpy's order (ne[3], ne[2], ne[1], ne[0])."""
        np = self.np
        ne = [t.ne[i] for i in range(GGML_MAX_DIMS)]
        nb = [t.nb[i] for i in range(GGML_MAX_DIMS)]
        extent = sum((n - 1) * s for n, s in zip(ne, nb)) + np.dtype(dtype).itemsize
        if not t.buffer or self.ggml.ggml_backend_buffer_is_host(t.buffer):
            buf = (ctypes.c_char * extent).from_address(t.data)
        else:  # device memory: copied out, the same strides over the copy
            n = self.ggml.ggml_nbytes(ctypes.addressof(t))
            if extent > n:
                raise ValueError(f"a tensor of {n} bytes spans {extent}")
            buf = np.empty(n, dtype=np.uint8)
            self.ggml.ggml_backend_tensor_get(ctypes.addressof(t), buf.ctypes.data, 0, n)
        return np.ndarray(shape=ne[::-1], dtype=dtype, buffer=buf, strides=nb[::-1])

    def _collect(self, node: GgmlTensor) -> None:
        np = self.np
        s0 = GgmlTensor.from_address(node.src[0])
        s1 = GgmlTensor.from_address(node.src[1])
        name = weight_name(s0.name).decode("utf-8", "replace")
        ne0 = s1.ne[0]
        if node.op == OP_MUL_MAT_ID:
            ids_t = GgmlTensor.from_address(node.src[2])
            n_as = s0.ne[2]
            if ids_t.type != TYPE_I32 or ids_t.ne[1] != s1.ne[2] or s1.ne[3] != 1:
                raise ValueError(f"an expert product of {name} this build does not lay out as "
                                 "llama-imatrix expects")
            x = self._view(s1, np.float32)[0]                   # (n_tokens, ne11, ne0)
            ids = np.array(self._view(ids_t, np.int32)[0, 0])  # (n_tokens, n_ids), copied
            sums, counts = moe_sums(x, ids, n_as)
            e = self._entry(name, n_as * ne0, n_as)
            if len(e.counts) == 1 and n_as > 1:
                e.counts = np.full(n_as, e.counts[0], dtype=np.int64)
            e.values += sums.reshape(-1)
            e.counts += counts
            touched = counts > 0
            if not np.isfinite(sums[touched]).all():
                raise ValueError(f"non-finite activations reach {name}")
            return
        n_mat = s0.ne[2] * s0.ne[3]
        e = self._entry(name, ne0 * n_mat, 1)
        x = self._view(s1, np.float32)                           # (ne3, ne2, ne1, ne0)
        if n_mat == 1:
            key = (node.src[1], s1.data, tuple(s1.ne), tuple(s1.nb), s1.name)
            if self._last is not None and self._last[0] == key:
                part = self._last[1]
            else:
                flat = x.reshape(-1, ne0)
                part = np.einsum("ij,ij->j", flat, flat)
                self._last = (key, part)
            e.values += part
        else:
            vals = e.values.reshape(n_mat, ne0)
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    mat = (i3 % s0.ne[3]) * s0.ne[2] + (i2 % s0.ne[2])
                    rows = x[i3, i2]
                    vals[mat] += np.einsum("ij,ij->j", rows, rows)
        if not np.isfinite(e.values).all():
            raise ValueError(f"non-finite activations reach {name}")
        e.counts += (s1.ne[1] * s1.ne[2] * s1.ne[3]) // n_mat

    def _entry(self, name: str, n_values: int, n_counts: int) -> Stat:
        np = self.np
        e = self.stats.get(name)
        if e is None:
            e = self.stats[name] = Stat(np.zeros(n_values, dtype=np.float64),
                                        np.zeros(n_counts, dtype=np.int64))
        elif e.values.size != n_values:
            raise ValueError(f"{name} takes {n_values} values here but {e.values.size} before")
        return e

    def check(self) -> None:
        """Raise what went wrong inside the callback, if anything."""
        err, self.error = self.error, None
        if err is None:
            return
        if isinstance(err, (KeyboardInterrupt, MemoryError)):
            raise err
        raise ModelLoadFailed(str(self.path), f"collecting the importance matrix failed: {err}")


# --- the calibration text ---------------------------------------------------------------------

def builtin_text() -> str:
    """The calibration text that ships with infer (prose and code, written for it)."""
    from importlib.resources import files

    return files("quantize").joinpath("data", "calibration.txt").read_text(encoding="utf-8")


def calibration_text(path: Path | None) -> tuple[str, str]:
    """(the text, the dataset name the file records): the shipped text when ``path`` is None."""
    if path is None:
        return builtin_text(), BUILTIN_NAME
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise BadOption("--calibration", str(path), f"a readable UTF-8 text file ({reason})") from None
    if not text.strip():
        raise BadOption("--calibration", str(path), "a file with some text in it")
    return text, str(path)


def chunk_plan(n_tokens: int, ctx: int, chunks: int | None, source: str) -> int:
    """How many chunks of ``ctx`` tokens the text gives (capped by ``chunks``)."""
    have = n_tokens // ctx
    if have < 1:
        raise BadOption("--calibration", source,
                        f"a text of at least one chunk: it has {n_tokens} tokens and a chunk needs "
                        f"{ctx} (--ctx)")
    return have if chunks is None else min(chunks, have)


# --- computing ----------------------------------------------------------------------------------

@dataclass
class Matrix:
    """What one computation gathered."""

    stats: dict          # name -> Stat
    chunks: int          # chunks decoded
    chunk_size: int
    tokens: int          # tokens of the whole text
    ppl: float           # over the second halves of the chunks
    seconds: float
    dataset: str


def compute(model_path: Path, text: str, *, dataset: str = BUILTIN_NAME, ctx: int = DEFAULT_CTX,
            chunks: int | None = None, threads: int | None = None,
            progress: ChunkProgress | None = None) -> Matrix:
    """Decode the text's chunks through llama.cpp and gather the matrix."""
    import numpy as np

    from infer_cli.engine import llama_log
    from infer_cli.engine.model import Model, default_threads
    from infer_cli.options import Options

    if ctx < MIN_ROWS:
        raise BadOption("--ctx", str(ctx), f"at least {MIN_ROWS} tokens")
    if chunks is not None and chunks < 1:
        raise BadOption("--chunks", str(chunks), "one or more")
    model = Model(model_path, Options(warmup=False, threads=threads))
    ctx_ptr = None
    batch = pool = None
    try:
        L = model.L
        vocab = model.vocab
        if L.llama_vocab_get_add_eos(vocab):
            raise BadOption("MODEL", str(model_path), "a model whose tokenizer adds no EOS token "
                            "(llama-imatrix refuses such models too)")
        tokens = np.asarray(model.tokenize(text, add_special=True, parse_special=False), dtype=np.int32)
        n_chunk = chunk_plan(len(tokens), ctx, chunks, dataset)
        add_bos = bool(L.llama_vocab_get_add_bos(vocab))
        bos = L.llama_vocab_bos(vocab)
        n_seq = max(1, BATCH // ctx)
        n_kv = n_seq * ctx
        n_batch = min(BATCH, n_kv)
        collector = Collector(L, Path(model_path))
        params = L.llama_context_default_params()
        params.n_ctx = n_kv
        params.n_batch = n_batch
        params.n_ubatch = min(UBATCH, n_batch)
        params.n_seq_max = n_seq
        params.n_threads = params.n_threads_batch = threads or default_threads()
        pool = _Pool(params.n_threads) if params.n_threads > 1 else None
        params.no_perf = True
        params.cb_eval = collector.callback
        params.cb_eval_user_data = None
        mark = llama_log.mark()
        ctx_ptr = L.llama_init_from_model(model.ptr, params)
        if not ctx_ptr:
            raise ModelLoadFailed(str(model_path), llama_log.last_error(mark) or "could not create a context")
        n_vocab = model.n_vocab
        batch = L.llama_batch_init(n_batch, 0, n_seq)
        mem = L.llama_get_memory(ctx_ptr)
        num_batches = (ctx + n_batch - 1) // n_batch
        first = ctx // 2
        nll, count = 0.0, 0
        t0 = time.perf_counter()
        tok_view = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        pos_view = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        nseq_view = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))
        logit_flags = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        for i in range(0, n_chunk, n_seq):
            start = i * ctx
            n_seq_batch = min(n_seq, n_chunk - i)
            L.llama_memory_clear(mem, True)
            kept = []  # logits of a chunk decoded in several batches
            for j in range(num_batches):
                batch_start = start + j * n_batch
                size = min(start + ctx - batch_start, n_batch)
                n = 0
                for seq in range(n_seq_batch):
                    s = batch_start + seq * ctx
                    part = tokens[s:s + size].copy()
                    if add_bos and j == 0:
                        part[0] = bos
                    tok_view[n:n + size] = part
                    pos_view[n:n + size] = np.arange(j * n_batch, j * n_batch + size, dtype=np.int32)
                    for k in range(n, n + size):
                        batch.seq_id[k][0] = seq
                    n += size
                nseq_view[:n] = 1
                logit_flags[:n] = 1
                batch.n_tokens = n
                rc = L.llama_decode(ctx_ptr, batch)
                collector.check()
                if rc != 0:
                    raise ModelLoadFailed(str(model_path), f"llama_decode returned {rc}")
                if num_batches > 1:
                    kept.append(np.ctypeslib.as_array(L.llama_get_logits(ctx_ptr),
                                                      shape=(size, n_vocab)).copy())
            for seq in range(n_seq_batch):
                if num_batches > 1:
                    logits = np.concatenate(kept)
                else:
                    ptr = L.llama_get_logits_ith(ctx_ptr, seq * ctx)
                    logits = np.ctypeslib.as_array(ptr, shape=(ctx, n_vocab))
                rows = logits[first:ctx - 1]
                target = tokens[start + seq * ctx + first + 1:start + seq * ctx + ctx]
                nll += _nll(rows, target, pool)
                count += ctx - first - 1
            if progress is not None:
                progress(i + n_seq_batch, n_chunk, math.exp(nll / count) if count else float("nan"))
        seconds = time.perf_counter() - t0
        return Matrix(collector.stats, n_chunk, ctx, len(tokens),
                      math.exp(nll / count) if count else float("nan"), seconds, dataset)
    finally:
        if pool is not None:
            pool.shutdown()
        if batch is not None:
            model.L.llama_batch_free(batch)
        if ctx_ptr:
            model.L.llama_free(ctx_ptr)
        model.close()


class _Pool:
    """A thread pool that knows its size."""

    def __init__(self, n: int):
        from concurrent.futures import ThreadPoolExecutor

        self.n, self._ex = n, ThreadPoolExecutor(n, thread_name_prefix="infer-imatrix")

    def map(self, fn, items):
        return self._ex.map(fn, items)

    def shutdown(self) -> None:
        self._ex.shutdown()


def _nll(logits, target, pool=None) -> float:
    """Summed negative log-likelihood of ``target`` under each row of ``logits``; with ``pool`` (a
    thread pool) the rows are shared out: numpy releases the GIL in these loops, and between two
    decodes llama.cpp's threads are idle, as llama-imatrix's own scoring threads use them."""
    import numpy as np

    if not len(target):
        return 0.0
    if pool is not None and len(target) >= 64:
        bounds = np.linspace(0, len(target), pool.n + 1).astype(int)
        return sum(pool.map(lambda ab: _nll(logits[ab[0]:ab[1]], target[ab[0]:ab[1]]),
                            [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]))
    mx = logits.max(axis=1)
    x = logits - mx[:, None]
    np.exp(x, out=x)
    lse = np.log(x.sum(axis=1, dtype=np.float64)) + mx
    picked = logits[np.arange(len(target)), target]
    return float((lse - picked).sum())


# --- the file -------------------------------------------------------------------------------------

_GGUF_UINT32, _GGUF_STRING, _GGUF_ARRAY = 4, 8, 9
_ALIGN = 32


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _n_dims(ne: tuple[int, ...]) -> int:
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def imatrix_bytes(stats: dict, datasets: list[str], chunk_count: int, chunk_size: int) -> bytes:
    """The GGUF file llama-imatrix writes: its four keys, then for each weight (sorted by name)
    ``NAME.in_sum2`` (ne = [values per matrix, matrices]) and ``NAME.counts`` ([1, matrices]),
    F32, every data block aligned to 32 bytes."""
    import numpy as np

    kv = [_str("general.type") + struct.pack("<I", _GGUF_STRING) + _str("imatrix"),
          _str("imatrix.datasets") + struct.pack("<IIQ", _GGUF_ARRAY, _GGUF_STRING, len(datasets))
          + b"".join(_str(d) for d in datasets),
          _str("imatrix.chunk_count") + struct.pack("<II", _GGUF_UINT32, chunk_count),
          _str("imatrix.chunk_size") + struct.pack("<II", _GGUF_UINT32, chunk_size)]
    infos, blobs, offset = [], [], 0
    for name in sorted(stats):
        st = stats[name]
        nmat = len(st.counts)
        nval = st.values.size
        if not nval or not nmat:
            continue
        for suffix, data, ne in ((".in_sum2", st.values, (nval // nmat, nmat)),
                                 (".counts", st.counts, (1, nmat))):
            raw = np.ascontiguousarray(data, dtype="<f4").tobytes()
            nd = _n_dims(ne)
            tname = (name + suffix).encode("utf-8")[:GGML_MAX_NAME - 1].decode("utf-8", "ignore")
            infos.append(_str(tname) + struct.pack("<I", nd) + struct.pack(f"<{nd}q", *ne[:nd])
                         + struct.pack("<iQ", TYPE_F32, offset))
            pad = -len(raw) % _ALIGN
            blobs.append(raw + b"\0" * pad)
            offset += len(raw) + pad
    head = b"GGUF" + struct.pack("<Iqq", 3, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    head += b"\0" * (-len(head) % _ALIGN)
    return head + b"".join(blobs)


def write_imatrix(path: Path, m: Matrix) -> None:
    """Write ``m`` to ``path`` atomically (a lock keeps a second writer out)."""
    from infer_cli.files import atomic_output, exclusive

    data = imatrix_bytes(m.stats, [m.dataset], m.chunks, m.chunk_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path), atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


# --- the cache ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImatrixSpec:
    """How ``--imatrix auto`` makes its matrix."""

    calibration: Path | None = None   # None: the shipped text
    chunks: int | None = None         # None: as many as the text gives
    ctx: int = DEFAULT_CTX
    threads: int | None = None


@dataclass
class Cached:
    path: Path
    reused: bool
    matrix: Matrix | None   # what was computed now (None when reused)


def cache_dir() -> Path:
    from infer_cli.paths import infer_home

    return infer_home() / "imatrix"


def cache_key(model_path: Path, text: str, ctx: int, chunks: int | None) -> str:
    """The model's fingerprint (size, header and samples of its weights), the text's sha256,
    the chunk size and the chunk cap."""
    from infer_cli.engine.prompt_cache import model_identity
    from infer_cli.models.gguf_info import read_gguf

    info = read_gguf(model_path)
    ident = model_identity(Path(model_path), info.data_offset)
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    raw = json.dumps({"model": ident, "text": text_sha, "ctx": ctx, "chunks": chunks}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def cached(model_path: Path, spec: ImatrixSpec, *, progress: ChunkProgress | None = None) -> Cached:
    """The matrix for ``model_path`` from the cache, or computed now and cached."""
    from .imatrix import load_imatrix

    text, dataset = calibration_text(spec.calibration)
    path = cache_dir() / f"{cache_key(model_path, text, spec.ctx, spec.chunks)}.imatrix.gguf"
    if path.is_file():
        try:
            load_imatrix(path)
            return Cached(path, True, None)
        except BadOption:  # damaged: made again below
            pass
    m = compute(model_path, text, dataset=dataset, ctx=spec.ctx, chunks=spec.chunks,
                threads=spec.threads, progress=progress)
    write_imatrix(path, m)
    return Cached(path, False, m)


def store_in_cache(model_path: Path, text: str, spec: ImatrixSpec, m: Matrix) -> Path:
    """Keep a matrix `infer imatrix` made where ``--imatrix auto`` looks for it."""
    path = cache_dir() / f"{cache_key(model_path, text, spec.ctx, spec.chunks)}.imatrix.gguf"
    write_imatrix(path, m)
    return path
