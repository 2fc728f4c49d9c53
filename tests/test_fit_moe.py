"""Mixture-of-experts models in `infer show` and `infer fit`: experts and experts used per token,
active against total parameters, memory with every expert resident (what llama.cpp allocates),
--cpu-moe / --n-cpu-moe (routed experts in RAM, the rest on the GPU) in the plan, in the
suggestions and in the engine (llama.cpp's tensor buffer overrides).

The large shapes are sparse synthetic files (tests/synthetic.py): llama.cpp's dry run plans them
without reading a weight. On a CPU-only machine the engine side can show only that a model loads
and generates with the overrides set (to the CPU buffer type) and that bad values are refused."""

from __future__ import annotations

import json

import pytest

from infer_cli.errors import BadOption
from infer_cli.models.gguf_info import is_expert_tensor, read_gguf
from infer_cli.options import ALL_LAYERS
from infer_cli.plan import fit
from tests import synthetic

GIB = 1 << 30
CPU = fit.Hardware("cpu", ram=1 << 50)
GPU12 = ("--vram", "12G", "--ram", "64G")  # a what-if CUDA GPU too small for Qwen3-30B-A3B


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe")
    shapes = [*synthetic.MOE_SHAPES.values(), synthetic.TINY_MOE]
    return {s.name: synthetic.write(s, d / f"{s.name}.gguf") for s in shapes}


@pytest.fixture(scope="module")
def qwen3(moe_files):
    return moe_files[synthetic.QWEN3_30B_A3B.name]


def _expected_params(s: synthetic.Shape) -> tuple[int, int]:
    """(total, active) parameters of a synthetic MoE shape, from its dimensions alone."""
    ff = s.n_ff_exp or s.n_ff
    experts = s.n_layer * 3 * s.n_embd * ff * s.n_expert
    total = sum(_n(dims) for _, dims, _ in synthetic._tensors(s))
    return total, total - experts + experts * s.n_expert_used // s.n_expert


