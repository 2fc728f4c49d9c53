"""The quantize pipeline: resolve the source, convert a checkpoint once, quantize each target,
leaving every output complete or absent."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from infer_cli.errors import BadOption, UnknownQuantType
from infer_cli.files import temp_path

from . import hub_source
from .llama_quant import QuantOptions, QuantResult, TensorProgress, quantize
from .types import CONVERT_TYPES, QuantType, lookup, names

# (what is being made, tensors done, tensors in all)
Progress = Callable[[str, int, int], None]

_QUANT_SUFFIX = re.compile(r"[.-](?:[IT]?Q\d\w*|F16|F32|BF16|MXFP4_MOE|NVFP4)$", re.IGNORECASE)


def parse_targets(spec: str) -> list[QuantType]:
    """'Q4_K_M,Q8_0' -> their table rows; an unknown name is one error listing the valid ones."""
    out: list[QuantType] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        qt = lookup(part)
        if qt is None:
            raise UnknownQuantType(part, names())
        if qt not in out:
            out.append(qt)
    if not out:
        raise BadOption("--to", spec, "one or more types, e.g. Q4_K_M,Q8_0")
    return out


def parse_tensor_types(values: list[str]) -> tuple[tuple[str, str], ...]:
    """['attn_v=q8_0', ...] -> (('attn_v', 'Q8_0'), ...)."""
    out = []
    for v in values:
        name, sep, typ = v.partition("=")
        if not sep or not name or not typ:
            raise BadOption("--tensor-type", v, "NAME=TYPE, e.g. attn_v=q8_0")
        out.append((name, typ.upper()))
    return tuple(out)


def base_name(source: Path) -> str:
    stem = source.name[:-5] if source.name.endswith(".gguf") else source.name
    return _QUANT_SUFFIX.sub("", stem) or stem


def output_path(source: Path, outdir: Path, qtype: QuantType) -> Path:
    return outdir / f"{base_name(source)}.{qtype.name}.gguf"


@dataclass
class Plan:
    source: Path
    kind: str                     # gguf | checkpoint
    targets: list[QuantType]
    outdir: Path
    outputs: list[Path] = field(default_factory=list)
    name: str | None = None       # output base name when the source folder's is meaningless
    repo_id: str | None = None    # the hub repo the checkpoint came from
    converted: Path | None = None  # the unquantized GGUF ``run`` converted the checkpoint to
    imatrix: Path | None = None   # the importance matrix ``run`` quantized with (auto: the cached file)
    revision: str | None = None   # the hub revision (branch, tag or commit) asked for
    notes: list[str] = field(default_factory=list)  # what a person should know before the work


def make_plan(source: str, targets: list[QuantType], outdir: Path | None,
              opts: QuantOptions | None = None, *, revision: str | None = None,
              download: Callable[[str, int, int], None] | None = None) -> Plan:
    """What to make from ``source``: a GGUF, a checkpoint folder, or a hub repo id (whose
    checkpoint files at ``revision``, default main, are fetched into the Hugging Face cache here,
    ``download(filename, bytes done, bytes in all)`` told as bytes arrive)."""
    path = Path(source).expanduser()
    if path.is_dir():
        kind = "checkpoint"
    elif path.is_file():
        kind = "gguf"
    elif hub_source.looks_like_repo_id(source):
        kind = "hub"
    else:
        raise BadOption("SOURCE", source, "an existing GGUF file, checkpoint folder or hub repo id")
    if revision is not None and kind != "hub":
        raise BadOption("--revision", revision, "a hub repo id as SOURCE (a local folder or GGUF "
                        "has no revisions)")
    if kind == "hub":
        # outputs go to the working folder by default (never into the hub cache), named after the repo
        out = Path(outdir).expanduser() if outdir else Path.cwd()
        name = source.split("/")[1]
    else:
        out = Path(outdir).expanduser() if outdir else (path if kind == "checkpoint" else path.parent)
        name = None
    plan = Plan(path, "checkpoint" if kind == "hub" else kind, targets, out, name=name)
    plan.outputs = [output_path(Path(name or path), out, t) for t in targets]
    for p in plan.outputs:
        if p.exists():
            raise BadOption("--to", p.name, f"a target that does not exist yet ({p} does; remove it)")
    if kind == "hub":
        if opts is not None:
            from .llama_quant import check_request

            for qt in targets:  # refuse a missing imatrix before downloading anything
                check_request(False, qt, opts)
        plan.repo_id, plan.revision = source, revision
        plan.source = hub_source.fetch_checkpoint(source, revision, progress=download)
    if plan.kind == "checkpoint":
        from .convert import checkpoint_notes

        plan.notes = checkpoint_notes(plan.source)
    return plan


def run(plan: Plan, opts: QuantOptions, *, progress: Progress | None = None,
        converted: Callable[[Path], None] | None = None,
        imatrix_progress: Callable[[int, int, float], None] | None = None,
        notice: Callable[[str], None] | None = None) -> tuple[list[QuantResult], Path | None]:
    """Make every target of ``plan``. A checkpoint is converted once, to the first of F32, F16
    and BF16 among the targets or else to a scratch F16, and ``plan.converted`` names that file.
    With ``opts.auto_imatrix`` the importance matrix is made from that unquantized file (or the
    source GGUF) once, kept in infer's cache and reused by later runs (``notice`` says which),
    and ``plan.imatrix`` names it.
    Returns the results and the scratch file when there is one (the caller may use it as the
    report's reference and must delete it with ``discard``)."""
    from .llama_quant import check_request

    for qt in plan.targets:  # refuse a missing imatrix before converting anything
        check_request(False, qt, opts)
    results: list[QuantResult] = []
    src = plan.source
    base = None
    if plan.kind == "checkpoint":
        from .convert import convert_checkpoint

        base_type = next((t for t in plan.targets if t.name in CONVERT_TYPES and t.name != "Q8_0"),
                         lookup("F16"))
        dst = output_path(Path(plan.name or plan.source), plan.outdir, base_type)
        is_target = base_type in plan.targets
        tmp_base = dst if is_target else temp_path(dst, ".base.gguf")
        res = convert_checkpoint(plan.source, tmp_base, base_type.name, name=plan.name,
                                 progress=_bind(progress, f"convert {base_type.name}"))
        if is_target:
            results.append(res)
        plan.converted = tmp_base
        if converted:
            converted(tmp_base)
        base = tmp_base
        src = tmp_base
    try:
        if opts.auto_imatrix is not None:
            from dataclasses import replace

            from .imatrix_make import cached

            got = cached(src, opts.auto_imatrix, progress=imatrix_progress)
            if notice:
                notice(f"reusing the cached importance matrix {got.path}" if got.reused else
                       f"computed the importance matrix ({got.matrix.chunks} chunks of "
                       f"{got.matrix.chunk_size} tokens, {got.matrix.seconds:.1f} s) and cached it "
                       f"as {got.path}")
            opts = replace(opts, imatrix=got.path, auto_imatrix=None)
        plan.imatrix = Path(opts.imatrix) if opts.imatrix is not None else None
        for qt, dst in zip(plan.targets, plan.outputs):
            if base is not None and dst == base:
                continue
            results.append(quantize(src, dst, qt, opts, progress=_bind(progress, qt.name)))
    except BaseException:
        if base is not None and base not in [r.path for r in results]:
            discard(base)
        raise
    return results, (base if plan.kind == "checkpoint" and base not in [r.path for r in results]
                     else None)


def default_reference(plan: Plan) -> Path:
    """What the report measures the outputs against when no other reference is given, after
    ``run``: the unquantized GGUF a checkpoint was converted to (itself one of the outputs when
    F32, F16 or BF16 was asked for), else the source GGUF."""
    return plan.converted or plan.source


def discard(path: Path | None) -> None:
    if path is not None and path.exists():
        os.unlink(path)


def _bind(progress: Progress | None, label: str) -> TensorProgress | None:
    if progress is None:
        return None
    return lambda done, total: progress(label, done, total)


# the types whose report also measures them made without the importance matrix
SHOW_IMATRIX_GAIN = ("Q2_K", "IQ3_XXS")


def without_imatrix(plan: Plan, results: list[QuantResult], opts: QuantOptions, *,
                    progress: Progress | None = None) -> dict[str, QuantResult]:
    """For the Q2_K and IQ3_XXS outputs made with an importance matrix: the same type made
    without it, in a scratch file beside the output (``scratch`` set; the caller deletes them
    with ``discard``). Keyed by the output's path.

    llama.cpp makes no IQ3_XXS without a matrix; that one gets a flat matrix instead (every
    column weighted alike: the same names and sizes, all ones), and ``imatrix`` says "flat"."""
    from dataclasses import replace

    from .types import lookup

    src = plan.converted or plan.source
    plain = replace(opts, imatrix=None, auto_imatrix=None)
    out: dict[str, QuantResult] = {}
    flat = None
    try:
        for r in results:
            if r.imatrix is None or r.qtype not in SHOW_IMATRIX_GAIN:
                continue
            qt = lookup(r.qtype)
            use = plain
            if qt.needs_imatrix:
                if flat is None:
                    flat = _flat_imatrix(Path(r.imatrix), temp_path(r.path, ".flat-imatrix.gguf"))
                use = replace(plain, imatrix=flat)
            dst = temp_path(r.path, ".no-imatrix.gguf")
            res = quantize(src, dst, qt, use, progress=_bind(progress, f"{r.qtype} without imatrix"))
            res.scratch = True
            res.imatrix = "flat" if qt.needs_imatrix else None
            out[str(r.path)] = res
    except BaseException:
        for res in out.values():
            discard(res.path)
        raise
    finally:
        discard(flat)
    return out


def _flat_imatrix(like: Path, dst: Path) -> Path:
    """An importance matrix of ones with the names and sizes of ``like``."""
    import numpy as np

    from .imatrix import load_imatrix
    from .imatrix_make import Stat, imatrix_bytes

    stats = {name: Stat(np.ones(v.size), np.ones(1)) for name, v in load_imatrix(like).items()}
    dst.write_bytes(imatrix_bytes(stats, ["flat"], 1, 1))
    return dst
