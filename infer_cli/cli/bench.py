"""`infer bench`: the trade-off table, measured for one model on this machine. Parses, calls
``infer_cli.bench``, renders; the measuring itself lives in the library package."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from infer_cli.cli.options import JsonOpt, ModelArg, RevisionOpt, RpcOpt, ThreadsOpt

SECTION_NAMES = ("precision", "kv", "flash-attn", "batching", "speculative")


# bench's --ctx is the long context of the KV-cache and flash-attention sections, not the
# context every run uses (the speed sections size theirs to the prompt and the answer)
LongCtxOpt = Annotated[Optional[int], typer.Option(
    "--ctx", "-c", help="The long context of the KV-cache and flash-attention sections, in tokens "
    "(default: 4096, with --quick 1024; at most the model's training context).", show_default=False)]

def register(app) -> None:
    """Add the `bench` command to the Typer app."""
    app.command(name="bench")(bench_cmd)


def bench_cmd(
    model: ModelArg = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="A smaller set: one repetition, short texts and a 1024-token long context.")] = False,
    only: Annotated[Optional[str], typer.Option(
        "--only", help="Sections to measure, comma-separated: " + ", ".join(SECTION_NAMES) + ".",
        show_default=False)] = None,
    reps: Annotated[Optional[int], typer.Option(
        "--reps", help="Repetitions of each speed (medians of alternating runs). Default: 3, "
        "1 with --quick.", show_default=False)] = None,
    ctx: LongCtxOpt = None,
    threads: ThreadsOpt = None,
    quants: Annotated[Optional[str], typer.Option(
        "--quants", help="Precisions to compare, comma-separated (default: F16,Q8_0,Q4_K_M,Q2_K); "
        "made with `infer quantize` into $INFER_HOME/bench/quants when not beside the model.",
        show_default=False)] = None,
    draft: Annotated[Optional[str], typer.Option(
        "--draft", help="Draft model for speculative decoding (default: the partner models.toml "
        "names).", show_default=False)] = None,
    eval_text: Annotated[Optional[Path], typer.Option(
        "--eval-text", help="Text for perplexity and KL divergence (default: that of `infer "
        "quantize`).", show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option(
        "--plot", help="Draw quality against size and speed, and batching throughput, to "
        "FILE.png or FILE.svg (needs matplotlib: infer-cli[plot]).", show_default=False)] = None,
    rpc: RpcOpt = None,
    show: Annotated[bool, typer.Option(
        "--show", help="Print the last saved result for this model, machine and llama.cpp build "
        "without measuring.")] = False,
    revision: RevisionOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Measure what each technique buys for a model on this machine: precision, KV cache type,
    flash attention, batching and speculative decoding; speed gain, quality impact, memory."""
    from infer_cli.bench import plot as plotting
    from infer_cli.bench import results
    from infer_cli.cli.options import parse_rpc
    from infer_cli.cli.output import output
    from infer_cli.errors import BadOption

    out = output(json_mode)
    endpoints = parse_rpc(rpc)
    sections = _parse_only(only)
    if reps is not None and reps < 1:
        raise BadOption("--reps", str(reps), "1 or more")
    if plot is not None:
        plotting.check(plot)  # before anything is measured
    from infer_cli.models import store

    with out.transfer() as progress:
        resolved = store.resolve(model, revision=revision, progress=progress)
    if not endpoints and resolved.entry is not None:  # the workers models.toml names for it
        endpoints = tuple(getattr(resolved.entry, "rpc", ()) or ())
    fp = results.fingerprint(resolved.path)
    machine, build = results.machine(endpoints), results.build()
    if show:
        doc, path = results.last(fp, machine["key"], build["key"], any_machine=True)
        if doc is None:
            raise results.NoSavedResult(resolved.name)
        if doc["machine"]["key"] != machine["key"] or doc["build"]["key"] != build["key"]:
            out.warn("this result was measured on another machine or llama.cpp build")
        _render(out, doc, json_mode, source=path)
        if plot is not None:
            out.info(f"drew {plotting.draw(doc, plot)}")
        return
    raise typer.Exit(_measure(out, resolved, fp, machine, build, sections=sections, quick=quick,
                              reps=reps, ctx=ctx, threads=threads, quants=quants, draft=draft,
                              eval_text_path=eval_text, plot=plot, json_mode=json_mode,
                              rpc=endpoints))


