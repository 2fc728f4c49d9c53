"""infer quantize on GGUF sources: the table, the CLI's refusals, real quantizations of SmolLM2
and the report's ordering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantize import api
from quantize.llama_quant import QuantOptions, quantize
from quantize.types import TYPES, lookup


def test_table_is_complete_and_unique():
    import llama_cpp

    ftypes = {getattr(llama_cpp, n) for n in dir(llama_cpp)
              if n.startswith("LLAMA_FTYPE_") and n != "LLAMA_FTYPE_GUESSED"}
    assert {t.ftype for t in TYPES} == ftypes
    assert len({t.name for t in TYPES}) == len(TYPES)
    assert lookup("q4_k").name == "Q4_K_M"


def test_tensor_types_are_ggml_types():
    from infer_cli import ggml
    from quantize.types import GGML_TYPES

    assert len(set(GGML_TYPES)) == len(GGML_TYPES)
    assert all(name in ggml.TYPE_IDS and ggml.TYPE_IDS[name] < ggml.TYPE_COUNT for name in GGML_TYPES)


def test_unknown_type_is_one_error_listing_the_valid_ones():
    from infer_cli.errors import UnknownQuantType

    with pytest.raises(UnknownQuantType) as e:
        api.parse_targets("Q4_K_M,Q9_X")
    assert "Q9_X" in str(e.value) and "Q8_0" in str(e.value) and "\n" not in str(e.value)


def test_list(infer):
    r = infer("quantize", "--list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {"IQ2_XS", "Q4_K_M", "F16"} <= {row["name"] for row in rows}
    assert next(row for row in rows if row["name"] == "IQ2_XS")["needs_imatrix"]


@pytest.fixture(scope="module")
def smollm2_f16(smollm2_gguf, tmp_path_factory) -> Path:
    """The Q4_1 test model expanded to F16: the reference for quality."""
    dst = tmp_path_factory.mktemp("f16") / "smollm2.F16.gguf"
    quantize(smollm2_gguf, dst, lookup("F16"), QuantOptions(allow_requantize=True))
    return dst


def test_requantize_needs_the_flag(infer, smollm2_gguf, tmp_path):
    r = infer("quantize", str(smollm2_gguf), "--to", "Q8_0", "-o", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "--allow-requantize" in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_iq2_without_imatrix_leaves_nothing(infer, smollm2_f16, tmp_path):
    r = infer("quantize", str(smollm2_f16), "--to", "IQ2_XS", "-o", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].startswith("Error: cannot make IQ2_XS")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_quantization_leaves_nothing(smollm2_f16, tmp_path):
    dst = tmp_path / "x.Q4_K_M.gguf"

    def stop(done, total):
        if done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(smollm2_f16, dst, lookup("Q4_K_M"), progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_quantize_report_orders_and_outputs_generate(infer, smollm2_f16, tmp_path):
    text = tmp_path / "eval.txt"
    from quantize.report import default_eval_text

    text.write_text(default_eval_text()[:6000])
    out = tmp_path / "out"
    r = infer("quantize", str(smollm2_f16), "--to", "Q8_0,Q4_K_M,Q2_K", "-o", str(out),
              "--eval-text", str(text), "--eval-tokens", "384", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = {row["name"]: row for row in doc["rows"]}
    kl = {k: rows[k]["quality"]["kl_mean"] for k in ("Q8_0", "Q4_K_M", "Q2_K")}
    assert kl["Q8_0"] < kl["Q4_K_M"] < kl["Q2_K"], kl
    assert rows["Q8_0"]["quality"]["top1"] > 0.9
    assert rows["Q8_0"]["size"] < rows["reference"]["size"]
    assert all(rows[k]["decode_tps"] > 0 for k in kl)
    for k in kl:
        path = out / f"smollm2.{k}.gguf"
        assert path.is_file()
        g = infer("run", str(path), "Say hello.", "-n", "8", "--temp", "0", "--no-prompt-cache")
        assert g.returncode == 0, g.stderr
        assert g.stdout.strip()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_blockwise_log_softmax_equals_the_whole_array_formula(monkeypatch):
    """The report's log-probabilities are computed a block of rows at a time (in the CPU's
    caches); each row must come out bit for bit as the one-pass formula gives it, whatever the
    block size, including a last block shorter than the others."""
    import numpy as np

    from quantize import report

    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((37, 1000)) * 8).astype(np.float32)
    x = logits.copy()
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    for block_bytes in (1, 4 * 1000 * 5, 4 * 1000 * 37, 1 << 30):
        monkeypatch.setattr(report, "SOFTMAX_BLOCK_BYTES", block_bytes)
        got = np.empty_like(x)
        seen = []
        for i, lp in report.log_softmax_rows(logits):
            got[i:i + len(lp)] = lp
            seen.append((i, len(lp)))
        assert sum(k for _, k in seen) == 37 and seen[0][0] == 0
        assert np.array_equal(got, x), block_bytes


def test_reference_compare_of_the_model_with_itself_is_zero(smollm2_gguf, tmp_path, monkeypatch):
    """KL, agreement and perplexity through the blockwise path, on real llama.cpp logits: the
    model against itself scores KL 0 and top-1 agreement 1 with blocks smaller than a chunk."""
    from quantize import report

    monkeypatch.setattr(report, "SOFTMAX_BLOCK_BYTES", 4 * 49152 * 10)  # 10 rows a block
    ref = report.Reference(smollm2_gguf, report.default_eval_text()[:3000], n_tokens=150,
                           n_ctx=64, threads=2, workdir=tmp_path)
    try:
        q = ref.compare(smollm2_gguf)
    finally:
        ref.close()
    assert q.positions == sum(len(c) - 1 for c in ref.chunks) > 100
    assert q.kl_mean < 1e-6 and q.top1 == 1.0
    assert abs(q.ppl - ref.ppl) < 1e-3 * ref.ppl and 1 < ref.ppl < 1000
