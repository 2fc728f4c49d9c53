"""The server's engine thread: the one thread that touches the scheduler.

The scheduler is not thread-safe and llama.cpp's context is not either, so one thread owns
both. HTTP handlers (on the asyncio loop) hand requests over through a thread-safe queue and
get text back through their own asyncio queue: the engine thread never blocks on a client, and
a slow client never slows the batch. Cancelling is a flag the engine thread turns into
``seq.cancel_requested`` before its next step, so the sequence leaves the batch at a step
boundary and its KV cells are freed at once.

Admission is bounded: ``parallel`` sequences run and at most ``queue_limit`` more wait; past
that a request is refused (the app answers 503 with Retry-After) instead of queueing without end.

With RPC workers, ``IsolatedServeEngine`` takes this thread's place: the scheduler runs in a child
process (``engine.isolated.IsolatedBatch``), this side reads its events, and a child that dies
(its worker gone) fails what was in flight and is started again once the workers answer.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from infer_cli.errors import WorkerLost

# Streamed text is handed to a client at most every this many seconds (0: every token): a lone
# fast stream gets a few tokens a chunk instead of waking the event loop on every token.
STREAM_INTERVAL_S = 0.05


class QueueFull(Exception):
    """More sequences in flight than the slots and the wait queue hold."""


class ShuttingDown(Exception):
    """The server is stopping: no new work."""


@dataclass
class Snapshot:
    """What /metrics reads, written by the engine thread after each step (plain values, so a
    reader on another thread never walks the scheduler's lists while they change)."""

    running: int = 0
    waiting: int = 0
    kv_used: int = 0
    kv_cached: int = 0
    cache_bytes: int = 0  # host memory the prompt cache holds
    prefill_tps: float = 0.0
    decode_tps: float = 0.0


class Handle:
    """One sequence of one HTTP request. ``index`` is its choice number in the response."""

    def __init__(self, index: int, req, sink, loop):
        self.index, self.req, self.sink, self.loop = index, req, sink, loop
        self.pending: list[str] = []    # text not handed to the client yet (see stream_interval)
        self.pushed_at = 0.0            # when text was last handed over
        self.cancelled = False
        self.error: str | None = None  # set when the engine itself failed under it
        self.seq = None                # set by the engine thread
        self.key = -1                  # the child's name for it (IsolatedServeEngine)


def result(seq, error: str | None = None) -> dict:
    """A finished sequence as plain values for the response builders."""
    t = seq.timings
    computed = seq.n_prompt - seq.cached_tokens
    prompt_s = (t.first - t.started) if t.first is not None and t.started is not None else 0.0
    predicted_s = (t.ended - t.first) if t.first is not None and t.ended is not None else 0.0
    return {"text": seq.text,
            "finish_reason": "error" if error else seq.finish_reason,
            "error": error or seq.error,
            "n_prompt": seq.n_prompt, "n_generated": seq.n_generated,
            "cached_tokens": seq.cached_tokens,
            "prompt_ms": prompt_s * 1000,
            "prompt_per_second": computed / prompt_s if prompt_s > 0 else 0.0,
            "predicted_ms": predicted_s * 1000,
            "predicted_per_second": seq.decode_tps,
            "ttft_ms": (t.ttft_s or 0.0) * 1000,
            "logprobs": seq.logprobs}


class ServeEngine:
    """Runs ``batch_engine.scheduler`` in a thread of its own; see the module docstring."""

    RATE_WINDOW_S = 1.0  # tokens-per-second gauges are averaged over this much wall time

    def __init__(self, batch_engine, *, queue_limit: int, metrics=None,
                 stream_interval: float = STREAM_INTERVAL_S):
        self.batch = batch_engine
        # Text of one sequence is handed to its client at most this often (seconds; 0: every
        # token). Each hand-over wakes the event loop's thread, whose Python work then competes
        # with llama.cpp's threads for the cores; a fast lone stream batches a few tokens a chunk.
        self.stream_interval = stream_interval
        self.sched = batch_engine.scheduler
        self.parallel = batch_engine.context.n_seq
        self.capacity = self.parallel + max(0, queue_limit)
        self.metrics = metrics
        self.snapshot = Snapshot()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = False
        self._deadline: float | None = None
        self._exit = False
        self._rate_mark = (time.perf_counter(), 0, 0)
        self.thread = threading.Thread(target=self._loop, name="infer-engine", daemon=True)

    # the HTTP side (asyncio loop thread) ------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, reqs: list, sink, loop) -> list[Handle]:
        """Queue ``reqs`` (one request's choices) together, or refuse them all."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown()
            if self._in_flight + len(reqs) > self.capacity:
                raise QueueFull()
            self._in_flight += len(reqs)
        handles = [Handle(i, r, sink, loop) for i, r in enumerate(reqs)]
        for h in handles:
            self._inbox.put(h)
        return handles

    def cancel(self, handles: list[Handle]) -> None:
        for h in handles:
            h.cancelled = True
        self._inbox.put(None)  # wake the thread if it is idle

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def drain(self, grace_s: float) -> None:
        """Refuse new work; let what runs finish for ``grace_s``, then cancel it."""
        with self._lock:
            self._stopping = True
        self._deadline = time.perf_counter() + grace_s
        self._inbox.put(None)

    def stop(self, timeout: float = 5.0) -> None:
        self.drain(0.0)
        self._exit = True
        self._inbox.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout)

    # the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        sched = self.sched
        while True:
            self._take(block=not sched.busy)
            if self._deadline is not None and time.perf_counter() >= self._deadline:
                for seq in list(sched.running) + list(sched.waiting):
                    seq.cancel_requested = True
            for seq in list(sched.running) + list(sched.waiting):
                if seq.id.cancelled:
                    seq.cancel_requested = True
            if sched.busy:
                try:
                    sched.step()
                except Exception as e:  # noqa: BLE001 - one failed step must not stop the server
                    self._fail_all(f"{type(e).__name__}: {e}")
                if self.stream_interval > 0:
                    self._flush_held(sched)
            self._publish()
            if self._exit and not sched.busy and self._inbox.empty():
                return

    def _take(self, block: bool) -> None:
        """Move handed-over requests into the scheduler: wait for one when idle."""
        try:
            item = self._inbox.get(timeout=0.25) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._admit(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, h: Handle) -> None:
        seq = self.sched.submit(h.req, h, self._on_text)
        h.seq = seq
        if h.cancelled or self._stopping and self._deadline is not None \
                and time.perf_counter() >= self._deadline:
            seq.cancel_requested = True

    def _fail_all(self, message: str) -> None:
        for seq in list(self.sched.running) + list(self.sched.waiting):
            seq.id.error = message
            self.sched.cancel(seq)

    def _on_text(self, seq, text: str) -> None:
        """Hand the client (index, text, result when finished, log-probability entries not
        handed out yet)."""
        h: Handle = seq.id
        if seq.finished:
            if h.pending:
                self._hand_over(h, seq, "", time.perf_counter())
            res = result(seq, h.error)
            with self._lock:
                self._in_flight -= 1
            if self.metrics is not None:
                self.metrics.finished(res)
            self._push(h, (h.index, None, res, seq.new_logprobs()))
        elif text:
            now = time.perf_counter()
            if self.stream_interval <= 0 or now - h.pushed_at >= self.stream_interval:
                self._hand_over(h, seq, text, now)
            else:
                h.pending.append(text)

    def _hand_over(self, h: Handle, seq, text: str, now: float) -> None:
        """Push the held text of ``h`` and then ``text`` as one chunk."""
        if h.pending:
            text = "".join(h.pending) + text
            h.pending.clear()
        h.pushed_at = now
        self._push(h, (h.index, text, None, seq.new_logprobs()))

    def _flush_held(self, sched) -> None:
        """Hand over held text that is due, and all of it when the next step computes a prompt
        (a long step: the text would otherwise wait for it)."""
        now = time.perf_counter()
        long_step = bool(sched.waiting) or any(not s.generating for s in sched.running)
        for seq in sched.running:
            h = seq.id
            if h.pending and (long_step or now - h.pushed_at >= self.stream_interval):
                self._hand_over(h, seq, "", now)

    @staticmethod
    def _push(h: Handle, item: Any) -> None:
        try:
            h.loop.call_soon_threadsafe(h.sink.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody listens
            pass

    def _publish(self) -> None:
        s = self.sched
        snap = self.snapshot
        snap.running, snap.waiting, snap.kv_used = len(s.running), len(s.waiting), s.kv_used
        snap.kv_cached, snap.cache_bytes = s.kv_cached, s.idle_bytes
        _rates(self, snap, s.stats)


def _rates(engine, snap: Snapshot, st) -> None:
    """The snapshot's tokens-per-second gauges from the scheduler's counters ``st``, averaged over
    ``ServeEngine.RATE_WINDOW_S`` of wall time (``engine._rate_mark`` holds the window's start)."""
    now = time.perf_counter()
    t0, p0, d0 = engine._rate_mark
    if now - t0 >= ServeEngine.RATE_WINDOW_S:
        prompt, generated = st.prompt_tokens, st.decoded_tokens - st.prompt_tokens
        snap.prefill_tps = (prompt - p0) / (now - t0)
        snap.decode_tps = (generated - d0) / (now - t0)
        engine._rate_mark = (now, prompt, generated)


class Unavailable(Exception):
    """The engine lost its RPC worker and is reconnecting: no work until it is back."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


WORKER_LOST = "worker_lost"  # the error code of what a lost worker ended


class IsolatedServeEngine:
    """``ServeEngine``'s interface over an ``engine.isolated.IsolatedBatch``: the scheduler runs
    in a child process, so that llama.cpp aborting there (an RPC worker stopped answering)
    cannot take the server down.

    This thread reads the child's events and hands them to the requests' sinks. When the child
    dies, every request in flight ends with an error (``code`` WORKER_LOST), ``on_state`` hears
    "reconnecting" with the reason and new requests are refused (``Unavailable``); the workers
    are probed with the Python handshake, with a backoff up to ``MAX_BACKOFF_S``, and as soon as
    every one answers, a new child loads the model; then "ok" again. Only with --rpc: the pipe
    costs a hop per token.

    A worker that dies while nothing runs is noticed within ``WATCH_S``: the child's connection
    to it leaves ESTABLISHED (the kernel's view, through psutil; no packet is sent, as a
    connection of our own would only wait in the worker's one-deep accept queue). The child is
    then stopped, which starts the same reconnection, so that /health says so and new requests
    are refused at once, instead of the next one failing after it was accepted."""

    MAX_BACKOFF_S = 4.0
    WATCH_S = 1.0

    def __init__(self, batch, *, queue_limit: int, metrics=None, on_state=None, log=None):
        self.batch = batch
        self.parallel = batch.context.n_seq
        self.capacity = self.parallel + max(0, queue_limit)
        self.metrics = metrics
        self.snapshot = Snapshot()
        self.on_state = on_state or (lambda status, reason: None)
        self.log = log or (lambda line: None)
        self.lost: str | None = None  # why, while reconnecting
        self._lock = threading.Lock()
        self._handles: dict[int, Handle] = {}
        self._next = 0
        self._stopping = False
        self._exit = False
        self._wake = threading.Event()
        self._timer: threading.Timer | None = None
        self._rate_mark = (time.perf_counter(), 0, 0)
        self.thread = threading.Thread(target=self._loop, name="infer-engine", daemon=True)
        self.watcher = threading.Thread(target=self._watch, name="infer-rpc-watch", daemon=True)
        self._closed_by: str | None = None  # the worker whose closed connection stopped the child

    # the HTTP side ----------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self.watcher.start()

    def submit(self, reqs: list, sink, loop) -> list[Handle]:
        from infer_cli.engine.isolated import RemoteSequence

        with self._lock:
            if self._stopping:
                raise ShuttingDown()
            if self.lost is not None:
                raise Unavailable(self.lost)
            if len(self._handles) + len(reqs) > self.capacity:
                raise QueueFull()
            handles = [Handle(i, r, sink, loop) for i, r in enumerate(reqs)]
            for h in handles:
                h.key, self._next = self._next, self._next + 1
                h.seq = RemoteSequence(h.key, h, h.req)
                self._handles[h.key] = h
            for h in handles:  # a dead child: this thread fails them when it reads the end
                self.batch.post("submit", h.key, h.req)
        return handles

    def cancel(self, handles: list[Handle]) -> None:
        for h in handles:
            h.cancelled = True
            if h.key in self._handles:
                self.batch.post("cancel", h.key)

    @property
    def in_flight(self) -> int:
        return len(self._handles)

    def drain(self, grace_s: float) -> None:
        with self._lock:
            self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(max(0.0, grace_s), self._cancel_all)
        self._timer.daemon = True
        self._timer.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.drain(0.0)
        deadline = time.perf_counter() + timeout
        while self._handles and self.lost is None and time.perf_counter() < deadline:
            time.sleep(0.05)
        self._exit = True
        self._wake.set()
        self.batch.end()
        if self.thread.is_alive():
            self.thread.join(max(0.1, deadline - time.perf_counter()))

    def _cancel_all(self) -> None:
        self.cancel(list(self._handles.values()))

    # this thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._exit:
            try:
                msg = self.batch.next_event()
            except Exception as e:  # noqa: BLE001 - the child is gone (WorkerLost, a torn message)
                if self._exit:
                    return
                closed, self._closed_by = self._closed_by, None
                if closed:  # stopped by _watch: not the child's own end
                    e = WorkerLost(closed, "while the server was idle")
                self._fail_all(str(e) or type(e).__name__)
                if not self._reconnect():
                    return
                continue
            kind = msg[0]
            if kind == "stats":
                self._publish()
                continue
            h = self._handles.get(msg[1])
            if h is None:
                continue
            if kind == "text":
                h.seq.took(*msg[2:])
                _push(h, (h.index, msg[2], None, h.seq.new_logprobs()))
            elif kind == "done":
                h.seq.ended(msg[2])
                with self._lock:
                    self._handles.pop(h.key, None)
                self._finished(h, result(h.seq))

    def _finished(self, h: Handle, res: dict) -> None:
        if self.metrics is not None:
            self.metrics.finished(res)
        _push(h, (h.index, None, res, h.seq.new_logprobs()))

    def _watch(self) -> None:
        """Stop the child when, with nothing in flight, its connection to a worker is gone."""
        from infer_cli.engine import rpc

        watched = None  # (the child, the endpoints it was connected to once loaded)
        targets = rpc.addresses(self.batch.endpoints)
        while not self._wake.wait(self.WATCH_S) and not self._exit:
            batch = self.batch
            if self.lost is not None or self._handles or self._stopping:
                continue
            held = rpc.connected(batch.proc.pid, targets)
            if held is None:
                continue
            if watched is None or watched[0] is not batch:
                watched = (batch, held)  # a worker given no layers may hold no connection
                continue
            gone = sorted(watched[1] - held)
            if gone and not self._handles and batch.proc.poll() is None:
                self._closed_by = gone[0]
                batch.kill()

    def _fail_all(self, reason: str) -> None:
        """The child died: every request in flight ends with the reason; refuse new ones."""
        with self._lock:
            self.lost = reason
            handles = list(self._handles.values())
            self._handles.clear()
        self.snapshot = Snapshot()
        self.log(f"engine lost: {reason}; answering 503 until the workers are back")
        self.on_state("reconnecting", reason)
        for h in handles:
            res = result(h.seq, reason)
            res["code"] = WORKER_LOST
            self._finished(h, res)

    def _reconnect(self) -> bool:
        """Probe the workers until all answer, then load the model in a new child."""
        from infer_cli.engine import rpc

        delay = 0.25
        while not self._exit:
            try:
                rpc.probe_all(self.batch.endpoints, timeout=2.0)
                batch = self.batch.restart()
            except Exception:  # noqa: BLE001 - not back yet (unreachable, busy, a failed load)
                self._wake.wait(delay)
                delay = min(delay * 2, self.MAX_BACKOFF_S)
                continue
            if self._exit:
                batch.end()
                return False
            self.batch = batch
            self.snapshot = Snapshot()
            self._rate_mark = (time.perf_counter(), 0, 0)
            with self._lock:
                self.lost = None
            self.log(f"engine back: the model is loaded again over {', '.join(batch.endpoints)}")
            self.on_state("ok", None)
            return True
        return False

    def _publish(self) -> None:
        st = self.batch.stats
        snap = self.snapshot
        snap.running, snap.waiting = st.running, st.waiting
        snap.kv_used, snap.kv_cached, snap.cache_bytes = st.kv_used, st.kv_cached, st.cache_bytes
        _rates(self, snap, st)


def _push(h: Handle, item: Any) -> None:
    ServeEngine._push(h, item)
