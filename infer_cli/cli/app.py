"""The `infer` command line: parse, call one library function, render.

Heavy modules (llama_cpp, numpy, huggingface_hub, gguf) are imported inside the commands that
need them, so `infer --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Annotated, Optional

import typer

from .errors import InferError, describe, human_bytes

app = typer.Typer(
    name="infer",
    help="Run, pull and inspect GGUF language models locally, through llama.cpp.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)

# Option types, defined once and shared by every command (STYLE.md, point 4).
ModelArg = Annotated[Optional[str], typer.Argument(
    help="A .gguf path, an alias from models.toml, org/repo, org/repo:QUANT or "
         "org/repo/file.gguf. Default: the default model in models.toml.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Hub branch, tag or commit (default: main).", show_default=False)]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def _output(json_mode: bool = False, quiet: bool = False):
    from .ui import Output

    return Output(json_mode=json_mode, quiet=quiet)


# --- run --------------------------------------------------------------------------------------

def _split_run_args(first: str | None, second: str | None) -> tuple[str | None, str | None]:
    """`infer run MODEL PROMPT`, `infer run MODEL`, or `infer run PROMPT` (default model)."""
    if second is not None or first is None:
        return first, second
    from .registry import load_catalog, parse_ref

    if any(c.isspace() for c in first):
        return None, first
    try:
        parse_ref(first, load_catalog())
    except InferError:
        return None, first
    return first, None


@app.command()
def run(
    model: Annotated[Optional[str], typer.Argument(
        help="Model reference (see `infer pull --help`), or the prompt when only one argument "
             "is given and it is not a model.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Argument(
        help="The prompt. Read from stdin when piped; without one, an interactive chat.",
        show_default=False)] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system prompt.", show_default=False)] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion, no chat template.")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate; -1: until the model stops or the context is full.")] = -1,
    temp: Annotated[Optional[float], typer.Option("--temp", help="Sampling temperature; 0 is greedy. Default: models.toml, else 0.8.", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens; 0 turns it off. Default: models.toml, else 40.", show_default=False)] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling; 1 turns it off. Default: models.toml, else 0.95.", show_default=False)] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens below this share of the best one's probability. Default: models.toml, else 0.05.", show_default=False)] = None,
    repeat_penalty: Annotated[Optional[float], typer.Option("--repeat-penalty", help="Penalty for repeating recent tokens; 1 turns it off. Default: models.toml, else 1.0.", show_default=False)] = None,
    repeat_last_n: Annotated[Optional[int], typer.Option("--repeat-last-n", help="How many recent tokens the penalty looks at. Default: models.toml, else 64.", show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; -1 picks one.")] = -1,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop when this text appears (repeatable).", show_default=False)] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-text token.")] = False,
    ctx: Annotated[Optional[int], typer.Option(
        "--ctx", "-c", help="Context length in tokens (default: models.toml, else the smaller of "
        "the training context and 4096).", show_default=False)] = None,
    truncate: Annotated[bool, typer.Option("--truncate", help="Keep the end of a prompt longer than the context instead of refusing it.")] = False,
    cache_type_k: Annotated[str, typer.Option("--cache-type-k", help="KV cache type for keys: f16, q8_0, q4_0, ...")] = "f16",
    cache_type_v: Annotated[str, typer.Option("--cache-type-v", help="KV cache type for values; quantized types need flash attention.")] = "f16",
    flash_attn: Annotated[str, typer.Option("--flash-attn", help="auto, on or off.")] = "auto",
    swa_full: Annotated[bool, typer.Option("--swa-full", help="Full-size cache for sliding-window layers (more memory).")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: the physical cores).", show_default=False)] = None,
    batch: Annotated[int, typer.Option("--batch", help="Logical batch size for the prompt.")] = 2048,
    ubatch: Annotated[int, typer.Option("--ubatch", help="Physical batch size (a memory knob: compute buffers scale with it).")] = 512,
    gpu_layers: Annotated[str, typer.Option("--gpu-layers", help="Layers to offload to the GPU: a number, or auto.")] = "auto",
    mlock: Annotated[bool, typer.Option("--mlock", help="Lock the weights in RAM.")] = False,
    no_mmap: Annotated[bool, typer.Option("--no-mmap", help="Read the weights into memory instead of mapping the file.")] = False,
    no_prompt_cache: Annotated[bool, typer.Option("--no-prompt-cache", help="Do not reuse or save prompt KV state on disk.")] = False,
    draft: Annotated[Optional[str], typer.Option("--draft", help="Speculative decoding with this draft model (same tokenizer); auto: the draft partner from models.toml.", show_default=False)] = None,
    lookup: Annotated[bool, typer.Option("--lookup", help="Speculative decoding with drafts looked up in the prompt and the text so far (no second model).")] = False,
    draft_max: Annotated[int, typer.Option("--draft-max", help="Most tokens drafted per step (a draft model stops sooner where it is unsure; lookup's length follows acceptance).")] = 16,
    draft_p_min: Annotated[float, typer.Option("--draft-p-min", help="A draft model stops drafting when its top choice is less likely than this (among its 10 best).")] = 0.5,
    revision: RevisionOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Generate text from a model, streaming it to stdout; statistics go to stderr."""
    from . import cli_run, engine, store

    model, prompt = _split_run_args(model, prompt)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is None and json_mode:
        raise typer.BadParameter("--json needs a prompt", param_hint="PROMPT")
    out = _output(json_mode)
    with out.transfer() as progress:
        resolved = store.resolve(model, revision=revision, progress=progress)
    store.touch(resolved)
    opts = engine.EngineOptions(
        n_ctx=ctx or _default_ctx(resolved), n_batch=batch, n_ubatch=ubatch, threads=threads,
        cache_type_k=cache_type_k.lower(), cache_type_v=cache_type_v.lower(),
        flash_attn=flash_attn.lower(), mlock=mlock, mmap=not no_mmap, swa_full=swa_full)
    opts.check()
    given = {"temperature": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p,
             "repeat_penalty": repeat_penalty, "repeat_last_n": repeat_last_n}
    model_defaults = resolved.entry.sampling if resolved.entry else {}
    sampling = engine.Sampling(seed=seed, **{**model_defaults,
                                             **{k: v for k, v in given.items() if v is not None}})
    if draft and lookup:
        raise typer.BadParameter("choose one of --draft and --lookup", param_hint="--draft")
    draft_model = None
    if draft:
        draft_ref = draft
        if draft.lower() == "auto":
            draft_ref = resolved.entry.draft if resolved.entry else None
            if not draft_ref:
                raise typer.BadParameter(f"models.toml names no draft partner for {resolved.name}",
                                         param_hint="--draft")
        with out.transfer() as progress:
            draft_model = store.resolve(draft_ref, progress=progress)
    opts = dataclasses.replace(opts, gpu_layers=_gpu_layers(gpu_layers, resolved, opts, draft_model))
    spec = cli_run.SpecSettings(draft_model, lookup, max(1, draft_max), draft_p_min) \
        if (draft_model or lookup) else None
    settings = cli_run.RunSettings(system, raw, max_tokens, tuple(stop or ()), ignore_eos,
                                   truncate, not no_prompt_cache, sampling, spec)
    runner = cli_run.Runner(resolved, opts, settings)
    if prompt is None:
        raise typer.Exit(cli_run.interactive(runner, out))
    raise typer.Exit(cli_run.one_shot(runner, prompt, out, json_mode=json_mode, resolved=resolved))