def _parse_only(only: str | None) -> tuple[str, ...]:
    from infer_cli.errors import BadOption

    if not only:
        return SECTION_NAMES
    picked = []
    for part in (p.strip().lower() for p in only.split(",")):
        if not part:
            continue
        name = {"flash": "flash-attn", "fa": "flash-attn", "flash_attn": "flash-attn",
                "spec": "speculative", "batch": "batching", "quant": "precision"}.get(part, part)
        if name not in SECTION_NAMES:
            raise BadOption("--only", part, "sections among " + ", ".join(SECTION_NAMES))
        if name not in picked:
            picked.append(name)
    if not picked:
        raise BadOption("--only", only, "one or more of " + ", ".join(SECTION_NAMES))
    return tuple(n for n in SECTION_NAMES if n in picked)


def _measure(out, resolved, fp, machine, build, *, sections, quick, reps, ctx, threads, quants,
             draft, eval_text_path, plot, json_mode, rpc=()) -> int:
    from infer_cli.bench import results
    from infer_cli.bench.sections import DEFAULT_QUANTS, Bench, Settings
    from infer_cli.models import store
    from quantize import api
    from quantize.report import eval_text

    text = eval_text(eval_text_path) if eval_text_path else None
    qnames = tuple(t.name for t in api.parse_targets(quants)) if quants else DEFAULT_QUANTS
    draft_path = draft_name = no_draft = None
    if "speculative" in sections:
        ref = draft or (resolved.entry.draft if resolved.entry else None)
        if ref is None:
            no_draft = (f"no draft model: models.toml names none for {resolved.name}; "
                        "--draft MODEL gives one")
        else:
            try:
                with out.transfer() as progress:
                    d = store.resolve(ref, download=draft is not None, progress=progress)
                draft_path, draft_name = d.path, d.name
            except Exception as e:  # noqa: BLE001 - a missing draft skips its row, not the bench
                from infer_cli.errors import InferError

                if not isinstance(e, InferError):
                    raise
                no_draft = f"the draft {ref} is not usable: {e}"
    settings = Settings(model=resolved.path, name=resolved.name, quick=quick,
                        reps=reps or (1 if quick else 3), ctx=ctx, threads=threads, quants=qnames,
                        only=sections, draft=draft_path, draft_name=draft_name, no_draft=no_draft,
                        eval_text=text, cache_dir=results.quant_cache(fp), rpc=tuple(rpc))
    started = time.time()
    if rpc:  # measured in a child process: a worker that dies cannot abort this one
        from infer_cli.bench.isolated import IsolatedBench

        bench = IsolatedBench(settings)
    else:
        bench = Bench(settings)
    try:
        return _measured(out, bench, resolved, fp, machine, build, sections=sections, quick=quick,
                         threads=threads, qnames=qnames, draft_path=draft_path,
                         eval_text_path=eval_text_path, plot=plot, json_mode=json_mode,
                         started=started, rpc=rpc)
    finally:
        if rpc:
            bench.close()


