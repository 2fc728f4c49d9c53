"""Importance matrices as llama-imatrix writes them: the GGUF format (``NAME.in_sum2`` and
``NAME.counts`` tensors) and the legacy ``.dat`` format, normalised as llama-quantize does."""

from __future__ import annotations

import struct
from pathlib import Path

from infer_cli.errors import BadOption


def load_imatrix(path: Path) -> dict:
    """Tensor name -> float32 numpy array of mean squared activations."""
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    except (ValueError, IndexError, struct.error, OSError) as e:
        raise BadOption("--imatrix", str(path), f"an imatrix file from llama-imatrix ({e})") from None


def _load_gguf(path: Path) -> dict:
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[:-8]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[:-7]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    out = {}
    for name, s in sums.items():
        c = np.rint(counts[name])
        per = s.reshape(len(c), -1)
        safe = np.where(c > 0, c, 1)[:, None]
        out[name] = np.ascontiguousarray(np.where(c[:, None] > 0, per / safe, 1.0).reshape(-1),
                                         dtype=np.float32)
    if not out:
        raise ValueError("no in_sum2 tensors")
    return out


def _load_legacy(path: Path) -> dict:
    import numpy as np

    data = path.read_bytes()
    (n,), pos = struct.unpack_from("<i", data, 0), 4
    out = {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4:pos + 4 + ln].decode()
        pos += 4 + ln
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        if nval <= 0 or pos + 4 * nval > len(data):
            raise ValueError(f"bad entry for {name}")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = vals / ncall if ncall > 0 else vals.copy()
    if not out:
        raise ValueError("no entries")
    return out
