"""Safetensors read one tensor at a time from a memory map, with every header value checked
against the file (no torch, no safetensors package)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from infer_cli.errors import BadCheckpoint

DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8", "I32": "<i4",
           "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "u1"}


@dataclass(frozen=True)
class TensorRef:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def n_bytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadCheckpoint(str(path), "truncated safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise BadCheckpoint(str(path), f"safetensors header claims {n} bytes")
        try:
            meta = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadCheckpoint(str(path), f"corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise BadCheckpoint(str(path), "corrupt safetensors header")
    base, out = 8 + n, {}
    for name, v in meta.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = v["dtype"], tuple(int(x) for x in v["shape"]), v["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise BadCheckpoint(str(path), f"corrupt safetensors entry for {name}") from None
        if dtype not in DTYPES:
            raise BadCheckpoint(str(path), f"{name} has unsupported dtype {dtype}")
        count = 1
        for d in shape:
            count *= d
        if not (0 <= b <= e and base + e <= size and e - b == count * int(DTYPES[dtype][-1])):
            raise BadCheckpoint(str(path), f"{name}'s data lies outside the file or has the wrong size")
        out[name] = TensorRef(name, path, dtype, shape, base + b, base + e)
    return out


def load_f32(ref: TensorRef):
    """The tensor as float32 (BF16 widened by a 16-bit shift), reading only its bytes."""
    import numpy as np

    raw = np.memmap(ref.file, dtype=np.dtype(DTYPES[ref.dtype]), mode="r", offset=ref.start,
                    shape=ref.shape if ref.shape else (1,))
    if ref.dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


def write(path: Path, tensors: dict) -> None:
    """Write numpy arrays (float32/float16) as a safetensors file (used by tests and exports)."""
    import numpy as np

    names = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}
    header, pos = {}, 0
    for name, arr in tensors.items():
        header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [pos, pos + arr.nbytes]}
        pos += arr.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
