"""`infer pull`, `infer list`, `infer show`, `infer rm`: the models on this machine."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from infer_cli.cli.options import JsonOpt, ModelArg, RevisionOpt, YesOpt
from infer_cli.cli.output import Column, ago, display_path, output as _output, pairs, table
from infer_cli.errors import InferError, human_bytes


def register(app) -> None:
    app.command()(pull)
    app.command("list")(list_models)
    app.command()(show)
    app.command()(rm)


def pull(model: ModelArg = None, revision: RevisionOpt = None, json_mode: JsonOpt = False) -> None:
    """Download a model into the shared cache (resumable, verified).

    MODEL is an alias from models.toml, org/repo (Q4_K_M or the nearest quant),
    org/repo:QUANT (case-insensitive), or org/repo/path/file.gguf. Split GGUFs are fetched
    whole. HF_TOKEN (or `hf auth login`) gives access to gated repos; HF_HUB_OFFLINE=1 uses
    only what is cached.
    """
    from infer_cli.models import store

    out = _output(json_mode)
    with out.transfer() as progress:
        resolved = store.pull(model, revision=revision, progress=progress)
    size = sum(p.stat().st_size for p in resolved.paths)
    if json_mode:
        out.json({"model": resolved.name, "source": resolved.source, "size": size,
                  "paths": [str(p) for p in resolved.paths]})
    else:
        out.result(f"{resolved.name}: {human_bytes(size)} at {display_path(resolved.path)}")


def list_models(
    aliases: Annotated[bool, typer.Option("--aliases", help="List models.toml's aliases instead.")] = False,
    json_mode: JsonOpt = False,
) -> None:
    """List local models: name, quant, size, parameters, path, last used."""
    from infer_cli.models import store

    out = _output(json_mode)
    if aliases:
        _list_aliases(out, json_mode)
        return
    from infer_cli.models.gguf_info import quant_label, read_gguf

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
    columns = [Column("NAME"), Column("QUANT"), Column("SIZE", right=True), Column("PARAMS", right=True),
               Column("LAST USED"), Column("PATH", long=True)]
    out.result(table(columns, [[r["name"], r["quant"], human_bytes(r["size"]), _params(r["parameters"]),
                                ago(r["last_used"]), display_path(r["path"])] for r in rows], out.width))


def _params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _list_aliases(out, json_mode: bool) -> None:
    from infer_cli.paths import user_models_toml
    from infer_cli.models.registry import load_catalog

    catalog = load_catalog()
    rows = [{"name": e.name, "default": e.name == catalog.default, "note": e.note,
             "context": e.context, "draft": e.draft, "hub": e.hub.repo if e.hub else None,
             "package": list(e.package.wheels) if e.package else None}
            for e in catalog.entries.values()]
    if json_mode:
        out.json({"aliases": rows, "user_models_toml": str(user_models_toml())})
        return
    columns = [Column("ALIAS"), Column("DRAFT"), Column("SOURCE", long=True), Column("NOTE", long=True)]
    out.result(table(columns, [[r["name"] + (" (default)" if r["default"] else ""), r["draft"] or "",
                                "package index" if r["package"] else r["hub"] or "", r["note"] or ""]
                               for r in rows], out.width))
    out.info(f"[dim]Your own aliases go in {escape(display_path(user_models_toml()))}[/]")


def show(model: ModelArg = None, json_mode: JsonOpt = False) -> None:
    """Show what a model's GGUF header says: architecture, size, attention, vocabulary, quant."""
    from infer_cli.models import store
    from infer_cli.models.gguf_info import read_gguf, read_split, summary

    out = _output(json_mode)
    resolved = store.resolve(model, download=False)
    info = read_gguf(resolved.path) if len(resolved.paths) == 1 else read_split([str(p) for p in resolved.paths])
    facts = {"model": resolved.name, **summary(info)}
    if json_mode:
        out.json(facts)
        return
    out.result(pairs(_show_rows(facts), out.width))


def _show_rows(f: dict) -> list[tuple[str, str]]:
    """The header facts a person asks about, in the order they ask; --json has everything."""
    def opt(v) -> str:
        return "none" if v in (None, "") else str(v)

    heads = f"{f['head_count']} query, {f['head_count_kv']} key/value"
    if f["head_count"] and f["head_count_kv"] and f["head_count"] != f["head_count_kv"]:
        heads += f" (grouped-query, {f['head_count'] // f['head_count_kv']} per group)"
    template = f["chat_template"]
    bpw = f["bits_per_weight"]
    moe = []
    if f.get("expert_count"):  # mixture of experts: every expert is loaded, a few run per token
        shared = f" + {f['expert_shared_count']} shared" if f.get("expert_shared_count") else ""
        width = f", {f['expert_feed_forward_length']} wide" if f.get("expert_feed_forward_length") else ""
        moe = [("experts", f"{f['expert_count']} per layer, {f['expert_used_count']} used per token{shared}{width}"),
               ("active parameters", f"{_params(f['n_active_params'])} per token ({f['n_active_params']:,}) "
                                     f"of {_params(f['n_params'])}")]
    return [
        ("model", f["model"]),
        ("architecture", opt(f["architecture"])),
        ("name", opt(f["name"])),
        ("parameters", f"{_params(f['n_params'])} ({f['n_params']:,})"),
        *moe,
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
        ("path", "\n".join(display_path(p) for p in f["paths"])),
    ]


def rm(model: Annotated[str, typer.Argument(help="The model to remove (see `infer list`).")],
       yes: YesOpt = False, json_mode: JsonOpt = False) -> None:
    """Delete a downloaded model and free its space (files of your own are only forgotten)."""
    from infer_cli.models import store

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
