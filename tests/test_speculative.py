"""Speculative decoding on real model pairs: the output is the target's own, token for token."""

from __future__ import annotations

import numpy as np
import pytest

from infer_cli import engine
from infer_cli.engine import speculative
from infer_cli.errors import DraftIncompatible

GREEDY = engine.Sampling(temperature=0, repeat_penalty=1.0)
PROMPTS = ["The history of the printing press", "def fibonacci(n):", "Ten facts about the Moon:\n1."]
PASSAGE = ("The old mill stood by the river for two hundred years. Every spring the water rose and "
           "turned its wheel, and the miller ground wheat for the whole valley. When the railway "
           "came, the mill fell silent, but the children of the village still played in its shade.")
OPTS = engine.Options(n_ctx=1024)


def _run(target_session, tokens, *, speculator=None, n=48, sampling=GREEDY):
    target_session.clear()
    req = engine.Request(tuple(tokens), sampling, n, (), True)
    events = list(engine.stream(target_session, req, speculator=speculator))
    return [e.token for e in events if e.token is not None], events[-1].stats


def _always_on(spec):
    spec.evidence = spec.probe_evidence = 10 ** 9  # correctness tests: no verdict ever
    return spec


def _draft(draft_session, **kw):
    return _always_on(speculative.DraftModel(draft_session=draft_session,
                                             stats=speculative.SpecStats("draft"), **kw))


def _sessions(target_path, draft_path):
    """Target and draft sessions, their models freed when the module's tests are done."""
    target, draft = engine.Model(target_path, OPTS), engine.Model(draft_path, OPTS)
    yield engine.Session(target, OPTS), engine.Session(draft, OPTS)
    target.close()
    draft.close()


@pytest.fixture(scope="module")
def gemma_pair(gemma3_f32, gemma3_gguf):
    yield from _sessions(gemma3_f32, gemma3_gguf)


@pytest.fixture(scope="module")
def smol_pair(smollm2_f32, smollm2_gguf):
    yield from _sessions(smollm2_f32, smollm2_gguf)


@pytest.mark.parametrize("pair", ["gemma_pair", "smol_pair"])
def test_greedy_with_a_draft_is_the_targets_own_output(request, pair):
    target, draft = request.getfixturevalue(pair)
    speculative.check_compatible(target.model, draft.model)
    for prompt in PROMPTS:
        tokens = target.model.tokenize(prompt)
        plain, _ = _run(target, tokens)
        draft.clear()
        spec, stats = _run(target, tokens, speculator=_draft(draft))
        assert spec == plain, prompt
        sp = stats.speculative
        assert sp["drafted"] > 0 and sp["accepted"] > 0
        assert sp["spec_tokens"] == sp["rounds"] + sp["accepted"]


def test_greedy_with_prompt_lookup_is_the_targets_own_output(smollm2_gguf):
    model = engine.Model(smollm2_gguf, OPTS)
    try:
        session = engine.Session(model, OPTS)
        tokens = model.tokenize(f"Copy this passage word for word:\n{PASSAGE}\nCopy:\n")
        plain, _ = _run(session, tokens, n=64)
        spec, stats = _run(session, tokens, n=64, speculator=_always_on(
            speculative.PromptLookup(stats=speculative.SpecStats("lookup"))))
        assert spec == plain
        assert stats.speculative["acceptance"] > 0.5  # a copy task is what lookup is for
    finally:
        model.close()


def test_a_draft_with_another_vocabulary_is_refused(smollm2_gguf, gemma3_gguf, infer, smollm2_in_home):
    target, draft = engine.Model(smollm2_gguf, OPTS), engine.Model(gemma3_gguf, OPTS)
    try:
        with pytest.raises(DraftIncompatible) as e:
            speculative.check_compatible(target, draft)
        assert "cannot draft for" in str(e.value)
    finally:
        target.close()
        draft.close()
    proc = infer("run", "smollm2", "hello", "--draft", str(gemma3_gguf))
    assert proc.returncode == 65
    assert proc.stderr.startswith("Error: ") and "cannot draft for" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_same_vocabulary_check_names_the_first_differing_token(smollm2_gguf, monkeypatch):
    target = engine.Model(smollm2_gguf, OPTS)
    try:
        texts = speculative._token_texts(target)
        changed = list(texts)
        changed[777] = "<other>"
        calls = iter([texts, changed])
        monkeypatch.setattr(speculative, "_token_texts", lambda m: next(calls))
        with pytest.raises(DraftIncompatible, match="token 777"):
            speculative.check_compatible(target, target)
    finally:
        target.close()