def _measured(out, bench, resolved, fp, machine, build, *, sections, quick, threads, qnames,
              draft_path, eval_text_path, plot, json_mode, started, rpc) -> int:
    from infer_cli.bench import results

    out.info(f"[dim]calibrating {resolved.name}…[/]")
    est = bench.estimate()
    total = sum(est.values())
    out.info(f"Estimated time: {_duration(total)} ("
             + ", ".join(f"{k} {_duration(v)}" for k, v in est.items()) + ")")
    done: list = []
    interrupted = False
    try:
        with _Bars(out) as progress:
            for sec in bench.run(progress, est):
                done.append(sec)
                if sec.status == "skipped":
                    out.info(f"[yellow]{sec.name}: skipped[/] ({sec.reason})")
                elif not json_mode:
                    out.info(f"{sec.name}: done in {_duration(sec.seconds)}")
                for n in sec.notes:
                    if n.startswith(("the machine was busy", "other processes used")):
                        out.warn(f"{sec.name}: {n}")
    except KeyboardInterrupt:
        interrupted = True
        out.info("\n[yellow]Interrupted:[/] keeping the sections finished so far")
    finished = {s.name for s in done}
    dicts = [s.as_dict() for s in done]
    if interrupted:
        for name in sections:
            if name not in finished:
                dicts.append({"name": name, "title": name, "status": "interrupted",
                              "reason": "interrupted (Ctrl-C)", "baseline": None, "rows": [],
                              "notes": [], "load": None, "seconds": 0.0, "estimate_s": est.get(name, 0.0)})
    model_info = {"name": resolved.name, "path": str(resolved.path), "fingerprint": fp,
                  "type": bench.src_type, "size": resolved.path.stat().st_size,
                  "n_params": bench.info.n_params}
    from infer_cli.engine import default_threads

    settings_doc = {"quick": quick, "reps": bench.reps, "ctx": bench.ctx,
                    "threads": threads or bench.base.threads or default_threads(), "quants": list(qnames),
                    "only": list(sections), "draft": str(draft_path) if draft_path else None,
                    "eval_text": str(eval_text_path) if eval_text_path else "default",
                    "rpc": list(rpc)}
    doc = results.document(model=model_info, machine_info=machine, build_info=build,
                           settings=settings_doc, sections=dicts, started=started,
                           interrupted=interrupted, notes=bench.notes, estimate_s=round(total, 1))
    old, _ = results.last(fp, machine["key"], build["key"])
    if old is not None:
        doc["comparison"] = results.compare(old, doc)
        if not interrupted:
            doc = results.carry_over(old, doc)
    path = None
    if done:
        path = results.save(doc)
    _render(out, doc, json_mode, saved=path)
    if plot is not None and done:
        from infer_cli.bench import plot as plotting

        out.info(f"drew {plotting.draw(doc, plot)}")
    return 130 if interrupted else 0


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s:02d} s"


class _Bars:
    """One rich bar over the estimated seconds of the whole bench, on a terminal only."""

    def __init__(self, out):
        self.out, self.bars, self.task = out, None, None

    def __enter__(self):
        if self.out.quiet or not self.out.err.is_terminal:
            return None
        from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                             TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                             TextColumn("left"), TimeRemainingColumn(), console=self.out.err,
                             transient=True)
        self.bars.__enter__()
        self.task = self.bars.add_task("starting", total=1.0)
        return self.update

    def update(self, label: str, done: float, total: float) -> None:
        self.bars.update(self.task, description=label, completed=min(done, total), total=total)

    def __exit__(self, *exc):
        if self.bars is not None:
            self.bars.__exit__(*exc)
        return False


# --- rendering --------------------------------------------------------------------------------

def _render(out, doc: dict, json_mode: bool, *, saved=None, source=None) -> None:
    if json_mode:
        out.json(doc)
        return
    from rich.markup import escape
    from rich.text import Text

    from infer_cli.cli.output import display_path

    m, mach = doc["model"], doc["machine"]
    s = doc["settings"]
    name = Path(m["name"]).name if m["name"].endswith(".gguf") else m["name"]
    out.result(f"[bold]{escape(name)}[/] ({m.get('type')}, {_mib(m.get('size'))}) on {mach.get('cpu')}, "
               f"{s.get('threads')} threads, llama.cpp {(doc['build'].get('commit') or doc['build'].get('binding') or '')[:12]}"
               f"; {'quick, ' if s.get('quick') else ''}{s.get('reps')} repetition(s), measured {doc.get('finished')}"
               f" in {_duration(doc.get('seconds') or 0)}")
    from infer_cli.cli.output import Column, table

    cols = (Column("technique"), Column("speed gain", right=True), Column("quality impact"),
            Column("memory change", right=True), Column("note", long=True))
    rows = []
    for r in doc["summary"]:
        if r.get("skipped"):
            rows.append((r["technique"], "—", "skipped", "—", r["skipped"]))
            continue
        rows.append((r["technique"], _gain(r.get("speed_gain")), _quality(r), _memory(r), _basis(r)))
    out.result("")
    out.result(Text("Trade-offs", style="bold"))
    out.result(table(cols, rows, out.width))
    for sec in doc["sections"]:
        _section(out, sec, doc)
    for n in doc.get("notes") or []:
        out.result(f"[yellow]note:[/] {n}")
    comp = doc.get("comparison")
    if comp:
        _comparison(out, comp)
    if doc.get("interrupted"):
        out.result("[yellow]Interrupted: the sections above are those finished.[/]")
    if saved:
        out.info(f"[dim]saved {display_path(saved)}[/]")
    if source:
        out.info(f"[dim]from {display_path(source)}[/]")


