"""`infer worker`: an RPC worker of llama.cpp's RPC backend, from the installed package.

A worker holds the layers a client (`infer run --rpc HOST:PORT`, or llama.cpp's own tools with
--rpc) gives it and computes them on its devices. The server loop is llama.cpp's own
(``ggml_backend_rpc_start_server``), which blocks in C for as long as it serves: it runs in a
thread, and the main thread waits for Ctrl-C / SIGTERM and ends the process.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from infer_cli.cli.output import output
from infer_cli.errors import BadOption, human_bytes


def register(app) -> None:
    app.command("worker")(worker)


def worker(
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. The protocol has no authentication and no "
        "encryption: anything but loopback should be a trusted network only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on.")] = 50052,
    threads: Annotated[Optional[int], typer.Option(
        "--threads", "-t", help="CPU threads for the layers computed on the CPU (default: the "
        "physical cores).", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="Devices to offer, comma-separated: CPU, CUDA0, ... (default: the first "
        "GPU, else the CPU).", show_default=False)] = None,
    cache: Annotated[Optional[str], typer.Option(
        "--cache", help="A folder where the worker keeps large tensors it was sent, so that a "
        "client loading the same model again sends only their hashes.", show_default=False)] = None,
) -> None:
    """Serve some of a model's layers to a client over llama.cpp's RPC protocol."""
    import signal
    import threading

    from infer_cli.engine import rpc
    from infer_cli.engine.binding import build_info, require
    from infer_cli.engine.model import default_threads

    out = output()
    endpoint = rpc.parse_endpoint(f"{host}:{port}", "--host/--port")
    if threads is not None and threads < 1:
        raise BadOption("--threads", str(threads), "at least 1")
    llama_cpp = require()
    if not rpc.available():
        from infer_cli.errors import RpcUnavailable

        raise RpcUnavailable()
    devices = rpc.pick_devices(device.split(",") if device else None)
    if cache:
        os.makedirs(cache, exist_ok=True)
    _check_port(endpoint)
    # A client that left before this worker got to it makes the next write fail; llama.cpp
    # writes with send(), and a default SIGPIPE would end the worker there.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    n_threads = threads or default_threads()
    commit = build_info(llama_cpp).commit or "unknown commit"
    out.info(f"RPC worker on {endpoint} (protocol {'.'.join(map(str, rpc.PROTOCOL))}, "
             f"llama.cpp {commit}, {n_threads} threads)")
    for d in devices:
        out.info(f"  offers {d.name} ({d.description}): {human_bytes(d.free)} free of {human_bytes(d.total)}")
    if not endpoint.loopback:
        out.warn(f"listening on {endpoint}: llama.cpp's RPC protocol has no authentication and no "
                 "encryption; anyone who reaches this port can use this machine's memory and "
                 "compute. Run it only on a trusted network.")
    out.info(f"[dim]clients: --rpc {endpoint}; Ctrl-C stops the worker[/]")
    sys.stderr.flush()

    stop = threading.Event()
    code = [0]

    def on_signal(signum, frame):  # noqa: ARG001
        code[0] = 128 + signum if signum != signal.SIGINT else 0
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def serve() -> None:
        rpc.serve_worker(endpoint, devices, threads=n_threads, cache_dir=cache)
        code[0] = 69  # it only returns when it could not listen
        stop.set()

    threading.Thread(target=serve, name="rpc-worker", daemon=True).start()
    while not stop.wait(0.5):
        pass
    sys.stdout.flush()
    if code[0] == 69:
        out.error(f"the worker could not listen on {endpoint}")
    else:
        out.info("worker stopped")
    sys.stderr.flush()
    # The native server cannot be asked to stop: end the process without waiting for it.
    os._exit(code[0] if code[0] != 128 + signal.SIGTERM else 0)


def _check_port(endpoint) -> None:
    """A one-line error, before llama.cpp tries, when the address cannot be listened on."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise BadOption("--host", endpoint.host, f"an address of this machine ({e.strerror or e})") from None
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(infos[0][4])
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise BadOption("--port", str(endpoint.port), "a free port (this one is in use)") from None
        raise BadOption("--host", endpoint.host, f"an address of this machine ({e.strerror or e})") from None
    finally:
        s.close()
