"""The batching engine and `infer batch`, on real llama.cpp with the test models."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from infer_cli import engine
from infer_cli.engine.batch import parse_line
from infer_cli.engine.scheduler import Scheduler
from infer_cli.errors import BadInputLine
from infer_cli.options import Options

PROMPTS = ["The capital of France is", "Once upon a time, a fox", "def fibonacci(n):",
           "Three facts about the moon:", "The best way to learn to cook is",
           "In 1969, astronauts"]


def _engine(path, n_seq, n_ctx=2048, **kw):
    opts = Options(n_ctx=n_ctx, n_seq=n_seq, threads=2, **kw)
    model = engine.Model(path, opts)
    ctx = engine.Context(model, opts)
    return model, ctx


def _greedy(model, prompt, n=24):
    return engine.Request(tuple(model.tokenize(prompt)), engine.Sampling(temperature=0), n, (), True)


def _alone(path, prompts, n=24):
    """Each prompt's greedy text from a one-sequence context of its own."""
    model, ctx = _engine(path, 1)
    out = []
    for p in prompts:
        sched = Scheduler(model, ctx)
        seq = sched.submit(_greedy(model, p, n))
        sched.run()
        out.append(seq.text)
    return out


def test_batch_output_equals_alone_with_f16_weights(smollm2_f16):
    """Greedy text in a batch of 4 equals each prompt alone with F16 weights. (Quantized weights
    take other CPU matmul kernels for a batch of rows than for one, so close calls can go the
    other way there: scripts/batch_identity.py measures how often.)"""
    model, ctx = _engine(smollm2_f16, 4)
    sched = Scheduler(model, ctx, share_prefixes=False)
    seqs = [sched.submit(_greedy(model, p)) for p in PROMPTS[:4]]
    sched.run()
    alone = _alone(smollm2_f16, PROMPTS[:4])
    assert all(s.finish_reason == "length" and s.n_generated == 24 for s in seqs)
    assert [s.text for s in seqs] == alone


def test_join_and_leave_and_cells_freed(smollm2_gguf):
    """A short sequence finishes, a waiting one takes its slot before the long one ends, and a
    finished sequence holds no KV cells."""
    model, ctx = _engine(smollm2_gguf, 2)
    L = model.L
    sched = Scheduler(model, ctx, share_prefixes=False)
    long = sched.submit(_greedy(model, PROMPTS[0], 60))
    short = sched.submit(_greedy(model, PROMPTS[1], 4))
    waiting = sched.submit(_greedy(model, PROMPTS[2], 8))
    assert waiting.status.value == "waiting"
    started_while_long_ran = False
    while sched.busy:
        sched.step()
        if short.finished:
            assert L.llama_memory_seq_pos_max(ctx.mem, 1) == -1 or waiting.slot == 1
        if waiting.status.value == "running" and not long.finished:
            started_while_long_ran = True
    assert started_while_long_ran
    assert long.n_generated == 60 and short.n_generated == 4 and waiting.n_generated == 8
    for slot in range(2):
        assert L.llama_memory_seq_pos_max(ctx.mem, slot) == -1


def test_shared_prefix_is_decoded_once(smollm2_gguf):
    model, ctx = _engine(smollm2_gguf, 4)
    doc = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(30))
    questions = ["What is 7 squared?", "What is 12 squared?", "Which fact is first?", "Sum them."]
    reqs = [_greedy(model, doc + "\nQuestion: " + q, 8) for q in questions]
    shared = Scheduler(model, ctx)
    seqs = [shared.submit(r) for r in reqs]
    shared.run()
    prompt_total = sum(len(r.tokens) for r in reqs)
    common = min(len(r.tokens) for r in reqs) - 12
    # three of the four copy (nearly) the whole document instead of computing it
    assert shared.stats.shared_tokens >= 3 * common
    assert shared.stats.prompt_tokens <= prompt_total - 3 * common
    assert sum(s.cached_tokens for s in seqs) == shared.stats.shared_tokens
    plain = Scheduler(model, ctx, share_prefixes=False)
    again = [plain.submit(r) for r in reqs]
    plain.run()
    assert plain.stats.prompt_tokens == prompt_total
    assert [s.text for s in again] == [s.text for s in seqs]


def test_seeded_sampling_is_reproducible(smollm2_gguf):
    model, ctx = _engine(smollm2_gguf, 3)

    def once():
        sched = Scheduler(model, ctx)
        seqs = [sched.submit(engine.Request(tuple(model.tokenize(p)),
                                            engine.Sampling(temperature=0.9, seed=11 + i), 20))
                for i, p in enumerate(PROMPTS[:3])]
        sched.run()
        return [s.text for s in seqs]

    assert once() == once()


def test_sliding_window_model_with_several_sequences(gemma3_gguf):
    model, ctx = _engine(gemma3_gguf, 3, n_ctx=2048)
    sched = Scheduler(model, ctx)
    seqs = [sched.submit(_greedy(model, p, 16)) for p in PROMPTS[:3]]
    sched.run()
    assert all(s.n_generated == 16 or s.finish_reason == "stop" for s in seqs)
    alone = _alone(gemma3_gguf, PROMPTS[:3], 16)
    assert sum(s.text == a for s, a in zip(seqs, alone)) >= 2