def _gain(x) -> str:
    return f"{x:.2f}x" if x else "—"


def _pct(x) -> str:
    return f"{x:+.0%}" if x is not None else "—"


def _mib(n) -> str:
    """A size as short as it reads well: '258 MiB', '22.5 MiB', '1.2 GiB'."""
    from infer_cli.errors import human_bytes

    if not n:
        return "—"
    text = human_bytes(n)
    num, _, unit = text.partition(" ")
    try:
        return f"{float(num):.0f} {unit}" if float(num) >= 100 else text
    except ValueError:
        return text


def _quality(r: dict) -> str:
    if r.get("kl_mean") is not None:
        text = f"KL {r['kl_mean']:.4f}"
        if r.get("ppl_change") is not None:
            text += f", ppl {r['ppl_change']:+.1%}"
        return text
    return r.get("quality") or "—"


def _memory(r: dict) -> str:
    short = {"weights + KV + buffers": "total", "KV cache": "KV", "compute buffer": "compute",
             "draft model": "draft"}
    what = short.get(r.get("memory_basis") or "", "")
    if r.get("memory_added"):
        return f"+{_mib(r['memory_added'])} {what}".rstrip()
    if r.get("memory_change") is not None:
        return f"{_pct(r['memory_change'])} {what}".rstrip()
    return "none" if r.get("memory_basis") == "none" else "—"


def _basis(r: dict) -> str:
    parts = []
    if r.get("speed_basis"):
        parts.append(r["speed_basis"])
    if r.get("decode_gain"):
        parts.append(f"decode {r['decode_gain']:.2f}x")
    if r.get("per_sequence"):
        parts.append(f"per sequence {r['per_sequence']:.2f}x")
    if r.get("acceptance") is not None:
        parts.append(f"acceptance {r['acceptance']:.0%}")
    if r.get("baseline"):
        parts.append(f"against {r['baseline']}")
    return "; ".join(parts)


def _sp(m) -> str:
    """A speed with its spread: '170.0 (152.1-172.4)'."""
    if not isinstance(m, dict) or m.get("median") is None:
        return "—"
    text = f"{m['median']:.1f}"
    if len(m.get("reps") or []) > 1:
        text += f" ({m['min']:.1f}-{m['max']:.1f})"
    return text


