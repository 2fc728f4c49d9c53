"""`infer quantize`: the command's front door. Parses, calls the quantize package, renders.

Everything heavy (llama_cpp, numpy, gguf, the quantize package) is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from quantize.types import TYPES, names

_TO_HELP = ("Target precisions, comma-separated: " + ", ".join(names())
            + ". `--list` describes them.")


def register(app) -> None:
    """Add the `quantize` command to the Typer app."""
    app.command(name="quantize")(quantize_cmd)


def quantize_cmd(
    source: Annotated[Optional[str], typer.Argument(
        help="A GGUF file, a Hugging Face checkpoint folder (config.json, *.safetensors, "
             "tokenizer files), or a hub repo id (org/name: its checkpoint files are fetched "
             "into the Hugging Face cache).", show_default=False)] = None,
    to: Annotated[Optional[str], typer.Option("--to", help=_TO_HELP, show_default=False)] = None,
    output_dir: Annotated[Optional[Path], typer.Option(
        "--output-dir", "-o", help="Folder for the outputs (default: beside the source).",
        show_default=False)] = None,
    list_types: Annotated[bool, typer.Option("--list", help="List the precisions and exit.")] = False,
    allow_requantize: Annotated[bool, typer.Option(
        "--allow-requantize", help="Quantize a GGUF that is already quantized (losses compound).")] = False,
    imatrix: Annotated[Optional[str], typer.Option(
        "--imatrix", help="Importance matrix (required for IQ1/IQ2 types): auto (made from the "
        "unquantized source on --calibration text and cached), or a FILE from `infer imatrix` or "
        "llama-imatrix.", show_default=False)] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="Text for --imatrix auto (default: the prose and code that ship "
        "with infer).", show_default=False)] = None,
    imatrix_chunks: Annotated[Optional[int], typer.Option(
        "--imatrix-chunks", help="Most 512-token chunks of the text --imatrix auto uses "
        "(default: all).", show_default=False)] = None,
    output_tensor_type: Annotated[Optional[str], typer.Option(
        "--output-tensor-type", help="Tensor type for output.weight, e.g. q8_0.", show_default=False)] = None,
    token_embedding_type: Annotated[Optional[str], typer.Option(
        "--token-embedding-type", help="Tensor type for token_embd.weight.", show_default=False)] = None,
    pure: Annotated[bool, typer.Option("--pure", help="Every tensor at the target type, no k-quant mix.")] = False,
    tensor_type: Annotated[Optional[list[str]], typer.Option(
        "--tensor-type", help="Per-tensor override NAME=TYPE, NAME a regex (repeatable), "
        "e.g. attn_v=q8_0.", show_default=False)] = None,
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="GGUF to compare against (default: the unquantized source).",
        show_default=False)] = None,
    eval_text: Annotated[Optional[Path], typer.Option(
        "--eval-text", help="Text for perplexity and KL divergence (default: English prose "
        "from Python's own documentation).", show_default=False)] = None,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Tokens of the text to evaluate.")] = 2048,
    no_report: Annotated[bool, typer.Option("--no-report", help="Skip the measurements.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads.", show_default=False)] = None,
    json_mode: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    revision: Annotated[Optional[str], typer.Option(
        "--revision", help="Hub branch, tag or commit of a repo id SOURCE (default: main).",
        show_default=False)] = None,
) -> None:
    """Convert a checkpoint to GGUF and quantize it to llama.cpp precisions, then measure each
    output's size, speed and quality."""
    from infer_cli.cli.output import Output

    out = Output(json_mode=json_mode)
    if list_types:
        _print_list(out, json_mode)
        return
    if source is None or not to:
        raise typer.BadParameter("give SOURCE and --to TYPES (or --list)", param_hint="SOURCE")
    from quantize import api
    from quantize.llama_quant import QuantOptions

    targets = api.parse_targets(to)
    auto = _auto_imatrix(imatrix, calibration, imatrix_chunks, threads)
    opts = QuantOptions(allow_requantize=allow_requantize,
                        imatrix=Path(imatrix).expanduser() if imatrix and auto is None else None,
                        output_tensor_type=output_tensor_type,
                        token_embedding_type=token_embedding_type, pure=pure,
                        tensor_types=api.parse_tensor_types(tensor_type or []),
                        threads=threads or 0, auto_imatrix=auto)
    from contextlib import nullcontext

    from quantize.hub_source import looks_like_repo_id

    # a hub source's files: bytes, speed and time left, as `infer pull` shows them
    bars = out.transfer() if looks_like_repo_id(source) else nullcontext()
    with bars as download:
        plan = api.make_plan(source, targets, output_dir, opts, revision=revision, download=download)
    for note in plan.notes:
        out.info(f"Note: {escape(note)}")
    text = None
    if not no_report:
        from quantize.report import eval_text as read_text

        text = read_text(eval_text)  # a bad --eval-text fails before any work
    with _tensor_bars(out) as progress:
        chunks_done = (lambda done, total, ppl: progress(
            "imatrix", done, total, unit=f"chunks, running perplexity {ppl:.3f}")) if progress else None
        results, base = api.run(plan, opts, progress=progress, imatrix_progress=chunks_done,
                                notice=lambda msg: out.info(escape(msg)))
    try:
        for r in results:
            for w in (w for w in r.warnings if w not in plan.notes):  # notes were shown before
                out.warn(w)
            out.info(f"wrote {r.path}")
        if no_report:
            if json_mode:
                out.json({"outputs": [_result_dict(r) for r in results]})
            return
        ref = reference or api.default_reference(plan)
        with _tensor_bars(out) as progress:  # the same types without the imatrix, to compare
            baselines = api.without_imatrix(plan, results, opts, progress=progress)
        try:
            _report(out, ref, results, text, eval_tokens, threads, json_mode, plan.outdir,
                    baselines, plan.imatrix)
        finally:
            for b in baselines.values():
                api.discard(b.path)
    finally:
        api.discard(base)


