"""Speculative decoding: a draft (a small model, or n-grams looked up in the text so far)
proposes tokens, the target checks them all in one batch, and keeps those it would have
produced itself.

Verification samples the target at every drafted position and accepts while its choice equals
the draft's, so with greedy decoding the output is the target's own, and with sampling every
token is drawn from the target's distribution. Both KV caches are rolled back past rejected
tokens. The draft length follows recent acceptance; a draft model stops early when it is unsure;
and when speculation costs more time per token than plain decoding, it turns itself off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .errors import DraftIncompatible

# llama.cpp's rules for a usable draft (common/speculative.cpp).
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


@dataclass
class SpecStats:
    mode: str                      # "draft" or "lookup"
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    plain_tokens: int = 0          # tokens produced by plain steps (measuring, no draft, or off)
    spec_tokens: int = 0           # tokens produced by speculative rounds
    spec_s: float = 0.0
    plain_s: float = 0.0
    switched_off: str | None = None
    draft_max: int = 16

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def speedup(self) -> float | None:
        """Tokens per second while speculating, against plain decoding in the same run."""
        if not self.spec_tokens or not self.plain_tokens or not self.spec_s or not self.plain_s:
            return None
        return (self.spec_tokens / self.spec_s) / (self.plain_tokens / self.plain_s)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["acceptance"] = self.acceptance
        d["speedup"] = self.speedup
        return d


# --- compatibility --------------------------------------------------------------------------

def check_compatible(target, draft) -> None:
    """Raise DraftIncompatible unless ``draft`` (an engine.Model) can draft for ``target``."""
    L = target.L
    tv, dv = target.vocab, draft.vocab
    name = str(draft.path)

    def fail(reason: str):
        raise DraftIncompatible(str(target.path), name, reason)

    if L.llama_vocab_type(tv) != L.llama_vocab_type(dv):
        fail("the tokenizers are of different kinds")
    for what, f in (("BOS", L.llama_vocab_bos), ("EOS", L.llama_vocab_eos)):
        if f(tv) != f(dv):
            fail(f"{what} token ids differ ({f(tv)} against {f(dv)})")
    for what, f in (("BOS", L.llama_vocab_get_add_bos), ("EOS", L.llama_vocab_get_add_eos)):
        if bool(f(tv)) != bool(f(dv)):
            fail(f"one adds a {what} token and the other does not")
    nt, nd = target.n_vocab, draft.n_vocab
    if abs(nt - nd) > VOCAB_MAX_SIZE_DIFFERENCE:
        fail(f"vocabularies of {nt} and {nd} tokens differ by more than {VOCAB_MAX_SIZE_DIFFERENCE}")
    ttoks = _token_texts(target)
    dtoks = _token_texts(draft)
    for i in range(VOCAB_CHECK_START_TOKEN_ID, min(nt, nd)):
        if ttoks[i] != dtoks[i]:
            fail(f"token {i} is {ttoks[i]!r} in the target but {dtoks[i]!r} in the draft")


def _token_texts(model) -> list:
    """Token texts from the GGUF (one read of the array) rather than a C call per token."""
    from .gguf_info import read_gguf

    tokens = read_gguf(model.path, arrays=True).get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        return tokens
    return [model.L.llama_vocab_get_text(model.vocab, i) for i in range(model.n_vocab)]


# --- the shared machinery -------------------------------------------------------------------

@dataclass
class Speculator:
    """Proposes tokens, verifies them on the target, adapts, and knows when to step aside."""

    draft_max: int = 16
    draft_min: int = 1
    stats: SpecStats = field(default=None)  # type: ignore[assignment]
    probe_plain: int = 3       # plain steps measured first, as the baseline
    probe_rounds: int = 3      # speculative rounds before the first pays-or-not verdict
    n_draft: int = 8

    def propose(self, session, last: int, k: int) -> list[int]:
        raise NotImplementedError

    def prepare(self, prompt: list[int]) -> None:
        """Called once the target holds the prompt."""

    def on_tokens(self, tokens: list[int]) -> None:
        """Called with every token the target produced (history for lookup)."""

    def note(self) -> str | None:
        return self.stats.switched_off

    # one step: returns the tokens produced; the last one is not yet in the target's KV --------

    def step(self, session, sampler, last: int, budget: int) -> list[int]:
        st = self.stats
        measuring = st.plain_tokens < self.probe_plain
        if st.switched_off or measuring or budget < 2:
            return self._plain(session, sampler, last)
        t0 = time.perf_counter()
        drafts = self.propose(session, last, min(self.n_draft, budget - 1))
        if not drafts:
            return self._plain(session, sampler, last)
        out = verify(session, sampler, last, drafts)
        accepted = len(out) - 1
        st.rounds += 1
        st.drafted += len(drafts)
        st.accepted += accepted
        st.spec_tokens += len(out)
        st.spec_s += time.perf_counter() - t0
        self._adapt(accepted, len(drafts))
        self._maybe_switch_off()
        return out

    def _plain(self, session, sampler, last: int) -> list[int]:
        t0 = time.perf_counter()
        session.decode_one(last)
        tok = sampler.sample(session.ptr)
        self.stats.plain_s += time.perf_counter() - t0
        self.stats.plain_tokens += 1
        return [tok]

    def _adapt(self, accepted: int, drafted: int) -> None:
        if accepted == drafted:
            self.n_draft = min(self.draft_max, self.n_draft + 2)
        else:
            self.n_draft = max(self.draft_min, accepted + 1)

    def _maybe_switch_off(self) -> None:
        st = self.stats
        if st.rounds < self.probe_rounds or not st.plain_tokens:
            return
        plain = st.plain_s / st.plain_tokens
        spec = st.spec_s / st.spec_tokens
        if spec > plain:
            st.switched_off = (f"speculation switched off: {spec * 1e3:.1f} ms a token against "
                               f"{plain * 1e3:.1f} ms plain (acceptance {st.acceptance:.0%})")


def verify(session, sampler, last: int, drafts: list[int]) -> list[int]:
    """Decode ``last`` and the drafts in one batch; sample the target at each position and keep
    the drafts while they match. Returns the accepted drafts plus the target's own next token;
    the target's KV is rolled back to hold ``last`` and the accepted drafts only."""
    session.decode_all([last, *drafts])
    out = []
    for i in range(len(drafts) + 1):
        tok = sampler.sample_at(session.ptr, i)
        out.append(tok)
        if i == len(drafts) or tok != drafts[i]:
            break
    rejected = len(drafts) - (len(out) - 1)
    if rejected:
        session.rollback(len(session.tokens) - rejected)
    return out