def test_after_a_rejected_draft_the_next_logits_match_a_fresh_computation(gemma_pair):
    target, _ = gemma_pair
    model = target.model
    tokens = model.tokenize("The capital of France is")
    sampler = engine.Sampler(model, GREEDY)
    target.clear()
    target.prefill(tokens)
    last = sampler.sample(target.ptr)
    wrong = model.tokenize(" purple elephants dancing", add_special=False)
    out = speculative.verify(target, sampler, last, wrong)
    assert len(out) == 1  # the first draft is rejected: the target's own token comes back
    assert target.tokens == [*tokens, last]
    assert model.L.llama_memory_seq_pos_max(target.mem, 0) == len(tokens)  # rolled back
    target.decode_one(out[0])
    after = np.ctypeslib.as_array(model.L.llama_get_logits_ith(target.ptr, -1), shape=(model.n_vocab,)).copy()

    fresh = engine.Session(model, OPTS)
    fresh.prefill(tokens)
    fresh.decode_one(last)
    fresh.decode_one(out[0])
    expected = np.ctypeslib.as_array(model.L.llama_get_logits_ith(fresh.ptr, -1), shape=(model.n_vocab,))
    assert int(after.argmax()) == int(expected.argmax())
    # Batch shape changes the arithmetic by rounding only.
    assert np.allclose(after, expected, atol=1e-3 * float(np.abs(expected).max()))
    fresh.close()


def test_sampling_with_a_seed_is_reproducible_and_the_counts_add_up(gemma_pair):
    target, draft = gemma_pair
    tokens = target.model.tokenize("Once upon a time")
    sampling = engine.Sampling(temperature=0.7, seed=1234)
    runs = []
    for _ in range(2):
        draft.clear()
        got, stats = _run(target, tokens, n=40, sampling=sampling, speculator=_draft(draft))
        runs.append(got)
        sp = stats.speculative
        assert 0 <= sp["accepted"] <= sp["drafted"]
        assert sp["spec_tokens"] == sp["rounds"] + sp["accepted"]
        assert stats.generated_tokens <= 1 + sp["plain_tokens"] + sp["spec_tokens"]
    assert runs[0] == runs[1]


# --- the policy: decisions from acceptance counts ------------------------------------------

def _policy(cost=0.3, kind=speculative.PromptLookup, **kw):
    """A speculator whose cost figure is known, as after calibration: what follows depends on
    the acceptance counts it is given and on nothing else."""
    spec = kind(stats=speculative.SpecStats("lookup"), **kw)
    spec.stats.cost, spec.stats.cost_from = cost, "given"
    return spec


def _feed(spec, rounds, *, plain_until=None):
    """Give the policy rounds of (drafted, accepted); a step it would take plain is counted
    as one plain token. With ``plain_until``, go on with plain steps up to that token."""
    for drafted, accepted in rounds:
        while not spec.speculating():
            spec.produced += 1
        spec.observe(drafted, accepted)
    while plain_until is not None and spec.produced < plain_until and not spec.speculating():
        spec.produced += 1


