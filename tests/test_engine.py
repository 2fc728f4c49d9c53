"""The engine on the real test models: determinism, the prompt cache, stops, limits, KV options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from infer_cli import engine
from infer_cli.engine import prompt_cache
from infer_cli.engine.chat import render
from infer_cli.errors import BadOption, PromptTooLong

GREEDY = engine.Sampling(temperature=0, repeat_penalty=1.0)
DOC = ("The lighthouse keeper kept a log of every ship that passed the point. " * 40).strip()


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    model = engine.Model(smollm2_gguf, engine.Options())
    yield model
    model.close()


def _session(model, **kw):
    return engine.Session(model, engine.Options(n_ctx=kw.pop("n_ctx", 2048), **kw))


def _generate(session, tokens, *, n=24, cache=None, sampling=GREEDY, stop=()):
    req = engine.Request(tuple(tokens), sampling, n, tuple(stop))
    events = list(engine.stream(session, req, prompt_cache=cache))
    return [e.token for e in events if e.token is not None], "".join(e.text for e in events), events[-1]


def _cache(model, path, root, **settings):
    ident = prompt_cache.model_identity(path, model.info.data_offset)
    return prompt_cache.PromptCache(path, ident, {"n_ctx": 2048, **settings}, root=root)


def test_greedy_is_deterministic_across_sessions(smol):
    tokens = smol.tokenize("Once upon a time, in a quiet village,")
    a, text_a, last = _generate(_session(smol), tokens)
    b, text_b, _ = _generate(_session(smol), tokens)
    assert a == b and len(a) == 24 and text_a == text_b
    assert last.finish_reason == "length" and last.stats.decode_tps > 0


def test_warm_prompt_cache_gives_the_same_tokens(smol, smollm2_gguf, tmp_path):
    tokens = smol.tokenize(f"{DOC}\nQuestion: what did the keeper log?\nAnswer:")
    cold, _, last_cold = _generate(_session(smol), tokens, cache=_cache(smol, smollm2_gguf, tmp_path))
    assert last_cold.stats.prompt_cache == "miss" and last_cold.stats.cached_tokens == 0
    assert len(prompt_cache.files(tmp_path)) == 1

    warm, _, last_warm = _generate(_session(smol), tokens, cache=_cache(smol, smollm2_gguf, tmp_path))
    assert last_warm.stats.prompt_cache == "hit"
    assert last_warm.stats.cached_tokens == len(tokens) - 1
    assert cold == warm
    assert last_warm.stats.prefill_s < last_cold.stats.prefill_s / 3


def _cold(smol, path, root, tokens):
    """What a run with the prompt cache on but empty gives: the reference for warm runs."""
    got, _, last = _generate(_session(smol), tokens, cache=_cache(smol, path, root))
    assert last.stats.prompt_cache == "miss"
    return got


def test_prompt_cache_reuses_a_shared_prefix(smol, smollm2_gguf, tmp_path):
    # A long document with two different questions: the second run reuses the document's KV.
    first = smol.tokenize(f"{DOC}\nQuestion: who kept the log?\nAnswer:")
    second = smol.tokenize(f"{DOC}\nQuestion: where did the ships pass?\nAnswer:")
    expected = _cold(smol, smollm2_gguf, tmp_path / "elsewhere", second)
    _generate(_session(smol), first, cache=_cache(smol, smollm2_gguf, tmp_path))
    got, _, last = _generate(_session(smol), second, cache=_cache(smol, smollm2_gguf, tmp_path))
    assert last.stats.prompt_cache == "hit" and last.stats.cached_tokens > len(second) // 2
    assert got == expected


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "settings"])
def test_bad_cache_files_are_refused_and_the_answer_is_right(smol, smollm2_gguf, tmp_path, damage):
    tokens = smol.tokenize(f"{DOC}\nSummary:")
    expected = _cold(smol, smollm2_gguf, tmp_path / "elsewhere", tokens)
    cache = _cache(smol, smollm2_gguf, tmp_path)
    _generate(_session(smol), tokens, cache=cache)
    [path] = prompt_cache.files(tmp_path)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-4096])
    else:
        # Rewrite the header as if another model (or other KV settings) had made it.
        entry = prompt_cache.read_header(path)
        header = dict(entry.header)
        if damage == "foreign":
            header["model"], header["model_path"] = "0" * 64, "/models/other.gguf"
        else:
            header["settings"] = {**header["settings"], "type_k": "q8_0"}
        body = json.dumps(header).encode()
        state = path.read_bytes()[entry.state_offset:]
        path.write_bytes(prompt_cache.MAGIC + len(body).to_bytes(4, "little") + body + state)
    got, _, last = _generate(_session(smol), tokens, cache=_cache(smol, smollm2_gguf, tmp_path))
    assert got == expected
    assert last.stats.prompt_cache == "miss"
    assert any("refused" in n for n in last.stats.notes), last.stats.notes


def test_cache_evicts_least_recently_used(smol, smollm2_gguf, tmp_path):
    cache = _cache(smol, smollm2_gguf, tmp_path)
    for i in range(3):
        _generate(_session(smol), smol.tokenize(f"{i} {DOC}"), n=1, cache=cache)
        time.sleep(0.01)
    files = prompt_cache.files(tmp_path)
    assert len(files) == 3
    one = max(f.stat().st_size for f in files)
    oldest = min(files, key=lambda f: f.stat().st_mtime)
    prompt_cache.evict(tmp_path, 2 * one)
    left = prompt_cache.files(tmp_path)
    assert len(left) == 2 and oldest not in left


def test_stop_strings_stop(smol):
    tokens = smol.tokenize("Count: 1, 2, 3, 4, 5, 6, 7,")
    _, free_text, _ = _generate(_session(smol), tokens, n=24)
    assert " 9" in free_text
    _, text, last = _generate(_session(smol), tokens, n=24, stop=(" 9",))
    assert last.finish_reason == "stop" and " 9" not in text
    assert free_text.startswith(text)


def test_stop_filter_holds_back_partial_matches():
    f = engine.StopFilter(["</end>"])
    assert f.feed("hello </e") == ("hello ", False)
    assert f.feed("nd> more") == ("", True)
    f = engine.StopFilter(["STOP"])
    assert f.feed("ST") == ("", False)
    assert f.feed("AY") == ("STAY", False)


def test_prompt_longer_than_the_context_is_refused(smol):
    tokens = smol.tokenize(DOC)
    assert len(tokens) > 256
    with pytest.raises(PromptTooLong):
        _generate(_session(smol, n_ctx=256), tokens)
    kept = engine.truncate(tokens, 256, 32)
    assert kept == tokens[-(256 - 32):]


def test_reaching_the_end_of_the_context_finishes_with_length(smol):
    tokens = smol.tokenize("List the numbers: 1, 2, 3,")
    session = _session(smol, n_ctx=64)
    _, _, last = _generate(session, tokens, n=1000)
    assert last.finish_reason == "length"
    assert last.stats.kv_used == session.n_ctx and any("context is full" in n for n in last.stats.notes)


def test_quantized_v_cache_needs_flash_attention(smol):
    tokens = smol.tokenize("The sky is")
    session = _session(smol, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="auto")
    got, text, _ = _generate(session, tokens, n=8)
    assert len(got) == 8 and text.strip()
    f16 = _session(smol)
    assert session.kv_bytes < f16.kv_bytes * 0.6  # q8_0 is 8.5 bits against 16
    with pytest.raises(BadOption, match="flash attention"):
        _session(smol, cache_type_v="q8_0", flash_attn="off")
    with pytest.raises(BadOption):
        _session(smol, cache_type_k="q3_x")


def test_gemma_keeps_the_small_sliding_window_cache(gemma3_gguf):
    model = engine.Model(gemma3_gguf, engine.Options())
    try:
        small = engine.Session(model, engine.Options(n_ctx=4096))
        full = engine.Session(model, engine.Options(n_ctx=4096, swa_full=True))
        # 3 global layers x 4096 cells + 15 window layers x 1024 cells, against 18 x 4096.
        assert small.kv_bytes == 27 << 20 and full.kv_bytes == 72 << 20
        _, text, last = _generate(small, model.tokenize("The capital of France is"), n=8)
        assert text.strip() and last.stats.kv_bytes == small.kv_bytes
    finally:
        model.close()


def test_chat_template_is_the_one_in_the_gguf(infer, smollm2_in_home, smol):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = render(smol.info.chat_template, messages)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                        "<|im_start|>assistant\n")
    expected, _, _ = _generate(_session(smol), smol.tokenize(rendered), n=12)
    proc = infer("run", "Hi there", "--system", "Be brief.", "--temp", "0", "--repeat-penalty", "1",
                 "-n", "12", "--json", "--no-prompt-cache")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["stats"]["prompt_tokens"] == len(smol.tokenize(rendered))
    assert doc["text"] == "".join(smol.piece(t).decode("utf-8", "replace") for t in expected)


def test_cli_greedy_is_identical_with_cold_and_warm_cache(infer, smollm2_in_home):
    args = ("run", f"{DOC}\nWhat did the keeper do?", "--temp", "0", "-n", "20", "--json")
    runs = [json.loads(infer(*args).stdout) for _ in range(2)]
    assert runs[0]["stats"]["prompt_cache"] == "miss" and runs[1]["stats"]["prompt_cache"] == "hit"
    assert runs[0]["text"] == runs[1]["text"]
    listed = json.loads(infer("cache", "list", "--json").stdout)["entries"]
    assert len(listed) == 1 and listed[0]["tokens"] == runs[0]["stats"]["prompt_tokens"] - 1
    assert json.loads(infer("cache", "clear", "--json").stdout)["removed"] == 1


def test_cli_too_long_prompt_is_one_line(infer, smollm2_in_home):
    proc = infer("run", DOC, "--ctx", "128")
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: the prompt is") and "--truncate" in proc.stderr
    ok = infer("run", DOC, "--ctx", "128", "--truncate", "-n", "4", "--temp", "0")
    assert ok.returncode == 0, ok.stderr
    assert "cut to its last" in ok.stderr


def test_ctrl_c_keeps_the_partial_text_and_exits_130(smollm2_in_home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "infer_cli", "run", "Write a very long story about a dragon.",
         "--ignore-eos", "-n", "100000", "--ctx", "8192", "--no-prompt-cache"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(proc.stdout.fileno(), False)
    got = b""
    deadline = time.monotonic() + 60
    while len(got) < 40 and time.monotonic() < deadline:
        chunk = proc.stdout.read()
        got += chunk or b""
        time.sleep(0.05)
    assert len(got) >= 40, "no text streamed"
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=30)
    text = (got + (rest or b"")).decode()
    assert proc.returncode == 130, err
    assert len(text) >= 40
    assert b"finish: interrupted" in err and b"Traceback" not in err


def test_interactive_chat_in_a_terminal(smollm2_in_home):
    """History, /reset, multi-line input and Ctrl-D, through a real pseudo-terminal."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "infer_cli", "run", "smollm2", "--temp", "0",
                             "-n", "12", "--no-prompt-cache"],
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    screen = b""

    def wait_for(marker: bytes, count: int, timeout: float = 60) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while screen.count(marker) < count and time.monotonic() < deadline:
            try:
                screen += os.read(leader, 4096)
            except OSError:
                break
        assert screen.count(marker) >= count, screen.decode(errors="replace")

    try:
        wait_for(b">>> ", 1)
        os.write(leader, b"My name is Ada.\n")
        wait_for(b"finish:", 1)
        wait_for(b">>> ", 2)
        os.write(leader, b"What is my name?\n")
        wait_for(b"finish:", 2)
        second = screen.split(b"finish:")[1]
        assert b"prompt" in second
        wait_for(b">>> ", 3)
        os.write(leader, b'"""Two\nlines"""\n')
        wait_for(b"finish:", 3)
        wait_for(b">>> ", 4)
        os.write(leader, b"/reset\n")
        wait_for(b"forgotten", 1)
        wait_for(b">>> ", 5)
        time.sleep(0.2)  # readline sets the terminal up after the prompt: keystrokes before are lost
        os.write(leader, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(leader)
    # The second turn's prompt carried the first turn (history); after /reset it would not.
    import re
    prompts = [int(n) for n in re.findall(rb"prompt (\d+) tokens", screen)]
    assert len(prompts) == 3 and prompts[1] > prompts[0] + 12


def test_fast_greedy_matches_llama_cpp_greedy_sampler(gemma3_gguf):
    model = engine.Model(gemma3_gguf, engine.Options())
    try:
        tokens = model.tokenize("The three primary colours are")
        runs = []
        for use_argmax in (True, False):
            session = engine.Session(model, engine.Options(n_ctx=256))
            sampler = engine.Sampler(model, GREEDY)
            sampler.argmax = use_argmax
            session.prefill(tokens)
            out = []
            for _ in range(24):
                out.append(sampler.sample(session.ptr))
                session.decode_one(out[-1])
            runs.append(out)
        assert runs[0] == runs[1]
    finally:
        model.close()


@pytest.mark.parametrize("mmap", [True, False])
def test_no_mmap_reads_the_weights_into_memory(smollm2_gguf, mmap):
    """--no-mmap reaches llama.cpp (its load_mode): the weights land in an ordinary buffer, not a
    mapping of the file; the answer is the same either way."""
    from infer_cli.engine import llama_log

    llama_log.install()
    mark = llama_log.mark()
    model = engine.Model(smollm2_gguf, engine.Options(mmap=mmap))
    try:
        buffers = [line for line in llama_log.since(mark) if "model buffer size" in line]
        assert buffers and all(("CPU_Mapped" in line) == mmap for line in buffers), buffers
        _, text, _ = _generate(_session(model), model.tokenize("The capital of France is"), n=6)
        assert "Paris" in text
    finally:
        model.close()


def test_no_repack_keeps_the_weights_in_the_files_layout(gemma3_gguf, infer):
    """--no-repack reaches llama.cpp (use_extra_bufts): Gemma's Q4_K matrices, repacked into the
    CPU's interleaved layout by default, stay in the mapping of the file; it still answers."""
    from infer_cli.engine import llama_log

    llama_log.install()
    for repack in (True, False):
        mark = llama_log.mark()
        model = engine.Model(gemma3_gguf, engine.Options(repack=repack))
        try:
            buffers = [line for line in llama_log.since(mark) if "model buffer size" in line]
            assert any("CPU_REPACK" in line for line in buffers) == repack, buffers
        finally:
            model.close()
    r = infer("run", str(gemma3_gguf), "Say hi", "-n", "4", "--temp", "0", "--no-repack",
              "--no-prompt-cache")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