# --- a draft model --------------------------------------------------------------------------

@dataclass
class DraftModel(Speculator):
    """Drafts with a smaller model that shares the target's vocabulary."""

    draft_session: object = None
    p_min: float = 0.5  # stop drafting when the draft's top choice (among its 10 best) is unsure

    def prepare(self, prompt: list[int]) -> None:
        self.draft_session.sync(prompt[:-1])  # the last prompt token comes with the first step

    def propose(self, session, last: int, k: int) -> list[int]:
        d = self.draft_session
        d.sync(session.tokens)  # same prefix as the target (rolls back what was rejected)
        d.decode_one(last)
        drafts: list[int] = []
        for i in range(k):
            tok, p = d.top(-1)
            if p < self.p_min:
                break
            drafts.append(tok)
            if i + 1 < k:
                d.decode_one(tok)
        return drafts


# --- prompt lookup --------------------------------------------------------------------------

@dataclass
class PromptLookup(Speculator):
    """Drafts by finding the latest earlier occurrence of the last n tokens in the prompt and
    the text so far, and proposing what followed it. Costs nothing to draft; pays off when the
    answer repeats its input (editing, quoting, code)."""

    ngram: int = 3
    history: list[int] = field(default_factory=list)
    index: dict = field(default_factory=dict)   # n-gram -> index just after its latest occurrence
    indexed: int = 0

    def prepare(self, prompt: list[int]) -> None:
        self.history = list(prompt)
        self.index, self.indexed = {}, 0

    def on_tokens(self, tokens: list[int]) -> None:
        self.history.extend(tokens)

    def _reindex(self) -> None:
        h, n = self.history, self.ngram
        # Index every n-gram that has a continuation (ends before the last token).
        for end in range(max(self.indexed, n), len(h)):
            self.index[tuple(h[end - n:end])] = end
        self.indexed = len(h)

    def propose(self, session, last: int, k: int) -> list[int]:
        h = self.history
        if len(h) < self.ngram + 1:
            return []
        self._reindex()
        key = tuple(h[-self.ngram:])
        start = self.index.get(key)
        if start is None or start >= len(h):
            return []
        return h[start:start + k]
