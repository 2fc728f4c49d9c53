"""`infer cache list` and `infer cache clear`: the prompt cache on disk."""

from __future__ import annotations

import typer
from rich.markup import escape

from infer_cli.cli.options import JsonOpt
from infer_cli.cli.output import Column, ago, display_path, output as _output, table
from infer_cli.errors import human_bytes


def register(app) -> None:
    app.add_typer(cache_app, name="cache")


cache_app = typer.Typer(help="The prompt cache: saved KV state of prompt prefixes, reused across runs.",
                        no_args_is_help=True)


@cache_app.command("list")
def cache_list(json_mode: JsonOpt = False) -> None:
    """List saved prompt prefixes: last used, tokens, size, KV settings, model."""
    from infer_cli.engine import prompt_cache

    out = _output(json_mode)
    rows = prompt_cache.listing()
    if json_mode:
        out.json({"entries": rows, "folder": str(prompt_cache.cache_root()),
                  "limit_bytes": prompt_cache.max_bytes()})
        return
    if not rows:
        out.info("The prompt cache is empty.")
        return
    columns = [Column("LAST USED"), Column("TOKENS", right=True), Column("SIZE", right=True),
               Column("KV"), Column("MODEL", long=True)]
    out.result(table(columns, [[ago(r["last_used"]), f"{r['tokens']:,}", human_bytes(r["size"]), _kv(r),
                                display_path(r["model"]) if r["model"] else "?"] for r in rows], out.width))
    total = sum(r["size"] for r in rows)
    out.info(f"[dim]{len(rows)} entries, {human_bytes(total)} of {human_bytes(prompt_cache.max_bytes())} "
             f"(INFER_PROMPT_CACHE_MAX) in {escape(display_path(prompt_cache.cache_root()))}[/]")


def _kv(row: dict) -> str:
    kv = row["settings"] or {}
    return f"ctx {kv.get('n_ctx')}, K {kv.get('type_k')}, V {kv.get('type_v')}"


@cache_app.command("clear")
def cache_clear(json_mode: JsonOpt = False) -> None:
    """Delete every saved prompt prefix."""
    from infer_cli.engine import prompt_cache

    out = _output(json_mode)
    n, freed = prompt_cache.clear()
    if json_mode:
        out.json({"removed": n, "freed": freed})
    else:
        out.result(f"Removed {n} entries, {human_bytes(freed)} freed.")
