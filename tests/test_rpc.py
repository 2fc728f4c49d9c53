"""A model split over RPC workers: two `infer worker` processes on loopback ports, the same text
as a local run, the planning numbers, and every bad input (malformed, unreachable, busy, another
version, too little memory, a worker killed mid-run) as a one-line error.

Every client that loads a model over the workers runs in its own process (a worker serves one
client at a time, and llama.cpp keeps its connections for the life of the client process)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from infer_cli.engine import rpc
from infer_cli.errors import BadOption, WorkerBusy, WorkerUnreachable, WorkerVersionMismatch

pytestmark = pytest.mark.skipif(not rpc.available(), reason="llama.cpp built without GGML_RPC")

PROMPT = "The lighthouse keeper kept a log of every ship that passed the point."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _addr(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.split(":")
    return host, int(port)


def _start_worker(port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "infer_cli", "worker", "--port", str(port),
                             "--threads", "1", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited: {proc.stderr.read()}")
        if rpc.alive(f"127.0.0.1:{port}", timeout=0.5):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the worker did not start listening")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def workers():
    ports = [_free_port(), _free_port()]
    procs = [_start_worker(p) for p in ports]
    yield [f"127.0.0.1:{p}" for p in ports]
    for p in procs:
        _stop(p)


def _run(*args, env=None, timeout=180):
    env = {**os.environ, "GGML_NO_BACKTRACE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "infer_cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line_error(proc) -> str:
    """The error line (serve logs its address first); no traceback, no native abort."""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "GGML_ABORT" not in proc.stderr, proc.stderr
    return errors[0]


def _greedy(model, *extra):
    p = _run("run", str(model), PROMPT, "--raw", "--temp", "0", "-n", "24", "--ignore-eos",
             "--ctx", "512", "--threads", "1", "--no-prompt-cache", "--json", *extra)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


# --- a fake worker: the handshake only ---------------------------------------------------------

class FakeWorker:
    """A socket server that answers HELLO with ``version`` (and the device queries with
    ``memory``), or never answers at all (``silent``)."""

    def __init__(self, version=(7, 0, 0), memory=(8 << 30, 8 << 30), silent=False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.version, self.memory, self.silent = version, memory, silent
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if not self.silent:
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        def recv(n):
            buf = b""
            while len(buf) < n:
                chunk = conn.recv(n - len(buf))
                if not chunk:
                    raise EOFError
                buf += chunk
            return buf

        try:
            while True:
                cmd, size = struct.unpack("<BQ", recv(9))
                recv(size)
                if cmd == 14:
                    reply = struct.pack("<BBBB24s", *self.version, 0, bytes(24))
                elif cmd == 15:
                    reply = struct.pack("<I", 1)
                elif cmd == 11:
                    reply = struct.pack("<QQ", *self.memory)
                else:
                    return
                conn.sendall(struct.pack("<Q", len(reply)) + reply)
        except (EOFError, OSError):
            return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def fake():
    made = []

    def make(**kw):
        f = FakeWorker(**kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


# --- endpoints and the handshake ---------------------------------------------------------------

@pytest.mark.parametrize("bad", ["host", "host:0", "host:99999", "host:", ":50052", "a:1:2", "h:x"])
def test_a_malformed_endpoint_is_refused_before_anything(bad):
    with pytest.raises(BadOption):
        rpc.parse_endpoints(bad)


def test_probe_reads_version_and_memory_of_a_real_worker(workers):
    info = rpc.probe(workers[0])
    assert info.version[0] == rpc.PROTOCOL[0]
    assert len(info.devices) == 1 and 0 < info.devices[0].free <= info.devices[0].total


def test_probe_kinds_unreachable_busy_version(fake):
    with pytest.raises(WorkerUnreachable):
        rpc.probe(f"127.0.0.1:{_free_port()}", timeout=1)
    old = fake(version=(6, 1, 0))
    with pytest.raises(WorkerVersionMismatch, match="6.1.0"):
        rpc.probe(old.endpoint, timeout=1)
    silent = fake(silent=True)
    t0 = time.time()
    with pytest.raises(WorkerBusy):
        rpc.probe(silent.endpoint, timeout=1)
    assert time.time() - t0 < 5


def test_a_second_client_on_a_busy_worker_is_refused_in_seconds(workers, smollm2_gguf):
    # hold the first worker with a client of our own (the handshake done, connection kept)
    with socket.create_connection(_addr(workers[0]), timeout=5) as held:
        held.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
        assert len(held.recv(36)) > 0
        t0 = time.time()
        p = _run("run", str(smollm2_gguf), "hi", "-n", "1", "--rpc", ",".join(workers))
        assert p.returncode == 69
        assert workers[0] in _one_line_error(p) and "busy" in p.stderr
        assert time.time() - t0 < 30
    # the worker survived the refused client and serves the next one
    assert rpc.probe(workers[0]).version[0] == rpc.PROTOCOL[0]


# --- the same text -----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_greedy_text_over_two_workers_equals_the_local_run(workers, which, smollm2_gguf, gemma3_gguf):
    model = smollm2_gguf if which == "smollm2" else gemma3_gguf
    local = _greedy(model)
    remote = _greedy(model, "--rpc", ",".join(workers), "--tensor-split", "1,1")
    assert remote["text"] == local["text"] and remote["stats"]["generated_tokens"] == 24


# --- planning ----------------------------------------------------------------------------------

def test_plan_places_layers_as_llama_cpp_does(smollm2_gguf):
    from infer_cli.models.gguf_info import read_gguf
    from infer_cli.options import Options
    from infer_cli.plan import fit, rpc_fit

    assert rpc_fit.assign(30, -1, [1, 1]).count(0) == 16
    assert rpc_fit.assign(30, 10, [3, 1]) == [-1] * 21 + [0] * 8 + [1] * 2
    info = read_gguf(str(smollm2_gguf))
    m = fit.facts(info)
    devs = rpc_fit.what_if([64 << 30, 64 << 30])
    p = rpc_fit.plan(info, devs, fit.Hardware("local", ram=16 << 30), Options(n_ctx=1024))
    assert p.fits and p.gpu_layers == 31
    assert [d.layers for d in p.devices] == [16, 15] and p.devices[1].output
    weights = p.cpu.weights + sum(d.memory.weights for d in p.devices)
    assert weights == m.weights_bytes + m.tied_bytes  # a tied output is duplicated off the CPU
    kv = sum(d.memory.kv for d in p.devices)
    assert kv == sum(fit.kv_layer_bytes(m, Options(n_ctx=1024), il) for il in range(m.n_layer))
    tight = rpc_fit.plan(info, rpc_fit.what_if([40 << 20, 64 << 30]), fit.Hardware("local", ram=16 << 30),
                         Options(n_ctx=1024, gpu_layers=-1, tensor_split=(1.0, 1.0)))
    assert not tight.fits and not tight.devices[0].fits
    assert tight.balanced[0] < tight.balanced[1]


_SIZES = r"""
import json, sys
from infer_cli.engine import llama_log
from infer_cli.engine.context import Context
from infer_cli.engine.model import Model
from infer_cli.engine.runner import settle
from infer_cli.models.gguf_info import read_gguf
from infer_cli.options import Options
llama_log.install()
info = read_gguf(sys.argv[1])
opts = settle(Options(n_ctx=1024, rpc=tuple(sys.argv[2].split(",")), tensor_split=(1.0, 1.0),
                      threads=1), info)
