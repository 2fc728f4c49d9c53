"""Option types defined once and shared by every command (``Annotated`` aliases), the groups
of options several commands take (``SamplingArgs``, ``EngineArgs``, added by ``@option_groups``),
and the helpers that turn what was typed into library values. Light: no llama_cpp, no numpy."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields, replace
from typing import Annotated, Callable, Optional, get_type_hints

import typer

ModelArg = Annotated[Optional[str], typer.Argument(
    help="A .gguf path, an alias from models.toml, org/repo, org/repo:QUANT or "
         "org/repo/file.gguf. Default: the default model in models.toml.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Hub branch, tag or commit (default: main).", show_default=False)]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]

# --- context and KV cache -------------------------------------------------------------------
CtxOpt = Annotated[Optional[int], typer.Option(
    "--ctx", "-c", help="Context length in tokens (default: models.toml, else the smaller of "
    "the training context and 4096).", show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch", help="Logical batch size for the prompt.")]
UbatchOpt = Annotated[int, typer.Option(
    "--ubatch", help="Physical batch size (a memory knob: compute buffers scale with it).")]
CacheTypeKOpt = Annotated[str, typer.Option("--cache-type-k", help="KV cache type for keys: f16, q8_0, q4_0, ...")]
CacheTypeVOpt = Annotated[str, typer.Option(
    "--cache-type-v", help="KV cache type for values; quantized types need flash attention.")]
FlashAttnOpt = Annotated[str, typer.Option("--flash-attn", help="auto, on or off.")]
SwaFullOpt = Annotated[bool, typer.Option(
    "--swa-full", help="Full-size cache for sliding-window layers (more memory).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", "-t", help="CPU threads (default: the physical cores).", show_default=False)]
GpuLayersOpt = Annotated[str, typer.Option("--gpu-layers", help="Layers to offload to the GPU: a number, or auto.")]
CpuMoeOpt = Annotated[bool, typer.Option(
    "--cpu-moe", help="Mixture-of-experts models: keep every layer's routed experts in RAM and "
    "the rest of the offloaded layers on the GPU (llama.cpp's --cpu-moe).")]
NCpuMoeOpt = Annotated[Optional[int], typer.Option(
    "--n-cpu-moe", help="Mixture-of-experts models: keep the routed experts of the first N layers "
    "in RAM (llama.cpp's --n-cpu-moe).", show_default=False)]
MlockOpt = Annotated[bool, typer.Option("--mlock", help="Lock the weights in RAM.")]
MmapOpt = Annotated[Optional[bool], typer.Option(
    "--mmap/--no-mmap", help="Map the weights from the file, or read them into memory. Default: "
    "read into huge pages where Linux provides them and every layer is on the CPU (faster "
    "decoding; INFER_HUGE_PAGES=0 turns that off), else mapped.", show_default=False)]
NoRepackOpt = Annotated[bool, typer.Option(
    "--no-repack", help="Keep CPU weights in the file's layout instead of llama.cpp's interleaved "
    "one (slower on most CPUs; the layout an RPC worker or another machine computes with).")]
RpcOpt = Annotated[Optional[str], typer.Option(
    "--rpc", envvar="INFER_RPC", help="Split the model over RPC workers (`infer worker`): "
    "HOST:PORT[,HOST:PORT...]. Each is probed first (handshake and version). The protocol has no "
    "authentication and no encryption: trusted networks only.", show_default=False)]
TensorSplitOpt = Annotated[Optional[str], typer.Option(
    "--tensor-split", help="Share of the offloaded layers for each worker device with --rpc, "
    "e.g. 1,1 or 3,1 (default: by each one's free memory; `infer fit --rpc` gives a balanced "
    "one).", show_default=False)]
ParallelOpt = Annotated[int, typer.Option(
    "--parallel", "-np", help="Sequences decoded together in one batch (one KV cache shared by all).")]

# --- sampling -------------------------------------------------------------------------------
TempOpt = Annotated[Optional[float], typer.Option(
    "--temp", help="Sampling temperature; 0 is greedy. Default: models.toml, else 0.8.", show_default=False)]
TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", help="Keep the k most likely tokens; 0 turns it off. Default: models.toml, else 40.", show_default=False)]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", help="Nucleus sampling; 1 turns it off. Default: models.toml, else 0.95.", show_default=False)]
MinPOpt = Annotated[Optional[float], typer.Option(
    "--min-p", help="Drop tokens below this share of the best one's probability. Default: models.toml, else 0.05.",
    show_default=False)]
RepeatPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repeat-penalty", help="Penalty for repeating recent tokens; 1 turns it off. Default: models.toml, else 1.0.",
    show_default=False)]
RepeatLastNOpt = Annotated[Optional[int], typer.Option(
    "--repeat-last-n", help="How many recent tokens the penalty looks at. Default: models.toml, else 64.",
    show_default=False)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed; -1 picks one.")]
MaxTokensOpt = Annotated[int, typer.Option(
    "--max-tokens", "-n", help="Most tokens to generate; -1: until the model stops or the context is full.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="Stop when this text appears (repeatable).", show_default=False)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="A system prompt.", show_default=False)]


def parse_rpc(value: str | None) -> tuple[str, ...]:
    """--rpc / INFER_RPC: the endpoints, each checked (HOST:PORT, port 1-65535)."""
    if not value:
        return ()
    from infer_cli.engine.rpc import parse_endpoints

    return tuple(str(e) for e in parse_endpoints(value))


def parse_tensor_split(value: str | None) -> tuple[float, ...]:
    """--tensor-split 3,1 -> (3.0, 1.0)."""
    if not value:
        return ()
    from infer_cli.errors import BadOption

    try:
        return tuple(float(x) for x in value.split(","))
    except ValueError:
        raise BadOption("--tensor-split", value, "numbers separated by commas, e.g. 1,1 or 3,1") from None


def parse_cpu_moe(cpu_moe: bool, n_cpu_moe: int | None) -> int:
    """--cpu-moe / --n-cpu-moe N -> Options.n_cpu_moe (ALL_LAYERS for --cpu-moe, which wins)."""
    from infer_cli.errors import BadOption
    from infer_cli.options import ALL_LAYERS

    if n_cpu_moe is not None and n_cpu_moe < 0:
        raise BadOption("--n-cpu-moe", str(n_cpu_moe), "a number of layers, 0 or more")
    return ALL_LAYERS if cpu_moe else n_cpu_moe or 0


def parse_gpu_layers(value: str) -> int | None:
    """--gpu-layers: None for auto (the plan decides), ALL_LAYERS for a negative number."""
    from infer_cli.options import ALL_LAYERS

    if value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise typer.BadParameter(f"'{value}' is not a number or auto", param_hint="--gpu-layers") from None
    return ALL_LAYERS if n < 0 else n


# --- groups of options ----------------------------------------------------------------------
# Several commands take the same sampling and engine options. Each group is declared once, as a
# dataclass whose fields are the options; a command names the group as one keyword-only
# parameter (``*, sampling_args: SamplingArgs``) and ``@option_groups`` puts the group's options
# in its place in the signature Typer reads, then hands the command one object per group.


class OptionGroup:
    """Base of the option groups: a dataclass of ``Annotated`` option fields, all with defaults."""


@dataclass(frozen=True)
class SamplingArgs(OptionGroup):
    """What to generate and how to sample it; the sampling ones override models.toml."""

    system: SystemOpt = None
    max_tokens: MaxTokensOpt = -1
    temp: TempOpt = None
    top_k: TopKOpt = None
    top_p: TopPOpt = None
    min_p: MinPOpt = None
    repeat_penalty: RepeatPenaltyOpt = None
    repeat_last_n: RepeatLastNOpt = None
    seed: SeedOpt = -1
    stop: StopOpt = None

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def given(self) -> dict:
        """The sampling options typed on the command line (absent: not given), under the names
        of ``Sampling``'s fields."""
        given = dict(temperature=self.temp, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                     repeat_penalty=self.repeat_penalty, repeat_last_n=self.repeat_last_n)
        return {k: v for k, v in given.items() if v is not None}

    def sampling(self, entry):
        """The ``Sampling`` for a model: its models.toml defaults (``entry``, may be None),
        overridden by what was typed."""
        from infer_cli.engine.runner import sampling_for

        return sampling_for(entry, self.seed, self.given())