def _default_ctx(resolved) -> int:
    if resolved.entry and resolved.entry.context:
        return resolved.entry.context
    from .gguf_info import read_gguf

    trained = read_gguf(resolved.path).context_length
    return min(trained, 4096) if trained else 4096


def _gpu_layers(value: str, resolved, opts, draft) -> int:
    """--gpu-layers: a number, or auto: as many as `infer fit`'s plan puts on the GPU."""
    if value.strip().lower() != "auto":
        try:
            n = int(value)
        except ValueError:
            raise typer.BadParameter(f"'{value}' is not a number or auto", param_hint="--gpu-layers") from None
        return 999 if n < 0 else n
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return 0  # a CPU build: nothing to plan
    from . import fit, hardware
    from .gguf_info import read_gguf

    options = fit.Options(n_ctx=opts.n_ctx, n_batch=opts.n_batch, n_ubatch=opts.n_ubatch,
                          cache_type_k=opts.cache_type_k, cache_type_v=opts.cache_type_v,
                          flash_attn=opts.flash_attn, swa_full=opts.swa_full, mmap=opts.mmap)
    plan = fit.plan(read_gguf(resolved.path), hardware.detect().hardware(), options,
                    draft=read_gguf(draft.path) if draft else None)
    return plan.gpu_layers


# --- pull / list / show / rm -----------------------------------------------------------------

