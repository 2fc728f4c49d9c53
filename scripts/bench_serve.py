#!/usr/bin/env python3
"""`infer serve` under load against llama.cpp's own llama-server and llama-cpp-python's server.

Streamed chat completions (max_tokens 128, temperature 0, distinct prompts) from 1, 4 and 16
concurrent clients against:

  infer serve --parallel 4 (and --parallel 16 for 16 clients)  --ctx C --threads T
  llama-server -np 4 (and -np 16 for 16 clients)               -c C  -t T
  python -m llama_cpp.server (1 and 4 clients)                  --n_ctx C --n_threads T
      once with --interrupt_requests False (serial: one request at a time, each answered whole)
      and once as it ships (4 clients; a new request cuts off the stream in progress)

Each server is a subprocess on a free loopback port, waited for through /health (/v1/models for
llama-cpp-python, which has no /health), warmed up with one short request, loaded, then stopped
(SIGTERM, SIGKILL after a grace). Servers alternate load by load: every repetition starts all
of them, then runs each load on one server after the other (an idle server uses no CPU), in an
order that reverses every load and every repetition, so a slow moment of the machine does not
land on one server only and the two sides of a pair run seconds apart.
Two prompt sets (a tuning set and a held-out set, 12 prompts each: letters, explanations, code,
lists, dialogue) are both reported. Every request to a server gets a distinct prompt: the set's
prompts in turn, each with a request number in front, so no server answers from a cache of a
whole earlier prompt (the chat template's common system prefix may still be shared).

Per load: aggregate generated tokens/s (completion tokens from the final usage chunk, requested
with stream_options.include_usage; the number of content chunks where a server sends no usage)
summed over the requests / wall time from the first send to the last byte; TTFT (time to the
first non-empty content delta) p50 and p95; complete responses (HTTP 200, a finish_reason,
non-empty text). A load is max(--min-requests, clients x --rounds) requests (defaults 8 and 1:
8, 8 and 16 requests at 1, 4 and 16 clients; the default run, every server, 3 reps, takes ~20
minutes on 2 cores). Medians over --reps, and the median of each repetition's own ratio
("paired") with a 90% bootstrap interval: where the interval straddles a bound, the run has
not resolved the ratio against it, and --merge pools saved runs (their --json output) into
one table to narrow it.

Eight requests at 4 clients is the load of the figure the llama-cpp-python comparison was set
against (its server: 28 tokens/s, 7 of 8 answers empty). That server as it ships lets each new
request cut off the stream in progress, so what it delivers depends on how many requests cut
in; with a single wave of 4, one answer survives whole and the others cost little more than
their prompts.

At temperature 0 the servers' answers still differ in length: a batch's arithmetic depends on
which sequences share it, so greedy texts part at near-ties, and with --parallel 4 and 16
clients the TTFT p50 falls between the requests of the second wave and the third, i.e. on when
the earlier answers happened to end. --ignore-eos asks every answer to run to max_tokens (an
extra both infer and llama-server take), so every server does the same work in every load.

    .venv/bin/python scripts/bench_serve.py [--model PATH] [--reps 3] [--json]
    .venv/bin/python scripts/bench_serve.py --reps 1 --max-tokens 16 --clients 1,4 --servers infer4,llama4
    .venv/bin/python scripts/bench_serve.py --merge run1.txt run2.txt   # runs saved with --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchstats import interval  # noqa: E402

HOST = "127.0.0.1"
DEFAULT_MODEL = ROOT / ".cache/test-home/store/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NATIVE_BIN = ROOT / ".cache/native/src/build/bin"
BENCH_VENV = ROOT / ".cache/bench-venv"

TUNING = (
    "Write a short letter to a neighbour asking them to water your plants while you are away.",
    "Explain why the sky is blue in simple terms.",
    "Write a Python function that checks whether a string is a palindrome.",
    "List five things to pack for a weekend camping trip.",
    "Write a dialogue between a customer and a baker about a birthday cake.",
    "Explain what a hash table is and when to use one.",
    "Write a thank-you note to a teacher at the end of the school year.",
    "Give a numbered list of tips for learning a new language.",
    "Write a JavaScript function that returns the largest number in an array.",
    "Explain how photosynthesis works.",
    "Write a short conversation between two friends planning a trip to the sea.",
    "List the planets of the solar system with one fact about each.",
)
HELD_OUT = (
    "Write a letter to a landlord reporting a broken heater.",
    "Explain how a bicycle stays upright when it moves.",
    "Write a Python function that counts the vowels in a sentence.",
    "List six healthy breakfast ideas.",
    "Write a dialogue between a doctor and a patient with a sore throat.",
    "Explain the difference between weather and climate.",
    "Write a cover letter for a job at a public library.",
    "Give a list of steps to change a flat tyre.",
    "Write a SQL query that finds the ten most recent orders in an orders table.",
    "Explain what inflation is and why prices rise over time.",
    "Write a short conversation between a child and a grandparent about the old days.",
    "List four board games and say who each one suits.",
)
PROMPT_SETS = {"tuning": TUNING, "held-out": HELD_OUT}


# --- a small HTTP/1.1 client on asyncio streams (cheap: the servers share 2 cores with it) -------

class HTTPError(Exception):
    pass


async def _read_head(reader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HTTPError(f"bad status line {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


async def _body_chunks(reader, headers: dict[str, str]):
    """The response body as it arrives, whatever its framing."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # the trailer's end (no trailers expected)
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await reader.readexactly(n)
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def request(port: int, method: str, path: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None, timeout: float = 120.0):
    """One plain request: (status, headers, body bytes)."""
    async def go():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(_request_bytes(port, method, path, body, headers))
            await writer.drain()
            status, hdrs = await _read_head(reader)
            data = b"".join([c async for c in _body_chunks(reader, hdrs)])
            return status, hdrs, data
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)