def _auto_imatrix(imatrix: str | None, calibration: Path | None, chunks: int | None,
                  threads: int | None):
    """--imatrix auto's settings (None for a FILE or no imatrix); a bad --calibration fails
    here, before any work."""
    if imatrix is None or imatrix.strip().lower() != "auto":
        for name, value in (("--calibration", calibration), ("--imatrix-chunks", chunks)):
            if value is not None:
                raise typer.BadParameter("only with --imatrix auto", param_hint=name)
        return None
    from quantize.imatrix_make import ImatrixSpec, calibration_text

    if chunks is not None and chunks < 1:
        raise typer.BadParameter("one or more", param_hint="--imatrix-chunks")
    calibration_text(calibration)
    return ImatrixSpec(calibration, chunks, threads=threads)


def _result_dict(r) -> dict:
    return {"type": r.qtype, "path": str(r.path), "size": r.size, "bpw": r.bpw, "seconds": r.seconds,
            "imatrix": getattr(r, "imatrix", None)}


def _print_list(out, json_mode: bool) -> None:
    if json_mode:
        out.json([{"name": t.name, "bpw": t.bpw, "description": t.description,
                   "needs_imatrix": t.needs_imatrix} for t in TYPES])
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("type")
    table.add_column("bits/weight", justify="right")
    table.add_column("description")
    for t in TYPES:
        table.add_row(t.name, f"{t.bpw:.2f}", t.description)
    out.result(table)


def _report(out, ref: Path, results, text, eval_tokens, threads, json_mode, workdir,
            baselines=None, imatrix=None) -> None:
    from quantize.report import iter_rows

    from infer_cli.errors import human_bytes

    rows = []
    for row in iter_rows(Path(ref), results, text=text, eval_tokens=eval_tokens,
                         threads=threads, workdir=workdir, baselines=baselines):
        rows.append(row)
        if not json_mode:
            out.info(f"measured {_row_name(row, baselines)}")
    if json_mode:
        doc = {"reference": str(ref), "rows": [r.as_dict() for r in rows]}
        if imatrix is not None:
            doc["imatrix"] = str(imatrix)
            doc["imatrix_gain"] = _gains(rows)
        out.json(doc)
        return
    from rich.table import Table

    table = Table(title=f"against {Path(ref).name}", box=None, pad_edge=False)
    for col in ("type", "size", "bits/weight", "made in", "decode t/s", "KL mean", "KL p99",
                "top-1", "perplexity"):
        table.add_column(col, justify="left" if col == "type" else "right")
    for r in rows:
        q = r.quality
        table.add_row(_row_name(r, baselines), human_bytes(r.size), f"{r.bpw:.2f}",
                      f"{r.seconds:.1f} s" if r.seconds is not None else "",
                      f"{r.decode_tps:.1f}" if r.decode_tps else "",
                      f"{q.kl_mean:.4f}", f"{q.kl_p99:.4f}", f"{q.top1:.1%}", f"{q.ppl:.3f}")
    out.result(table)


def _row_name(row, baselines) -> str:
    """The type, marked with or without the imatrix where the report shows both."""
    if row.scratch:
        return f"{row.name} (flat imatrix)" if row.imatrix == "flat" else f"{row.name} (no imatrix)"
    if baselines and str(row.path) in baselines:
        return f"{row.name} (imatrix)"
    return row.name


def _gains(rows) -> list[dict]:
    """For each type measured with and without the imatrix: both qualities side by side."""
    out = []
    for prev, row in zip(rows, rows[1:]):
        if row.scratch and prev.name == row.name and prev.quality and row.quality:
            out.append({"type": row.name,
                        "with_imatrix": {"kl_mean": prev.quality.kl_mean,
                                         "kl_p99": prev.quality.kl_p99, "ppl": prev.quality.ppl},
                        "without_imatrix": {"kl_mean": row.quality.kl_mean,
                                            "kl_p99": row.quality.kl_p99, "ppl": row.quality.ppl}})
    return out


class _tensor_bars:
    """A rich bar of tensors done per output (and of the imatrix's chunks, with the running
    perplexity), on a terminal only."""

    def __init__(self, out):
        self.out, self.bars, self.tasks = out, None, {}

    def __enter__(self):
        if self.out.quiet or self.out.json_mode or not self.out.err.is_terminal:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=self.out.err)
        self.bars.__enter__()
        return self.update

    def update(self, label: str, done: int, total: int, unit: str = "tensors") -> None:
        if label not in self.tasks:
            self.tasks[label] = self.bars.add_task(label, total=total, unit=unit)
        self.bars.update(self.tasks[label], completed=done, total=total, unit=unit)

    def __exit__(self, *exc):
        if self.bars is not None:
            self.bars.__exit__(*exc)
        return False