@app.command()
def pull(model: ModelArg = None, revision: RevisionOpt = None, json_mode: JsonOpt = False) -> None:
    """Download a model into the shared cache (resumable, verified).

    MODEL is an alias from models.toml, org/repo (Q4_K_M or the nearest quant),
    org/repo:QUANT (case-insensitive), or org/repo/path/file.gguf. Split GGUFs are fetched
    whole. HF_TOKEN (or `hf auth login`) gives access to gated repos; HF_HUB_OFFLINE=1 uses
    only what is cached.
    """
    from . import store

    out = _output(json_mode)
    with out.transfer() as progress:
        resolved = store.pull(model, revision=revision, progress=progress)
    size = sum(p.stat().st_size for p in resolved.paths)
    if json_mode:
        out.json({"model": resolved.name, "source": resolved.source, "size": size,
                  "paths": [str(p) for p in resolved.paths]})
    else:
        out.result(f"{resolved.name}: {human_bytes(size)} at {resolved.path}")


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = time.time() - ts
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{int(s // n)} {unit} ago"
    return "just now"


@app.command("list")
def list_models(
    aliases: Annotated[bool, typer.Option("--aliases", help="List models.toml's aliases instead.")] = False,
    json_mode: JsonOpt = False,
) -> None:
    """List local models: name, quant, size, parameters, path, last used."""
    from . import store

    out = _output(json_mode)
    if aliases:
        _list_aliases(out, json_mode)
        return
    from .gguf_info import quant_label, read_gguf

    rows = []
    for m in store.list_local():
        try:
            info = read_gguf(m.path)
            quant, params = quant_label(info), info.n_params
        except InferError:
            quant, params = "?", None
        rows.append({"name": m.name, "quant": quant, "size": m.size, "parameters": params,
                     "path": str(m.path), "source": m.source, "last_used": m.last_used})
    if json_mode:
        out.json({"models": rows})
        return
    if not rows:
        out.info("No local models yet. Try `infer pull` (the default model) or `infer run \"hi\"`.")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("NAME", "QUANT", "SIZE", "PARAMS", "LAST USED", "PATH"):
        table.add_column(col, no_wrap=col != "PATH", overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["quant"], human_bytes(r["size"]), _params(r["parameters"]),
                      _ago(r["last_used"]), r["path"])
    out.result(table)


def _params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _list_aliases(out, json_mode: bool) -> None:
    from .paths import user_models_toml
    from .registry import load_catalog

    catalog = load_catalog()
    rows = [{"name": e.name, "default": e.name == catalog.default, "note": e.note,
             "context": e.context, "draft": e.draft, "hub": e.hub.repo if e.hub else None,
             "package": list(e.package.wheels) if e.package else None}
            for e in catalog.entries.values()]
    if json_mode:
        out.json({"aliases": rows, "user_models_toml": str(user_models_toml())})
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("ALIAS", "SOURCE", "DRAFT", "NOTE"):
        table.add_column(col, overflow="fold")
    for r in rows:
        source = "package index" if r["package"] else r["hub"]
        table.add_row(r["name"] + (" (default)" if r["default"] else ""), source, r["draft"] or "",
                      r["note"])
    out.result(table)
    out.info(f"[dim]Your own aliases go in {user_models_toml()}[/]")


@app.command()
def show(model: ModelArg = None, json_mode: JsonOpt = False) -> None:
    """Show what a model's GGUF header says: architecture, size, attention, vocabulary, quant."""
    from . import store
    from .gguf_info import read_gguf, read_split, summary

    out = _output(json_mode)
    resolved = store.resolve(model, download=False)
    info = read_gguf(resolved.path) if len(resolved.paths) == 1 else read_split([str(p) for p in resolved.paths])
    facts = {"model": resolved.name, **summary(info)}
    if json_mode:
        out.json(facts)
        return
    from rich.table import Table

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in _show_rows(facts):
        table.add_row(label, value)
    out.result(table)


def _show_rows(f: dict) -> list[tuple[str, str]]:
    """The header facts a person asks about, in the order they ask; --json has everything."""
    def opt(v) -> str:
        return "none" if v in (None, "") else str(v)

    heads = f"{f['head_count']} query, {f['head_count_kv']} key/value"
    if f["head_count"] and f["head_count_kv"] and f["head_count"] != f["head_count_kv"]:
        heads += f" (grouped-query, {f['head_count'] // f['head_count_kv']} per group)"
    template = f["chat_template"]
    bpw = f["bits_per_weight"]
    return [
        ("model", f["model"]),
        ("architecture", opt(f["architecture"])),
        ("name", opt(f["name"])),
        ("parameters", f"{_params(f['n_params'])} ({f['n_params']:,})"),
        ("quantization", f"{f['quant']}, {bpw:.2f} bits per weight" if bpw else f["quant"]),
        ("file size", f"{human_bytes(f['file_size'])} ({f['file_size']:,} bytes)"),
        ("layers", opt(f["block_count"])),
        ("attention heads", heads),
        ("head size", f"{opt(f['key_length'])} (key), {opt(f['value_length'])} (value)"),
        ("embedding", opt(f["embedding_length"])),
        ("sliding window", opt(f["sliding_window"])),
        ("training context", opt(f["context_length"])),
        ("vocabulary", f"{opt(f['vocab_size'])} tokens ({opt(f['tokenizer_model'])})"),
        ("chat template", f"yes ({len(template)} characters)" if template else "no"),
        ("license", opt(f["license"])),
        ("path", "\n".join(f["paths"])),
    ]


@app.command()
def rm(model: Annotated[str, typer.Argument(help="The model to remove (see `infer list`).")],
       yes: YesOpt = False, json_mode: JsonOpt = False) -> None:
    """Delete a downloaded model and free its space (files of your own are only forgotten)."""
    from . import store

    out = _output(json_mode)
    resolved = store.plan_remove(model)
    size = sum(p.stat().st_size for p in resolved.paths if p.exists())
    if not yes and resolved.source != "local":
        if not sys.stdin.isatty():
            raise typer.BadParameter("not a terminal: pass --yes to delete without asking",
                                     param_hint="--yes")
        if not typer.confirm(f"Delete {resolved.name} ({human_bytes(size)})?", err=True):
            raise typer.Exit(1)
    removal = store.remove(resolved)
    if json_mode:
        out.json({"model": removal.name, "deleted": removal.deleted, "freed": removal.freed,
                  "paths": [str(p) for p in removal.paths]})
    elif removal.deleted:
        out.result(f"Deleted {removal.name}: {human_bytes(removal.freed)} freed")
    else:
        out.result(f"Forgot {removal.name}; the file itself stays where it is.")


# --- fit / quantize (their own modules) -------------------------------------------------------

from . import cli_fit, cli_quantize  # noqa: E402  (light modules: heavy imports stay inside)

cli_fit.register(app)
cli_quantize.register(app)


# --- cache ----------------------------------------------------------------------------------

cache_app = typer.Typer(help="The prompt cache: saved KV state of prompt prefixes, reused across runs.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list(json_mode: JsonOpt = False) -> None:
    """List saved prompt prefixes: model, tokens, size, last used."""
    from . import prompt_cache

    out = _output(json_mode)
    rows = prompt_cache.listing()
    if json_mode:
        out.json({"entries": rows, "folder": str(prompt_cache.cache_root()),
                  "limit_bytes": prompt_cache.max_bytes()})
        return
    if not rows:
        out.info("The prompt cache is empty.")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("MODEL", "TOKENS", "SIZE", "LAST USED", "KV"):
        table.add_column(col, overflow="fold")
    for r in rows:
        kv = r["settings"] or {}
        table.add_row(str(r["model"]), str(r["tokens"]), human_bytes(r["size"]), _ago(r["last_used"]),
                      f"ctx {kv.get('n_ctx')}, K {kv.get('type_k')}, V {kv.get('type_v')}")
    out.result(table)
    total = sum(r["size"] for r in rows)
    out.info(f"[dim]{len(rows)} entries, {human_bytes(total)} of {human_bytes(prompt_cache.max_bytes())} "
             f"(INFER_PROMPT_CACHE_MAX) in {prompt_cache.cache_root()}[/]")


@cache_app.command("clear")
def cache_clear(json_mode: JsonOpt = False) -> None:
    """Delete every saved prompt prefix."""
    from . import prompt_cache

    out = _output(json_mode)
    n, freed = prompt_cache.clear()
    if json_mode:
        out.json({"removed": n, "freed": freed})
    else:
        out.result(f"Removed {n} entries, {human_bytes(freed)} freed.")


# --- entry point ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    """Console entry point: typed errors become `Error: ...` plus a hint and an exit code."""
    # Typer may carry its own copy of click: take the exception classes from Typer itself.
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    debug = bool(os.environ.get("INFER_DEBUG"))
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="infer")
        sys.exit(rc if isinstance(rc, int) else 0)
    except InferError as err:
        if debug:
            raise
        r = describe(err)
        _output().error(r.message, r.hint)
        sys.exit(r.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except click_error as e:
        e.show()
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("\nInterrupted.\n")
        sys.exit(130)
    except BrokenPipeError:
        # `infer ... | head`: the reader left; nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
