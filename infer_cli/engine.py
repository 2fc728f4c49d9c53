"""Generation through llama.cpp: a generator of events the CLI renders.

This first version streams a completion through llama-cpp-python's ``Llama`` object; the
engine issue replaces the inside with a low-level decode loop, keeping the event shape.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ModelLoadFailed


@dataclass
class Stats:
    load_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    first_token_s: float | None = None
    decode_s: float = 0.0
    finish_reason: str | None = None

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Event:
    """One piece of streamed text; the last event carries ``finish_reason``."""

    text: str
    stats: Stats = field(repr=False, default_factory=Stats)
    finish_reason: str | None = None


@dataclass(frozen=True)
class RunOptions:
    n_ctx: int = 4096
    max_tokens: int = 256
    temperature: float = 0.8
    seed: int = -1
    threads: int | None = None
    raw: bool = False


def load(path: Path, opts: RunOptions):
    """Open ``path`` in llama.cpp; a file it refuses becomes ModelLoadFailed."""
    from llama_cpp import Llama

    from .gguf_info import read_gguf

    read_gguf(path)  # a bad file gets a clear error here, not a crash inside llama.cpp
    verbose = bool(os.environ.get("INFER_DEBUG"))
    try:
        return Llama(model_path=str(path), n_ctx=opts.n_ctx, n_threads=opts.threads,
                     seed=opts.seed if opts.seed >= 0 else 0xFFFFFFFF, verbose=verbose)
    except (ValueError, RuntimeError) as e:
        raise ModelLoadFailed(str(path), str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def generate(path: Path, prompt: str, opts: RunOptions) -> Iterator[Event]:
    """Stream the model's answer to ``prompt`` (its chat template unless ``opts.raw``)."""
    stats = Stats()
    t0 = time.perf_counter()
    llm = load(path, opts)
    stats.load_s = time.perf_counter() - t0
    use_chat = not opts.raw and llm.metadata.get("tokenizer.chat_template")
    t_start = time.perf_counter()
    if use_chat:
        chunks = llm.create_chat_completion([{"role": "user", "content": prompt}], stream=True,
                                            max_tokens=opts.max_tokens, temperature=opts.temperature)
        pieces = ((c["choices"][0]["delta"].get("content") or "", c["choices"][0]["finish_reason"])
                  for c in chunks)
    else:
        chunks = llm.create_completion(prompt, stream=True, max_tokens=opts.max_tokens,
                                       temperature=opts.temperature)
        pieces = ((c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in chunks)
    for text, finish in pieces:
        now = time.perf_counter()
        if text and stats.first_token_s is None:
            stats.first_token_s = now - t_start
        if text:
            stats.generated_tokens += 1
        if finish:
            stats.finish_reason = finish
        stats.decode_s = now - t_start - (stats.first_token_s or 0.0)
        yield Event(text, stats, finish)
