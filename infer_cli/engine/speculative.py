"""Speculative decoding: a draft (a small model, or n-grams looked up in the text so far)
proposes tokens, the target checks them all in one batch, and keeps those it would have
produced itself.

Verification samples the target at every drafted position and accepts while its choice equals
the draft's, so with greedy decoding the output is the target's own, and with sampling every
token is drawn from the target's distribution. Both KV caches are rolled back past rejected
tokens.

The policy decides from acceptance counts. A draft model drafts until it is unsure or reaches
``draft_max``; lookup's length grows while drafts are taken whole and falls back after a
rejection. Whether speculation pays is judged on the latest drafted tokens (not rounds), with
the acceptance estimate's confidence interval, against one cost figure: what a drafted token
costs in plain steps, measured over the first rounds (from the model sizes when sampling is
seeded, so that nothing depends on the clock). A switch-off that rests on the clock's first
figure alone (at the cheapest of the rounds behind it, or at a figure 20% lower, speculation
would pay) waits for the figure to be measured again. Switched off, it probes again every so
often, measures the cost again over the probe's first rounds (the machine's load may have
changed since), and switches back on when acceptance has recovered. Given the tokens and the
cost figures, every decision is deterministic.

One verdict needs no acceptance evidence: when the first two long rounds each show that even every
draft taken would hardly beat plain decoding (a draft model nearly as slow as its target, as tiny
models are where fixed per-token overheads dominate), speculation stops at once, for good.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
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
    switched_off: str | None = None  # why speculation is off at the end; None while it is on
    switches: list = field(default_factory=list)  # {"token", "to": "off" | "on", "why"}
    probes: int = 0                # times it tried speculating again after switching off
    cost: float | None = None      # plain steps one drafted token costs (drafting + verifying)
    cost_from: str = ""            # "measured" or "model sizes"
    costs: list = field(default_factory=list)  # every measured figure, the first one and then
                                               # one per re-check or probe
    rechecks: list = field(default_factory=list)  # {"token", "why"}: the clock's first figure
                                                  # measured again before a switch-off on it
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

    def summary(self) -> str:
        """The decisions, for the notes: "off at token 40 (...); on at token 104 (...)", in
        token order with the cost's re-checks ("cost measured again at token 21 (...)")."""
        events = [(s["token"], f"{s['to']} at token {s['token']} ({s['why']})") for s in self.switches]
        events += [(r["token"], f"cost measured again at token {r['token']} ({r['why']})")
                   for r in self.rechecks]
        return "; ".join(text for _, text in sorted(events, key=lambda e: e[0]))

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["switches"] = [dict(s) for s in self.switches]
        d["rechecks"] = [dict(r) for r in self.rechecks]
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


# --- the policy ----------------------------------------------------------------------------

