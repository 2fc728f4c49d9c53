"""`infer batch`: a JSONL file of prompts through the batching engine, results as JSONL.

Only parsing, files and rendering here; the work is ``engine.batch`` on ``engine.scheduler``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from infer_cli.cli.options import (EngineArgs, JsonOpt, ParallelOpt, RevisionOpt, SamplingArgs,
                                   option_groups)
from infer_cli.cli.output import output
from infer_cli.errors import human_bytes


def register(app) -> None:
    app.command("batch")(batch)


def _split_args(first: str, second: str | None) -> tuple[str | None, str]:
    """`infer batch MODEL INPUT` or `infer batch INPUT` (the default model)."""
    return (None, first) if second is None else (first, second)


@option_groups
def batch(
    model: Annotated[str, typer.Argument(
        help="Model reference (see `infer pull --help`); omit it for the default model.",
        show_default=False)],
    input_path: Annotated[Optional[str], typer.Argument(
        metavar="INPUT.jsonl", help="One JSON object per line: {\"id\", \"prompt\"} or {\"id\", "
        "\"messages\"}, optional max_tokens, temperature, top_p, top_k, min_p, seed, stop, system. "
        "- reads stdin.", show_default=False)] = None,
    output_path: Annotated[str, typer.Option(
        "--output", "-o", help="Where the results go, one JSON line per input line in input order; - "
        "is stdout. Run again with the same file to skip the lines it already holds.")] = "-",
    parallel: ParallelOpt = 4,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Record a malformed line as an error and go on, instead of stopping.")] = False,
    no_share: Annotated[bool, typer.Option(
        "--no-prefix-sharing", help="Compute every prompt in full, even where prompts start alike.")] = False,
    *,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion, no chat template.")] = False,
    sampling_args: SamplingArgs,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-text token.")] = False,
    engine_args: EngineArgs,
    revision: RevisionOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Generate for every line of a JSONL file, N sequences at a time in one batch.

    --ctx is the KV cache shared by all sequences (as llama-server's -c): each may grow to all of
    it, and when it is full the newest is paused and recomputed later."""
    model_ref, source = _split_args(model, input_path)
    opts = engine_args.options(parallel)
    out = output(json_mode)
    to_stdout = output_path == "-"
    # Held to the end: a second `infer batch` on the same output is refused, before it reads
    # (and trims a torn last line of) a file another run is appending to.
    folder = Path(output_path).parent if not to_stdout else None
    from infer_cli.files import exclusive

    lock = exclusive(output_path) if folder is not None and folder.is_dir() else contextlib.nullcontext()
    with lock:
        _batch_locked(out, json_mode, model_ref, source, output_path, to_stdout, opts, parallel,
                      skip_bad, no_share, raw, sampling_args, ignore_eos, revision)


def _batch_locked(out, json_mode, model_ref, source, output_path, to_stdout, opts, parallel,
                  skip_bad, no_share, raw, sampling_args, ignore_eos, revision) -> None:
    from infer_cli.engine import batch as jobs_lib
    from infer_cli.models import store

    done = set() if to_stdout else _check_output(Path(output_path))
    jobs = jobs_lib.read_jobs(_lines(source), "stdin" if source == "-" else source, skip_bad=skip_bad)
    todo = [j for j in jobs if j.key not in done]
    if not todo:
        note = "the input is empty" if not jobs else f"all {len(jobs)} lines are already in {output_path}"
        out.info(f"Nothing to do: {note}.")
        if json_mode and not to_stdout:
            out.json({**jobs_lib.Summary(lines=len(jobs), skipped=len(jobs)).as_dict()})
        return
    with out.transfer() as progress:
        resolved = store.resolve(model_ref, revision=revision, progress=progress)
    store.touch(resolved)
    sampling = sampling_args.sampling(resolved.entry)
    from infer_cli.engine.isolated import IsolatedBatch, batch_engine

    # with RPC workers the engine runs in a child process: a worker that dies cannot abort this one
    engine = batch_engine(resolved, opts, share_prefixes=not no_share)
    try:
        _run_loaded(out, json_mode, engine, jobs, todo, output_path, to_stdout, sampling_args,
                    sampling, raw, ignore_eos)
    finally:
        if isinstance(engine, IsolatedBatch):
            engine.close()