def test_the_verdict_waits_for_enough_drafted_tokens_not_rounds():
    spec = _policy(cost=0.3)
    # Rounds whose first draft is rejected: one judged token each. Thirty of them are not
    # enough evidence, however many rounds that is.
    _feed(spec, [(4, 0)] * 31)
    assert spec.stats.switches == []
    _feed(spec, [(4, 0)])
    [off] = spec.stats.switches
    assert off["to"] == "off" and off["token"] == 32
    assert "acceptance 0% (0%-11%) over 32 drafted tokens" in off["why"]
    assert spec.stats.switched_off.startswith("speculation switched off: ")
    # Two long rounds make as much evidence as thirty-two short ones.
    spec = _policy(cost=0.3)
    _feed(spec, [(16, 15), (16, 16), (16, 2)])
    assert spec.judged()[0] == 16 + 16 + 3 and spec.stats.switches == []


def test_an_uncertain_acceptance_keeps_speculation_on():
    # 25% over 32 tokens does not pay, but its interval reaches past what would, so it stays
    # on; the same rate over more tokens is clear evidence, and it switches off (and the
    # probes that follow find the same).
    spec = _policy(cost=0.3)
    _feed(spec, [(2, 1), (2, 0), (2, 0)] * 8)
    assert spec.judged()[:2] == (32, 8) and spec.stats.switches == []
    lo, hi = speculative.wilson(8, 32, spec.z)
    assert speculative.gain(hi, [2] * 24, 0.3) >= 1 > speculative.gain(8 / 32, [2] * 24, 0.3)
    _feed(spec, [(2, 1), (2, 0), (2, 0)] * 8)
    assert [s["to"] for s in spec.stats.switches] == ["off"]


def test_decisions_depend_on_the_acceptance_counts_alone():
    import random

    def run(clock_seed):
        # A text the draft follows, then a stretch it misses (tokens 300-700), then follows
        # again; the round timings differ from run to run.
        rng, clock = random.Random(7), random.Random(clock_seed)
        spec = _policy(cost=0.2)
        while spec.produced < 1200:
            if not spec.speculating():
                spec.produced += 1
                continue
            d = rng.randint(1, 16)
            if 300 <= spec.produced < 700:
                a = 0 if rng.random() < 0.9 else 1
            else:
                a = d if rng.random() < 0.8 else rng.randint(0, d - 1)
            spec.observe(d, a, seconds=clock.uniform(0.01, 0.2))
        return spec.stats.switches

    first = run(1)
    assert first == run(2)
    assert [s["to"] for s in first][0] == "off" and first[-1]["to"] == "on"
    assert 300 < first[0]["token"] < 400 and 700 < first[-1]["token"] < 900


def test_a_probe_turns_speculation_back_on_when_acceptance_recovers():
    spec = _policy(cost=0.3, kind=speculative.DraftModel)
    _feed(spec, [(8, 0)] * 32, plain_until=10 ** 6)  # the opening of an answer the draft misses
    off = spec.stats.switches[-1]
    assert off["to"] == "off" and f"next probe at token {off['token'] + 64}" in off["why"]
    # Plain steps until the probe is due; then it drafts again.
    assert spec.produced == off["token"] + 64
    assert spec.stats.probes == 1 and spec.stats.switched_off is None and spec.speculating()
    _feed(spec, [(8, 8), (8, 8)])  # the probe: 16 tokens, all taken
    on = spec.stats.switches[-1]
    assert on["to"] == "on" and on["token"] == off["token"] + 64 + 18
    assert on["why"].startswith("probe: acceptance 100%")
    assert spec.stats.summary() == f"off at token {off['token']} ({off['why']}); on at token " \
                                   f"{on['token']} ({on['why']})"


def test_failed_probes_come_less_often():
    spec = _policy(cost=0.3)
    _feed(spec, [(4, 0)] * 32)
    gaps = []
    for _ in range(3):
        at = spec.stats.switches[-1]["token"]
        _feed(spec, [(4, 0)] * 16, plain_until=None)
        gaps.append(spec.stats.switches[-1]["token"] - at - 16)
    assert gaps == [64, 128, 256]
    assert spec.stats.probes == 3 and all(s["to"] == "off" for s in spec.stats.switches)