COLUMNS = {
    "precision": (("type", lambda r: r["label"]), ("size", lambda r: _mib(r["metrics"].get("size"))),
                  ("memory", lambda r: _mib(r["metrics"].get("memory_bytes"))),
                  ("prefill t/s", lambda r: _sp(r["metrics"].get("prefill_tps"))),
                  ("decode t/s", lambda r: _sp(r["metrics"].get("decode_tps"))),
                  ("KL mean", lambda r: _q(r, "kl_mean", "{:.4f}")), ("KL p99", lambda r: _q(r, "kl_p99", "{:.4f}")),
                  ("top-1", lambda r: _q(r, "top1", "{:.1%}")), ("ppl", lambda r: _q(r, "ppl", "{:.3f}"))),
    "kv": (("KV type", lambda r: r["label"]), ("KV size", lambda r: _mib(r["metrics"].get("kv_bytes"))),
           ("decode t/s (full)", lambda r: _sp(r["metrics"].get("decode_tps"))),
           ("prefill t/s (long)", lambda r: _sp(r["metrics"].get("prefill_tps"))),
           ("KL mean", lambda r: _q(r, "kl_mean", "{:.4f}")), ("KL p99", lambda r: _q(r, "kl_p99", "{:.4f}")),
           ("top-1", lambda r: _q(r, "top1", "{:.1%}"))),
    "flash-attn": (("flash attention", lambda r: r["label"]),
                   ("prefill t/s", lambda r: _sp(r["metrics"].get("prefill_tps"))),
                   ("decode t/s", lambda r: _sp(r["metrics"].get("decode_tps"))),
                   ("prefill t/s (long)", lambda r: _sp(r["metrics"].get("prefill_long_tps"))),
                   ("decode t/s (long)", lambda r: _sp(r["metrics"].get("decode_long_tps"))),
                   ("compute buffer", lambda r: _mib(r["metrics"].get("compute_bytes")))),
    "batching": (("sequences", lambda r: r["label"]),
                 ("total t/s", lambda r: _sp(r["metrics"].get("throughput_tps"))),
                 ("per sequence t/s", lambda r: _sp(r["metrics"].get("per_sequence_tps"))),
                 ("KV", lambda r: _mib(r["metrics"].get("kv_bytes")))),
    "speculative": (("drafts from", lambda r: r["label"]),
                    ("plain t/s", lambda r: _sp(r["metrics"].get("plain_tps"))),
                    ("speculative t/s", lambda r: _sp(r["metrics"].get("speculative_tps"))),
                    ("speed-up", lambda r: _gain(r["metrics"].get("speedup"))),
                    ("acceptance", lambda r: _accept(r["metrics"].get("acceptance")))),
}


def _q(r: dict, key: str, fmt: str) -> str:
    q = r["metrics"].get("quality") or {}
    return fmt.format(q[key]) if q.get(key) is not None else "—"


def _accept(m) -> str:
    if not isinstance(m, dict) or m.get("median") is None:
        return "—"
    return f"{m['median']:.0%}"


def _section(out, sec: dict, doc: dict) -> None:
    from rich.markup import escape
    from rich.text import Text

    from infer_cli.cli.output import Column, table

    title = sec.get("title") or sec["name"]
    if sec.get("carried_from"):
        title += f" (from the run of {sec['carried_from']})"
    out.result("")
    if sec["status"] != "done":
        out.result(f"[bold]{escape(title)}[/]: {sec['status']} ({escape(sec.get('reason') or '')})")
        return
    cols = COLUMNS[sec["name"]]
    columns = [Column(name, right=i > 0) for i, (name, _) in enumerate(cols)]
    rows = [[f(r) for _, f in cols] for r in sec["rows"] if not r.get("skipped")]
    out.result(Text(title, style="bold"))
    if rows:
        out.result(table(columns, rows, out.width))
    for r in sec["rows"]:
        if r.get("skipped"):
            out.result(f"  {escape(r['label'])}: skipped ({escape(r['skipped'])})")
    for r in sec["rows"]:
        for n in r.get("notes") or []:
            out.result(f"  [dim]{escape(r['label'])}: {escape(n)}[/]")
    for n in sec.get("notes") or []:
        out.result(f"  [dim]{escape(n)}[/]")


def _comparison(out, comp: dict) -> None:
    changed = comp.get("changed") or []
    line = (f"\nCompared with the run of {comp.get('previous')}: {comp.get('unchanged', 0)} measures "
            f"within 10%, {len(changed)} changed")
    if comp.get("settings_differ"):
        line += f" (settings differ: {', '.join(comp['settings_differ'])})"
    out.result(line + (":" if changed else "."))
    for c in changed:
        rel = f" ({c['change']:+.0%})" if c.get("change") is not None else ""
        fmt = "{:.4f}" if c["metric"] == "kl_mean" else "{:.1f}"
        out.result(f"  {c['section']} {c['row']} {c['metric']}: {fmt.format(c['old'])} -> "
                   f"{fmt.format(c['new'])}{rel}")