def test_full_cache_preempts_and_still_finishes(smollm2_gguf):
    """Four sequences that together need more cells than the cache has: the newest is paused
    and recomputed, and every one still gets its tokens."""
    model, ctx = _engine(smollm2_gguf, 4, n_ctx=256)
    sched = Scheduler(model, ctx, share_prefixes=False)
    seqs = [sched.submit(_greedy(model, p, 60)) for p in PROMPTS[:4]]
    sched.run()
    assert all(s.n_generated == 60 for s in seqs), [(s.n_generated, s.finish_reason) for s in seqs]
    assert sched.stats.preempted >= 1


def _idle_run(model, ctx, reqs, *, keep_idle=True):
    """Each request alone, one after another, through one scheduler; (texts, sequences)."""
    sched = Scheduler(model, ctx, keep_idle=keep_idle)
    seqs = []
    for r in reqs:
        seqs.append(sched.submit(r))
        sched.run()
    return sched, seqs


def test_the_prompt_cache_gives_the_next_request_its_prefix(smollm2_f16):
    """With keep_idle (the server) a finished sequence's KV goes to the prompt cache, in host
    memory: the next prompt that starts the same way computes only its new tail, and its greedy
    text equals a computation from scratch; a chat's next turn reuses the whole previous turn
    and takes its entry's place; the pool itself holds nothing once every sequence has ended."""
    model, ctx = _engine(smollm2_f16, 2)
    system = "You are a careful assistant who answers in one short sentence. " * 3
    first = _greedy(model, system + "What is the capital of Italy?", 12)
    second = _greedy(model, system + "Name a large mammal.", 12)
    _, (fa, fb) = _idle_run(model, ctx, [first, second], keep_idle=False)  # frees its cells
    sched, (a, b) = _idle_run(model, ctx, [first, second])
    common = next(i for i, (x, y) in enumerate(zip(first.tokens, second.tokens)) if x != y)
    assert b.cached_tokens == common and b.slot == -1
    assert sched.stats.prompt_tokens == len(first.tokens) + len(second.tokens) - common
    assert (a.text, b.text) == (fa.text, fb.text) and fb.cached_tokens == 0
    # the next turn of the second conversation: its whole history is still cached
    turn = second.tokens + tuple(b.tokens[b.n_prompt:]) + tuple(model.tokenize(" And a small one?",
                                                                               add_special=False))
    c = sched.submit(engine.Request(turn, engine.Sampling(temperature=0), 8, (), True))
    sched.run()
    assert c.cached_tokens >= len(b.tokens) - 1
    # one entry per conversation: the first one's, and the second one's latest turn
    assert sorted(len(e.tokens) for e in sched.idle.values()) == sorted([a.n_computed, c.n_computed])
    assert sched.kv_cached == a.n_computed + c.n_computed and sched.idle_bytes > 0
    # the pool holds nothing: cached KV costs the sequences that run no attention span
    assert all(model.L.llama_memory_seq_pos_max(ctx.mem, s) == -1 for s in range(2))
    sched.drop_idle()
    assert sched.kv_cached == 0 and not sched.idle


def test_the_prompt_cache_never_costs_a_running_sequence_its_cells(smollm2_gguf):
    """The prompt cache lives outside the pool: with a pool just large enough for the next
    batch, every sequence gets all its tokens, the cached prefixes are restored, the cache holds
    no more tokens than the context, and no more bytes than its cap (entries beyond it go,
    least recently used first)."""
    model, ctx = _engine(smollm2_gguf, 4, n_ctx=256)
    sched = Scheduler(model, ctx, keep_idle=True)
    lead = "Read the question below, think it over, and answer it in a few plain words: "
    for p in PROMPTS[:4]:
        sched.submit(_greedy(model, lead + p, 30))
    sched.run()
    assert 0 < sched.kv_cached <= 256
    seqs = [sched.submit(_greedy(model, lead + p + " and more", 45)) for p in PROMPTS[2:6]]
    sched.run()
    assert all(s.n_generated == 45 for s in seqs), [(s.n_generated, s.finish_reason) for s in seqs]
    assert all(s.cached_tokens >= 16 for s in seqs)
    assert sched.kv_cached <= 256
    assert all(model.L.llama_memory_seq_pos_max(ctx.mem, s) == -1 for s in range(4))
    before = len(sched.idle)
    sched.idle_bytes_cap = max(e.size for e in sched.idle.values()) * 3 // 2
    last = sched.submit(_greedy(model, lead + PROMPTS[0] + " once more", 5))
    sched.run()
    assert sched.idle_bytes <= sched.idle_bytes_cap and len(sched.idle) < before
    assert list(sched.idle.values())[-1].tokens == last.tokens[:last.n_computed]
    # an entry llama.cpp cannot restore (no room, or bytes it refuses): computed in full
    entry = list(sched.idle.values())[-1]
    entry.state, entry.size = (ctypes.c_uint8 * 64)(), 64
    again = sched.submit(_greedy(model, lead + PROMPTS[0] + " once more", 5))
    sched.run()
    assert again.cached_tokens == 0 and again.n_generated == 5 and again.finish_reason != "error"