def test_no_probes_where_speculation_could_not_pay():
    # A drafted token costing 0.8 plain steps: even 90% acceptance would hardly pay.
    spec = _policy(cost=0.8, kind=speculative.DraftModel)
    _feed(spec, [(4, 3)] * 8, plain_until=10 ** 4)
    [off] = spec.stats.switches
    assert "no probes: 90% acceptance would give" in off["why"]
    assert spec.produced == 10 ** 4 and spec.stats.probes == 0


class _Clock:
    """perf_counter for the policy: plain steps take ``step`` seconds, whatever it is now."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        return self.now

    def decode_one(self, token):
        self.now += self.step


def _calibrating(monkeypatch, step, kind=speculative.DraftModel):
    """A speculator before its cost is known, timed by a clock the test moves."""
    clock = _Clock(step)
    monkeypatch.setattr(speculative.time, "perf_counter", clock)
    spec = kind(stats=speculative.SpecStats("draft"))
    sampler = type("Sampler", (), {"sample": lambda self, ptr: 7})()
    session = type("Session", (), {"decode_one": lambda self, t: clock.decode_one(t), "ptr": None})()

    def run(rounds, *, seconds_per_step, cost):
        """Rounds of (drafted, accepted), each taking as long as ``1 + cost * drafted`` plain
        steps at ``seconds_per_step``; the plain steps the policy takes between them too."""
        kinds = []
        for drafted, accepted in rounds:
            clock.step = seconds_per_step
            while not spec.stats.switched_off and not spec.speculating():
                spec._plain(session, sampler, 0)
                kinds.append("plain")
            if spec.stats.switched_off:
                break
            spec.observe(drafted, accepted, seconds=(1 + cost * drafted) * seconds_per_step)
            kinds.append("round")
        return kinds

    return spec, clock, run


def test_the_cost_is_measured_against_the_plain_steps_around_each_round(monkeypatch):
    # The machine runs the first plain steps at 10 ms, then at 20 ms a step (a CPU's clock
    # drifts that much within a second): rounds are judged against the steps beside them.
    spec, clock, run = _calibrating(monkeypatch, 0.010)
    kinds = run([(4, 4)], seconds_per_step=0.010, cost=0.5)
    kinds += run([(4, 4)] * 4, seconds_per_step=0.020, cost=0.5)
    # The first round pays one-time costs and is not measured; the second waits for two plain
    # steps (none came before it), the later ones for one each.
    assert kinds == ["round", "round", "plain", "plain"] + ["round", "plain"] * 2 + ["round"]
    assert spec.stats.cost_from == "measured"
    assert spec.stats.cost == pytest.approx(0.5, abs=0.05)
    assert spec.stats.switches == []


def test_a_probe_measures_the_cost_again(monkeypatch):
    # Measured while another process had the CPU, a drafted token costs 0.6 plain steps, and
    # at 50% acceptance speculation switches off. By the probe the load is gone and drafts
    # cost 0.1: the probe measures that over its first rounds (each followed by a plain step)
    # and the same acceptance now pays, so it is back on, with both figures in the stats.
    spec, clock, run = _calibrating(monkeypatch, 0.010, kind=speculative.PromptLookup)
    run([(4, 1)] * 40, seconds_per_step=0.010, cost=0.6)
    [off] = spec.stats.switches
    assert off["to"] == "off" and "costing 0.60 plain steps" in off["why"]
    assert speculative.gain(0.5, [4], 0.6) < 1 <= speculative.gain(0.5, [4], 0.1)
    while spec.stats.switched_off:  # plain steps until the probe is due
        spec.produced += 1
        spec.speculating()
    assert spec.stats.probes == 1 and spec.remeasuring
    kinds = run([(4, 1)] * 8, seconds_per_step=0.010, cost=0.1)
    assert kinds[:6] == ["round", "plain"] * 3  # the probe's rounds are measured, as at first
    on = spec.stats.switches[-1]
    assert on["to"] == "on" and "costing 0.10 plain steps" in on["why"]
    assert spec.stats.costs == [pytest.approx(0.6), pytest.approx(0.1)]
    assert not spec.remeasuring and spec.stats.cost == pytest.approx(0.1)


def test_a_draft_that_could_not_pay_with_every_draft_taken_stops_at_once(monkeypatch):
    # A draft nearly as slow as its target (tiny models, where fixed per-token costs dominate):
    # the first two long rounds measured show that even all drafts taken would not beat plain
    # decoding by 10%, so it stops at once and never probes.
    spec, clock, run = _calibrating(monkeypatch, 0.010)
    run([(16, 16), (16, 16), (6, 6), (16, 16)], seconds_per_step=0.010, cost=0.95)
    [off] = spec.stats.switches
    # the first round (not measured), the second and its two plain steps, the third and one
    assert off["to"] == "off" and off["token"] == 17 + 17 + 2 + 7 + 1
    assert "rounds of 16 and 6 drafts took 16.2 and 6.7 plain steps" in off["why"]
    assert "even every draft taken would give at most 1.05x plain; no probes" in off["why"]
    assert spec.next_probe is None
    for _ in range(1000):
        assert not spec.speculating()
        spec.produced += 1
    # A draft at half that cost goes on, and short rounds (the draft unsure) say nothing of
    # the best case: a fixed cost per round would make them look like a dear draft.
    for rounds, cost in (([(16, 16)] * 6, 0.5), ([(2, 2)] * 6, 0.7)):
        spec, clock, run = _calibrating(monkeypatch, 0.010)
        run(rounds, seconds_per_step=0.010, cost=cost)
        assert spec.stats.switches == [] and spec.stats.cost == pytest.approx(cost)
    # One long round slowed down (a neighbour on the CPU) does not decide: the best round does.
    spec, clock, run = _calibrating(monkeypatch, 0.010)
    run([(16, 16)], seconds_per_step=0.010, cost=0.5)
    spec.observe(16, 16, seconds=0.010 * 16)  # as slow as 16 plain steps: 1.06x at best
    run([(16, 16)] * 4, seconds_per_step=0.010, cost=0.5)
    assert spec.stats.switches == [] and not spec.stats.switched_off


def test_a_cost_no_acceptance_could_repay_stops_it_once_measured(monkeypatch):
    # Every drafted token costs 1.5 plain steps: whatever the acceptance, rounds lose. It
    # switches off as soon as the figure is measured (the first round, not measured, and three
    # that are), not after 32 drafted tokens of evidence. On the clock's first figure it still
    # probes; the probe measures the same, and that stops it for good.
    spec, clock, run = _calibrating(monkeypatch, 0.010, kind=speculative.PromptLookup)
    kinds = run([(2, 2)] * 40, seconds_per_step=0.010, cost=1.5)
    [off] = spec.stats.switches
    assert kinds.count("round") == 4 and spec.stats.drafted == 8 and spec.stats.rechecks == []
    assert "a drafted token costs 1.50 plain steps: even every draft taken would give at most " \
           f"0.80x plain; next probe at token {off['token'] + 16}" in off["why"]
    while spec.stats.switched_off:
        spec.produced += 1
        spec.speculating()
    kinds = run([(2, 2)] * 8, seconds_per_step=0.010, cost=1.5)
    again = spec.stats.switches[-1]
    assert kinds.count("round") == 3
    assert again["to"] == "off" and again["why"].startswith("probe: a drafted token costs 1.50")
    assert "no probes" in again["why"] and spec.next_probe is None and spec.stats.probes == 1
    # At 1.2, a figure 20% lower (0.96) would pay: within what runs of one prompt measure, so the
    # figure is measured again before anything stops (no switch-off, no probe, no catch-up);
    # measured at 1.2 again, it stops for good.
    spec, clock, run = _calibrating(monkeypatch, 0.010, kind=speculative.PromptLookup)
    kinds = run([(2, 2)] * 40, seconds_per_step=0.010, cost=1.2)
    [off] = spec.stats.switches
    [recheck] = spec.stats.rechecks
    assert recheck["why"] == "a drafted token costs 1.20 plain steps, at most 0.91x plain; at " \
                             "0.96 plain steps a drafted token (its cheapest round, or 20% less) " \
                             "it would pay"
    assert kinds.count("round") == 7 and spec.stats.costs == [pytest.approx(1.2)] * 2
    assert "no probes" in off["why"] and spec.next_probe is None and spec.stats.probes == 0
    # One of the three rounds at 0.5 (two slowed by a neighbour): at that cost every draft taken
    # would pay, so the figure is measured again, and it is 0.5: speculation never stopped.
    spec, clock, run = _calibrating(monkeypatch, 0.010, kind=speculative.PromptLookup)
    run([(2, 2)] * 2, seconds_per_step=0.010, cost=0.5)
    run([(2, 2)] * 2, seconds_per_step=0.010, cost=1.5)
    run([(2, 2)] * 20, seconds_per_step=0.010, cost=0.5)
    assert spec.stats.switches == [] and spec.stats.costs == [pytest.approx(1.5), pytest.approx(0.5)]
    [recheck] = spec.stats.rechecks
    assert "its cheapest round" in recheck["why"] and "at 0.50 plain steps" in recheck["why"]


def test_lookup_length_follows_acceptance():
    spec = _policy(cost=0.1)
    lengths = []
    for taken in (True, True, True, True, 1, 0, 3, 0, 0, 0, True):
        n = spec._length()
        lengths.append(n)
        spec.observe(n, n if taken is True else taken)
    assert lengths == [4, 8, 16, 16, 16, 8, 4, 4, 2, 1, 1] and spec._length() == 2


def test_seeded_sampling_takes_its_cost_from_the_model_sizes(smol_pair):
    target, draft = smol_pair
    spec = speculative.DraftModel(draft_session=draft, stats=speculative.SpecStats("draft"))
    ratio = draft.model.path.stat().st_size / target.model.path.stat().st_size
    assert spec.prior(target) == pytest.approx(ratio + 0.1)
    tokens = target.model.tokenize("Once upon a time")
    draft.clear()
    _, stats = _run(target, tokens, n=16, sampling=engine.Sampling(temperature=0.7, seed=5),
                    speculator=spec)
    assert stats.speculative["cost_from"] == "model sizes"
    assert stats.speculative["cost"] == pytest.approx(ratio + 0.1)


def test_real_pair_switched_off_then_probed_back_on_keeps_the_targets_output(smol_pair):
    target, draft = smol_pair
    tokens = target.model.tokenize(PROMPTS[2])
    plain, _ = _run(target, tokens, n=64)
    # As if the opening had switched it off: the probe at token 8 finds a draft that agrees.
    draft.clear()
    spec = _policy(cost=0.3, kind=speculative.DraftModel, draft_session=draft)
    spec._switch_off("for the test")
    spec.next_probe = 8
    got, stats = _run(target, tokens, n=64, speculator=spec)
    assert got == plain
    sp = stats.speculative
    assert [s["to"] for s in sp["switches"]] == ["off", "on"] and sp["probes"] == 1
    assert sp["switches"][1]["why"].startswith("probe: acceptance")
    assert sp["switched_off"] is None and sp["plain_tokens"] >= 8
    assert any(n.startswith("speculation off at token 0") and "on at token" in n for n in stats.notes)
    # A cost no acceptance could repay: off after the first round, without waiting for 32
    # drafted tokens of evidence, and for good (the figure is not the clock's first).
    draft.clear()
    spec = _policy(cost=3.0, kind=speculative.DraftModel, draft_session=draft)
    got, stats = _run(target, tokens, n=64, speculator=spec)
    assert got == plain
    sp = stats.speculative
    [off] = sp["switches"]
    assert off["to"] == "off" and "no probes" in off["why"] and sp["switched_off"]
    assert "a drafted token costs 3.00 plain steps: even every draft taken would give at most " \
           "0.50x plain" in off["why"]
    assert sp["rounds"] == 1 and 1 <= sp["drafted"] <= spec.draft_max


def test_the_statistics_line_says_when_it_switched():
    from infer_cli.cli.run import stats_line
    from infer_cli.engine.generate import Stats

    st = speculative.SpecStats("draft", drafted=40, accepted=30)
    st.switches = [{"token": 41, "to": "off", "why": "w"}, {"token": 105, "to": "on", "why": "v"}]
    line = stats_line(Stats(generated_tokens=200, speculative=st.as_dict()), "length")
    assert "draft: 30/40 drafted accepted (75%), off at token 41, on at token 105" in line


def test_the_first_measured_cost_alone_does_not_stop_it_for_good(monkeypatch):
    # A neighbour on the CPU during two of the three calibration rounds: a drafted token
    # measures 1.0 plain steps (the median of 0.6, 1.0, 1.0), at which 75% acceptance would
    # not pay; at 0.6, the cheapest of those rounds, it would. So the verdict waits: the figure
    # is measured again over three more rounds, without switching off.
    def disturbed(run, after):
        run([(4, 3)] * 2, seconds_per_step=0.010, cost=0.6)  # the first is not measured
        run([(4, 3)] * 2, seconds_per_step=0.010, cost=1.0)
        return run([(4, 3)] * 40, seconds_per_step=0.010, cost=after)

    # The neighbour has gone: the figure measured again is 0.1, and speculation never stopped.
    spec, clock, run = _calibrating(monkeypatch, 0.010, kind=speculative.PromptLookup)
    kinds = disturbed(run, after=0.1)
    assert spec.stats.switches == [] and spec.stats.probes == 0
    [recheck] = spec.stats.rechecks
    # the eighth round gave 32 judged tokens: 8 rounds of 4 tokens and the calibration's 4 plain
    assert recheck["token"] == 8 * 4 + 4
    assert "acceptance 75% (58%-87%) over 32 drafted tokens, a drafted token costing 1.00 plain " \
           "steps: at most 0.77x plain; at 0.60 plain steps a drafted token (its cheapest " \
           "round, or 20% less) it would pay" in recheck["why"]
    assert spec.stats.costs == [pytest.approx(1.0), pytest.approx(0.1)]
    # the fourth round's plain step, four rounds on the first figure, then the re-check's three,
    # each followed by a plain step
    assert kinds[:11] == ["plain"] + ["round"] * 4 + ["round", "plain"] * 3
    assert "cost measured again at token 36" in spec.stats.summary()
    # It stays: the figure measured again is 1.0 as well, and now speculation stops, for good
    # (even 90% acceptance would not pay at a figure measured twice).
    spec, clock, run = _calibrating(monkeypatch, 0.010, kind=speculative.PromptLookup)
    disturbed(run, after=1.0)
    [off] = spec.stats.switches
    assert len(spec.stats.rechecks) == 1 and spec.stats.costs == [pytest.approx(1.0)] * 2
    assert "costing 1.00 plain steps" in off["why"] and "no probes: 90% acceptance" in off["why"]
    assert spec.next_probe is None and spec.stats.probes == 0
    # All three rounds slowed down: neither the cheapest nor a figure 20% lower would pay, so it
    # switches off at once, and on the clock's first figure it still probes, 16 tokens later
    # (not 64: it is there to measure); the probe measures 0.1, and the same acceptance pays.
    # (Rounds of three drafts: two long rounds this slow would give the cost verdict instead.)
    spec, clock, run = _calibrating(monkeypatch, 0.010, kind=speculative.PromptLookup)
    run([(3, 2)], seconds_per_step=0.010, cost=0.6)
    run([(3, 2)] * 40, seconds_per_step=0.010, cost=1.0)
    [off] = spec.stats.switches
    assert spec.stats.rechecks == [] and "costing 1.00 plain steps" in off["why"]
    assert f"next probe at token {off['token'] + 16}" in off["why"]
    assert "a probe measures that figure again" in off["why"]
    while spec.stats.switched_off:
        spec.produced += 1
        spec.speculating()
    run([(3, 2)] * 8, seconds_per_step=0.010, cost=0.1)
    assert spec.stats.switches[-1]["to"] == "on"
    assert spec.stats.costs == [pytest.approx(1.0), pytest.approx(0.1)]
