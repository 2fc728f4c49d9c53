"""The engine in a child process, for runs that talk to RPC workers.

llama.cpp's RPC client aborts its process when a worker stops answering mid-run. ``IsolatedRunner``
keeps the model, its workers and the generation in a child (``python -m
infer_cli.engine.isolated``) and streams the child's events back, so that such an abort ends
the run with ``WorkerLost`` naming the worker, while what was generated so far has already
been handed to the caller.

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
from dataclasses import dataclass

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


class IsolatedRunner:
    """``engine.runner.Runner``'s interface (``answer``, ``conversation.reset``, ``settings``,
    ``opts``, ``load_s``) over a child process."""

    def __init__(self, resolved, opts, settings, *, endpoints=None):
        self.settings = settings
        self.endpoints = [str(e) for e in (endpoints if endpoints is not None else opts.rpc)]
        self.conversation = _ConversationProxy(self)
        self.generated = 0
        self._log = tempfile.NamedTemporaryFile(prefix="infer-engine-", suffix=".log", delete=False)
        env = dict(os.environ, GGML_NO_BACKTRACE="1")  # an abort: one line, no debugger
        # its own session: a terminal's Ctrl-C reaches this process, which forwards it once
        self.proc = subprocess.Popen([sys.executable, "-m", "infer_cli.engine.isolated"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, start_new_session=True)
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
