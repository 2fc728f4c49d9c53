"""`infer imatrix` and `infer quantize --imatrix auto`: the matrix gathered through llama.cpp's
eval callback equals a numpy forward pass of a tiny checkpoint (every matrix product's input
computed in numpy), the file is llama-imatrix's format (load_imatrix and llama-imatrix's own
output agree with it), the quantize pipeline makes it once and reuses it, and bad input is one
typed line with nothing left at the target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="session")
def native_bin() -> Path:
    """The folder of llama.cpp's own tools (llama-imatrix, llama-quantize), built by
    scripts/native.sh from the llama.cpp the binding vendors (about ten minutes on two cores
    the first time, then cached)."""
    import os
    import subprocess
    import sys

    p = subprocess.run(["bash", str(ROOT / "scripts" / "native.sh")],
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                       text=True, timeout=3600)
    assert p.returncode == 0, f"scripts/native.sh failed:\n{p.stderr[-3000:]}"
    folder = Path(p.stdout.strip().splitlines()[-1])
    for tool in ("llama-imatrix", "llama-quantize"):
        assert (folder / tool).is_file(), f"scripts/native.sh built no {folder / tool}"
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama 3 checkpoint (2 layers, 64 wide), its weights, config and F16 GGUF."""
    from quantize.convert import convert_checkpoint
    from tests.test_quantize_tiny import tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-imatrix")
    folder, weights = tiny_checkpoint(root / "llama3", "llama3")
    cfg = json.loads((folder / "config.json").read_text())
    gguf = convert_checkpoint(folder, root / "tiny.F16.gguf", "F16").path
    return folder, weights, cfg, gguf


