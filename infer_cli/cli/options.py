"""Option types defined once and shared by every command (``Annotated`` aliases), and the
helpers that turn what was typed into library values. Light: no llama_cpp, no numpy."""

from __future__ import annotations

from typing import Annotated, Optional

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
MlockOpt = Annotated[bool, typer.Option("--mlock", help="Lock the weights in RAM.")]
NoMmapOpt = Annotated[bool, typer.Option(
    "--no-mmap", help="Read the weights into memory instead of mapping the file.")]
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


def gpu_layers(value: str) -> int | None:
    """--gpu-layers: None for auto (the plan decides), ALL_LAYERS for a negative number."""
    from infer_cli.options import ALL_LAYERS

    if value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise typer.BadParameter(f"'{value}' is not a number or auto", param_hint="--gpu-layers") from None
    return ALL_LAYERS if n < 0 else n


def engine_options(*, ctx, batch, ubatch, cache_type_k, cache_type_v, flash_attn, swa_full,
                   threads=None, gpu_layers_value="auto", mlock=False, no_mmap=False, parallel=1):
    """The load/context ``Options`` from the shared options (n_ctx 0 = the model's default,
    settled once the model's header has been read)."""
    from dataclasses import replace

    from infer_cli.options import DEFAULT_CTX, Options

    opts = Options(n_ctx=ctx or 0, n_batch=batch, n_ubatch=ubatch, n_seq=parallel, threads=threads,
                   cache_type_k=cache_type_k.lower(), cache_type_v=cache_type_v.lower(),
                   flash_attn=flash_attn.lower(), swa_full=swa_full,
                   gpu_layers=gpu_layers(gpu_layers_value), mlock=mlock, mmap=not no_mmap)
    replace(opts, n_ctx=opts.n_ctx or DEFAULT_CTX).check()  # bad options fail before anything loads
    return opts


def sampling_given(**given) -> dict:
    """The sampling options typed on the command line (None: not given)."""
    return {k: v for k, v in given.items() if v is not None}