@dataclass(frozen=True)
class EngineArgs(OptionGroup):
    """How the model is loaded and its context built."""

    ctx: CtxOpt = None
    cache_type_k: CacheTypeKOpt = "f16"
    cache_type_v: CacheTypeVOpt = "f16"
    flash_attn: FlashAttnOpt = "auto"
    swa_full: SwaFullOpt = False
    threads: ThreadsOpt = None
    batch: BatchOpt = 2048
    ubatch: UbatchOpt = 512
    gpu_layers: GpuLayersOpt = "auto"
    cpu_moe: CpuMoeOpt = False
    n_cpu_moe: NCpuMoeOpt = None
    mlock: MlockOpt = False
    mmap: MmapOpt = None
    no_repack: NoRepackOpt = False
    rpc: RpcOpt = None
    tensor_split: TensorSplitOpt = None

    def options(self, parallel: int = 1):
        """The load/context ``Options`` for ``parallel`` sequences (n_ctx 0 = the model's
        default, settled once the model's header has been read)."""
        from infer_cli.options import DEFAULT_CTX, Options

        opts = Options(n_ctx=self.ctx or 0, n_batch=self.batch, n_ubatch=self.ubatch, n_seq=parallel,
                       threads=self.threads, cache_type_k=self.cache_type_k.lower(),
                       cache_type_v=self.cache_type_v.lower(), flash_attn=self.flash_attn.lower(),
                       swa_full=self.swa_full, gpu_layers=parse_gpu_layers(self.gpu_layers),
                       mlock=self.mlock, mmap=self.mmap, repack=not self.no_repack,
                       rpc=parse_rpc(self.rpc),
                       tensor_split=parse_tensor_split(self.tensor_split),
                       n_cpu_moe=parse_cpu_moe(self.cpu_moe, self.n_cpu_moe))
        replace(opts, n_ctx=opts.n_ctx or DEFAULT_CTX).check()  # bad options fail before anything loads
        return opts


