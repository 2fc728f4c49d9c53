"""Ctrl-C while llama.cpp is inside one of infer's Python callbacks (its log, the imatrix's graph
callback).

Python raises KeyboardInterrupt in whatever Python code runs when the signal is handled. Inside a
ctypes callback that exception cannot travel up through llama.cpp's C frames: ctypes prints it as
"Exception ignored on calling ctypes callback function" with a traceback, and the interrupt is
lost. So, for the functions registered here, the handler defers: while one of them is on the
stack it has the interrupt asked for again a moment later (``_thread.interrupt_main`` from a
timer thread), until it lands outside them, where it is the usual KeyboardInterrupt: the Ctrl-C
still stops the command, as soon as llama.cpp is back in Python code of infer's own."""

from __future__ import annotations

import _thread
import signal
import threading

_codes: set = set()
_installed = False


def shield(fn):
    """Register ``fn`` (a function llama.cpp calls back) and return it unchanged."""
    _codes.add(fn.__code__)
    _install()
    return fn


def _handler(signum, frame) -> None:
    f = frame
    while f is not None:
        if f.f_code in _codes:
            # Ask again in a moment, from another thread (asking from in here would call this
            # handler again at once): by then the callback has most likely returned.
            t = threading.Timer(0.002, _thread.interrupt_main)
            t.daemon = True
            t.start()
            return
        f = f.f_back
    raise KeyboardInterrupt


def _install() -> None:
    """Take over SIGINT from Python's default handler (only that one: a server that installed its
    own keeps it), from the main thread, once."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)
    _installed = True
