"""`infer imatrix`: an importance matrix for a model, computed through llama.cpp on a
calibration text, written in llama-imatrix's GGUF format (for `infer quantize --imatrix FILE`
or llama-quantize). The work is ``quantize.imatrix_make``; this module parses and renders.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from infer_cli.cli.options import JsonOpt, ModelArg, ThreadsOpt


def register(app) -> None:
    """Add the `imatrix` command to the Typer app."""
    app.command(name="imatrix")(imatrix_cmd)


def imatrix_cmd(
    model: ModelArg = None,
    output_file: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="The imatrix file to write (default: MODEL-NAME.imatrix.gguf in "
        "the current folder).", show_default=False)] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        "--calibration", help="UTF-8 text to run through the model (default: the prose and code "
        "that ship with infer).", show_default=False)] = None,
    chunks: Annotated[Optional[int], typer.Option(
        "--chunks", help="Most chunks to use (default: as many as the text gives).",
        show_default=False)] = None,
    ctx: Annotated[int, typer.Option("--ctx", "-c", help="Tokens per chunk.")] = 512,
    threads: ThreadsOpt = None,
    json_mode: JsonOpt = False,
) -> None:
    """Compute an importance matrix (llama-imatrix's format) for quantizing MODEL."""
    from infer_cli.cli.output import output
    from infer_cli.models import store
    from quantize import imatrix_make as im
    from quantize.api import base_name

    out = output(json_mode)
    text, dataset = im.calibration_text(calibration)  # a bad file fails before the model loads
    with out.transfer() as progress:
        resolved = store.resolve(model, progress=progress)
    target = output_file or Path.cwd() / f"{base_name(resolved.path)}.imatrix.gguf"
    with chunk_bars(out, "imatrix") as bar:
        m = im.compute(resolved.path, text, dataset=dataset, ctx=ctx, chunks=chunks,
                       threads=threads, progress=bar)
    im.write_imatrix(target, m)
    im.store_in_cache(resolved.path, text, im.ImatrixSpec(calibration, chunks, ctx, threads), m)
    doc = {"model": str(resolved.path), "output": str(target), "dataset": m.dataset,
           "chunks": m.chunks, "chunk_size": m.chunk_size, "text_tokens": m.tokens,
           "tensors": len(m.stats), "perplexity": m.ppl, "seconds": m.seconds,
           "tokens_per_second": m.chunks * m.chunk_size / m.seconds if m.seconds else None}
    if json_mode:
        out.json(doc)
        return
    out.info(f"{m.chunks} chunks of {m.chunk_size} tokens ({m.tokens} in the text), "
             f"{len(m.stats)} tensors, perplexity {m.ppl:.3f}, {m.seconds:.1f} s")
    out.result(f"wrote {target}")


@contextmanager
def chunk_bars(out, label: str) -> Iterator:
    """A callback ``(done, total, perplexity)`` drawing one rich bar of chunks on stderr, on a
    terminal only (None otherwise)."""
    if out.quiet or out.json_mode or not out.err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("chunks  perplexity {task.fields[ppl]}"), TimeElapsedColumn(),
                    console=out.err)
    with bars:
        task = None

        def update(done: int, total: int, ppl: float) -> None:
            nonlocal task
            if task is None:
                task = bars.add_task(label, total=total, ppl="-")
            bars.update(task, completed=done, total=total, ppl=f"{ppl:.3f}")

        yield update