def _group_of(annotation) -> type[OptionGroup] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, OptionGroup) else None


def option_groups(command: Callable) -> Callable:
    """Expand each ``OptionGroup`` parameter of a Typer command into the group's options, at its
    place; the command is called with one group object per such parameter.

    Typer reads the parameters from ``inspect.signature`` (which honours ``__signature__``) and
    the types from ``typing.get_type_hints`` (which reads ``__annotations__``), so both are set.
    Every parameter becomes keyword-only: a group parameter has no default, and Typer passes
    everything by name anyway."""
    signature = inspect.signature(command, eval_str=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type[OptionGroup], list[str]]] = {}
    for param in signature.parameters.values():
        group = _group_of(param.annotation)
        if group is None:
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        types = get_type_hints(group, include_extras=True)
        names = [f.name for f in fields(group)]
        groups[param.name] = (group, names)
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                     annotation=types[f.name]) for f in fields(group)]
    seen: set[str] = set()
    for name in (p.name for p in params):
        if name in seen:  # the command could not tell the two apart
            raise TypeError(f"{command.__name__}: parameter {name!r} is declared twice")
        seen.add(name)

    @functools.wraps(command)
    def expanded(**kwargs):
        for name, (group, names) in groups.items():
            kwargs[name] = group(**{n: kwargs.pop(n) for n in names})
        return command(**kwargs)

    expanded.__signature__ = signature.replace(parameters=params)
    expanded.__annotations__ = {p.name: p.annotation for p in params}
    if signature.return_annotation is not inspect.Signature.empty:
        expanded.__annotations__["return"] = signature.return_annotation
    return expanded