def _run_loaded(out, json_mode, engine, jobs, todo, output_path, to_stdout, sampling_args,
                sampling, raw, ignore_eos) -> None:
    from infer_cli.engine import batch as jobs_lib

    for note in engine.notes:
        out.info(f"[yellow]note:[/] {note}")
    defaults = jobs_lib.Defaults(sampling, sampling_args.max_tokens, sampling_args.stops,
                                 sampling_args.system, raw, ignore_eos)
    # A file gets whole lines only: a write the disk has no room for is cut back (DiskFull).
    from infer_cli.files import LineAppender

    sink = sys.stdout if to_stdout else LineAppender(output_path)
    try:
        def write(rec: dict) -> None:
            if to_stdout:
                sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                sink.flush()
            else:
                sink.write_line(json.dumps(rec, ensure_ascii=False))

        sched = _Watched(engine.scheduler)
        with _progress(out, len(todo)) as tick:
            summary = jobs_lib.run_jobs(sched, engine.model, engine.template, todo,
                                        defaults, write=write, progress=tick)
    finally:
        if not to_stdout:
            sink.close()
    if sched.lost is not None:  # every finished line is written; a rerun completes the rest
        raise sched.lost
    summary.skipped = len(jobs) - len(todo)
    _report(out, summary, engine, json_mode and not to_stdout)
    if summary.interrupted:
        raise typer.Exit(130)


class _WorkerGone(KeyboardInterrupt):
    """A lost RPC worker ends the run the way Ctrl-C does: ``run_jobs`` writes every finished
    line and cancels the rest; the command then reports the worker."""


class _Watched:
    """The scheduler, with a lost worker (the engine's child process died) turned into
    ``_WorkerGone`` and kept in ``lost``."""

    def __init__(self, sched):
        self._sched, self.lost = sched, None

    def __getattr__(self, name):
        return getattr(self._sched, name)

    def step(self):
        from infer_cli.errors import WorkerLost

        try:
            return self._sched.step()
        except WorkerLost as e:
            self.lost = e
            raise _WorkerGone() from None


def _lines(source: str):
    if source == "-":
        return iter(sys.stdin.readline, "")
    try:
        with open(source, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        raise typer.BadParameter(f"{source} does not exist", param_hint="INPUT.jsonl") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"{source} cannot be read: {e.__class__.__name__}",
                                 param_hint="INPUT.jsonl") from None


def _check_output(path: Path) -> set[str]:
    """Refuse an output file that cannot be written before any model is loaded; return the ids
    it already holds complete. A torn last line (a run killed mid-write) is cut off."""
    from infer_cli.engine.batch import completed_ids

    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder", param_hint="--output")
    if not folder.is_dir():
        raise typer.BadParameter(f"the folder {folder} does not exist", param_hint="--output")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise typer.BadParameter(f"{path} cannot be written (permission denied)", param_hint="--output")
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return completed_ids(data.decode("utf-8", "replace").splitlines())


class _progress:
    """A rich progress bar on stderr when it is a terminal: lines done, tokens/s, ETA."""

    def __init__(self, out, total: int):
        self.out, self.total, self.bar = out, total, None

    def __enter__(self):
        if not sys.stderr.isatty():
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[tps]}"), TimeRemainingColumn(),
                            console=self.out.err, transient=True)
        self.bar.start()
        self.task = self.bar.add_task("batch", total=self.total, tps="")
        return self.tick

    def tick(self, summary) -> None:
        done = summary.errors + len(summary.ttfts)
        self.bar.update(self.task, completed=min(done, self.total),
                        tps=f"{summary.throughput:.1f} tokens/s")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _report(out, summary, engine, as_json: bool) -> None:
    d = summary.as_dict()
    s = engine.scheduler.stats
    d.update({"parallel": engine.context.n_seq, "n_ctx": engine.context.n_ctx,
              "decoded_tokens": s.decoded_tokens, "shared_tokens": s.shared_tokens,
              "preempted": s.preempted, "kv_bytes": engine.context.kv_bytes})
    if as_json:
        out.json(d)
        return
    p50, p95 = d["ttft_p50_s"], d["ttft_p95_s"]
    ttft = f"first token p50 {p50:.2f} s, p95 {p95:.2f} s" if p50 is not None else "no tokens"
    parts = [f"{d['lines']} lines" + (f" ({d['skipped']} already done)" if d["skipped"] else ""),
             f"{d['errors']} errors" if d["errors"] else None,
             f"generated {d['completion_tokens']} tokens in {d['wall_s']:.1f} s, "
             f"{d['throughput_tps']:.1f} tokens/s", ttft,
             f"prompt {d['prompt_tokens']} tokens ({d['cached_tokens']} shared)",
             f"{d['parallel']} sequences, KV {d['n_ctx']} cells"
             + (f" ({human_bytes(d['kv_bytes'])})" if d["kv_bytes"] else ""),
             "interrupted" if d["interrupted"] else None]
    out.info("[dim]" + " · ".join(p for p in parts if p) + "[/]")