def wilson(successes: int, trials: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a success rate (sound at small counts and near 0 or 1)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def expected_tokens(a: float, n: float) -> float:
    """Tokens a round yields drafting ``n`` when each draft is taken with probability ``a``
    while the ones before it were: 1 + a + ... + a^n (the last is the target's own)."""
    if a >= 1.0:
        return n + 1
    return (1 - a ** (n + 1)) / (1 - a)


def gain(a: float, lengths, cost: float) -> float:
    """Tokens per plain-step time of rounds drafting ``lengths`` (a number, or the lengths of
    several rounds) at acceptance ``a``, when a drafted token costs ``cost`` plain steps:
    above 1, speculation pays."""
    lengths = [lengths] if isinstance(lengths, (int, float)) else list(lengths)
    steps = sum(1 + cost * n for n in lengths)
    return sum(expected_tokens(a, n) for n in lengths) / steps if steps else 0.0


@dataclass
class Speculator:
    """Proposes tokens, verifies them on the target, and decides whether that pays.

    Evidence is counted in drafted tokens: a round that took ``k`` drafts and then met a
    rejection is ``k + 1`` trials of the per-token acceptance ``a`` (``k`` without a
    rejection), and the verdict looks at the latest ``window`` of them. A round drafting ``n``
    yields 1 + a + ... + a^n tokens for 1 + cost * n plain steps. Speculation switches off once
    ``evidence`` tokens are judged and even the upper end of the acceptance interval would not
    pay for the rounds drafted, or as soon as the cost is measured where it is a plain step or
    more (then no acceptance could pay); switched off, it probes again after ``probe_after``
    plain tokens (doubling after each failed probe) and is back on when the probe's acceptance
    pays. Like llama.cpp's own speculative decoding, lengths and thresholds are fixed or follow
    the counts; the clock gives only the cost figure: at the start, once more before a
    switch-off that rests on that first figure alone (see ``_recheck``), and at each probe."""

    draft_max: int = 16
    draft_min: int = 1
    stats: SpecStats = field(default=None)  # type: ignore[assignment]
    reproducible: bool = False  # seeded sampling: the cost comes from model sizes, not the clock
    plain_first: int = 0        # plain steps before the first round (each one leaves a draft model
                                # a token further behind, caught up in that round's batch)
    calibrate_rounds: int = 3   # rounds after the first whose cost, in plain steps, is the
                                # figure used until a probe measures it again (their median);
                                # each is followed by a plain step, and measured against the
                                # plain steps on either side of it (a CPU's speed drifts by a
                                # third within a second)
    evidence: int = 32          # drafted tokens judged before a verdict
    probe_evidence: int = 16    # the same for a probe
    window: int = 128           # the verdict's memory, in drafted tokens
    z: float = 2.0              # the acceptance interval: about 95%
    probe_after: int = 64       # plain tokens between switching off and the first probe
    remeasure_after: int = 16   # the same where only the cost figure, the clock's first, stands
                                # in the way: the probe measures it again, and a draft model
                                # catches up on the tokens it missed in one batch, which costs
                                # more the longer the gap (64 tokens: about 0.2 s for SmolLM2)
    probe_ceiling: float = 0.9  # no probes where even this acceptance would not pay
    prior_cost: float = 0.1     # the cost figure when nothing may be measured
    long_round: int = 4         # rounds drafting at least this many tokens tell the best case
    best_case_rounds: int = 2   # such rounds, each below the floor, before the cost verdict (one
                                # round slowed by a neighbour on the CPU must not decide)
    best_case_floor: float = 1.1  # below this best case (every draft taken), it cannot pay
    n_draft: int = 4
    # state
    produced: int = 0           # tokens produced by steps so far (the switches' clock)
    probing: bool = False
    next_probe: int | None = None
    probe_gap: int = 0
    recent: deque = field(default_factory=deque)  # per round: (trials, accepted, drafted)
    last_plain_s: float | None = None  # the latest plain step's time
    remeasuring: bool = False   # a probe measuring the cost again (the old figure meanwhile)
    round_costs: list = field(default_factory=list)  # per calibration round: plain steps a draft
    figure_low: float | None = None  # the cheapest round behind the clock's latest figure
    figure_noise: float = 0.2   # how far below the clock's first figure another run of the same
                                # prompt may measure, outliers aside (held-out runs: 0.51-0.55,
                                # 0.53-0.72, 0.65-0.78 plain steps a drafted token)
    best_case: list = field(default_factory=list)  # per long round: (drafted, plain steps taken)
    pending: tuple | None = None  # a calibration round awaiting its plain step: (drafted, s)
    catch_up_s: float = 0.0     # this round's share of time spent catching a draft up (not
                                # what a round costs in the steady state)

    def prepare(self, prompt: list[int]) -> None:
        """Called once the target holds the prompt."""

    def on_tokens(self, tokens: list[int]) -> None:
        """Called with every token the target produced (history for lookup)."""

    def prior(self, session) -> float:
        """The cost figure when the clock may not decide (seeded sampling)."""
        return self.prior_cost

    # one step: returns the tokens produced; the last one is not yet in the target's KV --------

    def step(self, session, sampler, last: int, budget: int) -> list[int]:
        st = self.stats
        if self.reproducible and st.cost is None:
            st.cost, st.cost_from = self.prior(session), "model sizes"
        if budget < 2 or not self.speculating():
            return self._plain(session, sampler, last)
        t0 = time.perf_counter()
        self.catch_up_s = 0.0
        drafts = self.propose(session, last, min(self._length(), budget - 1))
        if not drafts:
            st.spec_s += time.perf_counter() - t0  # a draft model unsure from the start
            return self._plain(session, sampler, last)
        out = verify(session, sampler, last, drafts)
        seconds = time.perf_counter() - t0
        st.spec_tokens += len(out)
        st.spec_s += seconds
        self.observe(len(drafts), len(out) - 1, seconds - self.catch_up_s)
        return out

    @property
    def measuring(self) -> bool:
        """Whether the clock is measuring the cost figure now."""
        return self.stats.cost is None or self.remeasuring

    def speculating(self) -> bool:
        """Whether the next step drafts (else it is a plain one); starts a probe when due."""
        st = self.stats
        if self.measuring and (st.plain_tokens < self.plain_first or self.pending):
            return False
        if st.switched_off:
            if self.next_probe is None or self.produced < self.next_probe:
                return False
            self._start_probe()
        return True

    def observe(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """One verified round: ``accepted`` of ``drafted`` taken, in ``seconds`` (which only
        the cost's calibration reads). Adapts the length and gives the verdict."""
        st = self.stats
        rejected = accepted < drafted
        self.produced += accepted + 1
        st.rounds += 1
        st.drafted += drafted
        st.accepted += accepted
        self._learn(drafted, accepted)
        if self.measuring and seconds is not None and (st.rounds > 1 or self.remeasuring):
            # The run's first round pays one-time costs (graph sizes, allocation): not measured.
            self.pending = (drafted, seconds)
        self.recent.append((accepted + rejected, accepted, drafted))
        while sum(t for t, _, _ in self.recent) - self.recent[0][0] >= self.window:
            self.recent.popleft()
        self._judge()

    def _calibrate(self, before: float, after: float) -> None:
        """The pending round, in plain steps of the time around it."""
        st = self.stats
        drafted, seconds = self.pending
        self.pending = None
        steps = seconds / ((before + after) / 2)
        self.round_costs.append((steps - 1) / drafted)
        if drafted >= self.long_round and not self.remeasuring:
            self.best_case.append((drafted, steps))
        measured = len(self.round_costs) >= self.calibrate_rounds
        if measured:
            st.cost, st.cost_from = max(0.0, statistics.median(self.round_costs)), "measured"
            self.figure_low = max(0.0, min(self.round_costs))
            st.costs.append(round(st.cost, 3))
            self.round_costs = []
            self.remeasuring = False
        self._judge_best_case()  # for good, where the rounds show it: before the verdict below
        if measured:  # the verdict waited for the figure (at the start, and in a probe)
            self._judge()

    def _judge_best_case(self) -> None:
        """The cost verdict, from the clock (never with seeded sampling): what each of the
        first ``best_case_rounds`` long rounds would have yielded had every draft been taken,
        per plain-step time. When even the best of them is below ``best_case_floor``,
        speculation cannot pay at any acceptance a draft model reaches, so it stops for the
        rest of the run."""
        if (self.reproducible or self.stats.switched_off
                or len(self.best_case) < self.best_case_rounds):
            return
        rounds, self.best_case = self.best_case, []  # judged once: then acceptance decides
        best = max((n + 1) / t for n, t in rounds)
        if best < self.best_case_floor:
            self._switch_off(f"rounds of {' and '.join(str(n) for n, _ in rounds)} drafts took "
                             f"{' and '.join(f'{t:.1f}' for _, t in rounds)} plain steps: even "
                             f"every draft taken would give at most {best:.2f}x plain",
                             for_good=True)

    def _plain(self, session, sampler, last: int) -> list[int]:
        t0 = time.perf_counter()
        session.decode_one(last)
        tok = sampler.sample(session.ptr)
        dt = time.perf_counter() - t0
        st = self.stats
        st.plain_s += dt
        st.plain_tokens += 1
        self.produced += 1
        if self.pending and self.last_plain_s is not None:
            self._calibrate(self.last_plain_s, dt)
        self.last_plain_s = dt
        return [tok]

    # the draft length: from acceptance alone ------------------------------------------------

    def _length(self) -> int:
        return self.n_draft

    def _learn(self, drafted: int, accepted: int) -> None:
        """Twice as long after a draft taken whole; after a rejection, half as long, or what
        was taken plus one if more: where drafts follow the text for long stretches (a copy
        with an edit here and there) they stay long, and where they keep missing they shrink
        to one token a round."""
        if accepted == drafted:
            self.n_draft = min(self.draft_max, max(self.n_draft, drafted) * 2)
        else:
            self.n_draft = max(self.draft_min, min(self.draft_max, max(accepted + 1, drafted // 2)))

    # the verdict ------------------------------------------------------------------------------

    def judged(self) -> tuple[int, int, list[int]]:
        """Trials, accepted and the rounds' draft lengths in the verdict's window."""
        trials = sum(t for t, _, _ in self.recent)
        accepted = sum(a for _, a, _ in self.recent)
        return trials, accepted, [d for _, _, d in self.recent]

    def _judge(self) -> None:
        st = self.stats
        if self.measuring or st.switched_off:
            return
        # Where a drafted token costs more than a plain step, no acceptance could pay (every
        # draft taken yields most with one draft a round): no need to wait for the evidence
        # (each round of it at a loss).
        if st.cost > 1:
            ceiling = gain(1.0, 1, st.cost)
            if self._recheck(lambda cost: gain(1.0, 1, cost) >= 1,
                             f"a drafted token costs {st.cost:.2f} plain steps, at most "
                             f"{ceiling:.2f}x plain"):
                return
            self._switch_off(f"{'probe: ' if self.probing else ''}a drafted token costs "
                             f"{st.cost:.2f} plain steps: even every draft taken would give at "
                             f"most {ceiling:.2f}x plain")
            return
        trials, accepted, lengths = self.judged()
        if trials < (self.probe_evidence if self.probing else self.evidence):
            return
        lo, hi = wilson(accepted, trials, self.z)
        rate = accepted / trials
        what = (f"acceptance {rate:.0%} ({lo:.0%}-{hi:.0%}) over {trials} drafted tokens, "
                f"a drafted token costing {st.cost:.2f} plain steps")
        best = gain(hi, lengths, st.cost)
        if best < 1:
            verdict = f"{what}: at most {best:.2f}x plain"
            if not self._recheck(lambda cost: gain(hi, lengths, cost) >= 1, verdict):
                self._switch_off(verdict)
        elif self.probing and (gain(rate, lengths, st.cost) >= 1 or trials >= self.evidence):
            if gain(rate, lengths, st.cost) >= 1:
                self.probing = False
                st.switches.append({"token": self.produced, "to": "on",
                                    "why": f"probe: {what}: {gain(rate, lengths, st.cost):.2f}x plain"})
            else:
                self._switch_off(f"probe: {what}: {gain(rate, lengths, st.cost):.2f}x plain")

    def _recheck(self, pays_at, verdict: str) -> bool:
        """Before switching off on the clock's first cost figure, measure it again where the
        verdict rests on the figure alone: when ``pays_at(cost)`` says speculation would pay at
        the cheapest of the rounds behind it, or at a figure ``figure_noise`` lower (three rounds
        are few to tell the spread by). The median of three rounds moves with a neighbour on the
        CPU during two of them (a Gemma 3 pair measured 0.92 plain steps a drafted token where
        four other runs of the same prompt measured 0.53-0.72, and switched off at 94%
        acceptance), or with all three (prompt lookup measured 0.65 against 0.51-0.55 and
        switched off at 65%, where the other runs went on); switching off and probing later to
        measure it again costs the plain tokens in between and a draft model's catch-up. So
        speculation stays on for three more calibration rounds and the verdict is given again
        on the new figure. Once: the figure measured again (``costs`` then holds two) stands, as
        a probe's does. Returns whether it is measuring again."""
        if not self._unconfirmed or self.figure_low is None:
            return False
        low = min(self.figure_low, self.stats.cost * (1 - self.figure_noise))
        if not pays_at(low):
            return False
        self.stats.rechecks.append({
            "token": self.produced,
            "why": f"{verdict}; at {low:.2f} plain steps a drafted token (its cheapest round, or "
                   f"{self.figure_noise:.0%} less) it would pay"})
        self.remeasuring = True
        self.round_costs = []
        return True

    def _switch_off(self, why: str, *, for_good: bool = False) -> None:
        st = self.stats
        failed_probe = self.probing
        self.probing = False
        self.probe_gap = self.probe_gap * 2 if failed_probe else self.probe_after
        # even a good stretch would hardly pay: probing would only cost
        best = None if for_good else max(gain(self.probe_ceiling, n, st.cost)
                                         for n in range(1, self.draft_max + 1))
        hopeless = best is not None and best < 1.1
        if for_good:  # the cost verdict: no acceptance could make it pay
            self.next_probe = None
            why += "; no probes"
        elif hopeless and not self._unconfirmed:
            self.next_probe = None
            why += f"; no probes: {self.probe_ceiling:.0%} acceptance would give {best:.2f}x plain"
        else:
            self.next_probe = self.produced + (self.remeasure_after if hopeless else self.probe_gap)
            why += f"; next probe at token {self.next_probe}"
            if hopeless:  # on the clock's first figure: the probe measures it again
                why += f" (at {st.cost:.2f} plain steps a drafted token even " \
                       f"{self.probe_ceiling:.0%} acceptance would give {best:.2f}x plain: a probe " \
                       "measures that figure again before it stops for good)"
        st.switched_off = f"speculation switched off: {why}"
        st.switches.append({"token": self.produced, "to": "off", "why": why})

    @property
    def _unconfirmed(self) -> bool:
        """Whether the cost figure is the clock's first: over three rounds, a neighbour on the CPU
        can nearly double it (two of 45 Gemma 3 F32 runs with its Q4_K_M draft measured 0.98 and
        1.06 plain steps a drafted token where the median run measured 0.55, and at 98%
        acceptance stopped for the rest of the run). Such a figure alone does not stop
        speculation for good: a probe measures it again first."""
        return self.stats.cost_from == "measured" and len(self.stats.costs) < 2

    def _start_probe(self) -> None:
        self.stats.switched_off = None
        self.stats.probes += 1
        self.probing = True
        self.recent.clear()  # judged on what follows, not on the stretch that switched it off
        self.n_draft = max(self.draft_min, min(self.draft_max, 4))
        # What a drafted token costs may have changed since it was measured (another process
        # started or ended on the CPU, a longer context): the probe measures it again, as at
        # the start, and judges on the new figure. A figure the clock did not give (seeded
        # sampling's, from the model sizes) is kept.
        if self.stats.cost_from == "measured":
            self.remeasuring = True  # (no round is pending, none half-counted, when it is off)


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

    def prior(self, session) -> float:
        # Decoding a token reads every weight once, so the draft's share of a target step
        # follows the file sizes; verification adds about a tenth of a step per draft.
        try:
            ratio = os.path.getsize(self.draft_session.model.path) / os.path.getsize(session.model.path)
        except (OSError, AttributeError, TypeError):
            ratio = 0.5
        return ratio + 0.1

    def _length(self) -> int:
        # The draft's own confidence ends each draft where it becomes unsure (the threshold
        # adapts, see _learn): that follows acceptance token by token, where a length from the
        # average acceptance would cut confident runs short after one rejection.
        # While the clock measures the cost (at the start and again in a probe), rounds are of
        # long_round drafts at most, as the first figure was measured: enough to
        # tell the best case, and a draft too slow to ever pay is then found out after a few
        # short rounds instead of rounds of draft_max tokens, each at a loss.
        if self.measuring:
            return min(self.draft_max, self.long_round)
        return self.draft_max

    def _learn(self, drafted: int, accepted: int) -> None:
        # How unsure a draft may be before it stops depends on the pair: when it stopped early
        # and the target took every draft anyway, the stop was needless, so lower the bar; after
        # a rejection, raise it back toward --draft-p-min. Counts only, never the clock.
        p = self.p_min if self.p_now is None else self.p_now
        if accepted < drafted:
            self.p_now = min(self.p_min, p * 2)
        elif self.stopped_early:
            self.p_now = max(self.p_floor, p / 2)

    def propose(self, session, last: int, k: int) -> list[int]:
        d = self.draft_session
        # Same prefix as the target plus ``last``: rolls back what was rejected, and decodes
        # what the draft has not seen (after a fully accepted round, its own last draft and
        # the target's next token; after a stretch switched off, all of it) in one batch.
        t0 = time.perf_counter()
        behind = d.sync([*session.tokens, last])
        if behind > 2:  # catching up after plain steps: more than a round in the steady state
            self.catch_up_s = (time.perf_counter() - t0) * (1 - 2 / behind)
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

    # Six tokens: three matched often by chance in ordinary prose ("of the old"), and each such
    # draft costs a verification that is thrown away; llama.cpp's ngram-simple takes twelve,
    # which starts drafting a copied stretch later (tuning and fresh copy/edit prompts, 3 reps:
    # 6 beat 3 and 12 on both; on the held-out ones 1.03x ngram-simple against 3's 0.997x)
    ngram: int = 6
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
