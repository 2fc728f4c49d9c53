"""`infer run`: one-shot generation and the interactive chat, rendered for a terminal.

Part of the CLI layer (it prints); the work is done by ``engine.runner``.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated, Optional

import typer

from infer_cli.cli.options import EngineArgs, JsonOpt, RevisionOpt, SamplingArgs, option_groups
from infer_cli.cli.output import output
from infer_cli.errors import InferError, describe, human_bytes


def stats_line(stats, finish: str | None) -> str:
    parts = []
    if stats.load_s:
        parts.append(f"load {stats.load_s:.2f} s")
    computed = stats.prompt_tokens - stats.cached_tokens
    prompt = f"prompt {stats.prompt_tokens} tokens"
    if stats.cached_tokens:
        prompt += f" ({stats.cached_tokens} cached)"
    if computed > 0 and stats.prefill_s > 0:
        prompt += f", {stats.prefill_tps:.0f} tokens/s"
    parts.append(prompt)
    parts.append(f"generated {stats.generated_tokens} tokens, {stats.decode_tps:.1f} tokens/s")
    if stats.ttft_s is not None:
        parts.append(f"first token {stats.ttft_s:.2f} s")
    if stats.speculative:
        sp = stats.speculative
        spec = f"{sp['mode']}: {sp['accepted']}/{sp['drafted']} drafted accepted ({sp['acceptance']:.0%})"
        if sp["speedup"]:
            spec += f", {sp['speedup']:.2f}x plain"
        for sw in sp.get("switches") or ():  # the reasons are in the notes
            spec += f", {sw['to']} at token {sw['token']}"
        parts.append(spec)
    kv = f"KV {stats.kv_used}/{stats.kv_size} cells"
    if stats.kv_bytes:
        kv += f" ({human_bytes(stats.kv_bytes)})"
    parts.append(kv)
    parts.append(f"peak memory {human_bytes(stats.peak_rss_bytes)}")
    parts.append(f"finish: {finish}")
    return " · ".join(parts)


def end_answer(text: str) -> None:
    """Finish the streamed answer on stdout so that what follows on stderr starts a line."""
    if text and not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()


def one_shot(runner, prompt: str, out, *, json_mode: bool, resolved) -> int:
    """Stream one answer; returns the exit code (130 when interrupted)."""
    last = None
    text = []
    try:
        for event in runner.answer(prompt):
            text.append(event.text)
            last = event
            if not json_mode and event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except InferError:  # e.g. a worker lost mid-run: the text so far stays, the error follows
        if not json_mode:
            end_answer("".join(text))
        raise
    stats, finish = last.stats, last.finish_reason
    if json_mode:
        out.json({"model": resolved.name, "path": str(resolved.path), "text": "".join(text),
                  "finish_reason": finish, "stats": stats.as_dict(), "notes": stats.notes,
                  "sampling": dataclasses.asdict(runner.settings.sampling)})
    else:
        end_answer("".join(text))
        for note in stats.notes:
            out.info(f"[yellow]note:[/] {note}")
        out.info(f"[dim]{stats_line(stats, finish)}[/]")
    full = _cache_disk_full(runner)
    if full is not None and finish != "interrupted":
        raise full  # the answer is out, whole; the disk that could not take its cache entry is news
    return 130 if finish == "interrupted" else 0


def _cache_disk_full(runner):
    """The DiskFull of a prompt-cache save during the last answer (then forgotten), or None."""
    cache = getattr(runner, "cache", None)
    full = getattr(cache, "disk_full", None)
    if full is not None:
        cache.disk_full = None
    return full


_HELP = ("Type a message; end a line with \\ to continue it, or wrap several lines in \"\"\". "
         "/reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops an answer.")


def _read_message() -> str | None:
    """One user message from the terminal; None at end of input."""
    try:
        line = input(">>> ")
    except EOFError:
        return None
    if line.strip().startswith('"""'):
        lines = [line.strip()[3:]]
        while not lines[-1].rstrip().endswith('"""') or len(lines) == 1 and lines[0] == "":
            try:
                lines.append(input("... "))
            except EOFError:
                break
        text = "\n".join(lines).rstrip()
        return text[:-3] if text.endswith('"""') else text
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines)