def _n(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _fit(infer, path, *args) -> dict:
    r = infer("fit", str(path), "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --- infer show ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", sorted(synthetic.MOE_SHAPES))
def test_show_json_experts_and_active_parameters(infer, moe_files, shape):
    s = synthetic.MOE_SHAPES[shape]
    r = infer("show", str(moe_files[shape]), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    total, active = _expected_params(s)
    assert (doc["expert_count"], doc["expert_used_count"]) == (s.n_expert, s.n_expert_used)
    assert doc["expert_shared_count"] == s.n_expert_shared
    assert doc["expert_feed_forward_length"] == (s.n_ff_exp or None)  # Mixtral has no such key
    assert doc["n_params"] == total and doc["n_active_params"] == active
    assert doc["n_active_params"] < doc["n_params"] / 3


def test_show_published_sizes(moe_files):
    """The shapes give the parameter counts their model cards state."""
    for name, (total, active) in {"mixtral-8x7b-shaped": (46.7e9, 12.9e9),
                                  "qwen3-30b-a3b-shaped": (30.5e9, 3.3e9),
                                  "qwen2moe-a2.7b-shaped": (14.3e9, 2.7e9)}.items():
        info = read_gguf(moe_files[name])
        assert info.n_params == pytest.approx(total, rel=0.01), name
        assert info.n_active_params == pytest.approx(active, rel=0.03), name


def test_show_text_moe_and_dense(infer, qwen3, smollm2_gguf):
    r = infer("show", str(qwen3))
    assert r.returncode == 0, r.stderr
    assert "128 per layer, 8 used per token, 768 wide" in r.stdout
    assert "active parameters" in r.stdout and "3.4B per token" in r.stdout
    dense = infer("show", str(smollm2_gguf))
    assert dense.returncode == 0 and "experts" not in dense.stdout
    doc = json.loads(infer("show", str(smollm2_gguf), "--json").stdout)
    assert doc["expert_count"] == 0 and doc["n_active_params"] == doc["n_params"]


# --- infer fit: memory with every expert ---------------------------------------------------

def _block_bytes(info, blocks, experts_only=False) -> int:
    return sum(t.n_bytes for t in info.tensors if t.name.startswith("blk.")
               and int(t.name.split(".")[1]) in blocks and (not experts_only or is_expert_tensor(t.name)))


def test_fit_json_counts_every_expert_per_layer(infer, qwen3):
    info = read_gguf(qwen3)
    experts_3d = [t for t in info.tensors if is_expert_tensor(t.name)]
    assert len(experts_3d) == 48 * 3 and all(len(t.shape) == 3 and t.shape[2] == 128 for t in experts_3d)
    expert_bytes = sum(t.n_bytes for t in experts_3d)
    doc = _fit(infer, qwen3, *GPU12, "--no-mmap", "--gpu-layers", "10")
    assert doc["experts"]["count"] == 128 and doc["experts"]["used"] == 8
    assert doc["experts"]["bytes"] == expert_bytes > 0.9 * info.weights_bytes
    assert doc["parameters"] == {"total": info.n_params, "active": info.n_active_params}
    plan = doc["plan"]
    cpu, gpu = plan["devices"]["cpu"], plan["devices"]["gpu"]
    # --gpu-layers 10: the output layer and blocks 39..47, each with all 128 experts of each
    # 3-D tensor; the rest (token embedding, blocks 0..38) in RAM
    out = sum(t.n_bytes for t in info.tensors if not t.name.startswith(("blk.", "token_embd.")))
    assert gpu["weights"] == _block_bytes(info, range(39, 48)) + out
    assert cpu["weights"] == _block_bytes(info, range(39)) + info.tensor("token_embd.weight").n_bytes
    assert cpu["weights"] + gpu["weights"] == info.weights_bytes
    assert plan["moe_cpu_layers"] == 0 and plan["moe_cpu_bytes"] == 0


def test_fit_cpu_moe_moves_exactly_the_expert_bytes(infer, qwen3):
    info = read_gguf(qwen3)
    expert_bytes = sum(t.n_bytes for t in info.tensors if is_expert_tensor(t.name))
    args = (*GPU12, "--no-mmap", "--gpu-layers", "49")
    base = _fit(infer, qwen3, *args)["plan"]
    moe = _fit(infer, qwen3, *args, "--cpu-moe")["plan"]
    b, m = base["devices"], moe["devices"]
    assert m["cpu"]["weights"] - b["cpu"]["weights"] == expert_bytes
    assert b["gpu"]["weights"] - m["gpu"]["weights"] == expert_bytes
    assert m["cpu"]["kv"] == b["cpu"]["kv"] == 0 and m["gpu"]["kv"] == b["gpu"]["kv"]  # KV stays with its layer
    assert moe["moe_cpu_layers"] == 48 and moe["moe_cpu_bytes"] == expert_bytes
    assert not base["fits"] and moe["fits"] and moe["gpu_layers"] == 49
    assert moe["options"]["n_cpu_moe"] == ALL_LAYERS
    # --n-cpu-moe 5: the experts of blocks 0..4 only
    five = _fit(infer, qwen3, *args, "--n-cpu-moe", "5")["plan"]
    assert five["devices"]["cpu"]["weights"] - b["cpu"]["weights"] == _block_bytes(info, range(5), True)
    assert five["moe_cpu_layers"] == 5
    # blocks 0..4 are on the CPU anyway with --gpu-layers 10: nothing more moves
    ten = _fit(infer, qwen3, *GPU12, "--no-mmap", "--gpu-layers", "10", "--n-cpu-moe", "5")["plan"]
    plain = _fit(infer, qwen3, *GPU12, "--no-mmap", "--gpu-layers", "10")["plan"]
    assert ten["devices"] == plain["devices"] and ten["moe_cpu_layers"] == 0


def test_fit_cpu_moe_with_mmap_maps_the_experts(qwen3):
    """With mmap the CPU tensors are read from the mapping, which then spans the whole file."""
    m = fit.facts(read_gguf(qwen3))
    hw = fit.Hardware("12G", ram=64 * GIB, vram=12 * GIB, backend="cuda")
    p = fit.plan(m, hw, fit.Options(n_ctx=4096, gpu_layers=ALL_LAYERS, n_cpu_moe=ALL_LAYERS))
    first = min(o for o, _, _ in m.tensors)
    last = max(o + b for o, b, _ in m.tensors)
    assert p.cpu.weights == last - first
    assert p.gpu.weights == m.weights_bytes - m.embd_bytes - sum(m.expert_bytes)


def test_cuda_copies_one_ram_expert_tensor_into_the_gpu_compute_buffer(qwen3):
    """ggml-cuda offloads MUL_MAT_ID for a ubatch of 32+ tokens: an expert tensor kept in RAM is
    copied whole into the CUDA compute buffer, which holds the largest one beside the FFN."""
    m = fit.facts(read_gguf(qwen3))
    h200 = fit.Hardware("H200", ram=128 * GIB, vram=140 * GIB, backend="cuda")
    o = fit.Options(n_ctx=4096, gpu_layers=ALL_LAYERS, n_ubatch=512)
    gpu = fit.plan(m, h200, o).gpu.compute
    moe = fit.plan(m, h200, fit.replace(o, n_cpu_moe=ALL_LAYERS)).gpu.compute
    largest = max(b for _, b, _ in m.expert_tensors)
    assert moe >= largest + 512 * 4 * 3 * m.n_ff and moe >= gpu


def test_fit_moe_plan_matches_llama_cpp_dry_run(moe_files):
    """KV exactly; the compute buffer, whose MoE peaks this models loosely, within 10% (the whole
    ubatch's logits) and 20% (one token's)."""
    configs = [fit.Options(n_ctx=512, n_ubatch=128), fit.Options(n_ctx=4096, n_ubatch=512),
               fit.Options(n_ctx=4096, n_ubatch=512, flash_attn="off"),
               fit.Options(n_ctx=32768, n_ubatch=512, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on")]
    for name, path in moe_files.items():
        m = fit.facts(read_gguf(path))
        for chk in fit.check(str(path), configs, decode=True):
            assert chk.ok, (name, chk.error)
            p = fit.plan(m, CPU, chk.options)
            assert p.cpu.kv == chk.kv, (name, chk.options)
            assert p.cpu.compute == pytest.approx(chk.compute, rel=0.10), (name, chk.options)
            assert fit.decode_compute_bytes(m, chk.options) == pytest.approx(chk.compute_decode, rel=0.20), \
                (name, chk.options)


# --- suggestions -----------------------------------------------------------------------------

def test_fit_suggests_cpu_moe_when_it_gains_layers(infer, qwen3):
    doc = _fit(infer, qwen3, *GPU12, "--ctx", "8192")
    assert doc["plan"]["verdict"] == "partial"
    tips = {s["change"]: s for s in doc["suggestions"]}
    assert tips["--cpu-moe"]["fits"] and tips["--cpu-moe"]["gpu_layers"] == 49
    n = [c for c in tips if c.startswith("--n-cpu-moe ")]
    assert len(n) == 1 and tips[n[0]]["gpu_layers"] == 49
    # the fewest layers whose experts must stay in RAM for every layer to go to the GPU
    k = int(n[0].split()[1])
    m = fit.facts(read_gguf(qwen3))
    hw = fit.Hardware("w", ram=64 * GIB, vram=12 * GIB, backend="cuda")
    o = fit.Options(n_ctx=8192)
    at = fit.plan(m, hw, fit.replace(o, n_cpu_moe=k))
    below = fit.plan(m, hw, fit.replace(o, n_cpu_moe=k - 1))
    assert at.fits and at.gpu_layers == 49 and below.gpu_layers < 49
    r = infer("fit", str(qwen3), *GPU12, "--ctx", "8192")
    assert r.returncode == 0, r.stderr
    assert "8 of 128 experts per token" in r.stdout and "3.4B of 30.5B parameters active" in r.stdout
    assert "--cpu-moe: fits on the GPU, with the experts of 48 layers in RAM" in r.stdout


def test_no_cpu_moe_suggestion_where_it_gains_nothing(infer, qwen3, smollm2_gguf):
    # every layer fits on the GPU already
    doc = _fit(infer, qwen3, "--gpu", "H100 80GB")
    assert doc["plan"]["verdict"] == "gpu" and doc["suggestions"] == []
    # no GPU: the experts are in RAM anyway
    doc = _fit(infer, qwen3, "--ram", "64G")
    assert not any("cpu-moe" in s["change"] for s in doc["suggestions"])
    # a dense model has no experts to keep
    doc = _fit(infer, smollm2_gguf, "--vram", "0.1G", "--ram", "8G")
    assert doc["experts"] is None and not any("cpu-moe" in s["change"] for s in doc["suggestions"])
    doc = _fit(infer, smollm2_gguf, "--vram", "0.1G", "--ram", "8G", "--cpu-moe")
    assert any("no experts" in n for n in doc["plan"]["notes"])


def test_draft_keeps_its_experts_on_the_gpu(moe_files):
    tiny = fit.facts(read_gguf(moe_files["tiny-moe"]))
    m = fit.facts(read_gguf(moe_files["qwen3-30b-a3b-shaped"]))
    hw = fit.Hardware("H200", ram=128 * GIB, vram=140 * GIB, backend="cuda")
    p = fit.plan(m, hw, fit.Options(n_ctx=4096, n_cpu_moe=ALL_LAYERS), draft=tiny)
    assert p.moe_cpu_layers == 48 and p.draft.moe_cpu_layers == 0


# --- the engine: tensor buffer overrides -----------------------------------------------------

def test_bad_cpu_moe_values_are_refused(infer, moe_files):
    r = infer("run", str(moe_files["tiny-moe"]), "hello", "--n-cpu-moe", "-3")
    assert r.returncode == 2 and "--n-cpu-moe" in r.stderr and "Traceback" not in r.stderr
    r = infer("fit", str(moe_files["tiny-moe"]), "--n-cpu-moe", "-1")
    assert r.returncode == 2 and "--n-cpu-moe" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(BadOption):
        fit.Options(n_cpu_moe=-2).check()


@pytest.mark.parametrize("n_cpu_moe, moved", [(ALL_LAYERS, 4 * 3), (2, 2 * 3), (0, 0)])
def test_engine_sets_the_overrides(moe_files, n_cpu_moe, moved):
    """llama.cpp logs each tensor it places by an override: the routed experts of every block
    (--cpu-moe) or of the first N (--n-cpu-moe N), and nothing else."""
    from infer_cli.engine import llama_log
    from infer_cli.engine.model import Model

    mark = llama_log.mark()
    model = Model(moe_files["tiny-moe"], fit.Options(n_cpu_moe=n_cpu_moe, warmup=False))
    try:
        lines = [ln for ln in llama_log.since(mark) if "buffer type overridden to CPU" in ln]
    finally:
        model.close()
    assert len(lines) == moved
    assert all("_exps.weight" in ln for ln in lines)
    if n_cpu_moe == 2:
        assert {ln.split()[1].split(".")[1] for ln in lines} == {"0", "1"}


def test_run_generates_with_cpu_moe(infer, moe_files):
    r = infer("run", str(moe_files["tiny-moe"]), "hello", "-n", "4", "--temp", "0", "--cpu-moe")
    assert r.returncode == 0, r.stderr
    assert "generated 4 tokens" in r.stderr + r.stdout
