"""GGUF -> GGUF through llama.cpp's own quantizer (`llama_model_quantize`), written safely.

The output goes to a temporary name beside the target and is renamed only when llama.cpp
returns success, so an interrupted run leaves nothing at the target path. llama.cpp logs one
line per tensor ("[  12/ 272] blk.0.attn_q.weight ..."); we read those lines from the captured
log to report progress.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from infer_cli import ggml
from infer_cli.engine import llama_log
from infer_cli.errors import (BadModelFile, BadOption, DiskFull, NotEnoughDisk, QuantizeFailed,
                               QuantizeRefused)
from infer_cli.files import atomic_output, exclusive, free_bytes
from infer_cli.models.gguf_info import read_gguf

from .types import GGML_TYPES, QuantType

# (tensors done, tensors in all)
TensorProgress = Callable[[int, int], None]

_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


@dataclass(frozen=True)
class QuantOptions:
    """What `llama-quantize` takes besides the input, output and type."""

    allow_requantize: bool = False
    imatrix: Path | None = None
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    tensor_types: tuple[tuple[str, str], ...] = ()  # (name regex, ggml type), first match wins
    threads: int = 0  # 0: llama.cpp uses every hardware thread
    keep_output_tensor: bool = False
    # `--imatrix auto`: how to make the matrix from the source (quantize.imatrix_make.ImatrixSpec);
    # the pipeline sets ``imatrix`` to the made (or cached) file before quantizing
    auto_imatrix: object | None = None


@dataclass
class QuantResult:
    path: Path
    qtype: str
    seconds: float
    size: int
    n_params: int
    requantized: bool = False
    warnings: list[str] = field(default_factory=list)
    imatrix: str | None = None   # the importance matrix it was made with
    scratch: bool = False        # made only for the report (no imatrix), deleted after it

    @property
    def bpw(self) -> float:
        return self.size * 8 / self.n_params if self.n_params else 0.0


def is_quantized(src: Path) -> bool:
    """True when any 2-D weight of ``src`` is stored in a quantized format."""
    info = read_gguf(src)
    return any(t.ggml_type not in ggml.FLOAT_TYPES for t in info.tensors if len(t.shape) >= 2)


def estimate_size(src: Path, qtype: QuantType) -> int:
    """A generous upper bound on the output size: main tensors at the type's rate, plus 10%
    for the tensors kept at higher precision and the metadata."""
    info = read_gguf(src)
    rate = qtype.bpw if qtype.bpw >= 16 else qtype.bpw + 2.5
    return int(info.n_params * rate / 8 * 1.1) + info.data_offset + (16 << 20)


def check_disk(folder: Path, needed: int) -> None:
    free = free_bytes(folder)
    if free < needed:
        raise NotEnoughDisk(str(folder), needed, free)


def check_request(src_quantized: bool, qtype: QuantType, opts: QuantOptions) -> list[str]:
    """Refuse what llama.cpp would refuse (late, after minutes) before starting; return warnings."""
    warnings = []
    if src_quantized:
        if not opts.allow_requantize:
            raise QuantizeRefused(qtype.name, "the source is already quantized",
                                  "Pass --allow-requantize to re-quantize it anyway (the losses "
                                  "compound), or start from the F16/BF16 checkpoint.")
        warnings.append(f"re-quantizing an already quantized model to {qtype.name}: the losses of "
                        "both quantizations compound; start from the original weights if you can")
    if qtype.needs_imatrix and opts.imatrix is None and opts.auto_imatrix is None:
        raise QuantizeRefused(qtype.name, "this type needs an importance matrix",
                              "Pass --imatrix auto (infer makes one), --imatrix FILE (from "
                              "`infer imatrix` or llama-imatrix), or pick a type that does not need "
                              "one, e.g. Q2_K or Q3_K_S.")
    if opts.imatrix is not None and not Path(opts.imatrix).is_file():
        raise BadOption("--imatrix", str(opts.imatrix), "an existing imatrix file")
    for option, value in (("--output-tensor-type", opts.output_tensor_type),
                          ("--token-embedding-type", opts.token_embedding_type),
                          *(("--tensor-type", t) for _, t in opts.tensor_types)):
        if value is not None and value.upper() not in GGML_TYPES:
            raise BadOption(option, value, "one of " + ", ".join(GGML_TYPES))
    for pattern, _ in opts.tensor_types:
        try:
            re.compile(pattern)
        except re.error as e:
            raise BadOption("--tensor-type", pattern, f"a regular expression ({e})") from None
    return warnings


class _Native:
    """The C structures handed to llama.cpp, kept alive for the duration of the call."""

    def __init__(self, L, qtype: QuantType, opts: QuantOptions):
        p = L.llama_model_quantize_default_params()
        p.ftype = qtype.ftype
        p.nthread = opts.threads
        p.allow_requantize = opts.allow_requantize
        p.pure = opts.pure
        p.quantize_output_tensor = not opts.keep_output_tensor
        if opts.output_tensor_type:
            p.output_tensor_type = ggml.type_id(opts.output_tensor_type)
        if opts.token_embedding_type:
            p.token_embedding_type = ggml.type_id(opts.token_embedding_type)
        self.keep: list = []
        self.entries = None
        if opts.tensor_types:
            n = len(opts.tensor_types)
            arr = (L.llama_model_tensor_override * (n + 1))()
            for i, (pattern, tname) in enumerate(opts.tensor_types):
                b = pattern.encode()
                self.keep.append(b)
                arr[i].pattern = b
                arr[i].type = ggml.type_id(tname)
            arr[n].pattern = None
            arr[n].type = ggml.TYPE_COUNT  # terminates the list
            self.keep.append(arr)
            p.tt_overrides = ctypes.cast(arr, type(p.tt_overrides))
        if opts.imatrix is not None:
            from .imatrix import load_imatrix

            entries = self.entries = load_imatrix(Path(opts.imatrix))
            arr = (L.llama_model_imatrix_data * (len(entries) + 1))()
            for i, (name, values) in enumerate(entries.items()):
                b = name.encode()
                self.keep.extend((b, values))
                arr[i].name = b
                arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                arr[i].size = values.size
            arr[len(entries)].name = None
            self.keep.append(arr)
            p.imatrix = ctypes.cast(arr, type(p.imatrix))
        self.params = p


def quantize(src: Path, dst: Path, qtype: QuantType, opts: QuantOptions = QuantOptions(), *,
             progress: TensorProgress | None = None) -> QuantResult:
    """Write ``src`` as ``qtype`` to ``dst`` (atomically). Raises the typed errors of
    infer_cli.errors; never leaves a file at ``dst`` unless it succeeded."""
    import llama_cpp as L

    src, dst = Path(src), Path(dst)
    requant = is_quantized(src)
    warnings = check_request(requant, qtype, opts)
    dst.parent.mkdir(parents=True, exist_ok=True)
    check_disk(dst.parent, estimate_size(src, qtype))
    native = _Native(L, qtype, opts)
    if native.entries is not None:
        from .imatrix import mismatch

        why = mismatch(native.entries, read_gguf(src))
        if why:
            raise QuantizeRefused(qtype.name, f"the imatrix {opts.imatrix} was made for another "
                                  f"model: {why}", "Make one for this model (`infer imatrix "
                                  "MODEL`), or pass --imatrix auto.")
    llama_log.install()
    L.llama_backend_init()
    mark = llama_log.mark()
    outcome: dict = {}
    t0 = time.perf_counter()
    # Interrupted or failed: the partial file goes. (A worker still writing keeps an unlinked
    # inode, gone when the process exits.)
    # The lock: a second quantization to the same output is refused (FileBusy), never raced.
    with exclusive(dst), atomic_output(dst) as tmp:

        def work() -> None:
            try:
                outcome["rc"] = L.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                                       ctypes.byref(native.params))
            except BaseException as e:  # noqa: BLE001 - reported to the waiting thread
                outcome["error"] = e

        worker = threading.Thread(target=work, daemon=True, name="llama-quantize")
        worker.start()
        _watch(worker, mark, progress)
        if "error" in outcome:
            raise QuantizeFailed(str(src), str(outcome["error"]))
        if outcome.get("rc", 1) != 0 or not tmp.exists():
            if _out_of_room(dst.parent, llama_log.since(mark), src.stat().st_size):
                raise DiskFull(str(dst.parent), dst.name)
            raise _failure(src, qtype, llama_log.since(mark))
        # What llama.cpp wrote must be whole before it takes the target's name: a write it did
        # not check (a full disk) leaves a file shorter than its own header says.
        try:
            read_gguf(tmp)
        except BadModelFile as e:
            if _out_of_room(dst.parent, llama_log.since(mark), src.stat().st_size):
                raise DiskFull(str(dst.parent), dst.name) from None
            raise QuantizeFailed(str(src), f"llama.cpp wrote an incomplete file ({e.reason})") from None
    seconds = time.perf_counter() - t0
    return QuantResult(dst, qtype.name, seconds, dst.stat().st_size, read_gguf(dst).n_params,
                       requant, warnings, str(opts.imatrix) if opts.imatrix is not None else None)


def _out_of_room(folder: Path, log: Sequence[str], need: int) -> bool:
    """Did a native write fail for lack of space? llama.cpp's log says so; or it reports a
    failed stream write (its C++ streams say only "iostream error") while less is free than the
    output could need; or nearly nothing is free (the partial file still holds what did fit)."""
    text = " ".join(log).lower()
    if "no space left" in text:
        return True
    try:
        free = free_bytes(folder)
    except OSError:
        return False
    if "iostream error" in text or "failed to write" in text:
        return free < need
    return free < (1 << 20)


def _watch(worker: threading.Thread, mark: int, progress: TensorProgress | None) -> None:
    seen = 0
    while worker.is_alive():
        worker.join(0.1)
        if progress is None:
            continue
        lines = llama_log.since(mark + seen)
        seen += len(lines)
        for ln in lines:
            m = _TENSOR_LINE.match(ln)
            if m:
                progress(int(m.group(1)), int(m.group(2)))


def _failure(src: Path, qtype: QuantType, log: Sequence[str]) -> Exception:
    text = "\n".join(log)
    if "requires an imatrix" in text or "Missing importance matrix" in text:
        return QuantizeRefused(qtype.name, "llama.cpp needs an importance matrix for some tensors",
                               "Pass --imatrix FILE, or pick a type that does not need one.")
    reason = next((ln.strip() for ln in reversed(log)
                   if any(w in ln.lower() for w in ("error", "failed", "exception", "invalid"))),
                  None)
    return QuantizeFailed(str(src), reason or "llama.cpp returned an error")
