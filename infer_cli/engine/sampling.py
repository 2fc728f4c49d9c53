"""Sampling settings, llama.cpp's native sampler chain, and stop strings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's sampler chain: a grammar, penalties, top-k, top-p, min-p, temperature, then
    a draw. The defaults of the later fields (no grammar, no presence or frequency penalty)
    build the same chain as before they existed."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = -1
    grammar: str | None = None       # GBNF text with a rule named "root": only tokens it allows
    presence_penalty: float = 0.0    # subtracted once from every token already generated
    frequency_penalty: float = 0.0   # subtracted per occurrence of a token already generated

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """llama.cpp's native sampler chain, built once per generation."""

    def __init__(self, model: Model, s: Sampling):
        L = model.L
        self.L = L
        # Plain greedy is an argmax: numpy does it on the logits in place, where llama.cpp's
        # chain first copies the whole vocabulary into a candidate list (0.25 ms a token with
        # Gemma's 262k vocabulary, a few percent of decode speed).
        # A grammar or a penalty changes the logits first, so the shortcut would ignore them.
        penalised = (s.repeat_penalty != 1.0 or s.presence_penalty != 0.0
                     or s.frequency_penalty != 0.0)
        self.argmax = s.greedy and not penalised and not s.grammar
        self.n_vocab = model.n_vocab
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda smpl: L.llama_sampler_chain_add(self.ptr, smpl)  # noqa: E731
        if s.grammar:
            # First in the chain: every later stage then only sees tokens the grammar allows,
            # so a draw can never leave it. The chain owns the samplers added to it.
            grammar = L.llama_sampler_init_grammar(model.vocab, s.grammar.encode("utf-8"), b"root")
            if not grammar:
                self.close()
                raise ValueError("llama.cpp could not parse the grammar")
            add(grammar)
        if penalised:
            add(L.llama_sampler_init_penalties(model.n_vocab, s.repeat_last_n, s.repeat_penalty,
                                               s.frequency_penalty, s.presence_penalty))
        if s.greedy:
            add(L.llama_sampler_init_greedy())
            return
        if s.top_k > 0:
            add(L.llama_sampler_init_top_k(s.top_k))
        if 0 < s.top_p < 1:
            add(L.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(L.llama_sampler_init_min_p(s.min_p, 1))
        add(L.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed >= 0 else int.from_bytes(os.urandom(4), "little")
        add(L.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx) -> int:
        return self.sample_at(ctx, -1)

    def sample_at(self, ctx, idx: int) -> int:
        """Sample from the logits of output ``idx`` (-1: the last)."""
        if self.argmax:
            import numpy as np

            logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
            return int(logits.argmax())  # the first maximum, as llama.cpp's greedy sampler
        # llama_sampler_sample also accepts the token (penalties see it).
        return self.L.llama_sampler_sample(self.ptr, ctx, idx)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.L.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


# --- stop strings ---------------------------------------------------------------------------

class StopFilter:
    """Holds back text that might be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
