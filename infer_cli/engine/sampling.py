"""Sampling settings, llama.cpp's native sampler chain, and stop strings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence


class _LogitRows:
    """Numpy views of llama.cpp's logits rows, made once per address.

    ``np.ctypeslib.as_array`` builds a ctypes array type and an array interface on every call;
    right after a decode, with the caches full of weights, that Python path costs 60-80 us a
    token (~1% of SmolLM2's decode step). Here llama_get_logits_ith is called through a second
    function object that returns the bare address, and a row's view is kept by address: the
    address is asked for anew every time, so a view is only ever read where llama.cpp's output
    buffer is now (it moves when llama.cpp reallocates it; the old views are then not used)."""

    MAX_VIEWS = 1024

    def __init__(self):
        self.fn = None
        self.views: dict[tuple[int, int], object] = {}

    def __call__(self, L, ctx, idx: int, n_vocab: int):
        fn = self.fn
        if fn is None:
            import ctypes

            from infer_cli.engine.binding import native_library

            # lib[name] is a new function object: the binding's own keeps its types
            fn = native_library(L, "libllama")["llama_get_logits_ith"]
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_int32], ctypes.c_void_p
            self.fn = fn
        addr = fn(ctx, idx)
        if not addr:
            raise ValueError(f"llama.cpp has no logits at output {idx}")
        key = (addr, n_vocab)
        view = self.views.get(key)
        if view is None:  # (the imports only here: this is every decoded token's path)
            import ctypes

            import numpy as np

            if len(self.views) >= self.MAX_VIEWS:
                self.views.clear()
            view = np.frombuffer((ctypes.c_float * n_vocab).from_address(addr), dtype=np.float32)
            self.views[key] = view
        return view


logits_row = _LogitRows()  # logits_row(L, ctx, idx, n_vocab): the float32 logits of output idx


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
        self.grammar = None
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda smpl: L.llama_sampler_chain_add(self.ptr, smpl)  # noqa: E731
        if s.grammar:
            # Kept out of the chain: matching the whole vocabulary against the grammar costs
            # ~10 us a token (0.5 s a step for SmolLM2's 49k), so the chain draws first and the
            # grammar only checks that one token; only a refused draw pays for the full pass,
            # then the chain draws again among the tokens the grammar allows (as llama.cpp's
            # own samplers do). Either way no token the grammar refuses is ever returned.
            self.grammar = L.llama_sampler_init_grammar(model.vocab, s.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                self.close()
                raise ValueError("llama.cpp could not parse the grammar")
            self._candidates = _Candidates(L, model.n_vocab)
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
        if self.grammar is not None:
            return self._sample_constrained(ctx, idx)
        if self.argmax:  # the first maximum, as llama.cpp's greedy sampler
            return int(logits_row(self.L, ctx, idx, self.n_vocab).argmax())
        # llama_sampler_sample also accepts the token (penalties see it).
        return self.L.llama_sampler_sample(self.ptr, ctx, idx)

    def _sample_constrained(self, ctx, idx: int) -> int:
        L, cand = self.L, self._candidates
        logits = L.llama_get_logits_ith(ctx, idx)
        arr = cand.fill(logits)
        L.llama_sampler_apply(self.ptr, arr)
        token = cand.selected()
        if not cand.allowed(self.grammar, token):
            arr = cand.fill(logits)
            L.llama_sampler_apply(self.grammar, arr)
            L.llama_sampler_apply(self.ptr, arr)
            token = cand.selected()
        L.llama_sampler_accept(self.grammar, token)
        L.llama_sampler_accept(self.ptr, token)
        return token

    def close(self) -> None:
        if getattr(self, "grammar", None):
            self.L.llama_sampler_free(self.grammar)
            self.grammar = None
        if getattr(self, "ptr", None):
            self.L.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self):
        # A Ctrl-C landing while the interpreter finalizes objects must not print a traceback.
        try:
            self.close()
        except KeyboardInterrupt:
            pass


class _Candidates:
    """A reusable llama_token_data array over the whole vocabulary, filled from the logits by
    numpy (the samplers reorder and rewrite it, so it is refilled for every pass)."""

    def __init__(self, L, n_vocab: int):
        import ctypes

        import numpy as np

        self.L, self.n = L, n_vocab
        self.data = (L.llama_token_data * n_vocab)()
        self.view = np.frombuffer(self.data, dtype=np.dtype(
            [("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.one = (L.llama_token_data * 1)()
        self.one_arr = L.llama_token_data_array(self.one, 1, -1, False)
        self._ref = ctypes.byref
        self._np = np

    def fill(self, logits_ptr):
        np = self._np
        v = self.view
        v["id"] = self.ids
        v["logit"] = np.ctypeslib.as_array(logits_ptr, shape=(self.n,))
        v["p"] = 0.0
        self.arr = self.L.llama_token_data_array(self.data, self.n, -1, False)
        return self._ref(self.arr)

    def selected(self) -> int:
        a = self.arr
        if a.selected < 0:
            raise ValueError("the sampler chain selected no token")
        return int(self.data[a.selected].id)

    def allowed(self, grammar, token: int) -> bool:
        """Whether the grammar, in its current state, lets ``token`` come next."""
        one = self.one[0]
        one.id, one.logit, one.p = token, 1.0, 0.0
        self.one_arr.size, self.one_arr.selected, self.one_arr.sorted = 1, -1, False
        self.L.llama_sampler_apply(grammar, self._ref(self.one_arr))
        return self.one[0].logit != float("-inf")


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