def _matmul_inputs(t: dict, cfg: dict, ids: list[int]) -> dict[str, np.ndarray]:
    """The input of every weight's matrix product, (tokens, columns), for one sequence: the
    Hugging Face Llama forward pass in float64, keyed by the GGUF weight names."""
    from tests.test_quantize_tiny import _rope_inv_freq

    d, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, n = d // nh, cfg["rms_norm_eps"], len(ids)
    g = {k: v.astype(np.float64) for k, v in t.items()}
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w  # noqa: E731
    ang = np.arange(n)[:, None] * _rope_inv_freq(cfg)[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    out = {}
    x = g["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        h = norm(x, g[p + "input_layernorm.weight"])
        for w in ("attn_q", "attn_k", "attn_v"):
            out[b + w + ".weight"] = h
        heads = lambda name, k: (h @ g[p + name + ".weight"].T).reshape(n, k, hd).transpose(1, 0, 2)  # noqa: E731
        q, k, v = heads("self_attn.q_proj", nh), heads("self_attn.k_proj", nkv), heads("self_attn.v_proj", nkv)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, 0), np.repeat(v, nh // nkv, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, nh * hd)
        out[b + "attn_output.weight"] = a
        x = x + a @ g[p + "self_attn.o_proj.weight"].T
        h = norm(x, g[p + "post_attention_layernorm.weight"])
        out[b + "ffn_gate.weight"] = out[b + "ffn_up.weight"] = h
        gate = h @ g[p + "mlp.gate_proj.weight"].T
        act = (gate / (1 + np.exp(-gate))) * (h @ g[p + "mlp.up_proj.weight"].T)
        out[b + "ffn_down.weight"] = act
        x = x + act @ g[p + "mlp.down_proj.weight"].T
    return out


def test_tensor_layout_matches_this_libggml():
    import llama_cpp

    from quantize.imatrix_make import GgmlTensor, _Ggml, weight_name

    assert ctypes_size(GgmlTensor) == 336  # ggml.h's struct ggml_tensor on a 64-bit build
    _Ggml(llama_cpp)  # op ids and the tensor size checked against the library
    assert weight_name(b"CUDA0#blk.0.attn_k.weight#0") == b"blk.0.attn_k.weight"
    assert weight_name(b"blk.3.ffn_up.weight") == b"blk.3.ffn_up.weight"


def ctypes_size(cls) -> int:
    import ctypes

    return ctypes.sizeof(cls)


def test_expert_sums_match_llama_imatrix_loop():
    """MUL_MAT_ID: each (token, slot) row goes to the chosen expert, as imatrix.cpp's loop."""
    from quantize.imatrix_make import moe_sums

    rng = np.random.default_rng(3)
    for ne11 in (1, 4):
        n_tokens, n_ids, n_as, ne0 = 37, 4, 9, 24
        x = rng.standard_normal((n_tokens, ne11, ne0)).astype(np.float32)
        ids = np.stack([rng.choice(n_as, n_ids, replace=False) for _ in range(n_tokens)]).astype(np.int32)
        want, wcount = np.zeros((n_as, ne0)), np.zeros(n_as, dtype=np.int64)
        for idx in range(n_ids):
            for row in range(n_tokens):
                ex = ids[row, idx]
                want[ex] += x[row, idx % ne11].astype(np.float64) ** 2
                wcount[ex] += 1
        sums, counts = moe_sums(x, ids, n_as)
        assert (counts == wcount).all()
        np.testing.assert_allclose(sums, want, rtol=1e-5)
    with pytest.raises(ValueError):
        moe_sums(x, np.full((n_tokens, n_ids), n_as, dtype=np.int32), n_as)


def test_sums_equal_a_numpy_forward_pass(tiny, tmp_path):
    """Three chunks of 64 tokens through llama.cpp: every weight's in_sum2 is the sum of the
    squares of its input columns in a float64 forward pass, counts are the tokens, and
    load_imatrix gives their quotient."""
    from gguf import GGUFReader

    from infer_cli.engine import Model, Options
    from quantize import imatrix_make as im
    from quantize.imatrix import load_imatrix

    _, weights, cfg, gguf = tiny
    text = im.builtin_text()
    ctx, n_chunks = 64, 3
    m = im.compute(gguf, text, ctx=ctx, chunks=n_chunks, threads=2)
    assert m.chunks == n_chunks and m.chunk_size == ctx and np.isfinite(m.ppl)

    model = Model(gguf, Options(warmup=False))
    try:
        tokens = model.tokenize(text, add_special=True, parse_special=False)
        bos = model.L.llama_vocab_bos(model.vocab)
    finally:
        model.close()
    assert m.tokens == len(tokens)
    want: dict[str, np.ndarray] = {}
    for c in range(n_chunks):
        ids = [bos] + tokens[c * ctx + 1:(c + 1) * ctx]
        for name, x in _matmul_inputs(weights, cfg, ids).items():
            want[name] = want.get(name, 0) + (x * x).sum(0)
    assert sorted(m.stats) == sorted(want)
    for name, ref in want.items():
        got = m.stats[name]
        assert list(got.counts) == [n_chunks * ctx], name
        # llama.cpp computes in float32 with F16 weights: about 0.1% here; a chunk that did not
        # start from BOS would be off by half
        np.testing.assert_allclose(got.values, ref, rtol=0.005, atol=0.002 * ref.max(), err_msg=name)

    path = tmp_path / "tiny.imatrix.gguf"
    im.write_imatrix(path, m)
    r = GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == n_chunks
    assert r.fields["imatrix.chunk_size"].contents() == ctx
    assert r.fields["imatrix.datasets"].contents() == [im.BUILTIN_NAME]
    names = [t.name for t in r.tensors]
    assert names == [f"{n}{s}" for n in sorted(want) for s in (".in_sum2", ".counts")]
    loaded = load_imatrix(path)
    for name, ref in want.items():
        np.testing.assert_allclose(loaded[name], m.stats[name].values / (n_chunks * ctx), rtol=1e-6)


def test_file_is_the_one_llama_imatrix_writes(smollm2_gguf, tmp_path, infer, native_bin):
    """The same model, text and chunking through `infer imatrix` and llama-imatrix: the same
    header and tensor table byte for byte, and sums within 1%."""
    import subprocess

    from gguf import GGUFReader

    text = tmp_path / "cal.txt"
    from quantize.imatrix_make import builtin_text

    text.write_text(builtin_text()[:8000], encoding="utf-8")
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    r = infer("imatrix", str(smollm2_gguf), "-o", str(ours), "--calibration", str(text),
              "--ctx", "128", "--chunks", "2", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["chunks"] == 2 and doc["tensors"] == 30 * 7
    subprocess.run([str(native_bin / "llama-imatrix"), "-m", str(smollm2_gguf), "-f", str(text),
                    "-c", "128", "--chunks", "2", "-o", str(theirs)],
                   check=True, capture_output=True, timeout=300)
    a, b = GGUFReader(str(ours)), GGUFReader(str(theirs))
    start = a.tensors[0].data_offset
    assert ours.read_bytes()[:start] == theirs.read_bytes()[:start]
    assert ours.stat().st_size == theirs.stat().st_size
    other = {t.name: t for t in b.tensors}
    for t in a.tensors:
        x, y = np.asarray(t.data, np.float64), np.asarray(other[t.name].data, np.float64)
        assert np.abs(x - y).max() <= 0.01 * np.abs(y).max(), t.name


def test_quantize_auto_makes_it_once_and_reports_the_gain(tiny, tmp_path, infer, isolated_home):
    folder = tiny[0]
    out1, out2 = tmp_path / "a", tmp_path / "b"
    r = infer("quantize", str(folder), "--to", "IQ2_XXS,Q2_K,IQ3_XXS", "--imatrix", "auto",
              "--imatrix-chunks", "4", "-o", str(out1), "--eval-tokens", "64", "--json",
              "--threads", "2", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "computed the importance matrix" in r.stderr
    doc = json.loads(r.stdout)
    cached = list((isolated_home / "imatrix").glob("*.imatrix.gguf"))
    assert len(cached) == 1 and doc["imatrix"] == str(cached[0])
    rows = {(row["name"], row["scratch"]): row for row in doc["rows"]}
    assert rows[("IQ2_XXS", False)]["imatrix"] == str(cached[0])
    assert rows[("Q2_K", False)]["imatrix"] == str(cached[0])
    plain = rows[("Q2_K", True)]
    assert plain["imatrix"] is None and not Path(plain["path"]).exists()  # scratch: deleted
    # llama.cpp makes no IQ3_XXS without a matrix: its baseline has a flat one
    assert rows[("IQ3_XXS", True)]["imatrix"] == "flat"
    assert [g["type"] for g in doc["imatrix_gain"]] == ["Q2_K", "IQ3_XXS"]
    assert ("IQ2_XXS", True) not in rows
    assert sorted(p.name for p in out1.iterdir() if not p.name.startswith(".")) == \
        ["llama3.IQ2_XXS.gguf", "llama3.IQ3_XXS.gguf", "llama3.Q2_K.gguf"]
    assert not [p for p in out1.iterdir() if p.name.startswith(".")]  # no scratch left behind

    r = infer("quantize", str(folder), "--to", "IQ2_XXS", "--imatrix", "auto",
              "--imatrix-chunks", "4", "-o", str(out2), "--no-report", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "reusing the cached importance matrix" in r.stderr
    assert (out2 / "llama3.IQ2_XXS.gguf").exists()
    assert len(list((isolated_home / "imatrix").glob("*.imatrix.gguf"))) == 1


def _one_line_error(r, code: int, *words: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("Error:"))
    for w in words:
        assert w in line, line
    return line


def test_calibration_shorter_than_a_chunk(tiny, tmp_path, infer):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of text.", encoding="utf-8")
    target = tmp_path / "out.imatrix.gguf"
    r = infer("imatrix", str(tiny[3]), "--calibration", str(short), "--ctx", "128", "-o", str(target))
    _one_line_error(r, 2, "--calibration", "tokens", "a chunk needs 128")
    assert not target.exists() and not list(tmp_path.glob(".out*"))


def test_calibration_shorter_than_a_chunk_for_quantize_auto(tiny, tmp_path, infer):
    """Found after the checkpoint's conversion: the converted scratch goes, no output stays."""
    short = tmp_path / "short.txt"
    short.write_text("Not nearly enough text for a chunk.", encoding="utf-8")
    out = tmp_path / "q"
    r = infer("quantize", str(tiny[0]), "--to", "IQ2_XXS", "--imatrix", "auto", "--calibration",
              str(short), "-o", str(out), "--no-report")
    _one_line_error(r, 2, "--calibration", "a chunk needs 512")
    assert not out.exists() or list(out.iterdir()) == []


def test_interrupted_computation_leaves_no_cache_entry(tiny, isolated_home):
    from quantize import imatrix_make as im

    def stop(done, total, ppl):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        im.cached(tiny[3], im.ImatrixSpec(ctx=64, chunks=40, threads=2), progress=stop)
    folder = isolated_home / "imatrix"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_unreadable_calibration(tiny, tmp_path, infer):
    target = tmp_path / "out.imatrix.gguf"
    for bad in (tmp_path / "missing.txt", tmp_path):
        r = infer("imatrix", str(tiny[3]), "--calibration", str(bad), "-o", str(target))
        _one_line_error(r, 2, "--calibration", str(bad))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    r = infer("quantize", str(tiny[3]), "--to", "IQ2_XXS", "--imatrix", "auto", "--calibration",
              str(binary), "-o", str(tmp_path / "q"), "--no-report")
    _one_line_error(r, 2, "--calibration", "UTF-8")
    assert not target.exists() and not (tmp_path / "q").exists()


def test_imatrix_from_another_model_is_refused_before_quantizing(tiny, smollm2_gguf, tmp_path, infer):
    from quantize import imatrix_make as im

    m = im.compute(tiny[3], im.builtin_text(), ctx=64, chunks=1, threads=2)
    foreign = tmp_path / "tiny.imatrix.gguf"
    im.write_imatrix(foreign, m)
    out = tmp_path / "out"
    r = infer("quantize", str(smollm2_gguf), "--to", "IQ2_XXS", "--allow-requantize",
              "--imatrix", str(foreign), "-o", str(out), "--no-report")
    line = _one_line_error(r, 2, "another model", "blk.0.attn_k.weight", "64", "576")
    assert str(foreign) in line
    assert not out.exists() or not list(out.iterdir())


def test_a_file_from_infer_imatrix_quantizes_here_and_in_llama_quantize(tiny, tmp_path, infer,
                                                                       native_bin):
    import subprocess

    imx = tmp_path / "tiny.imatrix.gguf"
    r = infer("imatrix", str(tiny[3]), "-o", str(imx), "--ctx", "64", "--chunks", "2", "-t", "2")
    assert r.returncode == 0, r.stderr
    assert f"wrote {imx}" in r.stdout.replace("\n", "")
    r = infer("quantize", str(tiny[3]), "--to", "IQ2_XXS", "--imatrix", str(imx),
              "-o", str(tmp_path / "q"), "--no-report", "--json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "q" / "tiny.IQ2_XXS.gguf").exists()
    out = tmp_path / "native.IQ2_XXS.gguf"
    p = subprocess.run([str(native_bin / "llama-quantize"), "--imatrix", str(imx), str(tiny[3]), str(out), "IQ2_XXS", "2"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "loaded 14 importance matrix entries" in p.stdout + p.stderr


def test_mismatch_names_the_first_tensor_that_differs(smollm2_gguf):
    from infer_cli.models.gguf_info import read_gguf
    from quantize.imatrix import mismatch

    info = read_gguf(smollm2_gguf)
    fits = {t.name: np.ones(t.shape[0], dtype=np.float32) for t in info.tensors
            if t.name.startswith("blk.") and len(t.shape) == 2}
    assert mismatch(fits, info) is None
    fewer_layers = {k: v for k, v in fits.items() if not k.startswith("blk.29.")}
    assert "blk.29." in mismatch(fewer_layers, info)
    wrong = dict(fits, **{"blk.3.ffn_down.weight": np.ones(7, dtype=np.float32)})
    assert mismatch(wrong, info) == "blk.3.ffn_down.weight has 7 values in it but 1536 in this model"
    assert "blk.0.nothing.weight" in mismatch(dict(fits, **{"blk.0.nothing.weight": np.ones(3)}), info)