def _request_bytes(port, method, path, body, headers) -> bytes:
    h = {"Host": f"{HOST}:{port}", "Connection": "close", "Accept": "*/*"}
    if body is not None:
        h["Content-Type"] = "application/json"
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
    return head.encode("latin-1") + (body or b"")


@dataclass
class StreamResult:
    status: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage_tokens: int | None = None     # completion_tokens of the usage chunk, when one came
    content_chunks: int = 0
    t_send: float = 0.0
    t_first: float | None = None        # first non-empty content delta
    t_end: float = 0.0
    error: str | None = None
    events: list = field(default_factory=list)   # kept only when asked (the stress test)
    done_marker: bool = False

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.content_chunks

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def complete(self) -> bool:
        return self.status == 200 and bool(self.finish_reason) and bool(self.text) and not self.error


async def stream_chat(port: int, payload: dict, timeout: float = 300.0, keep_events: bool = False,
                      stop_after_chunks: int | None = None) -> StreamResult:
    """One streamed chat completion, read event by event. ``stop_after_chunks``: hang up after
    that many content deltas (a client that leaves mid-stream)."""
    r = StreamResult()
    body = json.dumps(payload).encode()

    async def go():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            r.t_send = time.perf_counter()
            writer.write(_request_bytes(port, "POST", "/v1/chat/completions", body,
                                        {"Accept": "text/event-stream"}))
            await writer.drain()
            r.status, hdrs = await _read_head(reader)
            buf = b""
            parts = []
            async for data in _body_chunks(reader, hdrs):
                if r.status != 200:
                    parts.append(data)
                    continue
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.rstrip(b"\r")
                    if not line.startswith(b"data:"):
                        continue
                    payload_ = line[5:].strip()
                    if payload_ == b"[DONE]":
                        r.done_marker = True
                        continue
                    ev = json.loads(payload_)
                    if keep_events:
                        r.events.append(ev)
                    if "error" in ev:
                        r.error = json.dumps(ev["error"])[:300]
                        continue
                    if ev.get("usage"):
                        r.usage_tokens = ev["usage"].get("completion_tokens")
                    for ch in ev.get("choices") or ():
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            if r.t_first is None:
                                r.t_first = time.perf_counter()
                            r.text += piece
                            r.content_chunks += 1
                        if ch.get("finish_reason"):
                            r.finish_reason = ch["finish_reason"]
                    if stop_after_chunks is not None and r.content_chunks >= stop_after_chunks:
                        return  # hang up: the finally closes the socket mid-stream
            if r.status != 200:
                r.error = b"".join(parts).decode("utf-8", "replace")[:300]
        finally:
            r.t_end = time.perf_counter()
            writer.close()

    try:
        await asyncio.wait_for(go(), timeout)
    except Exception as e:  # noqa: BLE001 - counted as an incomplete response
        r.error = f"{type(e).__name__}: {e}"
        r.t_end = time.perf_counter()
    return r


