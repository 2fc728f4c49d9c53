"""`infer serve` as a client meets it: a real server subprocess on the SmolLM2 test model, spoken
to with the real `openai` client and plain HTTP. Each configuration starts once per module."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

# The command line, whether or not `serve` is in infer's command table yet.
_LAUNCH = ("import sys\n"
           "from infer_cli.cli import app as a, serve\n"
           "if not any(c.name == 'serve' for c in a.app.registered_commands):\n"
           "    serve.register(a.app)\n"
           "a.main(sys.argv[1:])\n")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
HI = [{"role": "user", "content": "Say hello."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log
        self.base = f"http://127.0.0.1:{port}"

    def client(self, key="none", **kw):
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=180, **kw)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _start(model, tmp, *args) -> Served:
    port = _free_port()
    log = tmp / f"serve-{port}.log"
    env = {**os.environ, "INFER_HOME": str(tmp / "home"), "HF_HOME": str(tmp / "hf")}
    env.pop("INFER_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, "serve", str(model), "--port", str(port),
                             "--ctx", "2048", "--threads", "2", "--temp", "0", *args],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    s = Served(proc, port, log)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"infer serve exited {proc.returncode}:\n{s.stderr()}")
        try:
            if httpx.get(s.base + "/health", timeout=2).status_code == 200:
                return s
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"infer serve did not get ready:\n{s.stderr()}")


def _stop(s: Served) -> None:
    if s.proc.poll() is None:
        s.proc.send_signal(signal.SIGTERM)
        try:
            s.proc.wait(20)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    s = _start(smollm2_gguf, tmp_path_factory.mktemp("serve"), "--parallel", "4")
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def guarded(smollm2_gguf, tmp_path_factory):
    """An API key, one sequence at a time and a wait queue of one."""
    s = _start(smollm2_gguf, tmp_path_factory.mktemp("serve-key"), "--parallel", "1",
               "--queue", "1", "--api-key", "sesame")
    yield s
    _stop(s)


def _metric(s: Served, name: str, key: str | None = None, default: float | None = None) -> float:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(s.base + "/metrics", headers=headers, timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    if m is None and default is not None:
        return default
    assert m, text
    return float(m.group(1))


def _error_object(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    return err


# --- the API ------------------------------------------------------------------------------------

def test_models_and_health(server):
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}
    models = server.client().models.list().data
    assert len(models) == 1 and models[0].id == "SmolLM2-135M-Instruct.Q4_1"
    assert models[0].model_extra["context_length"] == 2048


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's maps in /proc")
def test_the_server_runs_on_uvloop_and_httptools(server):
    """The event loop and HTTP parser in C that the package depends on are the ones that serve:
    their extension modules are mapped into the server process, and a streamed answer arrives."""
    from infer_cli.cli.serve import event_loop_stack

    assert event_loop_stack() == ("uvloop", "httptools")
    with server.client().chat.completions.create(model="x", messages=HI, max_tokens=4,
                                                 stream=True) as stream:
        assert any(c.choices and c.choices[0].delta.content for c in stream)
    maps = open(f"/proc/{server.proc.pid}/maps").read()
    assert re.search(r"/uvloop/loop\.[^/]*\.so", maps), "uvloop is not loaded in the server"
    assert re.search(r"/httptools/parser/[^/]*\.so", maps), "httptools is not loaded in the server"


def test_chat_plain_and_streamed_agree(server):
    c = server.client()
    plain = c.chat.completions.create(model="x", messages=HI, max_tokens=12, temperature=0)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason in ("stop", "length")
    u = plain.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert plain.model_extra["timings"]["predicted_n"] == u.completion_tokens
    chunks = list(c.chat.completions.create(model="x", messages=HI, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens


def test_completions_and_stop_strings(server):
    c = server.client()
    r = c.completions.create(model="x", prompt="The capital of France is", max_tokens=8, temperature=0)
    text = r.choices[0].text
    assert "Paris" in text and r.usage.completion_tokens <= 8
    cut = text.index("Paris")
    stopped = c.completions.create(model="x", prompt="The capital of France is", max_tokens=8,
                                   temperature=0, stop=["Paris"])
    assert stopped.choices[0].text == text[:cut] and stopped.choices[0].finish_reason == "stop"


def test_json_schema_output_validates(server):
    jsonschema = pytest.importorskip("jsonschema")
    r = server.client().chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = httpx.post(server.base + "/v1/chat/completions", timeout=30, json={
        "messages": HI, "response_format": {"type": "json_schema", "json_schema": {
            "schema": {"type": "object", "properties": {"a": {"$ref": "https://example.com/s"}}}}}})
    assert "cannot enforce" in _error_object(r, 400)["message"]


def test_seed_reproduces(server):
    """With cache_prompt off (llama-server's switch) the prompt is computed the same way each
    time, so a seeded draw repeats exactly."""
    c = server.client()
    ask = lambda seed: c.completions.create(  # noqa: E731
        model="x", prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=seed,
        extra_body={"cache_prompt": False}).choices[0].text
    assert ask(1234) == ask(1234)


def test_shared_prefix_is_cached(server):
    prefix = "You are a careful assistant who answers in one short sentence. " * 3
    r = server.client().completions.create(model="x", prompt=[prefix + "Sky?", prefix + "Sea?"],
                                           max_tokens=2, temperature=0)
    assert len(r.choices) == 2
    assert r.usage.prompt_tokens_details.cached_tokens >= 16


def test_next_request_reuses_an_idle_slot(server):
    """A finished request's cells stay in its slot: the next turn of the chat computes only
    what is new, and the answer is the one a fresh computation gives."""
    c = server.client()
    history = [{"role": "system", "content": "You answer in one short sentence. " * 4},
               {"role": "user", "content": "Name a river in Europe."}]
    first = c.chat.completions.create(model="x", messages=history, max_tokens=10, temperature=0)
    again = c.chat.completions.create(model="x", messages=history, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    turn = history + [{"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And one in Asia?"}]
    nxt = c.chat.completions.create(model="x", messages=turn, max_tokens=6, temperature=0)
    assert nxt.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert nxt.model_extra["timings"]["prompt_n"] < nxt.usage.prompt_tokens - first.usage.prompt_tokens + 8


def test_logprobs(server):
    c = server.client()
    r = c.chat.completions.create(model="x", messages=HI, max_tokens=8, temperature=0,
                                  logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].token == e.token and abs(tops[0] - e.logprob) < 1e-6
        assert sum(2.718281828 ** t for t in tops) <= 1 + 1e-6
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    chunks = list(c.chat.completions.create(model="x", messages=HI, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == \
        [(e.token, round(e.logprob, 4)) for e in content]
    plain = c.chat.completions.create(model="x", messages=HI, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    done = c.completions.create(model="x", prompt="The capital of France is", max_tokens=6,
                                temperature=0, logprobs=2, echo=True)
    lp = done.choices[0].logprobs
    text = done.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset[0] == len("The capital of France is")
    assert all(text[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens))
    assert all(len(alts) == 2 and max(alts.values()) >= x - 1e-6
               for alts, x in zip(lp.top_logprobs, lp.token_logprobs))


def test_plain_request_cancelled_when_the_client_leaves(server):
    """A non-streamed request whose client hangs up stops at once, though no text goes out."""
    before = _metric(server, 'infer_sequences_total{finish_reason="cancelled"}', default=0)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                      f"\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        deadline = time.monotonic() + 20
        while _metric(server, "infer_sequences_running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 5
    while _metric(server, "infer_sequences_running") != 0:
        assert time.monotonic() < deadline, "the sequence kept running after the client left"
        time.sleep(0.1)
    assert _metric(server, 'infer_sequences_total{finish_reason="cancelled"}', default=0) == before + 1


def test_parallel_requests_overlap(server):
    c = server.client()
    marks = {}

    def one(i):
        first = None
        for ch in c.completions.create(model="x", prompt=f"Story number {i}:", max_tokens=12,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True}):
            if first is None and ch.choices and ch.choices[0].text:
                first = time.monotonic()
        marks[i] = (first, time.monotonic())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(marks) == 4
    assert max(f for f, _ in marks.values()) < min(e for _, e in marks.values()), marks


def test_disconnect_cancels(server):
    with httpx.stream("POST", server.base + "/v1/completions", timeout=60, json={
            "prompt": "Once upon a time", "max_tokens": 1500, "stream": True, "ignore_eos": True}) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                got += 1
                if got >= 3:
                    break
    assert _metric(server, "infer_sequences_running") <= 1
    deadline = time.monotonic() + 10
    while _metric(server, "infer_sequences_running") != 0:
        assert time.monotonic() < deadline, "the sequence kept running after the client left"
        time.sleep(0.2)
    assert "cancelled" in server.stderr()


def _chunked_upload_answer(port: int, mib: int) -> bytes:
    """What a client that uploads ``mib`` MiB chunked (no Content-Length: the server finds the
    cap while reading), all at once, and only then reads, gets back. A server that answers 413
    and closes while the upload still comes resets the connection: the client's upload fails,
    and a client like urllib3 (requests) reports that instead of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n" % 2**20 + b"x" * 2**20 + b"\r\n"
        try:
            sock.sendall(piece * mib + b"0\r\n\r\n")
        except OSError as e:  # as urllib3 (requests) does: an upload cut short is the error
            return f"upload cut: {e}".encode()
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError as e:
            return f"no answer: {e}".encode()
        return answer


def test_bad_inputs_get_error_objects(server):
    url = server.base + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert _error_object(r, 400)["code"] == "invalid_json"
    err = _error_object(httpx.post(url, json={"messages": "hello"}), 400)
    assert err["param"] == "messages"
    err = _error_object(httpx.post(url, json={"messages": HI, "max_tokens": "many"}), 400)
    assert err["param"] == "max_tokens"
    _error_object(httpx.post(url, json={"messages": HI, "top_logprobs": 2}), 400)
    assert _error_object(httpx.post(url, json={"messages": HI, "logprobs": True,
                                               "top_logprobs": 99}), 400)["param"] == "top_logprobs"
    _error_object(httpx.post(server.base + "/v1/completions",
                             json={"prompt": "x", "logprobs": 9}), 400)
    _error_object(httpx.get(server.base + "/v1/nothing"), 404)
    _error_object(httpx.post(url, content=b"x" * (9 * 1024 * 1024),
                             headers={"content-type": "application/json"}), 413)

    for _ in range(3):
        assert _chunked_upload_answer(server.port, 16).startswith(b"HTTP/1.1 413")
    long = {"prompt": "word " * 3000, "max_tokens": 4}
    assert _error_object(httpx.post(server.base + "/v1/completions", json=long, timeout=60),
                         400)["code"] == "context_length_exceeded"
    assert httpx.get(server.base + "/health").status_code == 200  # still serving


def test_metrics_and_page(server):
    assert _metric(server, "infer_kv_cells_total") == 2048
    assert _metric(server, "infer_generated_tokens_total") > 0
    # earlier tests' answers sit in the prompt cache, in host memory, and the pool holds none
    assert 0 < _metric(server, "infer_kv_cells_cached") <= 2048
    assert _metric(server, "infer_prompt_cache_bytes") > 0
    assert _metric(server, "infer_kv_cells_used") == 0
    page = httpx.get(server.base + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text and "AbortController" in page.text
    assert "POST /v1/chat/completions 200" in server.stderr()


# --- the guarded server: API key and a full queue -----------------------------------------------

def test_api_key(guarded):
    url = guarded.base + "/v1/chat/completions"
    body = {"messages": HI, "max_tokens": 2}
    _error_object(httpx.post(url, json=body), 401)
    _error_object(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(guarded.base + "/health").status_code == 200
    ok = httpx.post(url, json=body, headers={"X-Api-Key": "sesame"}, timeout=120)
    assert ok.status_code == 200, ok.text
    r = guarded.client("sesame").chat.completions.create(model="x", messages=HI, max_tokens=2)
    assert r.choices[0].message.content is not None


def test_queue_full_is_503(guarded):
    """One running, one waiting: a third request is refused at once, and the two others still
    complete (each read by a client of its own, as concurrent users are)."""
    headers = {"Authorization": "Bearer sesame"}
    body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    done = {}

    def read(name):
        with httpx.stream("POST", guarded.base + "/v1/completions", json=body, headers=headers,
                          timeout=120) as r:
            done[name] = (r.status_code, [ln for ln in r.iter_lines() if ln][-1])

    threads = [threading.Thread(target=read, args=(n,)) for n in ("first", "second")]
    for t in threads:
        t.start()
        time.sleep(0.3)
    deadline = time.monotonic() + 30
    while _metric(guarded, "infer_queue_depth", "sesame") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    third = httpx.post(guarded.base + "/v1/completions", json=body, headers=headers, timeout=30)
    err = _error_object(third, 503)
    assert err["code"] == "queue_full" and third.headers["retry-after"]
    for t in threads:
        t.join(120)
    assert done["first"] == (200, "data: [DONE]") and done["second"] == (200, "data: [DONE]")


def test_stream_interval_puts_several_tokens_in_a_chunk(smollm2_gguf, tmp_path):
    """--stream-interval: a stream faster than the interval gets several tokens a chunk; the
    text and the log-probabilities are the plain answer's, none lost or repeated; the first
    token is not held back. With 0 every token is a chunk of its own."""
    ask = dict(model="x", messages=[{"role": "user", "content": "Tell me a story."}],
               max_tokens=40, temperature=0, logprobs=True, top_logprobs=1)
    seen = {}
    for interval in ("0.3", "0"):
        s = _start(smollm2_gguf, tmp_path, "--parallel", "1", "--stream-interval", interval)
        try:
            c = s.client()
            plain = c.chat.completions.create(**ask)
            chunks = [ch for ch in c.chat.completions.create(**ask, stream=True)
                      if ch.choices and ch.choices[0].delta.content]
        finally:
            _stop(s)
        text = plain.choices[0].message.content
        assert "".join(ch.choices[0].delta.content for ch in chunks) == text
        lps = [e.token for ch in chunks for e in ch.choices[0].logprobs.content]
        assert lps == [e.token for e in plain.choices[0].logprobs.content]
        assert len(chunks[0].choices[0].logprobs.content) == 1  # the first token at once
        seen[interval] = (len(chunks), plain.usage.completion_tokens)
    n, tokens = seen["0.3"]
    assert tokens >= 30 and n < tokens / 2, seen
    n, tokens = seen["0"]
    assert n >= tokens - 2, seen  # (a token may complete no character on its own)
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-c", _LAUNCH, "serve", str(smollm2_gguf),
                        "--stream-interval", "-1"], check=True, capture_output=True, timeout=60)


# --- last: stopping (ends the module's default server) -------------------------------------------

def test_sigterm_stops_within_seconds(server):
    with httpx.stream("POST", server.base + "/v1/completions", timeout=60, json={
            "prompt": "Once upon a time", "max_tokens": 1500, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        next(lines)
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    assert "data: [DONE]" in rest
    assert server.proc.wait(20) == 0
    assert time.monotonic() - t0 < 15
