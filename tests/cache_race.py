"""One process of the prompt-cache race in tests/test_concurrency.py:

    python -m tests.cache_race ROLE MODEL ROOT SECONDS

Each role loads the model, then works for SECONDS. writer: saves the same entry again and again
(removing it first, so each save writes and renames a new file over the name); evictor: empties
the cache every 20 ms; reader: restores the entry again and again and checks, after each hit,
that the next-token logits equal those of a fresh computation. Prints one JSON line: hits,
misses, wrong (hits whose logits differ), notes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PROMPT = ("A lighthouse keeper writes in the log each night: the wind, the ships that passed, "
          "the hours the lamp burned and the oil it took. ") * 3


def _session(model_path: Path):
    from infer_cli.engine import Model, Options, Session

    opts = Options(warmup=False, n_ctx=512, threads=1)
    m = Model(model_path, opts)
    return m, Session(m, opts)


def _cache(model_path: Path, root: Path, session):
    from infer_cli.engine.prompt_cache import PromptCache, model_identity
    from infer_cli.models.gguf_info import read_gguf

    info = read_gguf(model_path)
    kv = {"n_ctx": session.n_ctx, "type_k": "f16", "type_v": "f16"}
    return PromptCache(model_path, model_identity(model_path, info.data_offset), kv, root=root,
                       limit=1 << 40)


def _logits(session):
    import numpy as np

    return np.ctypeslib.as_array(session.L.llama_get_logits_ith(session.ptr, -1),
                                 shape=(session.model.n_vocab,)).copy()


def main(role: str, model_path: Path, root: Path, seconds: float) -> dict:
    from infer_cli.engine import prompt_cache

    if role == "evictor":
        t_end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < t_end:
            n += prompt_cache.evict(root, 0)
            time.sleep(0.02)
        return {"evicted": n}
    m, s = _session(model_path)
    cache = _cache(model_path, root, s)
    tokens = m.tokenize(PROMPT)
    head = tokens[:-1]
    if role == "writer":
        s.extend(head)
        t_end, n = time.monotonic() + seconds, 0
        while True:
            for p in cache.folder.glob("*.kvc"):
                prompt_cache._unlink(p)
            cache.save(s)
            n += 1
            if time.monotonic() >= t_end:
                return {"saved": n}
    import numpy as np

    s.extend(head)
    s.decode_one(tokens[-1])
    want = _logits(s)
    hits = misses = wrong = 0
    notes: list[str] = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        s.clear()
        if cache.restore(s, head, notes) == "hit":
            s.extend(head)
            s.decode_one(tokens[-1])
            hits += 1
            if not np.allclose(_logits(s), want, rtol=1e-3, atol=1e-3):
                wrong += 1
        else:
            misses += 1
    return {"hits": hits, "misses": misses, "wrong": wrong, "notes": notes}


if __name__ == "__main__":
    role, model, root, seconds = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
    print(json.dumps(main(role, model, root, seconds)))
