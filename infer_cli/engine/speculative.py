"""Speculative decoding: a draft (a small model, or n-grams looked up in the text so far)
proposes tokens, the target checks them all in one batch, and keeps those it would have
produced itself.

Verification samples the target at every drafted position and accepts while its choice equals
the draft's, so with greedy decoding the output is the target's own, and with sampling every
token is drawn from the target's distribution. Both KV caches are rolled back past rejected
tokens. A draft model drafts until it is unsure; lookup's draft length follows measured costs
and acceptance; and when speculation costs more time per token than plain decoding, it turns
itself off.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

from infer_cli.errors import DraftIncompatible

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
    from infer_cli.models.gguf_info import read_gguf

    tokens = read_gguf(model.path, arrays=True).get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        return tokens
    return [model.L.llama_vocab_get_text(model.vocab, i) for i in range(model.n_vocab)]


# --- the shared machinery -------------------------------------------------------------------

@dataclass
class Speculator:
    """Proposes tokens, verifies them on the target, adapts, and knows when to step aside.

    It keeps running estimates of what things cost here (a plain target step, a drafted token,
    a verification batch as a function of its length) and of how often drafts are accepted,
    and each round drafts the length that maximises expected tokens per second (a draft model
    overrides that with its own confidence, see DraftModel). When its rounds so far clearly took
    longer per token than a plain step, it switches itself off for the rest of the run."""

    draft_max: int = 16
    draft_min: int = 1
    stats: SpecStats = field(default=None)  # type: ignore[assignment]
    probe_plain: int = 2       # plain steps measured first, as the baseline
    verdict_rounds: int = 4    # no pays-or-not verdict before this many rounds after the first
    verdict_margin: float = 0.5  # "slower" means by more than margin / sqrt(rounds judged)
    confirm_steps: int = 3     # plain steps that re-measure the baseline before a verdict of "off"
    confirm_left: int = 0
    judged_rounds: int = 0     # the rounds after the first, their tokens and seconds (the
    judged_tokens: int = 0     # verdict's evidence), including the time of drafts that came to
    judged_s: float = 0.0      # nothing
    plain_times: list = field(default_factory=list)  # the latest plain steps (seconds)
    n_draft: int = 4
    t_plain: float = 0.0       # seconds for one plain step (median of the latest)
    t_draft: float = 0.0       # seconds per drafted token after the first (EMA)
    t_overhead: float = 0.0    # seconds a round costs before its first draft (EMA)
    verify_slope: float = 0.0  # extra verification cost per drafted token, in plain steps (EMA)
    verify_cost: dict = field(default_factory=dict)  # drafts n -> verification in plain steps
    rejections: int = 0        # rounds that ended on a rejected draft
    last_overhead: float | None = None  # set by propose(): time before the first draft
    rejections_last_round: bool = False
    last_accepted: int = 0
    reproducible: bool = False  # set for seeded sampling: no decision depends on timings

    def prepare(self, prompt: list[int]) -> None:
        """Called once the target holds the prompt."""

    def on_tokens(self, tokens: list[int]) -> None:
        """Called with every token the target produced (history for lookup)."""

    # one step: returns the tokens produced; the last one is not yet in the target's KV --------

    def step(self, session, sampler, last: int, budget: int) -> list[int]:
        st = self.stats
        if st.switched_off or st.plain_tokens < self.probe_plain or budget < 2:
            return self._plain(session, sampler, last)
        if self.confirm_left:
            out = self._plain(session, sampler, last)
            self.confirm_left -= 1
            if not self.confirm_left:
                self._decide()
            return out
        t0 = time.perf_counter()
        drafts = self.propose(session, last, min(self.n_draft, budget - 1))
        if not drafts:
            wasted = time.perf_counter() - t0  # a draft model that was unsure from the start
            st.spec_s += wasted
            if st.rounds > 1:
                self.judged_s += wasted
            return self._plain(session, sampler, last)
        t1 = time.perf_counter()
        overhead = self.last_overhead if self.last_overhead is not None else (t1 - t0) / len(drafts)
        out = verify(session, sampler, last, drafts)
        t2 = time.perf_counter()
        accepted = len(out) - 1
        st.rounds += 1
        st.drafted += len(drafts)
        st.accepted += accepted
        st.spec_tokens += len(out)
        st.spec_s += t2 - t0
        self.rejections_last_round = accepted < len(drafts)
        self.last_accepted = accepted
        self.rejections += self.rejections_last_round
        self._learn(len(drafts), overhead, t1 - t0 - overhead, t2 - t1)
        if st.rounds > 1:  # the first round pays one-time costs: learn from it, do not act on it
            self._choose()
        self._verdict(len(out), t2 - t0)
        return out

    def _plain(self, session, sampler, last: int) -> list[int]:
        t0 = time.perf_counter()
        session.decode_one(last)
        tok = sampler.sample(session.ptr)
        dt = time.perf_counter() - t0
        st = self.stats
        st.plain_s += dt
        st.plain_tokens += 1
        self.plain_times.append(dt)
        del self.plain_times[:-8]
        self.t_plain = statistics.median(self.plain_times)
        return [tok]

    @staticmethod
    def _ema(old: float, new: float, first: bool) -> float:
        return new if first else 0.7 * old + 0.3 * new

    def _learn(self, n: int, overhead_s: float, drafting_s: float, verify_s: float) -> None:
        first = self.stats.rounds == 1
        self.t_overhead = self._ema(self.t_overhead, overhead_s, first)
        if n > 1:
            self.t_draft = self._ema(self.t_draft, drafting_s / (n - 1), first or self.t_draft == 0)
        if self.t_plain > 0:
            ratio = verify_s / self.t_plain
            slope = max(0.0, (ratio - 1.0) / n)
            self.verify_slope = self._ema(self.verify_slope, slope, first)
            old = self.verify_cost.get(n)
            self.verify_cost[n] = ratio if old is None else 0.7 * old + 0.3 * ratio

    def verify_steps(self, n: int) -> float:
        """Verification of ``n`` drafts, in plain steps: interpolated between the lengths seen
        (a batch costs less than linearly more on most hardware), else the average slope."""
        seen = [(0, 1.0), *sorted(self.verify_cost.items())]  # no drafts: one plain step
        lower = [(k, v) for k, v in seen if k <= n]
        upper = [(k, v) for k, v in seen if k >= n]
        if lower and upper:
            (k0, v0), (k1, v1) = lower[-1], upper[0]
            return v0 if k1 == k0 else v0 + (v1 - v0) * (n - k0) / (k1 - k0)
        k0, v0 = lower[-1]
        return v0 + self.verify_slope * (n - k0)

    def acceptance_rate(self) -> float:
        """Per-token acceptance under a geometric model: accepted / (accepted + rejections)."""
        st = self.stats
        return st.accepted / (st.accepted + self.rejections) if st.accepted + self.rejections else 0.0

    def expected_rate(self, n: int) -> float:
        """Expected tokens per second drafting ``n``: (1 + a + ... + a^n) / (drafting + verify)."""
        a = self.acceptance_rate()
        tokens = sum(a ** i for i in range(n + 1))
        seconds = self.t_overhead + (n - 1) * self.t_draft + self.t_plain * self.verify_steps(n)
        return tokens / seconds if seconds > 0 else 0.0

    def _choose(self) -> None:
        if self.reproducible:
            # Seeded sampling must give the same text every run, and batch shapes change the
            # arithmetic: the length follows acceptance alone, never the clock.
            self.n_draft = (min(self.draft_max, self.n_draft + 2) if not self.rejections_last_round
                            else max(self.draft_min, self.last_accepted + 1))
            return
        self.n_draft = max(range(self.draft_min, self.draft_max + 1), key=self.expected_rate)

    def _verdict(self, tokens: int, seconds: float) -> None:
        """Decide whether speculation pays, on what was measured: the time per token of every
        round after the first (which pays one-time costs) against a plain step.

        Switching off is for good, and the first rounds of an answer are its least predictable,
        so "slower" must be clear: by more than verdict_margin / sqrt(rounds judged), 25% after
        four rounds, 9% after thirty. Then a few plain steps re-measure the baseline (an early
        step that ran fast must not decide it) and ``_decide`` settles it."""
        st = self.stats
        if st.rounds == 1 or self.reproducible:
            return
        self.judged_rounds += 1
        self.judged_tokens += tokens
        self.judged_s += seconds
        if self.judged_rounds >= self.verdict_rounds and self._slower():
            self.confirm_left = self.confirm_steps

    def _slower(self) -> bool:
        per_token = self.judged_s / self.judged_tokens
        return per_token > self.t_plain * (1 + self.verdict_margin / math.sqrt(self.judged_rounds))

    def _decide(self) -> None:
        if self._slower():
            st = self.stats
            st.switched_off = (f"speculation switched off: "
                               f"{self.judged_s / self.judged_tokens * 1e3:.1f} ms a token "
                               f"against {self.t_plain * 1e3:.1f} ms plain "
                               f"(acceptance {st.acceptance:.0%})")


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
    p_floor: float = 0.02
    p_now: float | None = None  # the threshold in force: lowered while early stops were needless
    stopped_early: bool = False

    def prepare(self, prompt: list[int]) -> None:
        self.draft_session.sync(prompt[:-1])  # the last prompt token comes with the first step
        self.n_draft = self.draft_max

    def _choose(self) -> None:
        # A draft model's own confidence ends each draft where it becomes unsure (the threshold
        # adapts, see _learn), which follows acceptance token by token: a fixed length from the
        # average acceptance would cut confident runs short after a single rejection.
        if self.reproducible:
            super()._choose()

    def _learn(self, n: int, overhead_s: float, drafting_s: float, verify_s: float) -> None:
        # No cost model here (see _choose), only the stopping bar. How unsure a draft may be
        # before it stops depends on the pair: when it stopped early and the target took every
        # draft anyway, the stop was needless, so lower the bar; after a rejection, raise it
        # back toward --draft-p-min.
        p = self.p_min if self.p_now is None else self.p_now
        if self.rejections_last_round:
            self.p_now = min(self.p_min, p * 2)
        elif self.stopped_early:
            self.p_now = max(self.p_floor, p / 2)

    def propose(self, session, last: int, k: int) -> list[int]:
        d = self.draft_session
        # Same prefix as the target plus ``last``: rolls back what was rejected, and decodes
        # what the draft has not seen (after a fully accepted round, its own last draft and
        # the target's next token) in one batch.
        d.sync([*session.tokens, last])
        drafts: list[int] = []
        threshold = self.p_min if self.p_now is None else self.p_now
        self.stopped_early = False
        for i in range(k):
            tok, p = d.top(-1)
            if p < threshold:
                self.stopped_early = True
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
        self.last_overhead = 0.0
        key = tuple(h[-self.ngram:])
        start = self.index.get(key)
        if start is None or start >= len(h):
            return []
        return h[start:start + k]