# --- servers ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def native_bin() -> Path:
    if (NATIVE_BIN / "llama-server").exists():
        return NATIVE_BIN
    out = subprocess.run([str(ROOT / "scripts/native.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


@dataclass
class ServerSpec:
    key: str          # infer4, infer16, llama4, llama16, lcp
    label: str
    kind: str         # infer | llama-server | llama-cpp-python
    parallel: int
    clients: tuple[int, ...]
    extra: tuple[str, ...] = ()  # more options for the server

    def argv(self, model: Path, port: int, ctx: int, threads: int) -> list[str]:
        if self.kind == "infer":
            return [str(ROOT / ".venv/bin/infer"), "serve", str(model), "--port", str(port),
                    "--parallel", str(self.parallel), "--ctx", str(ctx), "--threads", str(threads),
                    *self.extra]
        if self.kind == "llama-server":
            return [str(native_bin() / "llama-server"), "-m", str(model), "--host", HOST,
                    "--port", str(port), "-c", str(ctx), "-t", str(threads),
                    "-np", str(self.parallel), "--no-webui"]
        # `lcp` turns interrupt_requests off (by default a new request aborts the one being
        # streamed, so most answers come back empty); `lcp-default` runs it as it ships
        return [str(BENCH_VENV / "bin/python"), "-m", "llama_cpp.server", "--model", str(model),
                "--n_ctx", str(ctx), "--n_threads", str(threads), "--host", HOST,
                "--port", str(port), "--verbose", "False", *self.extra]

    @property
    def health_path(self) -> str:
        return "/v1/models" if self.kind == "llama-cpp-python" else "/health"


class Running:
    """A server subprocess: started, waited for, stopped."""

    def __init__(self, argv: list[str], port: int, health_path: str = "/health",
                 log_path: Path | None = None, env: dict | None = None):
        self.port, self.health_path = port, health_path
        self.log = open(log_path, "wb") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready")
            try:
                status, _, _ = asyncio.run(request(self.port, "GET", self.health_path, timeout=5))
                if status == 200:
                    return time.perf_counter() - t0
            except (OSError, asyncio.TimeoutError, HTTPError, asyncio.IncompleteReadError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (all its threads)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# --- loads --------------------------------------------------------------------------------------

def chat_payload(prompt: str, max_tokens: int, ignore_eos: bool = False) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:  # llama-server's and infer's extra (vLLM's too): every answer max_tokens long
        body["ignore_eos"] = True
    return body


async def run_load(port: int, prompts: list[str], clients: int, max_tokens: int,
                   deadline_s: float, ignore_eos: bool = False) -> dict:
    """``clients`` workers take the prompts in turn until none is left; a bound on wall time."""
    todo = list(prompts)
    results: list[StreamResult] = []

    t0 = time.perf_counter()
    end = t0 + deadline_s

    async def worker():
        while todo and time.perf_counter() < end:
            p = todo.pop(0)
            results.append(await stream_chat(port, chat_payload(p, max_tokens, ignore_eos),
                                             timeout=max(1.0, end - time.perf_counter())))

    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    ttfts = sorted(r.ttft for r in results if r.ttft is not None)
    tokens = sum(r.tokens for r in results)
    return {"requests": len(results) + len(todo), "complete": sum(r.complete for r in results),
            "tokens": tokens, "wall_s": wall, "agg_tps": tokens / wall if wall > 0 else 0.0,
            "ttft_p50_ms": pct(ttfts, 50) * 1000, "ttft_p95_ms": pct(ttfts, 95) * 1000,
            "usage_reported": all(r.usage_tokens is not None for r in results),
            "errors": sorted({r.error for r in results if r.error})[:3]
            + ([f"{len(todo)} requests not sent: the load ran out of time"] if todo else [])}


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


SPECS = {
    "infer4": ServerSpec("infer4", "infer serve --parallel 4", "infer", 4, (1, 4, 16)),
    "infer16": ServerSpec("infer16", "infer serve --parallel 16", "infer", 16, (16,)),
    # a chunk per token and chunks of 50 ms, whatever the default --stream-interval
    "infer4-tok": ServerSpec("infer4-tok", "infer serve --parallel 4 --stream-interval 0", "infer", 4,
                             (1, 4, 16), ("--stream-interval", "0")),
    "infer4-50ms": ServerSpec("infer4-50ms", "infer serve --parallel 4 --stream-interval 0.05", "infer",
                              4, (1, 4, 16), ("--stream-interval", "0.05")),
    "llama4": ServerSpec("llama4", "llama-server -np 4", "llama-server", 4, (1, 4, 16)),
    "llama16": ServerSpec("llama16", "llama-server -np 16", "llama-server", 16, (16,)),
    "lcp": ServerSpec("lcp", "llama-cpp-python server", "llama-cpp-python", 1, (1, 4),
                      ("--interrupt_requests", "False")),
    "lcp-default": ServerSpec("lcp-default", "llama-cpp-python server, as it ships", "llama-cpp-python",
                              1, (4,)),
}


def prompts_for(base: tuple[str, ...], n: int, rep: int, set_index: int, clients: int) -> list[str]:
    """n distinct prompts: the set's prompts in turn (from a point that moves on with each rep,
    so that small loads see all of the set over the reps), each with a request number in front
    that no other load of the same server repeats. Every server gets the same texts for the
    same (rep, set, clients), so greedy answers, and their lengths, match as far as the
    numerics do."""
    first = rep * n
    tag = 10000 * rep + 1000 * set_index + 100 * clients
    return [f"(Request {tag + i}) {base[(first + i) % len(base)]}" for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--clients", default="1,4,16", help="client counts to run (of 1,4,16)")
    ap.add_argument("--servers", default=",".join(SPECS), help=f"of {','.join(SPECS)}")
    ap.add_argument("--sets", default="tuning,held-out")
    ap.add_argument("--rounds", type=int, default=1,
                    help="requests per client in a load (at least --min-requests in all)")
    ap.add_argument("--min-requests", type=int, default=8, help="fewest requests in a load")
    ap.add_argument("--load-timeout", type=float, default=180.0, help="bound on one load's wall time")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="ask every answer to run to max_tokens (infer and llama-server; "
                         "llama-cpp-python ignores it), so every server does the same work")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                    help="run nothing: pool the repetitions of earlier runs (their --json output, "
                         "saved to files) into one table; the runs must share model and settings")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep the servers' output here")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()

    if args.merge:
        return merge(args)
    clients_wanted = {int(x) for x in args.clients.split(",")}
    specs = [SPECS[k] for k in args.servers.split(",")]
    sets = [s for s in args.sets.split(",")]
    if not args.model.exists():
        sys.exit(f"no model at {args.model}")
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    # raw[(server, set, clients)] = [load result per rep]
    raw: dict[tuple[str, str, int], list[dict]] = {}
    t_all = time.perf_counter()
    for rep in range(args.reps):
        order = specs if rep % 2 == 0 else specs[::-1]
        # Every server of the repetition is started and warmed first; then each load runs on
        # one server after the other, seconds apart, in an order that reverses from load to
        # load and from repetition to repetition. An idle server waits without using the CPU,
        # so the two sides of a pair see the same moment of a machine whose speed drifts.
        running: dict[str, Running] = {}
        ready: dict[str, float] = {}
        try:
            for spec in order:
                if not any(c in clients_wanted for c in spec.clients):
                    continue
                port = free_port()
                log = args.log_dir / f"{spec.key}-rep{rep}.log" if args.log_dir else None
                srv = running[spec.key] = Running(spec.argv(args.model, port, args.ctx, args.threads),
                                                  port, spec.health_path, log)
                ready[spec.key] = srv.wait_ready()
                warm = asyncio.run(stream_chat(port, chat_payload("Say hello.", 8), timeout=60))
                if warm.status != 200:
                    raise RuntimeError(f"{spec.label}: warm-up failed: {warm.error}")
            loads = [(s, c) for s in sets for c in sorted(clients_wanted)]
            for li, (set_name, clients) in enumerate(loads):
                turn = order if li % 2 == 0 else order[::-1]
                for spec in turn:
                    if clients not in spec.clients or spec.key not in running:
                        continue
                    srv = running[spec.key]
                    n = max(args.min_requests, clients * args.rounds)
                    prompts = prompts_for(PROMPT_SETS[set_name], n, rep, sets.index(set_name),
                                          clients)
                    cpu0, load0 = srv.cpu_s(), os.getloadavg()[0]
                    res = asyncio.run(run_load(srv.port, prompts, clients, args.max_tokens,
                                               args.load_timeout, args.ignore_eos))
                    res["ready_s"], res["rep"] = ready[spec.key], rep
                    # the server's CPU use (2 busy threads: ~200%) and the machine's load: a
                    # low share with a high load says another process took the cores
                    res["server_cpu_pct"] = 100 * (srv.cpu_s() - cpu0) / res["wall_s"]
                    res["loadavg_1m"] = max(load0, os.getloadavg()[0])
                    raw.setdefault((spec.key, set_name, clients), []).append(res)
                    print(f"rep {rep + 1} {spec.label:27} {set_name:8} {clients:2} clients: "
                          f"{res['agg_tps']:7.1f} tok/s  TTFT p50 {res['ttft_p50_ms']:7.1f} ms "
                          f"p95 {res['ttft_p95_ms']:7.1f} ms  {res['complete']}/{res['requests']} "
                          f"complete  {res['tokens']} tokens in {res['wall_s']:.1f} s  server CPU "
                          f"{res['server_cpu_pct']:.0f}%  load {res['loadavg_1m']:.2f}"
                          + (f"  errors: {res['errors']}" if res["errors"] else ""),
                          file=sys.stderr, flush=True)
        finally:
            for srv in running.values():
                srv.stop()
    total_s = time.perf_counter() - t_all

    summary = summarize(raw)
    ratios = compute_ratios(summary, sets, raw)
    print_tables(summary, ratios, sets, args, total_s)
    if args.json:
        print(json.dumps({"settings": {"model": str(args.model), "reps": args.reps, "ctx": args.ctx,
                                       "threads": args.threads, "max_tokens": args.max_tokens,
                                       "ignore_eos": args.ignore_eos, "rounds": args.rounds,
                                       "min_requests": args.min_requests, "total_s": total_s},
                          "configs": [{"server": k[0], "set": k[1], "clients": k[2], **v}
                                      for k, v in summary.items()],
                          "ratios": ratios,
                          "raw": [{"server": k[0], "set": k[1], "clients": k[2], "reps": v}
                                  for k, v in raw.items()]}, indent=1))
    return 0


SAME = ("model", "ctx", "threads", "max_tokens", "ignore_eos")  # what pooled runs must share


def read_run(path: Path) -> dict:
    """The JSON document a run printed with --json (after its tables, or alone)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SystemExit(f"{path}: {e.strerror}") from None
    start = text.find("\n{\n") + 1 if not text.startswith("{") else 0
    try:
        doc = json.loads(text[start:])
    except (json.JSONDecodeError, ValueError):
        doc = None
    if not isinstance(doc, dict) or "settings" not in doc or "raw" not in doc:
        raise SystemExit(f"{path}: no --json output of a bench_serve.py run in it")
    return doc


def merge(args) -> int:
    """--merge: one table from the repetitions of several runs, each tagged with its run so that
    pairs stay within the repetition they ran in."""
    docs = [read_run(p) for p in args.merge]
    first = docs[0]["settings"]
    for p, d in zip(args.merge[1:], docs[1:]):
        diff = [k for k in SAME if d["settings"].get(k, False) != first.get(k, False)]
        if diff:
            raise SystemExit(f"{p}: another {', '.join(diff)} than {args.merge[0]}; not pooled")
    raw: dict[tuple[str, str, int], list[dict]] = {}
    sets: list[str] = []
    for run, d in enumerate(docs):
        for entry in d["raw"]:
            if entry["set"] not in sets:
                sets.append(entry["set"])
            reps = [{**r, "run": run, "rep": r.get("rep", i)} for i, r in enumerate(entry["reps"])]
            raw.setdefault((entry["server"], entry["set"], entry["clients"]), []).extend(reps)
    for (server, set_name, clients), reps in raw.items():
        sizes = sorted({r["requests"] for r in reps})
        if len(sizes) > 1:  # e.g. runs with another --min-requests: said, not hidden
            print(f"note: {server} {set_name} {clients} clients pools loads of "
                  f"{' and '.join(map(str, sizes))} requests", file=sys.stderr)
    args.model, args.ctx, args.threads = Path(first["model"]), first["ctx"], first["threads"]
    args.max_tokens, args.ignore_eos = first["max_tokens"], first.get("ignore_eos", False)
    args.reps = f"{sum(d['settings']['reps'] for d in docs)} reps pooled from {len(docs)} run{'s' if len(docs) > 1 else ''}"
    total_s = sum(d["settings"].get("total_s", 0) for d in docs)
    summary = summarize(raw)
    ratios = compute_ratios(summary, sets, raw)
    print_tables(summary, ratios, sets, args, total_s)
    if args.json:
        print(json.dumps({"settings": {**first, "merged": [str(p) for p in args.merge]},
                          "ratios": ratios}, indent=1))
    return 0


def summarize(raw) -> dict:
    out = {}
    for key, reps in raw.items():
        med = lambda name: statistics.median(r[name] for r in reps)  # noqa: E731
        out[key] = {"agg_tps": med("agg_tps"), "ttft_p50_ms": med("ttft_p50_ms"),
                    "ttft_p95_ms": med("ttft_p95_ms"), "wall_s": med("wall_s"),
                    "tokens": med("tokens"),
                    "complete": sum(r["complete"] for r in reps),
                    "requests": sum(r["requests"] for r in reps),
                    "load_sizes": sorted({r["requests"] for r in reps}),
                    "usage_reported": all(r["usage_reported"] for r in reps), "reps": len(reps),
                    "server_cpu_pct": med("server_cpu_pct"),
                    "max_loadavg_1m": max(r["loadavg_1m"] for r in reps)}
    return out


def _rep_id(r: dict, i: int):
    """Which repetition of which run a load result is: results carry their repetition (and, when
    pooled by --merge, their run); older results are known by their place in the list."""
    return r.get("run", 0), r.get("rep", i)


def pair_ratios(raw, mine: str, theirs: str, s: str, c: int, field: str) -> list[float]:
    """One ratio (mine / theirs) per repetition that both servers ran: the two ran back to back,
    so a machine whose speed drifts over the run (a neighbour coming or going) moves both sides
    of each ratio alike."""
    a, b = raw.get((mine, s, c)) or [], raw.get((theirs, s, c)) or []
    by_id = {_rep_id(y, i): y for i, y in enumerate(b)}
    out = []
    for i, x in enumerate(a):
        y = by_id.get(_rep_id(x, i))
        if y is not None and y[field]:
            out.append(x[field] / y[field])
    return out


def paired(raw, mine: str, theirs: str, s: str, c: int, field: str) -> float | None:
    """The median of ``pair_ratios``; None where no repetition has both."""
    ratios = pair_ratios(raw, mine, theirs, s, c, field)
    return statistics.median(ratios) if ratios else None


def _row(s: str, what: str, c: int, value: float, raw, mine: str, theirs: str, field: str,
         target: str, met: bool) -> dict:
    ratios = pair_ratios(raw, mine, theirs, s, c, field)
    return {"set": s, "what": what, "clients": c, "value": value,
            "paired": statistics.median(ratios) if ratios else None, "pairs": len(ratios),  # as paired()
            "paired_90": interval(ratios), "target": target, "met": met}


def compute_ratios(summary, sets, raw) -> list[dict]:
    rows = []

    def get(server, s, c):
        return summary.get((server, s, c))

    for s in sets:
        for mine, theirs, c in (("infer4", "llama4", 1), ("infer4", "llama4", 4),
                                ("infer4", "llama4", 16), ("infer16", "llama16", 16),
                                ("infer4-tok", "llama4", 1), ("infer4-tok", "llama4", 4),
                                ("infer4-tok", "llama4", 16), ("infer4-50ms", "llama4", 1),
                                ("infer4-50ms", "llama4", 4), ("infer4-50ms", "llama4", 16)):
            a, b = get(mine, s, c), get(theirs, s, c)
            if a and b:
                v = a["agg_tps"] / b["agg_tps"]
                rows.append(_row(s, f"aggregate tok/s {mine} / {theirs}", c, v, raw, mine, theirs,
                                 "agg_tps", ">= 0.95", v >= 0.95))
                if c == 16:
                    for q in ("p50", "p95"):
                        v = a[f"ttft_{q}_ms"] / b[f"ttft_{q}_ms"]
                        rows.append(_row(s, f"TTFT {q} {mine} / {theirs}", c, v, raw, mine, theirs,
                                         f"ttft_{q}_ms", "<= 1.1", v <= 1.1))
        a = get("infer4", s, 4)
        for theirs, label in (("lcp", "llama-cpp-python (serial)"),
                              ("lcp-default", "llama-cpp-python (as it ships)")):
            b = get(theirs, s, 4)
            if a and b:
                # "complete" judges infer's answers: the shipped llama-cpp-python server cuts
                # streams off by design, which is the behaviour the bound was set against
                v = a["agg_tps"] / b["agg_tps"]
                rows.append(_row(s, f"aggregate tok/s infer4 / {label}", 4, v, raw, "infer4", theirs,
                                 "agg_tps", ">= 3, infer's all complete",
                                 v >= 3 and a["complete"] == a["requests"]))
    return rows


def print_tables(summary, ratios, sets, args, total_s) -> None:
    print(f"\n`infer serve` vs llama-server vs llama-cpp-python: {args.model.name}, ctx {args.ctx}, "
          f"{args.threads} threads, max_tokens {args.max_tokens}"
          f"{' (EOS ignored)' if args.ignore_eos else ''}, temperature 0, streamed; median "
          f"of {args.reps if isinstance(args.reps, str) else f'{args.reps} reps'}; "
          f"{total_s / 60:.1f} min in all\n")
    for s in sets:
        print(f"**{s} prompts**\n")
        print("| server | clients | requests/load | agg tok/s | TTFT p50 ms | TTFT p95 ms | complete "
              "| server CPU % | max load |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key in SPECS:
            for c in (1, 4, 16):
                v = summary.get((key, s, c))
                if not v:
                    continue
                note = "" if v["usage_reported"] else " (chunks)"
                sizes = "/".join(map(str, v["load_sizes"]))
                print(f"| {SPECS[key].label} | {c} | {sizes} | "
                      f"{v['agg_tps']:.1f}{note} | {v['ttft_p50_ms']:.1f} | {v['ttft_p95_ms']:.1f} | "
                      f"{v['complete']}/{v['requests']} | {v['server_cpu_pct']:.0f} | "
                      f"{v['max_loadavg_1m']:.2f} |")
        print()
    if ratios:
        print("| set | ratio | clients | value | paired [90%] | target | met |")
        print("|---|---|---:|---:|---:|---|---|")
        for r in ratios:
            pr = f"{r['paired']:.3f}" if r.get("paired") is not None else "-"
            if r.get("paired_90"):
                pr += " [{:.3f}, {:.3f}]".format(*r["paired_90"])
            print(f"| {r['set']} | {r['what']} | {r['clients']} | {r['value']:.3f} | {pr} | {r['target']} | "
                  f"{'yes' if r['met'] else 'NO'} |")
        print()
    print("value: the ratio of the two medians (what `met` judges); paired: the median of the "
          "ratios within each repetition, where both servers ran back to back, with a 90% "
          "bootstrap interval for it (4 repetitions or more).\n"
          "(chunks): the server sent no usage chunk; tokens are the content chunks received.\n"
          "server CPU %: the server process's CPU time over the load's wall time (median of reps; "
          "about 200 with 2 busy threads); max load: the 1-minute load average, highest of the "
          "reps (2 cores: above ~3 means other work shared them).")


if __name__ == "__main__":
    sys.exit(main())
