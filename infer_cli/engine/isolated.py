"""The engine in a child process, for runs that talk to RPC workers.

llama.cpp's RPC client aborts its process when a worker stops answering mid-run. ``IsolatedRunner``
keeps the model, its workers and the generation in a child (``python -m
infer_cli.engine.isolated``) and streams the child's events back, so that such an abort ends
the run with ``WorkerLost`` naming the worker, while what was generated so far has already
been handed to the caller. ``IsolatedBatch`` does the same for the batching engine (`infer batch`
and `infer serve` with workers): requests go in by key, their text and results come back as
events, and the parent tokenizes with a vocabulary-only load of the same file.

The two processes speak length-prefixed pickles over the child's stdin and a duplicate of its
stdout (the child's own stdout and stderr go to a log file, so nothing llama.cpp prints mixes
with the stream). Errors raised in the child come back as the same typed ``InferError``.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from infer_cli.engine.model import Model
from infer_cli.errors import InferError, WorkerLost

_LEN = struct.Struct("<Q")


def _send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_LEN.pack(len(data)) + data)
    f.flush()


def _recv(f):
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError
    (n,) = _LEN.unpack(head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def _pack_error(err: InferError) -> tuple:
    return (type(err).__module__, type(err).__qualname__, str(err), dict(err.__dict__))


def _unpack_error(packed: tuple) -> InferError:
    import importlib

    module, name, message, fields = packed
    try:
        cls = getattr(importlib.import_module(module), name)
        err = cls.__new__(cls)
        Exception.__init__(err, message)
        err.__dict__.update(fields)
        return err
    except Exception:  # noqa: BLE001 - an error class this side cannot rebuild
        return InferError(message)


@dataclass
class _ConversationProxy:
    runner: "IsolatedRunner"

    def reset(self) -> None:
        self.runner._call("reset")


class _Child:
    """The child process, its pipe and its log; what happens when it dies."""

    def _spawn(self, endpoints) -> None:
        self.endpoints = [str(e) for e in endpoints]
        self._log = tempfile.NamedTemporaryFile(prefix="infer-engine-", suffix=".log", delete=False)
        env = dict(os.environ, GGML_NO_BACKTRACE="1")  # an abort: one line, no debugger
        # its own session: a terminal's Ctrl-C reaches this process, which forwards it once
        self.proc = subprocess.Popen([sys.executable, "-m", "infer_cli.engine.isolated"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, start_new_session=True)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._write(("close",), "")
                self.proc.wait(timeout=10)
            except (InferError, subprocess.TimeoutExpired, OSError):
                self._kill()
        self._cleanup()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # --- the pipe ------------------------------------------------------------------------

    def _call(self, *msg, when: str = "while it was asked something"):
        self._write(msg, when)
        kind, payload = self._read(when)
        if kind == "error":
            raise _unpack_error(payload)
        return payload

    def _write(self, msg, when: str) -> None:
        try:
            _send(self.proc.stdin, msg)
        except (BrokenPipeError, OSError):
            raise self._lost(when) from None

    def _read(self, when: str):
        try:
            return _recv(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._lost(when) from None

    def _lost(self, when: str) -> InferError:
        """The child ended: name the worker that no longer accepts connections."""
        from infer_cli.engine import rpc

        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._kill()
            code = self.proc.returncode
        dead = [ep for ep in self.endpoints if not rpc.alive(ep, timeout=1.0)]
        how = f"the engine process ended with {_describe_exit(code)}"
        tail = self._log_tail()
        if tail:
            how += f": {tail}"
        self._cleanup()
        if dead:
            return WorkerLost(", ".join(dead), when, how)
        return WorkerLost(None, when, how)

    def _log_tail(self) -> str:
        if self._log is None:  # already cleaned up (the child was stopped on purpose)
            return ""
        try:
            with open(self._log.name, errors="replace") as f:
                lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        except OSError:
            return ""
        for ln in reversed(lines):
            if "error" in ln.lower() or "abort" in ln.lower() or "crash" in ln.lower():
                return ln.split(": ", 1)[-1] if "GGML_ABORT" not in ln else ln.rsplit(": ", 1)[-1]
        return ""

    def _signal(self, sig) -> None:
        try:
            os.kill(self.proc.pid, sig)
        except OSError:
            pass

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def _cleanup(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None:
            self._log = None
            log.close()
            if os.environ.get("INFER_DEBUG"):
                sys.stderr.write(f"(the engine process's log: {log.name})\n")
            else:
                try:
                    os.unlink(log.name)
                except OSError:
                    pass


class IsolatedRunner(_Child):
    """``engine.runner.Runner``'s interface (``answer``, ``conversation.reset``, ``settings``,
    ``opts``, ``load_s``) over a child process."""

    def __init__(self, resolved, opts, settings, *, endpoints=None):
        self.settings = settings
        self.conversation = _ConversationProxy(self)
        self.generated = 0
        self._spawn(endpoints if endpoints is not None else opts.rpc)
        reply = self._call("init", resolved, opts, settings, when="while the model loaded")
        self.opts, self.load_s, self.notes = reply

    # --- the conversation ----------------------------------------------------------------

    def answer(self, user_text: str):
        """Yields the child's events; WorkerLost when it dies on the way (after the events it
        sent, so the caller keeps what was generated)."""
        self._write(("answer", user_text), "when asked for an answer")
        interrupted = False
        while True:
            try:
                kind, payload = self._read(f"after {self.generated} generated tokens")
            except KeyboardInterrupt:
                if interrupted:  # a second Ctrl-C: do not wait for the child
                    self._kill()
                    raise
                interrupted = True
                self._signal(signal.SIGINT)
                continue
            if kind == "event":
                if payload.token is not None:
                    self.generated += 1
                yield payload
            elif kind == "done":
                return
            elif kind == "error":
                raise _unpack_error(payload)

def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


# ----------------------------------------------------------------------------------------------
# The batching engine in a child


class RemoteSequence:
    """A sequence the child runs, as ``engine.sequence.Sequence`` shows itself to its readers
    (``serve.engine.result``, ``engine.batch.record``): text, finish reason, counts, timings."""

    def __init__(self, key: int, ident, req):
        from infer_cli.engine.sequence import Timings

        self.key, self.id, self.req = key, ident, req
        self.n_prompt = len(req.tokens)
        self.n_generated = 0
        self.cached_tokens = 0
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.finished = False
        self.timings = Timings()
        self.decode_tps = 0.0
        self.logprobs: list[dict] | None = [] if req.logprobs is not None else None
        self._fresh: list[dict] = []

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def usage(self) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_generated,
                "cached_tokens": self.cached_tokens}

    def new_logprobs(self) -> list[dict]:
        out, self._fresh = self._fresh, []
        return out

    def took(self, text: str, lps: list, n_generated: int | None = None) -> None:
        if n_generated is not None:
            self.n_generated = n_generated
        if text:
            self.text_parts.append(text)
        if lps and self.logprobs is not None:
            self.logprobs.extend(lps)
            self._fresh.extend(lps)

    def ended(self, facts: dict) -> None:
        self.took("", facts.pop("new_logprobs"))
        self.text_parts = [facts.pop("text")]
        now = time.perf_counter()
        for name, ago in facts.pop("timings").items():
            setattr(self.timings, name, None if ago is None else now - ago)
        self.__dict__.update(facts)
        self.finished = True


def _facts(seq) -> dict:
    """What the parent needs of a finished ``Sequence`` (its timings in the parent's clock:
    shifted by how long ago each happened)."""
    now = time.perf_counter()
    t = seq.timings
    ago = {name: (None if getattr(t, name) is None else now - getattr(t, name))
           for name in ("submitted", "started", "first", "ended")}
    return {"text": seq.text, "finish_reason": seq.finish_reason, "error": seq.error,
            "n_generated": seq.n_generated, "cached_tokens": seq.cached_tokens,
            "decode_tps": seq.decode_tps, "new_logprobs": seq.new_logprobs(), "timings": ago}


class RemoteStats:
    """The child scheduler's counters (``scheduler.StepStats``' names) and its queue lengths."""

    steps = decoded_tokens = prompt_tokens = shared_tokens = preempted = 0
    running = waiting = kv_used = kv_cached = cache_bytes = 0


class _VocabModel(Model):
    """What the parent needs of the model: its vocabulary (tokenizer, pieces, special tokens),
    loaded without weights: no worker is contacted and no weights are read."""

    def __init__(self, path, info):
        import ctypes
        from pathlib import Path

        from infer_cli.engine import llama_log
        from infer_cli.engine.binding import require
        from infer_cli.errors import ModelLoadFailed

        L = self.L = require()
        self.path, self.info, self.rpc = Path(path), info, None
        llama_log.install()
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        mark = llama_log.mark()
        self.ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ModelLoadFailed(str(path), llama_log.last_error(mark) or "unknown reason")
        self.load_s = 0.0
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        # a vocabulary-only load reads no hyperparameters: the header has them
        self.n_ctx_train = info.context_length or 0
        self.n_swa = 0  # only the scheduler (in the child) reads it
        self._piece = ctypes.create_string_buffer(256)
        self._pieces = {}


class _Context:
    def __init__(self, n_ctx: int, n_seq: int, kv_bytes: int):
        self.n_ctx, self.n_seq, self.kv_bytes = n_ctx, n_seq, kv_bytes


class IsolatedBatch(_Child):
    """``engine.runner.BatchEngine``'s interface (``model``, ``context``, ``scheduler``,
    ``template``, ``notes``, ``close``) with the model, its context and the scheduler in a child
    process. ``post`` hands the child a request or a cancel (never blocking on a dead child);
    ``next_event`` returns what it sends back, or raises ``WorkerLost`` when it has died."""

    def __init__(self, resolved, opts, *, share_prefixes: bool = True, keep_idle: bool = False,
                 vocab=None, info=None):
        from infer_cli.engine.runner import read_header, with_rpc

        opts = with_rpc(opts, resolved.entry)
        self._args = (resolved, opts, share_prefixes, keep_idle)
        self.info = info if info is not None else read_header(resolved)
        self._spawn(opts.rpc)
        self._wlock = threading.Lock()
        self._owns_vocab = vocab is None
        self.model = None
        try:
            reply = self._call("batch", resolved, opts, share_prefixes, keep_idle,
                               when="while the model loaded")
            self.opts, n_ctx, n_seq, kv_bytes, self.notes = reply
            self.model = vocab if vocab is not None else _VocabModel(resolved.path, self.info)
        except BaseException:
            self._kill()
            self._cleanup()
            raise
        self.context = _Context(n_ctx, n_seq, kv_bytes)
        self.template = self.info.chat_template
        self.stats = RemoteStats()
        self.scheduler = RemoteScheduler(self)

    def restart(self) -> "IsolatedBatch":
        """A fresh child with the same model and settings (sharing this one's vocabulary)."""
        resolved, opts, share, keep = self._args
        return IsolatedBatch(resolved, opts, share_prefixes=share, keep_idle=keep,
                             vocab=self.model, info=self.info)

    def post(self, *msg) -> bool:
        """Send ``msg``; False when the child is gone (``next_event`` then says why)."""
        try:
            with self._wlock:
                _send(self.proc.stdin, msg)
            return True
        except (OSError, ValueError):
            return False

    def next_event(self, when: str = "while it was serving"):
        """("text", key, text, logprobs, n_generated) | ("done", key, facts) | ("stats", dict)."""
        msg = self._read(when)
        if msg[0] == "stats":
            self.stats.__dict__.update(msg[1])
        elif msg[0] == "error":
            raise _unpack_error(msg[1])
        return msg

    def kill(self) -> None:
        """Stop the child at once: ``next_event`` then raises ``WorkerLost``, which cleans up."""
        self._kill()

    def end(self) -> None:
        """Stop the child (the vocabulary stays)."""
        if self.proc.poll() is None:
            self.post("close")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        self._cleanup()

    def close(self) -> None:
        self.end()
        if self._owns_vocab and self.model is not None:
            self.model.close()


class RemoteScheduler:
    """``scheduler.Scheduler``'s interface for ``engine.batch.run_jobs`` (``submit``, ``step``,
    ``busy``, ``cancel``, ``n_ctx``, ``stats``) over an ``IsolatedBatch``. ``step`` waits for the
    child's next event; ``WorkerLost`` when the child died."""

    def __init__(self, batch: IsolatedBatch):
        self.batch = batch
        self.n_ctx = batch.context.n_ctx
        self.stats = batch.stats
        self._seqs: dict[int, RemoteSequence] = {}
        self._next = 0

    def submit(self, req, ident=None, on_text=None) -> RemoteSequence:
        key, self._next = self._next, self._next + 1
        seq = RemoteSequence(key, ident, req)
        self._seqs[key] = seq
        self.batch.post("submit", key, req)
        return seq

    def cancel(self, seq: RemoteSequence) -> None:
        if not seq.finished:
            self.batch.post("cancel", seq.key)

    @property
    def busy(self) -> bool:
        return bool(self._seqs)

    def step(self) -> list[RemoteSequence]:
        msg = self.batch.next_event(f"with {len(self._seqs)} sequences unfinished")
        if msg[0] == "text":
            seq = self._seqs.get(msg[1])
            if seq is not None:
                seq.took(*msg[2:])
                return [seq]
        elif msg[0] == "done":
            seq = self._seqs.pop(msg[1], None)
            if seq is not None:
                seq.ended(msg[2])
                return [seq]
        return []


class IsolatedCall(_Child):
    """A child process that runs ``target`` ("module:function", called as
    ``function(pipe_in, pipe_out, *args)`` with the pipe's two ends, for ``send``/``receive``);
    ``ask`` and ``read`` speak to it, ``WorkerLost`` when it has died."""

    def __init__(self, target: str, *args, endpoints=()):
        self._spawn(endpoints)
        self._write(("call", target, *args), "when it started")

    def ask(self, *msg, when: str = "while it was asked something"):
        return self._call(*msg, when=when)

    def post(self, *msg) -> None:
        self._write(msg, "")

    def read(self, when: str):
        msg = self._read(when)
        if msg[0] == "error":
            raise _unpack_error(msg[1])
        return msg

    def kill(self) -> None:
        self._kill()
        self._cleanup()


def send(f, obj) -> None:
    """One message to the other process (the child side of ``IsolatedCall``)."""
    _send(f, obj)


def receive(f):
    """The next message from the other process; EOFError when it is gone."""
    return _recv(f)


def send_error(f, err: InferError) -> None:
    _send(f, ("error", _pack_error(err)))


def open_runner(resolved, opts, settings):
    """A ``Runner`` for `infer run`: in this process, or with RPC workers (--rpc, INFER_RPC,
    models.toml) one whose engine runs in a child, so that a worker that dies mid-run cannot
    abort this one."""
    from infer_cli.engine.runner import Runner, with_rpc

    opts = with_rpc(opts, resolved.entry)
    if opts.rpc:
        return IsolatedRunner(resolved, opts, settings)
    return Runner(resolved, opts, settings)


def batch_engine(resolved, opts, *, share_prefixes: bool = True, keep_idle: bool = False):
    """The batching engine for ``opts``: in this process, or with RPC workers (--rpc, INFER_RPC,
    models.toml) in a child, so that a worker that dies cannot abort this process."""
    from infer_cli.engine.runner import BatchEngine, with_rpc

    if with_rpc(opts, resolved.entry).rpc:
        return IsolatedBatch(resolved, opts, share_prefixes=share_prefixes, keep_idle=keep_idle)
    return BatchEngine.load(resolved, opts, share_prefixes=share_prefixes, keep_idle=keep_idle)


def _batch_child(proto_in, proto_out, resolved, opts, share_prefixes, keep_idle) -> None:
    """The child's side of ``IsolatedBatch``: a reader thread queues the parent's messages, this
    thread runs the scheduler and sends text, results and (at most every quarter second, and
    once a second while idle) the counters."""
    import queue

    from infer_cli.engine.runner import BatchEngine

    engine = BatchEngine.load(resolved, opts, share_prefixes=share_prefixes, keep_idle=keep_idle)
    sched = engine.scheduler
    _send(proto_out, ("ok", (opts, engine.context.n_ctx, engine.context.n_seq,
                             engine.context.kv_bytes or 0, list(engine.notes))))
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        while True:
            try:
                inbox.put(_recv(proto_in))
            except (EOFError, OSError, pickle.UnpicklingError):
                inbox.put(("close",))
                return

    threading.Thread(target=read, name="infer-inbox", daemon=True).start()
    seqs: dict = {}
    failed: dict = {}

    def on_text(seq, text: str) -> None:
        if seq.finished:
            seqs.pop(seq.id, None)
            facts = _facts(seq)
            message = failed.pop(seq.id, None)
            if message is not None:
                facts["finish_reason"], facts["error"] = "error", message
            _send(proto_out, ("done", seq.id, facts))
        elif text:
            _send(proto_out, ("text", seq.id, text, seq.new_logprobs(), seq.n_generated))

    def stats() -> None:
        st = sched.stats
        _send(proto_out, ("stats", {"steps": st.steps, "decoded_tokens": st.decoded_tokens,
                                    "prompt_tokens": st.prompt_tokens,
                                    "shared_tokens": st.shared_tokens, "preempted": st.preempted,
                                    "running": len(sched.running), "waiting": len(sched.waiting),
                                    "kv_used": sched.kv_used, "kv_cached": sched.kv_cached,
                                    "cache_bytes": sched.idle_bytes}))

    sent = 0.0
    while True:
        try:
            msg = inbox.get(timeout=1.0) if not sched.busy else inbox.get_nowait()
        except queue.Empty:
            msg = None
        while msg is not None:
            if msg[0] == "submit":
                seq = sched.submit(msg[2], msg[1], on_text)
                if not seq.finished:
                    seqs[msg[1]] = seq
            elif msg[0] == "cancel":
                seq = seqs.get(msg[1])
                if seq is not None:
                    seq.cancel_requested = True
            elif msg[0] == "close":
                return
            try:
                msg = inbox.get_nowait()
            except queue.Empty:
                msg = None
        if sched.busy:
            try:
                sched.step()
            except Exception as e:  # noqa: BLE001 - one failed step fails its sequences, not the engine
                for seq in list(sched.running) + list(sched.waiting):
                    failed[seq.id] = f"{type(e).__name__}: {e}"
                    sched.cancel(seq)
        now = time.perf_counter()
        if not sched.busy or now - sent >= 0.25:
            stats()
            sent = now


# ----------------------------------------------------------------------------------------------
# The child


def _child() -> None:
    # the protocol keeps the original stdout; fd 1 (where C code prints) joins the log
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    proto_in = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdout = sys.stderr
    # Ctrl-C arrives from the parent as SIGINT: the generation ends with "interrupted"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runner = None
    while True:
        try:
            msg = _recv(proto_in)
        except EOFError:
            return
        kind = msg[0]
        try:
            if kind == "init":
                from infer_cli.engine.runner import Runner

                runner = Runner(*msg[1:])
                _send(proto_out, ("ok", (runner.opts, runner.load_s, list(runner.notes))))
            elif kind == "answer":
                for event in runner.answer(msg[1]):
                    _send(proto_out, ("event", event))
                _send(proto_out, ("done", None))
            elif kind == "batch":
                _batch_child(proto_in, proto_out, *msg[1:])
                return
            elif kind == "call":  # another module's child side takes the pipe over
                import importlib

                module, name = msg[1].split(":")
                getattr(importlib.import_module(module), name)(proto_in, proto_out, *msg[2:])
                return
            elif kind == "reset":
                runner.conversation.reset()
                _send(proto_out, ("ok", None))
            elif kind == "close":
                return
        except InferError as err:
            _send(proto_out, ("error", _pack_error(err)))
        except KeyboardInterrupt:
            _send(proto_out, ("done", None))


if __name__ == "__main__":
    _child()