def test_idle_prefix_on_a_sliding_window_model(gemma3_gguf):
    """Gemma 3's sliding-window cache: a reused idle prefix, short (inside the window) or long
    (past it), gives the text a fresh computation gives."""
    model, ctx = _engine(gemma3_gguf, 2, n_ctx=4096)
    short = "Answer briefly. "
    long = " ".join(f"Note {i}: item {i} costs {3 * i} coins." for i in range(70))  # > 512 tokens
    reqs = [_greedy(model, pre + q, 10) for pre in (short, long)
            for q in ("What is two plus two?", "Name a colour.")]
    _, fresh = _idle_run(model, ctx, reqs, keep_idle=False)  # first: it frees its cells
    sched, kept = _idle_run(model, ctx, reqs)
    # (other sequences' idle cells change where a sequence's cells sit in the unified cache,
    # and so the order of the attention sums: a near-tie can go the other way, as in a batch)
    assert sum(k.text == f.text for k, f in zip(kept, fresh)) >= 3
    assert kept[1].cached_tokens > 0 and kept[3].cached_tokens > model.n_swa
    # llama.cpp saves only the window of such a sequence: its cache stays in the pool
    assert sched.in_pool and all(e.state is None for e in sched.idle.values())


def test_bad_lines_are_named():
    with pytest.raises(BadInputLine) as e:
        parse_line("{not json", 7, "in.jsonl")
    assert e.value.line == 7 and "not JSON" in str(e.value)
    with pytest.raises(BadInputLine, match="neither prompt nor messages"):
        parse_line('{"id": 1}', 2, "in.jsonl")
    with pytest.raises(BadInputLine, match="temperature must be a number"):
        parse_line('{"prompt": "x", "temperature": "hot"}', 3, "in.jsonl")
    assert parse_line('{"prompt": "x"}', 5, "in.jsonl").id == 5


# --- the command --------------------------------------------------------------------------

def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_cli_batch_in_order_with_errors_and_resume(infer, smollm2_in_home, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    long_prompt = "word " * 3000
    _write(src, [{"id": "a", "prompt": PROMPTS[0], "max_tokens": 12},
                 {"id": "b", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6},
                 {"id": "c", "prompt": long_prompt},
                 {"prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0.5, "seed": 4}])
    r = infer("batch", str(src), "-o", str(out), "--temp", "0", "--ctx", "1024", "--parallel", "2")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == ["a", "b", "c", 4]
    assert recs[0]["usage"]["completion_tokens"] == 12 and recs[0]["finish_reason"] == "length"
    assert recs[2]["finish_reason"] == "error" and "context" in recs[2]["error"]
    assert recs[3]["usage"]["completion_tokens"] == 3
    assert recs[0]["timings"]["ttft_s"] > 0
    alone = infer("run", PROMPTS[0], "--raw", "-n", "12", "--temp", "0", "--ctx", "1024",
                  "--no-prompt-cache")
    assert alone.returncode == 0
    # the batch renders prompts through the chat template: compare the raw prompt in a batch
    raw = tmp_path / "raw.jsonl"
    _write(raw, [{"id": 1, "prompt": PROMPTS[0], "max_tokens": 12}])
    rr = infer("batch", str(raw), "--raw", "--temp", "0", "--ctx", "1024")
    assert json.loads(rr.stdout)["text"] == alone.stdout.rstrip("\n")
    # resume: a and b and 4 are complete, c is an error and runs again; nothing is duplicated
    r2 = infer("batch", str(src), "-o", str(out), "--temp", "0", "--ctx", "1024", "--json")
    assert r2.returncode == 0, r2.stderr
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in again] == ["a", "b", "c", 4, "c"]
    assert json.loads(r2.stdout)["skipped"] == 3


def test_cli_batch_bad_input(infer, smollm2_in_home, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [{"id": 1, "prompt": "hi", "max_tokens": 2}, "{oops", {"id": 3, "nope": 1}])
    r = infer("batch", str(src), "-o", str(out))
    assert r.returncode == 65 and "line 2" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = infer("batch", str(src), "-o", str(out), "--skip-bad", "--temp", "0")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["finish_reason"] for x in recs][1:] == ["error", "error"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = infer("batch", str(empty))
    assert r.returncode == 0 and "empty" in r.stderr
    r = infer("batch", str(src), "-o", str(tmp_path / "missing" / "out.jsonl"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_cli_batch_ctrl_c_keeps_finished_lines_and_resumes(smollm2_in_home, tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": i, "prompt": f"Count to {i}:", "max_tokens": 4} for i in range(3)]
    rows += [{"id": 99, "prompt": "Tell a very long story.", "max_tokens": 100000}]
    _write(src, rows)
    proc = subprocess.Popen([sys.executable, "-m", "infer_cli", "batch", str(src), "-o", str(out),
                             "--parallel", "4", "--ignore-eos", "--temp", "0", "--ctx", "4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids[:3] == [0, 1, 2]
