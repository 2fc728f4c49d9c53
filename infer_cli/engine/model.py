"""A loaded GGUF through llama.cpp's C API: weights, vocabulary, tokenizer."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Sequence

from infer_cli.engine import llama_log
from infer_cli.errors import ModelLoadFailed
from infer_cli.options import Options


def load_mode(mmap: bool, mlock: bool) -> int:
    """llama.cpp's llama_load_mode for --no-mmap / --mlock (one enum, no use_mmap flag now)."""
    import llama_cpp as L

    if mmap:
        return L.LLAMA_LOAD_MODE_MMAP_MLOCK if mlock else L.LLAMA_LOAD_MODE_MMAP
    return L.LLAMA_LOAD_MODE_MLOCK if mlock else L.LLAMA_LOAD_MODE_NONE


def weights_mapped(opts: Options, paths: Sequence[str | Path]) -> bool:
    """Whether the weights are mapped from the file (``opts.mmap``; None: decided here).

    Left to us, CPU-only weights are read into memory where the process has huge pages (see
    infer_cli.hugepages): decoding streams them every token, and runs faster from 2 MiB pages
    than from the file's 4 KiB ones. The mapping stays where it serves better: layers on a GPU
    or RPC workers (the host copy is only a staging area), and a file that would take more than
    half the memory now available (mapped pages can be dropped and read again; read ones
    cannot)."""
    if opts.mmap is not None:
        return opts.mmap
    from infer_cli import hugepages

    if opts.rpc or not hugepages.active():
        return True
    import llama_cpp

    if opts.gpu_layers and llama_cpp.llama_supports_gpu_offload():
        return True
    import psutil

    try:
        size = sum(os.path.getsize(p) for p in paths)  # every shard of a split model
    except OSError:
        return True
    return size > psutil.virtual_memory().available // 2


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override (llama.h; the binding has no type for it)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def cpu_moe_overrides(n_cpu_moe: int, n_layer: int):
    """llama.cpp's tensor buffer overrides for --cpu-moe (``n_cpu_moe`` ALL_LAYERS: one pattern
    for every block's routed experts) or --n-cpu-moe N (one pattern per block 0..N-1), each to
    the CPU buffer type, as common/arg.cpp builds them: (the NULL-terminated
    llama_model_tensor_buft_override array, the pattern strings it points into). Keep both
    alive while the model loads."""
    from infer_cli.models.gguf_info import EXPERT_TENSOR_PATTERN
    from infer_cli.options import ALL_LAYERS

    if n_cpu_moe == ALL_LAYERS:
        patterns = [EXPERT_TENSOR_PATTERN]
    else:
        patterns = [rf"blk\.{il}{EXPERT_TENSOR_PATTERN}" for il in range(min(n_cpu_moe, n_layer))]
    keep = [ctypes.create_string_buffer(p.encode()) for p in patterns]
    buft = _cpu_buffer_type()
    arr = (BuftOverride * (len(keep) + 1))()
    for i, b in enumerate(keep):
        arr[i].pattern = ctypes.cast(b, ctypes.c_char_p)
        arr[i].buft = buft
    arr[len(keep)].pattern = None  # the terminator
    return arr, keep


def _cpu_buffer_type() -> int:
    """ggml_backend_cpu_buffer_type(): the buffer type llama.cpp compares an override against
    to keep a tensor in host memory (libggml-base, loaded already by libllama)."""
    import llama_cpp

    from infer_cli.engine.binding import native_library

    lib = native_library(llama_cpp, "libggml-base")
    if lib is None:
        raise ModelLoadFailed(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"),
                              "llama.cpp's ggml-base library is not there (needed for --cpu-moe)")
    fn = lib.ggml_backend_cpu_buffer_type
    fn.restype, fn.argtypes = ctypes.c_void_p, []
    return fn()


class Model:
    """A loaded GGUF: weights and vocabulary. ``close()`` frees it (also on garbage collection)."""

    def __init__(self, path: Path, opts: Options, *, info=None):
        from infer_cli.engine.binding import require

        L = require()  # another llama-cpp-python release: one clear error, not a ctypes one

        self.L = L
        self.path = Path(path)
        if info is None:  # a bad file gets a clear error, not a native crash
            from infer_cli.models.gguf_info import read_gguf

            info = read_gguf(self.path)
        self.info = info
        from infer_cli.models.integrity import check_vocabulary

        check_vocabulary(self.path)  # llama.cpp aborts the process on a token listed twice
        llama_log.install()
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.n_gpu_layers = opts.gpu_layers or 0  # None (auto) is resolved by the caller's plan
        self.mmap = weights_mapped(opts, info.paths or (self.path,))
        if not self.mmap or opts.mlock:  # else llama.cpp's own default (mmap where it can)
            params.load_mode = load_mode(self.mmap, opts.mlock)
        if not opts.repack:  # llama.cpp's --no-repack: no "extra" CPU buffer types
            params.use_extra_bufts = False
        self.rpc = None
        if opts.rpc:  # the offloaded layers go to the workers' devices (probed first)
            from infer_cli.engine import rpc

            # llama.cpp aborts when a worker goes away; no debugger attached to print a trace
            os.environ.setdefault("GGML_NO_BACKTRACE", "1")
            self.rpc = rpc.client_devices(opts.rpc)
            if opts.tensor_split and len(opts.tensor_split) != len(self.rpc.handles):
                from infer_cli.errors import BadOption

                raise BadOption("--tensor-split", ",".join(f"{x:g}" for x in opts.tensor_split),
                                f"{len(self.rpc.handles)} shares, one per worker device")
            params.devices = self.rpc.pointer
            params.split_mode = L.LLAMA_SPLIT_MODE_LAYER
            if opts.tensor_split:
                n = L.llama_max_devices()
                shares = list(opts.tensor_split)[:n]
                self._split = (ctypes.c_float * n)(*shares, *([0.0] * (n - len(shares))))
                params.tensor_split = self._split
        if opts.n_cpu_moe:  # MoE: the routed experts stay in host memory (tensor buffer overrides)
            self._overrides = cpu_moe_overrides(opts.n_cpu_moe, info.block_count or 0)
            params.tensor_buft_overrides = ctypes.cast(self._overrides[0], ctypes.c_void_p)
        mark = llama_log.mark()
        t0 = time.perf_counter()
        self.ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ModelLoadFailed(str(path), llama_log.last_error(mark) or "unknown reason")
        self.load_s = time.perf_counter() - t0
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.ptr)
        self.n_swa = L.llama_model_n_swa(self.ptr)
        self._piece = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp says how many it needs
            cap = -n
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (cached: the decode loop asks for the same ones often)."""
        key = token if not special else -1 - token
        cached = self._pieces.get(key)
        if cached is not None:
            return cached
        n = self.L.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = self.L.llama_token_to_piece(self.vocab, token, big, len(big), 0, special)
            out = big.raw[:n]
        else:
            out = self._piece.raw[:n]
        self._pieces[key] = out
        return out

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token_id: int) -> str:
        return self.piece(token_id, special=True).decode("utf-8", "replace")

    @property
    def bos_text(self) -> str:
        tok = self.L.llama_vocab_bos(self.vocab)
        return self.token_text(tok) if tok >= 0 else ""

    @property
    def eos_text(self) -> str:
        tok = self.L.llama_vocab_eos(self.vocab)
        return self.token_text(tok) if tok >= 0 else ""

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.L.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):
        # A Ctrl-C landing while the interpreter finalizes objects must not print a traceback.
        try:
            self.close()
        except KeyboardInterrupt:
            pass
