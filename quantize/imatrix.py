"""Importance matrices as llama-imatrix writes them: the GGUF format (``NAME.in_sum2`` and
``NAME.counts`` tensors) and the legacy ``.dat`` format, normalised as llama-quantize does."""

from __future__ import annotations

import struct
from pathlib import Path

from infer_cli.errors import BadOption


def load_imatrix(path: Path) -> dict:
    """Tensor name -> float32 numpy array of mean squared activations."""
    from infer_cli.errors import BadModelFile

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    except BadModelFile as e:
        raise BadOption("--imatrix", str(path), f"an imatrix file from llama-imatrix ({e.reason})") from None
    except (ValueError, IndexError, struct.error, OSError) as e:
        raise BadOption("--imatrix", str(path), f"an imatrix file from llama-imatrix ({e})") from None


def _load_gguf(path: Path) -> dict:
    """Through infer's bounded GGUF reader (every count and offset checked against the file),
    then each F32 tensor read from its offset."""
    import numpy as np

    from infer_cli.ggml import TYPE_IDS
    from infer_cli.models.gguf_info import read_gguf

    info = read_gguf(path)
    f32 = TYPE_IDS["F32"]
    sums, counts = {}, {}
    with open(path, "rb") as f:
        for t in info.tensors:
            if t.name.endswith(".in_sum2"):
                table, name = sums, t.name[:-8]
            elif t.name.endswith(".counts"):
                table, name = counts, t.name[:-7]
            else:
                continue
            if t.ggml_type != f32:
                raise ValueError(f"{t.name} is {t.type_name}, not F32")
            f.seek(t.offset)
            table[name] = np.fromfile(f, dtype="<f4", count=t.n_elements).astype(np.float32)
    out = {}
    for name, s in sums.items():
        if name not in counts:
            raise ValueError(f"{name} has in_sum2 but no counts")
        c = np.rint(counts[name])
        if not len(c) or len(s) % len(c):
            raise ValueError(f"{name} has {len(s)} sums for {len(c)} matrices")
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
    # each entry takes at least 12 bytes: its name length, ncall and nval
    if n < 0 or n * 12 > len(data) - pos:
        raise ValueError(f"it claims {n} entries in {len(data)} bytes")
    out = {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", data, pos)
        if ln < 0 or pos + 4 + ln + 8 > len(data):
            raise ValueError(f"an entry name of {ln} bytes at byte {pos}")
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


def mismatch(entries: dict, info) -> str | None:
    """Why an imatrix (``load_imatrix``'s entries) was not made for the model ``info``
    (``read_gguf``'s header) describes, naming the first tensor that differs; None when it fits.
    Each entry must be a tensor of the model with one value per column (per expert); a model
    layer the matrix has nothing for at all means it came from a model with fewer layers."""
    import re

    tensors = {t.name: t for t in info.tensors}
    for name in sorted(entries):
        t = tensors.get(name)
        if t is None:
            return f"it has {name}, which this model does not"
        shape = list(t.shape)  # ggml order: columns first
        want = shape[0] * (shape[2] if len(shape) > 2 else 1)
        if entries[name].size != want:
            return f"{name} has {entries[name].size} values in it but {want} in this model"
    layer = re.compile(r"blk\.(\d+)\.")
    covered = {int(m.group(1)) for n in entries if (m := layer.match(n))}
    # the layers a forward pass runs: not the multi-token-prediction layers some models append
    arch = info.get("general.architecture")
    n_layer = info.get(f"{arch}.block_count")
    n_layer = int(n_layer) - int(info.get(f"{arch}.nextn_predict_layers") or 0) \
        if isinstance(n_layer, int) else None
    for t in info.tensors:
        m = layer.match(t.name)
        if m and covered and int(m.group(1)) not in covered and len(t.shape) >= 2 \
                and t.name.endswith(".weight") and (n_layer is None or int(m.group(1)) < n_layer):
            return f"it has nothing for {t.name} (layer {m.group(1)} of this model)"
    return None
