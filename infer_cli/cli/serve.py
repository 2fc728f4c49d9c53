"""`infer serve`: an OpenAI-compatible HTTP server (and a chat page) on the batching engine.

Only options, the model's resolution and the process's life here; the HTTP side is
``infer_cli.serve.app`` and the engine thread ``infer_cli.serve.engine``.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from infer_cli.cli.options import (EngineArgs, ModelArg, ParallelOpt, RevisionOpt, SamplingArgs,
                                   option_groups)
from infer_cli.serve.engine import STREAM_INTERVAL_S

GRACE_S = 3.0  # on Ctrl-C / SIGTERM: how long running answers may finish before they are cut


def register(app) -> None:
    app.command("serve")(serve)


@option_groups
def serve(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. Anything but loopback is reachable by others: "
        "set --api-key then.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on.")] = 8080,
    parallel: ParallelOpt = 4,
    queue: Annotated[int, typer.Option(
        "--queue", help="Requests that may wait for a free sequence; past that the answer is 503 "
        "with Retry-After.")] = 64,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="INFER_API_KEY", help="Require this key (Authorization: Bearer KEY, or "
        "X-Api-Key) on every route but /health and the chat page.", show_default=False)] = None,
    cors: Annotated[Optional[list[str]], typer.Option(
        "--cors", help="Allow browser pages from this origin (repeatable; * for any). Off by "
        "default.", show_default=False)] = None,
    stream_interval: Annotated[float, typer.Option(
        "--stream-interval", help="Seconds between a stream's chunks at most: a fast stream sends "
        "the tokens of that time in one chunk (0: a chunk per token; with --rpc always 0).")] = STREAM_INTERVAL_S,
    no_share: Annotated[bool, typer.Option(
        "--no-prefix-sharing", help="Compute every prompt in full, even where prompts start alike.")] = False,
    *,
    sampling_args: SamplingArgs,
    engine_args: EngineArgs,
    revision: RevisionOpt = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.

    Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
    GET /metrics. --ctx is the KV cache shared by the --parallel sequences, as in `infer batch`.
    The sampling options are defaults that each request may override."""
    from infer_cli.cli.output import output
    from infer_cli.engine.isolated import batch_engine
    from infer_cli.models import store

    if parallel < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--parallel")
    if queue < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--queue")
    if not 0 <= stream_interval <= 10:
        raise typer.BadParameter("must be 0..10 seconds", param_hint="--stream-interval")
    if not 0 < port < 65536:
        raise typer.BadParameter("must be 1..65535", param_hint="--port")
    opts = engine_args.options(parallel)
    out = output(False)
    with out.transfer() as progress:
        resolved = store.resolve(model, revision=revision, progress=progress)
    store.touch(resolved)
    sampling = sampling_args.sampling(resolved.entry)

    import uvicorn

    from infer_cli.serve.app import Defaults, Settings, create_app

    def log(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    # A local file is named by its file name: the full path says nothing to a client.
    model_id = Path(resolved.name).stem if resolved.source == "local" else resolved.name
    settings = Settings(model_id=model_id, api_key=api_key or None, cors=list(cors or ()),
                        queue_limit=queue, log=log, stream_interval=stream_interval,
                        defaults=Defaults(sampling, sampling_args.max_tokens, sampling_args.stops,
                                          sampling_args.system))
    app = create_app(settings)
    state = app.state.server
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log(f"warning: listening on {host} without --api-key: anyone who can reach this machine "
            "can use the model")

    loop, http = event_loop_stack()
    server = _make_server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                         access_log=False, timeout_graceful_shutdown=int(GRACE_S) + 3,
                                         lifespan="off", loop=loop, http=http), state)
    failure: list = []

    def load() -> None:
        try:
            # with RPC workers, in a child process: a worker that dies cannot abort the server
            engine = batch_engine(resolved, opts, share_prefixes=not no_share, keep_idle=True)
        except Exception as e:  # noqa: BLE001 - reported below, after the server has stopped
            failure.append(e)
            state.failed(str(e))
            server.should_exit = True
            return
        server.batch_engine = engine
        state.ready(engine)
        for note in engine.notes:
            log(f"note: {note}")
        log(f"ready: {model_id}, {engine.context.n_ctx} KV cells for {engine.context.n_seq} "
            "sequences")

    url_host = f"[{host}]" if ":" in host else host
    log(f"infer serve: http://{url_host}:{port}/ (loading {model_id})")
    loader = threading.Thread(target=load, name="infer-load", daemon=True)
    loader.start()
    server.run()
    if state.engine is not None:
        state.engine.stop(timeout=GRACE_S + 2)
    if server.batch_engine is not None and (state.engine is None or not state.engine.thread.is_alive()):
        server.batch_engine.close()
    if failure:
        err = failure[0]
        from infer_cli.errors import InferError

        if isinstance(err, InferError):
            raise err
        log(f"error: the model failed to load: {type(err).__name__}: {err}")
        raise typer.Exit(1)
    if not server.started:
        raise typer.Exit(1)  # uvicorn could not bind the address; it said why


def event_loop_stack() -> tuple[str, str]:
    """uvicorn's event loop and HTTP parser: uvloop and httptools (both C) where installed, as
    they are beside this package except on Windows, which uvloop does not support; else
    asyncio's loop and h11. The event loop's thread shares the cores with llama.cpp's threads,
    and each chunk of a stream costs it a wake-up, a write and its framing: with one client on two
    cores, uvloop and httptools gave 1-2% more tokens/s than asyncio and h11 in the same run, and
    4-5% with sixteen."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def _make_server(config, state):
    """uvicorn's server, stopping the way a model server should: the first Ctrl-C or SIGTERM
    stops accepting, lets running answers finish for a few seconds, then cuts them; the exit
    status is 0 (uvicorn would re-raise the signal after its shutdown)."""
    import uvicorn

    class Server(uvicorn.Server):
        batch_engine = None

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            if state.engine is not None:
                state.engine.drain(GRACE_S)

    return Server(config)
