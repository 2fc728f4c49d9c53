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
    spec.verdict_rounds = 10 ** 9  # correctness tests: timing never decides
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


def _costed(t_plain, t_draft, slope, accepted, rejections, rounds=3, kind=speculative.PromptLookup):
    spec = kind(stats=speculative.SpecStats("draft"), draft_max=16)
    spec.t_plain, spec.t_draft, spec.t_overhead, spec.verify_slope = t_plain, t_draft, t_draft, slope
    st = spec.stats
    st.accepted, spec.rejections, st.rounds = accepted, rejections, rounds
    st.drafted, st.spec_tokens, st.spec_s = accepted + rejections, accepted + rounds, 0.05
    return spec


def _judge(spec, rounds, plain_after=None):
    """Feed measured rounds (tokens, seconds) to the verdict; when it asks for plain steps to
    re-measure the baseline, give it ``plain_after`` seconds a step and let it decide."""
    for tokens, seconds in rounds:
        spec.stats.rounds += 1
        spec._verdict(tokens, seconds)
        if spec.confirm_left:
            spec.plain_times = [plain_after or spec.t_plain] * spec.confirm_steps
            spec.t_plain = plain_after or spec.t_plain
            spec.confirm_left = 0
            spec._decide()
        if spec.stats.switched_off:
            return


def test_speculation_switches_itself_off_when_it_does_not_pay():
    # Rounds that each took 3 plain steps' time for 2 tokens: off, but only once there is
    # enough evidence (verdict_rounds rounds) and the re-measured plain step confirms it.
    def slow():
        return _costed(t_plain=0.010, t_draft=0.009, slope=0.2, accepted=5, rejections=5,
                       rounds=1, kind=speculative.DraftModel)
    spec = slow()
    _judge(spec, [(2, 0.030)] * (spec.verdict_rounds - 1))
    assert spec.stats.switched_off is None and not spec.confirm_left
    _judge(spec, [(2, 0.030)])
    assert spec.stats.switched_off and "switched off" in spec.stats.switched_off
    # The same rounds, but plain steps re-measured at 20 ms (the first ones ran fast): stays on.
    spec = slow()
    _judge(spec, [(2, 0.030)] * spec.verdict_rounds, plain_after=0.020)
    assert spec.stats.switched_off is None and spec.t_plain == 0.020
    # Rounds of 10 tokens in 4 plain steps' time: never.
    good = _costed(t_plain=0.010, t_draft=0.002, slope=0.05, accepted=95, rejections=5, rounds=1,
                   kind=speculative.DraftModel)
    _judge(good, [(10, 0.040)] * 3 * good.verdict_rounds)
    assert good.stats.switched_off is None
    # A bad stretch after a good start counts against all the evidence, not a short window.
    _judge(good, [(1, 0.030)] * 8)
    assert good.stats.switched_off is None
    _judge(good, [(1, 0.030)] * 200)
    assert good.stats.switched_off


def test_a_draft_model_drafts_until_unsure_not_a_fixed_length():
    spec = _costed(t_plain=0.018, t_draft=0.012, slope=0.4, accepted=5, rejections=5,
                   kind=speculative.DraftModel)
    spec.n_draft = spec.draft_max
    spec._choose()  # low acceptance does not shorten it: the draft's own confidence does
    assert spec.n_draft == spec.draft_max


def test_draft_length_follows_acceptance():
    lengths = []
    for accepted in (5, 50, 95, 99):
        spec = _costed(t_plain=0.018, t_draft=0.002, slope=0.05, accepted=accepted,
                       rejections=100 - accepted)
        spec._choose()
        lengths.append(spec.n_draft)
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_verification_cost_is_interpolated_between_measured_lengths():
    spec = _costed(t_plain=0.018, t_draft=0.012, slope=0.43, accepted=40, rejections=0)
    spec.verify_cost = {4: 2.7}
    assert spec.verify_steps(2) == pytest.approx(1 + (2.7 - 1) * 2 / 4)
    assert spec.verify_steps(16) == pytest.approx(2.7 + 0.43 * 12)
    spec.verify_cost[16] = 5.8  # as measured for Gemma 3 F32 on two cores
    assert spec.verify_steps(10) == pytest.approx(2.7 + (5.8 - 2.7) * 6 / 12)
