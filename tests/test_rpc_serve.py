"""A worker that vanishes under `infer serve --rpc` and `infer batch --rpc`: a real `infer worker`
on a loopback port, SIGKILLed while an answer streams. The server ends the stream with an error
event, answers 503 (health too) while it reconnects, and serves again once a new worker listens
on the same port; batch stops with the one-line error and exit 69, keeping its finished lines.

CPU heavy (a model loaded over a worker, twice): run this module on its own."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from infer_cli.engine import rpc

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.skipif(not rpc.available(), reason="llama.cpp built without GGML_RPC")

LONG = 100000  # a stream the worker's death cuts: it never ends on its own within the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "infer_cli", "worker", "--port", str(port),
                             "--threads", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker exited"
        if rpc.alive(f"127.0.0.1:{port}", timeout=0.5):
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the worker did not start listening")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _env(tmp_path) -> dict:
    env = {**os.environ, "INFER_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "GGML_NO_BACKTRACE": "1"}
    env.pop("INFER_API_KEY", None)
    env.pop("INFER_RPC", None)
    return env


def _wait_health(base: str, status: int, proc, log, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"infer serve exited {proc.returncode}:\n{log.read_text()}"
        try:
            r = httpx.get(base + "/health", timeout=5)
            last = (r.status_code, r.text)
            if r.status_code == status:
                return r
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"/health never answered {status} (last {last}):\n{log.read_text()}")


def _chat(base: str, max_tokens: int = 8, **extra):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=120)


def _serve_over_a_worker(model, tmp_path):
    """A worker on a free loopback port and `infer serve --rpc` over it (still loading)."""
    port = _free_port()
    endpoint = f"127.0.0.1:{port}"
    worker = _start_worker(port)
    serve_port = _free_port()
    log = tmp_path / "serve.log"
    server = subprocess.Popen([sys.executable, "-m", "infer_cli", "serve", str(model),
                               "--port", str(serve_port), "--ctx", "2048", "--threads", "1",
                               "--parallel", "2", "--rpc", endpoint],
                              stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=_env(tmp_path),
                              stdin=subprocess.DEVNULL)
    return port, endpoint, worker, server, f"http://127.0.0.1:{serve_port}", log


def _assert_lost_and_back_once(log) -> None:
    text = log.read_text()
    assert "Traceback" not in text and "GGML_ABORT" not in text, text
    assert text.count("engine lost:") == 1 and text.count("engine back:") == 1, text


def test_serve_survives_a_worker_that_vanishes_mid_stream(smollm2_gguf, tmp_path):
    port, endpoint, worker, server, base, log = _serve_over_a_worker(smollm2_gguf, tmp_path)
    try:
        _wait_health(base, 200, server, log, 180)
        r = _chat(base)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]

        # a stream and a plain request, both running when the worker dies
        plain: list = []
        waiter = threading.Thread(target=lambda: plain.append(_chat(base, LONG, ignore_eos=True)))
        waiter.start()
        events = []
        with httpx.stream("POST", base + "/v1/chat/completions", timeout=120,
                          json={"messages": [{"role": "user", "content": "Tell a long story."}],
                                "max_tokens": LONG, "temperature": 0, "stream": True,
                                "ignore_eos": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) >= 6:  # the role chunk and some text
                    break
            _kill(worker)
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "worker_lost" and endpoint in error["message"]
        assert not any("error" in json.loads(e) for e in events[:-2])
        waiter.join(60)
        assert plain and plain[0].status_code == 503 and plain[0].headers.get("retry-after")
        assert plain[0].json()["error"]["code"] == "worker_lost"

        # refused while the worker is away, with the reason
        r = _chat(base)
        assert r.status_code == 503 and r.headers.get("retry-after")
        assert r.json()["error"]["code"] == "worker_lost"
        h = httpx.get(base + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["status"] == "reconnecting"
        assert endpoint in h.json()["error"]
        time.sleep(1.0)
        assert httpx.get(base + "/health", timeout=5).status_code == 503  # still probing

        # a new worker on the same port: the model is loaded again, the server serves again
        worker = _start_worker(port)
        _wait_health(base, 200, server, log, 120)
        r = _chat(base)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        assert server.poll() is None
    finally:
        _stop(server)
        _stop(worker)
    _assert_lost_and_back_once(log)


def test_serve_notices_a_worker_that_vanishes_while_idle(smollm2_gguf, tmp_path):
    # Nothing runs when the worker dies: /health says so within seconds and requests are refused
    # before they are accepted, rather than the next one failing on its way.
    port, endpoint, worker, server, base, log = _serve_over_a_worker(smollm2_gguf, tmp_path)
    try:
        _wait_health(base, 200, server, log, 180)
        assert _chat(base).status_code == 200
        time.sleep(2.5)  # idle: the server has seen its connection to the worker
        assert httpx.get(base + "/health", timeout=5).status_code == 200  # not a false alarm
        _kill(worker)
        h = _wait_health(base, 503, server, log, 10)
        assert h.json()["status"] == "reconnecting"
        assert endpoint in h.json()["error"] and "idle" in h.json()["error"]
        r = _chat(base)
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_lost"

        worker = _start_worker(port)
        _wait_health(base, 200, server, log, 120)
        assert _chat(base).status_code == 200
    finally:
        _stop(server)
        _stop(worker)
    _assert_lost_and_back_once(log)


def test_batch_stops_with_the_one_line_error_and_keeps_finished_lines(smollm2_gguf, tmp_path):
    port = _free_port()
    endpoint = f"127.0.0.1:{port}"
    worker = _start_worker(port)
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # two short lines finish at once; the long ones are running when the worker dies
    lines = [{"id": "a", "prompt": "One.", "max_tokens": 2}, {"id": "b", "prompt": "Two.", "max_tokens": 2},
             {"id": "c", "prompt": "Three.", "max_tokens": LONG}, {"id": "d", "prompt": "Four.", "max_tokens": 4}]
    source.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = [sys.executable, "-m", "infer_cli", "batch", str(smollm2_gguf), str(source), "-o", str(out),
            "--ctx", "4096", "--threads", "1", "--parallel", "2", "--ignore-eos", "--raw"]
    try:
        proc = subprocess.Popen([*args, "--rpc", endpoint], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                                stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 2:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)  # "c" keeps the engine busy on the worker
        _kill(worker)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 69, err
        errors = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
        assert len(errors) == 1 and endpoint in errors[0] and "stopped answering" in errors[0], err
        assert "Traceback" not in err and "GGML_ABORT" not in err, err
        done = [json.loads(ln) for ln in out.read_text().splitlines()]
        ids = [r["id"] for r in done]
        assert ids[:2] == ["a", "b"] and "c" not in ids
        assert all(r["finish_reason"] == "length" for r in done)

        # a rerun with a worker back completes the rest, without redoing what is there
        worker = _start_worker(port)
        lines[2]["max_tokens"] = 3
        source.write_text("".join(json.dumps(x) + "\n" for x in lines))
        p = subprocess.run([*args, "--rpc", endpoint], capture_output=True, text=True,
                           env=_env(tmp_path), stdin=subprocess.DEVNULL, timeout=180)
        assert p.returncode == 0, p.stderr
        final = [json.loads(ln) for ln in out.read_text().splitlines()]
        assert sorted(r["id"] for r in final) == ["a", "b", "c", "d"]
    finally:
        _stop(worker)


def test_bench_over_a_worker_that_vanishes_ends_with_the_one_line_error(smollm2_gguf, tmp_path):
    dead = f"127.0.0.1:{_free_port()}"
    args = [sys.executable, "-m", "infer_cli", "bench", str(smollm2_gguf), "--quick", "--only",
            "batching", "--threads", "1"]
    p = subprocess.run([*args, "--rpc", dead], capture_output=True, text=True, env=_env(tmp_path),
                       stdin=subprocess.DEVNULL, timeout=120)
    assert p.returncode == 69 and dead in p.stderr and "Traceback" not in p.stderr, p.stderr

    port = _free_port()
    endpoint = f"127.0.0.1:{port}"
    worker = _start_worker(port)
    try:
        proc = subprocess.Popen([*args, "--rpc", endpoint], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_env(tmp_path),
                                stdin=subprocess.DEVNULL)
        # the calibration ran over the worker; the batching section is being measured
        head = proc.stderr.readline() + proc.stderr.readline()
        assert "Estimated time" in head, head
        _kill(worker)
        _, err = proc.communicate(timeout=120)
        err = head + err
        assert proc.returncode == 69, err
        errors = [ln for ln in err.splitlines() if ln.startswith("Error: ")]
        # (mid-computation the child aborts; between two loads the next one finds nobody)
        assert len(errors) == 1 and endpoint in errors[0], err
        assert "stopped answering" in errors[0] or "unreachable" in errors[0], err
        assert "Traceback" not in err and "GGML_ABORT" not in err, err
    finally:
        _stop(worker)
