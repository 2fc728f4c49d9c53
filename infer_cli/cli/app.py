"""The `infer` command line: parse, call one library function, render.

One module per command (``run``, ``models`` for pull/list/show/rm, ``fit``, ``quantize``,
``cache``), each adding itself to the Typer app here; the option types live in ``options``, the
output object in ``output``. Heavy modules (llama_cpp, numpy, huggingface_hub, gguf) are imported
inside the commands that need them, so `infer --help` stays instant.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from infer_cli.cli import bench, batch, cache, fit, imatrix, models, quantize, run, serve, worker
from infer_cli.errors import InferError, describe

app = typer.Typer(
    name="infer",
    help="Run, pull and inspect GGUF language models locally, through llama.cpp.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)

for command in (run, batch, serve, models, fit, quantize, imatrix, cache, bench, worker):
    command.register(app)


def _print_version(value: bool) -> None:
    """--version: infer, llama-cpp-python, the llama.cpp build and its GPU backends. Imports
    llama_cpp, so only when asked (the option is eager: no command runs after it)."""
    if not value:
        return
    from infer_cli import __version__
    from infer_cli.engine.binding import version_lines

    sys.stdout.write("\n".join(version_lines(__version__)) + "\n")
    raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print the versions of infer, llama-cpp-python and llama.cpp, and its GPU backends.")] = False,
) -> None:
    pass


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
        from infer_cli.cli.output import output

        output().error(r.message, r.hint)
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