def interactive(runner, out) -> int:
    """The chat loop: history, multi-line input, /reset, /exit, Ctrl-D."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out.info(f"[dim]{_HELP}[/]")
    while True:
        try:
            message = _read_message()
        except KeyboardInterrupt:
            out.info("\n[dim](Ctrl-D or /exit leaves)[/]")
            continue
        if message is None or message.strip() in ("/exit", "/bye", "/quit"):
            sys.stdout.write("\n")
            return 0
        if message.strip() == "/reset":
            runner.conversation.reset()
            out.info("[dim]conversation forgotten[/]")
            continue
        if message.strip() in ("/help", "/?"):
            out.info(f"[dim]{_HELP}[/]")
            continue
        if not message.strip():
            continue
        last, parts = None, []
        try:
            for event in runner.answer(message):
                last = event
                parts.append(event.text)
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except InferError as err:  # e.g. a message too long for the context: say so, go on
            if type(err).__name__ == "WorkerLost":  # the engine is gone: nothing to go on with
                end_answer("".join(parts))
                raise
            out.error(str(err), describe(err).hint)
            continue
        end_answer("".join(parts))
        for note in last.stats.notes:
            out.info(f"[yellow]note:[/] {note}")
        out.info(f"[dim]{stats_line(last.stats, last.finish_reason)}[/]")
        if (full := _cache_disk_full(runner)) is not None:
            out.error(str(full), describe(full).hint)


def _split_run_args(first: str | None, second: str | None) -> tuple[str | None, str | None]:
    """`infer run MODEL PROMPT`, `infer run MODEL`, or `infer run PROMPT` (default model)."""
    if second is not None or first is None:
        return first, second
    from infer_cli.models.registry import load_catalog, parse_ref

    if any(c.isspace() for c in first):
        return None, first
    try:
        parse_ref(first, load_catalog())
    except InferError:
        return None, first
    return first, None


@option_groups
def run(
    model: Annotated[Optional[str], typer.Argument(
        help="Model reference (see `infer pull --help`), or the prompt when only one argument "
             "is given and it is not a model.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Argument(
        help="The prompt. Read from stdin when piped; without one, an interactive chat.",
        show_default=False)] = None,
    *,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion, no chat template.")] = False,
    sampling_args: SamplingArgs,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-text token.")] = False,
    engine_args: EngineArgs,
    truncate: Annotated[bool, typer.Option("--truncate", help="Keep the end of a prompt longer than the context instead of refusing it.")] = False,
    no_prompt_cache: Annotated[bool, typer.Option("--no-prompt-cache", help="Do not reuse or save prompt KV state on disk.")] = False,
    draft: Annotated[Optional[str], typer.Option("--draft", help="Speculative decoding with this draft model (same tokenizer); auto: the draft partner from models.toml.", show_default=False)] = None,
    lookup: Annotated[bool, typer.Option("--lookup", help="Speculative decoding with drafts looked up in the prompt and the text so far (no second model).")] = False,
    draft_max: Annotated[int, typer.Option("--draft-max", help="Most tokens drafted per step (a draft model stops sooner where it is unsure; lookup's length follows acceptance).")] = 16,
    draft_p_min: Annotated[float, typer.Option("--draft-p-min", help="A draft model stops drafting when its top choice is less likely than this (among its 10 best).")] = 0.5,
    revision: RevisionOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Generate text from a model, streaming it to stdout; statistics go to stderr."""
    from infer_cli.engine import isolated
    from infer_cli.engine import runner as engine_runner
    from infer_cli.models import store

    model, prompt = _split_run_args(model, prompt)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is None and json_mode:
        raise typer.BadParameter("--json needs a prompt", param_hint="PROMPT")
    if draft and lookup:
        raise typer.BadParameter("choose one of --draft and --lookup", param_hint="--draft")
    opts = engine_args.options()
    out = output(json_mode)
    with out.transfer() as progress:
        resolved = store.resolve(model, revision=revision, progress=progress)
    store.touch(resolved)
    sampling = sampling_args.sampling(resolved.entry)
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
    spec = engine_runner.SpecSettings(draft_model, lookup, max(1, draft_max), draft_p_min) \
        if (draft_model or lookup) else None
    settings = engine_runner.RunSettings(sampling_args.system, raw, sampling_args.max_tokens,
                                         sampling_args.stops, ignore_eos, truncate,
                                         not no_prompt_cache, sampling, spec)
    runner = isolated.open_runner(resolved, opts, settings)  # --rpc: in a child process
    if prompt is None:
        raise typer.Exit(interactive(runner, out))
    raise typer.Exit(one_shot(runner, prompt, out, json_mode=json_mode, resolved=resolved))


def register(app) -> None:
    app.command()(run)
