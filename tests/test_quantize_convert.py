"""Checkpoint folders to GGUF: the SmolLM2 round trip against llama.cpp's own F16 expansion,
and bad inputs that must fail in one line leaving nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from quantize.llama_quant import QuantOptions, quantize
from quantize.types import lookup
from tests.quantize_export import export_gemma3, export_llama

TEXTS = ["Hello, world! Ünïcödé ✓ 日本語", "def f(x):\n    return x ** 2  # 12345",
         "a    b\t\tc\n\n\nd", "3.14159 and 2,718,281 items", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, tmp_path_factory) -> Path:
    return export_llama(smollm2_gguf, tmp_path_factory.mktemp("hf") / "smollm2")


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_gguf, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("f16") / "smollm2.F16.gguf"
    quantize(smollm2_gguf, dst, lookup("F16"), QuantOptions(allow_requantize=True))
    return dst


def _tensors(path):
    import numpy as np
    from gguf import GGUFReader

    return {t.name: (int(t.tensor_type), np.asarray(t.data).view(np.uint8).tobytes())
            for t in GGUFReader(str(path)).tensors}


def test_round_trip_smollm2(infer, smollm2_hf, smollm2_f16, tmp_path):
    out = tmp_path / "out"
    r = infer("quantize", str(smollm2_hf), "--to", "F16", "-o", str(out), "--no-report")
    assert r.returncode == 0, r.stderr
    conv = out / "smollm2.F16.gguf"
    assert _tensors(conv) == _tensors(smollm2_f16)

    from infer_cli.engine import Options, Model

    a, b = Model(conv, Options(warmup=False)), Model(smollm2_f16, Options(warmup=False))
    for text in TEXTS:
        assert a.tokenize(text) == b.tokenize(text), text
    a.close(), b.close()
    args = ("Write a short poem about the sea.", "-n", "64", "--temp", "0", "--ignore-eos",
            "--no-prompt-cache")
    g1, g2 = infer("run", str(conv), *args), infer("run", str(smollm2_f16), *args)
    assert g1.returncode == 0 and g2.returncode == 0, g1.stderr + g2.stderr
    assert g1.stdout == g2.stdout


@pytest.fixture(scope="module")
def gemma3_f16(gemma3_gguf) -> Path:
    """llama.cpp's own F16 expansion of the Gemma 3 test model (made once, kept beside it)."""
    from tests.derived import expand

    return expand(gemma3_gguf, "F16")


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_f16, tmp_path_factory) -> Path:
    # Exported from the F16 expansion: the same values as the Q4_K_M original dequantized and
    # rounded to F16 (what llama.cpp's expansion does), read without dequantizing k-quants in numpy.
    return export_gemma3(gemma3_f16, tmp_path_factory.mktemp("hf") / "gemma3")


def _greedy(model, prompt: str, n: int = 64) -> tuple[str, list[int]]:
    """``n`` greedy tokens in-process: the text and the ids the KV cache took (all but the last)."""
    from infer_cli.engine import Options, Request, Sampling, Session, Stats, stream

    s = Session(model, Options(warmup=False, n_ctx=256))
    try:
        req = Request(tuple(model.tokenize(prompt)), Sampling(temperature=0, repeat_penalty=1.0),
                      max_tokens=n, ignore_eos=True)
        stats = Stats()
        text = "".join(e.text for e in stream(s, req, stats=stats))
        assert stats.generated_tokens == n
        return text, list(s.tokens[len(req.tokens):])
    finally:
        s.close()


def test_round_trip_gemma3(gemma3_f16, gemma3_hf, tmp_path):
    """SentencePiece vocabulary, +1 norms, tied embedding, sliding window: the conversion of the
    export equals llama.cpp's own F16 expansion of the original, tensors and tokenizer metadata,
    and 64 greedy tokens match."""
    import numpy as np
    from gguf import GGUFReader

    from infer_cli.engine import Options, Model
    from quantize.convert import convert_checkpoint

    conv = convert_checkpoint(gemma3_hf, tmp_path / "gemma3.F16.gguf", "F16").path
    ra, rb = GGUFReader(str(conv)), GGUFReader(str(gemma3_f16))
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    assert sorted(ta) == sorted(tb)
    for name, t in tb.items():
        u = ta[name]
        assert int(u.tensor_type) == int(t.tensor_type), name
        assert np.array_equal(np.asarray(u.data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
    fa, fb = ra.fields, rb.fields
    for key in fb:
        if key.startswith(("tokenizer.ggml.", "gemma3.")) and key != "tokenizer.ggml.add_sep_token":
            assert fa[key].contents() == fb[key].contents(), key
    del ra, rb, ta, tb, fa, fb

    a, b = Model(conv, Options(warmup=False)), Model(gemma3_f16, Options(warmup=False))
    try:
        for text in TEXTS + ["<start_of_turn>user\nhi<end_of_turn>", "  two  spaces\u2581and ▁ marks"]:
            assert a.tokenize(text) == b.tokenize(text), text
        prompt = "Write a short poem about the sea."
        ga, gb = _greedy(a, prompt), _greedy(b, prompt)
        assert ga == gb and len(gb[0]) > 40 and len(set(gb[1])) > 8
    finally:
        a.close(), b.close()


def test_checkpoint_to_q8_and_quantized(infer, smollm2_hf, tmp_path):
    r = infer("quantize", str(smollm2_hf), "--to", "Q8_0,Q4_K_M", "-o", str(tmp_path),
              "--no-report", "--json")
    assert r.returncode == 0, r.stderr
    made = {o["type"] for o in json.loads(r.stdout)["outputs"]}
    assert made == {"Q8_0", "Q4_K_M"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2.Q4_K_M.gguf", "smollm2.Q8_0.gguf"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, expect", [
    ("no_config", "config.json is missing"),
    ("unknown_arch", "architecture 'FooForCausalLM' is not supported"),
    ("corrupt_header", "corrupt safetensors header"),
    ("missing_shard", "shard model-00002-of-00002.safetensors is missing"),
])
def test_bad_checkpoints(infer, smollm2_hf, tmp_path, damage, expect):
    d = _copy(smollm2_hf, tmp_path / "ckpt")
    if damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "unknown_arch":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["FooForCausalLM"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif damage == "corrupt_header":
        with open(d / "model.safetensors", "r+b") as f:
            f.seek(8)
            f.write(b"\xff\xfe{garbage")
    elif damage == "missing_shard":
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    out = tmp_path / "out"
    r = infer("quantize", str(d), "--to", "F16", "-o", str(out), "--no-report")
    assert r.returncode != 0
    first = r.stderr.splitlines()[0]
    assert first.startswith("Error:") and expect in first, r.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_iq2_on_checkpoint_without_imatrix_converts_nothing(infer, smollm2_hf, tmp_path):
    r = infer("quantize", str(smollm2_hf), "--to", "IQ2_XXS", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "needs an importance matrix" in r.stderr
    assert not (tmp_path / "o").exists()
