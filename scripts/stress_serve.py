#!/usr/bin/env python3
"""`infer serve` under a rough mix of requests: does it stay up, answer every request right and
give everything back afterwards?

One `infer serve --parallel 4 --ctx 8192` on a free loopback port; --requests (default 2000)
requests from 32 concurrent clients, in a shuffled mix:

  10% malformed: bad JSON, bytes that are not UTF-8, a JSON array, wrong types, a 9 MiB body
      (with Content-Length, and chunked without one) ... each must get a 4xx whose body is a
      JSON object {"error": {...}};
  10% clients that hang up: mid-stream after a few content deltas, or (non-streamed) right after
      sending the request;
  10% response_format json_schema (streamed or not): the text must validate (jsonschema);
  the rest normal chats, max_tokens 8..32, streamed (with and without usage) or not: status 200
      and a body of the right shape.

Then: the server is still up (/health 200), /metrics shows infer_sequences_running 0,
infer_queue_depth 0 and infer_kv_cells_used 0, and the server's resident memory (psutil, by pid)
is within 10% of what it was after a warm-up that ran every code path and filled the prompt
cache (finished sequences' KV in host memory: bounded by the context's size, memory by design);
the same less the cache's own bytes (infer_prompt_cache_bytes) is printed beside it.

    .venv/bin/python scripts/stress_serve.py [--requests 2000] [--clients 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import sys
import time
from pathlib import Path

import jsonschema
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import (DEFAULT_MODEL, HELD_OUT, HOST, ROOT, TUNING, HTTPError, Running,  # noqa: E402
                         _body_chunks, _read_head, _request_bytes, free_port, pct, request,
                         stream_chat)

PROMPTS = TUNING + HELD_OUT
BIG = 9 * 1024 * 1024

SCHEMAS = [
    {"type": "object",
     "properties": {"name": {"type": "string", "maxLength": 24},
                    "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object",
     "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["colour", "ok"], "additionalProperties": False},
    {"type": "object",
     "properties": {"items": {"type": "array", "items": {"type": "string", "maxLength": 12},
                              "minItems": 1, "maxItems": 3}},
     "required": ["items"], "additionalProperties": False},
]
SCHEMA_PROMPTS = ["Describe a person as JSON.", "Pick a colour and say whether it is ok, as JSON.",
                  "List a few fruits as JSON."]


def _chat_body(prompt: str, max_tokens: int, **extra) -> bytes:
    return json.dumps({"model": "x", "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens, "temperature": 0, **extra}).encode()


def _malformed() -> list[tuple[str, bytes | None, dict]]:
    """(name, body, extra headers). A body of None: the 9 MiB one, chunked (no Content-Length)."""
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    big_json = json.dumps({"messages": [{"role": "user", "content": "a" * BIG}]}).encode()
    return [
        ("truncated JSON", b'{"messages": [{"role": "user", "content": "hi"}', {}),
        ("not UTF-8", b'\xff\xfe{"messages": []}', {}),
        ("empty body", b"", {}),
        ("JSON array", b"[1, 2, 3]", {}),
        ("messages a string", json.dumps({"messages": "hello"}).encode(), {}),
        ("max_tokens a string", json.dumps({**good, "max_tokens": "ten"}).encode(), {}),
        ("temperature a string", json.dumps({**good, "temperature": "hot"}).encode(), {}),
        ("stream not a bool", json.dumps({**good, "stream": "maybe"}).encode(), {}),
        ("unknown role", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), {}),
        ("no messages", json.dumps({"messages": []}).encode(), {}),
        ("max_tokens negative", json.dumps({**good, "max_tokens": -5}).encode(), {}),
        ("content a number", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), {}),
        ("json_schema without schema", json.dumps(
            {**good, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}).encode(), {}),
        ("9 MiB body", big_json, {}),
        ("9 MiB body, chunked", None, {}),
    ]


class Check:
    def __init__(self):
        self.counts = collections.Counter()
        self.failures: list[str] = []
        self.ttft: list[float] = []
        self.latency: list[float] = []

    def ok(self, kind: str):
        self.counts[f"{kind} ok"] += 1

    def fail(self, kind: str, why: str):
        self.counts[f"{kind} FAILED"] += 1
        if len(self.failures) < 40:
            self.failures.append(f"{kind}: {why}")


async def send_raw(port: int, body: bytes | None, headers: dict, timeout: float = 120.0):
    """POST a (possibly huge) body while reading the answer: the server may answer before it
    has read the body and close. ``body`` None: 9 MiB sent chunked, without a Content-Length."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        if body is None:
            head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                    "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                    "Connection: close\r\n\r\n").encode()

            async def write():
                writer.write(head)
                piece = b"a" * (256 * 1024)
                for _ in range(BIG // len(piece) + 1):
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        else:
            data = _request_bytes(port, "POST", "/v1/chat/completions", body, headers)

            async def write():
                writer.write(data)
                await writer.drain()

        wtask = asyncio.create_task(write())

        async def read():
            status, hdrs = await _read_head(reader)
            out = b"".join([c async for c in _body_chunks(reader, hdrs)])
            return status, hdrs, out

        try:
            return await asyncio.wait_for(read(), timeout)
        finally:
            if not wtask.done():
                wtask.cancel()
            try:
                await wtask
            except (asyncio.CancelledError, OSError):
                pass
    finally:
        writer.close()


async def one(port: int, kind: str, spec, check: Check, rng: random.Random):
    t0 = time.perf_counter()
    try:
        if kind == "malformed":
            name, body, headers = spec
            try:
                status, hdrs, data = await send_raw(port, body, headers)
            except (OSError, asyncio.IncompleteReadError, HTTPError, asyncio.TimeoutError) as e:
                return check.fail(kind, f"{name}: no answer ({type(e).__name__}: {e})")
            if not 400 <= status < 500:
                return check.fail(kind, f"{name}: status {status}: {data[:200]!r}")
            try:
                obj = json.loads(data)
            except ValueError:
                return check.fail(kind, f"{name}: {status} body not JSON: {data[:200]!r}")
            if not (isinstance(obj, dict) and isinstance(obj.get("error"), dict)
                    and isinstance(obj["error"].get("message"), str)):
                return check.fail(kind, f"{name}: {status} body not an error object: {data[:200]!r}")
            check.counts[f"malformed status {status}"] += 1
            return check.ok(kind)

        if kind == "disconnect":
            mode, payload = spec
            if mode == "mid-stream":
                r = await stream_chat(port, payload, timeout=120, stop_after_chunks=rng.randint(1, 4))
                if r.status != 200 or r.error or r.content_chunks == 0 and not r.finish_reason:
                    return check.fail(kind, f"mid-stream: status {r.status} error {r.error}")
                return check.ok(kind)
            # non-streamed: send, then hang up before the answer
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(_request_bytes(port, "POST", "/v1/chat/completions",
                                        json.dumps(payload).encode(), {}))
            await writer.drain()
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            writer.close()
            return check.ok(kind)

        if kind == "schema":
            schema, payload = spec
            if payload.get("stream"):
                r = await stream_chat(port, payload, timeout=180)
                if r.status != 200 or r.error:
                    return check.fail(kind, f"stream status {r.status} error {r.error}")
                text, finish = r.text, r.finish_reason
            else:
                status, _, data = await request(port, "POST", "/v1/chat/completions",
                                                json.dumps(payload).encode(), timeout=180)
                if status != 200:
                    return check.fail(kind, f"status {status}: {data[:200]!r}")
                obj = json.loads(data)
                text = obj["choices"][0]["message"]["content"]
                finish = obj["choices"][0]["finish_reason"]
            try:
                jsonschema.validate(json.loads(text), schema)
            except (ValueError, jsonschema.ValidationError) as e:
                return check.fail(kind, f"finish {finish}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120]}; text {text[:160]!r}")
            check.latency.append(time.perf_counter() - t0)
            return check.ok(kind)

        # normal
        payload = spec
        mt = payload["max_tokens"]
        if payload.get("stream"):
            r = await stream_chat(port, payload, timeout=120, keep_events=True)
            why = stream_shape(r, payload)
            if why:
                return check.fail(kind, f"stream: {why}")
            if r.ttft is not None:
                check.ttft.append(r.ttft)
            if not r.text:
                check.counts["normal empty text"] += 1
        else:
            status, _, data = await request(port, "POST", "/v1/chat/completions",
                                            json.dumps(payload).encode(), timeout=120)
            if status != 200:
                return check.fail(kind, f"status {status}: {data[:200]!r}")
            why = completion_shape(json.loads(data), mt)
            if why:
                return check.fail(kind, why)
        check.latency.append(time.perf_counter() - t0)
        return check.ok(kind)
    except Exception as e:  # noqa: BLE001 - anything unexpected is a failure of this request
        return check.fail(kind, f"{type(e).__name__}: {e}")


def completion_shape(obj, max_tokens: int) -> str | None:
    try:
        assert obj["object"] == "chat.completion", "object"
        assert isinstance(obj["id"], str) and obj["id"], "id"
        assert len(obj["choices"]) == 1, "choices"
        ch = obj["choices"][0]
        assert ch["message"]["role"] == "assistant", "role"
        assert isinstance(ch["message"]["content"], str), "content"
        assert ch["finish_reason"] in ("stop", "length"), f"finish_reason {ch['finish_reason']}"
        u = obj["usage"]
        assert isinstance(u["prompt_tokens"], int) and u["prompt_tokens"] > 0, "prompt_tokens"
        assert isinstance(u["completion_tokens"], int) and 0 < u["completion_tokens"] <= max_tokens, \
            f"completion_tokens {u['completion_tokens']}"
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"], "total_tokens"
        if ch["finish_reason"] == "length":
            assert u["completion_tokens"] == max_tokens, "length before max_tokens"
    except (AssertionError, KeyError, TypeError, IndexError) as e:
        return f"bad shape ({e}): {json.dumps(obj)[:200]}"
    return None


def stream_shape(r, payload) -> str | None:
    if r.status != 200:
        return f"status {r.status}: {r.error}"
    if r.error:
        return f"error event {r.error}"
    if not r.done_marker:
        return "no [DONE]"
    finishes = [ch["finish_reason"] for ev in r.events for ch in ev.get("choices") or ()
                if ch.get("finish_reason")]
    if finishes not in (["stop"], ["length"]):
        return f"finish reasons {finishes}"
    if any(ev.get("object") != "chat.completion.chunk" for ev in r.events):
        return "a chunk's object is not chat.completion.chunk"
    usage = [ev["usage"] for ev in r.events if ev.get("usage")]
    want_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
    if want_usage != bool(usage):
        return f"usage chunk {'missing' if want_usage else 'unasked for'}"
    if usage and not 0 < usage[-1]["completion_tokens"] <= payload["max_tokens"]:
        return f"completion_tokens {usage[-1]['completion_tokens']}"
    return None


def plan(n: int, rng: random.Random) -> list[tuple[str, object]]:
    bad = _malformed()
    n_bad = n_disc = n_schema = n // 10
    jobs: list[tuple[str, object]] = []
    for i in range(n_bad):
        jobs.append(("malformed", bad[i % len(bad)]))
    for i in range(n_disc):
        p = rng.choice(PROMPTS)
        if i % 4 == 3:
            jobs.append(("disconnect", ("before answer", {
                "messages": [{"role": "user", "content": p}], "max_tokens": 128, "temperature": 0})))
        else:
            jobs.append(("disconnect", ("mid-stream", {
                "messages": [{"role": "user", "content": p}], "max_tokens": 128, "temperature": 0,
                "stream": True})))
    for i in range(n_schema):
        k = i % len(SCHEMAS)
        jobs.append(("schema", (SCHEMAS[k], {
            "messages": [{"role": "user", "content": SCHEMA_PROMPTS[k]}], "max_tokens": 160,
            "temperature": rng.choice([0, 0.7]), "seed": i, "stream": i % 3 == 0,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": f"s{k}", "schema": SCHEMAS[k]}}})))
    for i in range(n - len(jobs)):
        payload = {"messages": [{"role": "user", "content": f"{rng.choice(PROMPTS)}"}],
                   "max_tokens": rng.randint(8, 32), "temperature": rng.choice([0, 0.8]),
                   "seed": i}
        if i % 2:
            payload["stream"] = True
            if i % 4 == 1:
                payload["stream_options"] = {"include_usage": True}
        jobs.append(("normal", payload))
    rng.shuffle(jobs)
    return jobs


def read_metrics(port: int) -> dict[str, float]:
    status, _, data = asyncio.run(request(port, "GET", "/metrics", timeout=10))
    out = {}
    for line in data.decode().splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


async def run_jobs(port: int, jobs, clients: int, check: Check, seed: int, deadline_s: float,
                   server_pid: int, samples: list):
    todo = collections.deque(jobs)
    end = time.perf_counter() + deadline_s
    proc = psutil.Process(server_pid)

    async def worker(w: int):
        rng = random.Random(seed * 1000 + w)
        while todo and time.perf_counter() < end:
            kind, spec = todo.popleft()
            await one(port, kind, spec, check, rng)

    async def sampler():
        while todo:
            try:
                samples.append((len(jobs) - len(todo), proc.memory_info().rss))
            except psutil.Error:
                return
            await asyncio.sleep(1.0)

    s = asyncio.create_task(sampler())
    await asyncio.gather(*(worker(w) for w in range(clients)))
    s.cancel()
    return len(todo)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=24, help="normal requests before the first RSS")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=690.0, help="stop sending after this")
    ap.add_argument("--log", type=Path, default=None, help="keep the server's output here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    port = free_port()
    argv = [str(ROOT / ".venv/bin/infer"), "serve", str(args.model), "--port", str(port),
            "--parallel", str(args.parallel), "--ctx", str(args.ctx), "--threads", str(args.threads)]
    srv = Running(argv, port, "/health", args.log)
    check = Check()
    figures: dict = {"command": " ".join(argv), "requests": args.requests, "clients": args.clients}
    try:
        figures["ready_s"] = round(srv.wait_ready(), 2)
        proc = psutil.Process(srv.pid)
        # warm-up: normal requests, a few schema ones, a few streamed (all code paths once)
        rng = random.Random(args.seed)
        warm = Check()
        warm_jobs = [("normal", {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                 "max_tokens": 24, "temperature": 0, "stream": bool(i % 2)})
                     for i in range(args.warmup)]
        warm_jobs += [("schema", (SCHEMAS[k], {
            "messages": [{"role": "user", "content": SCHEMA_PROMPTS[k]}], "max_tokens": 160,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {
                "name": "w", "schema": SCHEMAS[k]}}})) for k in range(len(SCHEMAS))]
        warm_jobs += [("malformed", b) for b in _malformed()]
        asyncio.run(run_jobs(port, warm_jobs, 8, warm, args.seed, 300, srv.pid, []))
        # then distinct prompts until the prompt cache is about full: it is memory by design,
        # bounded by the context's size, and the baseline is the server in its steady state
        for r in range(40):
            if read_metrics(port).get("infer_kv_cells_cached", 0) >= 0.9 * args.ctx:
                break
            fill = [("normal", {"messages": [{"role": "user", "content": f"(Warm-up {r}.{i}) "
                                              + PROMPTS[(r + i) % len(PROMPTS)]}],
                                "max_tokens": 24, "temperature": 0}) for i in range(16)]
            asyncio.run(run_jobs(port, fill, 8, warm, args.seed, 300, srv.pid, []))
        if warm.failures:
            figures["warmup_failures"] = warm.failures
        time.sleep(1.0)
        rss_warm = proc.memory_info().rss
        cache_warm = read_metrics(port).get("infer_prompt_cache_bytes", 0)
        figures["rss_after_warmup_mib"] = round(rss_warm / 2**20, 1)
        figures["prompt_cache_mib_after_warmup"] = round(cache_warm / 2**20, 1)

        jobs = plan(args.requests, rng)
        figures["mix"] = dict(collections.Counter(k for k, _ in jobs))
        samples: list[int] = []
        t0 = time.perf_counter()
        left = asyncio.run(run_jobs(port, jobs, args.clients, check, args.seed, args.time_limit,
                                    srv.pid, samples))
        figures["wall_s"] = round(time.perf_counter() - t0, 1)
        figures["not_sent_time_limit"] = left
        figures["server_alive"] = srv.alive()
        # give cancelled sequences a moment to leave, then read the gauges
        m: dict = {}
        settle = time.perf_counter()
        for _ in range(50):
            if not srv.alive():
                break
            m = read_metrics(port)
            if m.get("infer_sequences_running", 1) == 0 and m.get("infer_kv_cells_used", 1) == 0:
                break
            time.sleep(0.2)
        figures["settle_s"] = round(time.perf_counter() - settle, 2)
        status, _, _ = asyncio.run(request(port, "GET", "/health", timeout=10)) if srv.alive() else (0, 0, 0)
        figures["health_after"] = status
        for k in ("infer_sequences_running", "infer_queue_depth", "infer_kv_cells_used",
                  "infer_kv_cells_total"):
            figures[k] = m.get(k)
        figures["infer_sequences_total"] = {k.split('"')[1]: v for k, v in m.items()
                                            if k.startswith("infer_sequences_total{")}
        figures["infer_requests_total"] = {k[len("infer_requests_total"):]: v for k, v in m.items()
                                           if k.startswith("infer_requests_total{")
                                           and "chat" in k}
        time.sleep(1.0)
        rss_after = proc.memory_info().rss if srv.alive() else 0
        cache_after = read_metrics(port).get("infer_prompt_cache_bytes", 0) if srv.alive() else 0
        figures["rss_after_run_mib"] = round(rss_after / 2**20, 1)
        figures["prompt_cache_mib_after_run"] = round(cache_after / 2**20, 1)
        figures["rss_peak_during_run_mib"] = round(max((r for _, r in samples), default=0) / 2**20, 1)
        # RSS as the run goes on: the last sample at or before each tenth of the requests sent
        by_tenth = []
        for t in range(1, 11):
            upto = [r for n, r in samples if n <= t * len(jobs) / 10]
            by_tenth.append(round(upto[-1] / 2**20, 1) if upto else None)
        figures["rss_mib_by_tenth_of_run"] = by_tenth
        figures["rss_growth_pct"] = round(100 * (rss_after - rss_warm) / rss_warm, 2)
        base = rss_warm - cache_warm  # what grows besides the cache
        figures["rss_less_cache_growth_pct"] = round(100 * ((rss_after - cache_after) - base) / base, 2)
    finally:
        figures["server_exit_code"] = srv.stop()

    figures["counts"] = dict(sorted(check.counts.items()))
    figures["normal_ttft_ms_p50_p95"] = [round(pct(sorted(check.ttft), q) * 1000, 1) for q in (50, 95)]
    figures["latency_s_p50_p95_max"] = [round(pct(sorted(check.latency), q), 2) for q in (50, 95, 100)]
    figures["failures"] = check.failures
    n_failed = sum(v for k, v in check.counts.items() if k.endswith("FAILED"))
    checks = {
        "server stayed up": figures["server_alive"] and figures["health_after"] == 200,
        "every request checked (none left by the time limit)": left == 0,
        "all well-formed answered right": all(check.counts[f"{k} FAILED"] == 0
                                               for k in ("normal", "disconnect")),
        "all malformed got a 4xx error object": check.counts["malformed FAILED"] == 0,
        "all schema answers validate": check.counts["schema FAILED"] == 0,
        "running 0, queue 0, KV cells used 0 after": (figures["infer_sequences_running"] == 0
                                                      and figures["infer_queue_depth"] == 0
                                                      and figures["infer_kv_cells_used"] == 0),
        "RSS after within 10% of after warm-up": abs(figures["rss_growth_pct"]) <= 10,
    }
    figures["checks"] = checks
    figures["failed_requests"] = n_failed

    print(f"\n`infer serve` stress: {args.requests} requests, {args.clients} clients, "
          f"--parallel {args.parallel} --ctx {args.ctx} --threads {args.threads}\n")
    print("| figure | value |\n|---|---|")
    for k in ("ready_s", "mix", "wall_s", "not_sent_time_limit", "counts", "normal_ttft_ms_p50_p95",
              "latency_s_p50_p95_max", "server_alive", "health_after", "settle_s",
              "infer_sequences_running", "infer_queue_depth", "infer_kv_cells_used",
              "infer_kv_cells_total", "infer_sequences_total", "infer_requests_total",
              "rss_after_warmup_mib", "prompt_cache_mib_after_warmup", "rss_mib_by_tenth_of_run",
              "rss_peak_during_run_mib", "rss_after_run_mib", "prompt_cache_mib_after_run",
              "rss_growth_pct", "rss_less_cache_growth_pct", "server_exit_code"):
        print(f"| {k} | {json.dumps(figures.get(k))} |")
    print("\n| check | met |\n|---|---|")
    for k, v in checks.items():
        print(f"| {k} | {'yes' if v else 'NO'} |")
    if check.failures:
        print("\nfailures (first 40):")
        for f in check.failures:
            print("  " + f)
    if figures.get("warmup_failures"):
        print("\nwarm-up failures:")
        for f in figures["warmup_failures"]:
            print("  " + f)
    if args.json:
        print(json.dumps(figures, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
