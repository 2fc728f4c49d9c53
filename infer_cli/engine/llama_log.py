"""llama.cpp's log, captured instead of printed.

llama.cpp reports what it allocates (KV cache, compute and output buffers) only in its log.
We keep the lines in memory, so the engine can report the real sizes, and echo them to stderr
only with INFER_DEBUG=1.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading

_lines: list[str] = []
_lock = threading.Lock()
_partial = ""
_installed = None  # keeps the ctypes callback alive for as long as the process runs

_MIB = re.compile(r"([\d.]+) MiB")


def install() -> None:
    """Route llama.cpp's log through us. Idempotent."""
    global _installed
    if _installed is not None:
        return
    import llama_cpp

    echo = bool(os.environ.get("INFER_DEBUG"))

    from infer_cli.engine.sigint import shield

    @llama_cpp.llama_log_callback
    @shield  # a Ctrl-C landing in here is raised once llama.cpp has returned
    def callback(level: int, text: bytes, user_data) -> None:
        global _partial
        piece = text.decode("utf-8", "replace")
        if echo:
            sys.stderr.write(piece)
        with _lock:
            buf = _partial + piece
            *done, _partial = buf.split("\n")
            _lines.extend(done)

    _installed = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def mark() -> int:
    """A position in the log; ``since(mark)`` gives the lines written after it."""
    with _lock:
        return len(_lines)


def since(position: int) -> list[str]:
    with _lock:
        return list(_lines[position:])


def last_error(position: int) -> str | None:
    """The most telling line llama.cpp logged since ``position`` (for load failures)."""
    lines = [ln.strip() for ln in since(position) if ln.strip()]
    for ln in reversed(lines):
        if any(w in ln.lower() for w in ("error", "failed", "invalid", "cannot", "unknown")):
            return ln
    return lines[-1] if lines else None


def kv_cache_bytes(lines: list[str]) -> int | None:
    """Sum of the KV cache sizes llama.cpp announced (one line per cache; two with SWA)."""
    total, seen = 0.0, False
    for ln in lines:
        # 'llama_kv_cache: size = 90.00 MiB (4096 cells, ...)'; not the '... KV buffer size' line
        if "llama_kv_cache" in ln and ": size =" in ln:
            m = _MIB.search(ln.split(": size =", 1)[1])
            if m:
                total += float(m.group(1))
                seen = True
    return int(total * 1024 * 1024) if seen else None


def buffer_bytes(lines: list[str], kind: str) -> int | None:
    """Sum of 'X <kind> buffer size = N MiB' lines (kind: 'compute', 'output')."""
    total, seen = 0.0, False
    for ln in lines:
        if f"{kind} buffer size" in ln:
            m = _MIB.search(ln.split("=", 1)[-1])
            if m:
                total += float(m.group(1))
                seen = True
    return int(total * 1024 * 1024) if seen else None