mark = llama_log.mark()
Context(Model(sys.argv[1], opts, info=info), opts)
print(json.dumps(llama_log.since(mark)))
"""


_CACHE = r"""
import json, sys
from infer_cli.engine.context import Context
from infer_cli.engine.model import Model
from infer_cli.engine.runner import settle
from infer_cli.engine.sampling import Sampling
from infer_cli.engine.scheduler import Scheduler
from infer_cli.engine.sequence import Request
from infer_cli.models.gguf_info import read_gguf
from infer_cli.options import Options
info = read_gguf(sys.argv[1])
opts = settle(Options(n_ctx=1024, n_seq=2, rpc=tuple(sys.argv[2].split(",")), threads=1), info)
model = Model(sys.argv[1], opts, info=info)
sched = Scheduler(model, Context(model, opts), keep_idle=True)
lead = "You are a careful assistant who answers every question in one short sentence. "
seqs = []
for q in ("What is the capital of Italy?", "Name a large mammal."):
    seqs.append(sched.submit(Request(tuple(model.tokenize(lead + q)), Sampling(temperature=0), 8)))
    sched.run()
print(json.dumps({"in_pool": sched.in_pool, "cached": seqs[1].cached_tokens,
                  "bytes": sched.idle_bytes}))
"""


def test_the_prompt_cache_stays_on_the_workers(workers, smollm2_gguf):
    """Over RPC the server's prompt cache stays in the pool, on the workers: copying each
    finished sequence's KV out to host memory would cross the network and back."""
    p = subprocess.run([sys.executable, "-c", _CACHE, str(smollm2_gguf), ",".join(workers)],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["in_pool"] and got["bytes"] == 0 and got["cached"] >= 10, got


def test_planned_weights_and_kv_match_what_the_workers_allocate(workers, smollm2_gguf):
    import re

    from infer_cli.models.gguf_info import read_gguf
    from infer_cli.options import Options
    from infer_cli.plan import hardware, rpc_fit

    p = subprocess.run([sys.executable, "-c", _SIZES, str(smollm2_gguf), ",".join(workers)],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    logged = {}
    for ln in json.loads(p.stdout.strip().splitlines()[-1]):
        # 'RPC0[127.0.0.1:50052] model buffer size = 33.82 MiB': the worker's own device index
        m = re.search(r"RPC\d+\[([^\]]+)\]\s+(model|KV) buffer size =\s*([\d.]+) MiB", ln)
        if m:
            logged[(m.group(1), m.group(2))] = logged.get((m.group(1), m.group(2)), 0) + float(m.group(3))
    devices = rpc_fit.devices_of(rpc.probe_all(workers))
    plan = rpc_fit.plan(read_gguf(str(smollm2_gguf)), devices, hardware.detect(llama=False).hardware(),
                        Options(n_ctx=1024, rpc=tuple(workers), tensor_split=(1.0, 1.0)))
    for d in plan.devices:
        for kind, ours in (("model", d.memory.weights), ("KV", d.memory.kv)):
            theirs = logged[(d.device.endpoint, kind)] * (1 << 20)
            assert abs(ours - theirs) / theirs < 0.02, (d.device.name, kind, ours, theirs)


def test_fit_over_live_workers_and_a_what_if(workers, smollm2_gguf):
    p = _run("fit", str(smollm2_gguf), "--rpc", ",".join(workers), "--ctx", "1024", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)["rpc_plan"]
    assert doc["fits"] and [d["endpoint"] for d in doc["devices"]] == workers
    assert sum(d["layers"] for d in doc["devices"]) == 31
    p = _run("fit", str(smollm2_gguf), "--rpc-ram", "64M,4G", "--ctx", "1024", "--gpu-layers", "-1",
             "--tensor-split", "1,1")
    assert p.returncode == 0, p.stderr
    assert "does not fit" in p.stdout and "--tensor-split" in p.stdout


def test_a_worker_with_too_little_memory_is_refused_at_plan_time(fake, smollm2_gguf):
    small = fake(memory=(16 << 20, 16 << 20))
    p = _run("run", str(smollm2_gguf), "hi", "-n", "1", "--rpc", small.endpoint)
    assert p.returncode == 69
    line = _one_line_error(p)
    assert small.endpoint in line and "MiB" in line


# --- bad input through the commands ------------------------------------------------------------

def test_unreachable_and_mismatched_workers_are_one_line_errors(fake, smollm2_gguf):
    dead = f"127.0.0.1:{_free_port()}"
    p = _run("run", str(smollm2_gguf), "hi", "-n", "1", "--rpc", dead)
    assert p.returncode == 69 and dead in _one_line_error(p)
    old = fake(version=(6, 0, 0))
    p = _run("run", str(smollm2_gguf), "hi", "-n", "1", "--rpc", old.endpoint)
    assert p.returncode == 69 and "6.0.0" in _one_line_error(p)


@pytest.mark.parametrize("command", ["run", "batch", "serve", "fit"])
def test_every_command_takes_rpc_and_checks_it(command, smollm2_gguf, tmp_path):
    args = {"run": ["run", str(smollm2_gguf), "hi"],
            "batch": ["batch", str(smollm2_gguf), str(tmp_path / "in.jsonl")],
            "serve": ["serve", str(smollm2_gguf), "--port", str(_free_port())],
            "fit": ["fit", str(smollm2_gguf)]}[command]
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    p = _run(*args, "--rpc", "host:99999")
    assert p.returncode == 2 and "host:99999" in _one_line_error(p)
    dead = f"127.0.0.1:{_free_port()}"
    p = _run(*args, env={"INFER_RPC": dead}, timeout=60)
    assert p.returncode == 69 and dead in _one_line_error(p)


def test_a_worker_killed_mid_run_ends_the_run_with_the_text_so_far(smollm2_gguf):
    port = _free_port()
    victim = _start_worker(port)
    endpoint = f"127.0.0.1:{port}"
    try:
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        client = subprocess.Popen(
            [sys.executable, "-m", "infer_cli", "run", str(smollm2_gguf), PROMPT, "--raw", "--temp", "0",
             "-n", "100000", "--ignore-eos", "--ctx", "4096", "--no-prompt-cache", "--rpc", endpoint],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL)
        first = client.stdout.read(40)  # some text has streamed
        assert first
        victim.send_signal(signal.SIGKILL)
        out, err = client.communicate(timeout=60)
        err = err.decode()
        assert client.returncode == 69, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines[0].startswith("Error: ") and endpoint in lines[0] and "stopped answering" in lines[0]
        assert "Traceback" not in err
        assert len(first + out) > 40  # what was generated stays
    finally:
        _stop(victim)


def test_worker_stops_cleanly_and_warns_off_loopback():
    port = _free_port()
    w = _start_worker(port)
    w.send_signal(signal.SIGTERM)
    assert w.wait(timeout=10) == 0
    assert "worker stopped" in w.stderr.read()
    port = _free_port()
    w = subprocess.Popen([sys.executable, "-m", "infer_cli", "worker", "--host", "0.0.0.0", "--port",
                          str(port), "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.time() + 30
        while not rpc.alive(f"127.0.0.1:{port}", timeout=0.5) and time.time() < deadline:
            time.sleep(0.1)
        w.send_signal(signal.SIGINT)
        assert w.wait(timeout=10) == 0
        assert "no authentication" in w.stderr.read()
    finally:
        _stop(w)


def test_a_worker_survives_a_queued_client_that_gave_up(workers):
    # a probe that times out behind another client closes with a reset: the worker, reaching
    # it later, must neither die nor hang
    with socket.create_connection(_addr(workers[1]), timeout=5) as held:
        held.sendall(struct.pack("<BQ", 14, 24) + bytes(24))
        held.recv(36)
        with pytest.raises(WorkerBusy):
            rpc.probe(workers[1], timeout=1)
    time.sleep(0.5)
    assert rpc.probe(workers[1]).version[0] == rpc.PROTOCOL[0]
