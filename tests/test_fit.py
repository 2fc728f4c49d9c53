"""`infer fit`: the memory plan against llama.cpp's own dry run (real and synthetic models),
GPU planning arithmetic through what-if hardware, hardware probes, the CLI, hub repos read
through range requests."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from infer_cli.plan import fit
from infer_cli.plan import hardware
from infer_cli.errors import BadOption
from infer_cli.models.gguf_info import read_gguf
from tests import synthetic

GIB = 1 << 30
CPU = fit.Hardware("cpu", ram=1 << 50)
# A representative subset of the accuracy grid (scripts/bench_fit.py prints all of it).
SUBSET = [
    fit.Options(n_ctx=512, n_ubatch=128),
    fit.Options(n_ctx=4096, n_ubatch=512, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on"),
    fit.Options(n_ctx=4096, n_ubatch=512, flash_attn="off"),
    fit.Options(n_ctx=32768, n_ubatch=512, flash_attn="off"),
    fit.Options(n_ctx=32768, n_ubatch=128, cache_type_k="q4_0", cache_type_v="q4_0", flash_attn="on"),
    fit.Options(n_ctx=32768, n_ubatch=512, cache_type_k="q8_0", flash_attn="off"),
    # several sequences in one unified cache: one sliding window each, one logits row each
    fit.Options(n_ctx=4096, n_ubatch=512, n_seq=4),
    fit.Options(n_ctx=8192, n_ubatch=256, n_seq=16),
]


@pytest.fixture(scope="session")
def synthetic_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    return {s.name: synthetic.write(s, d / f"{s.name}.gguf") for s in synthetic.SHAPES.values()}


def _assert_matches_dry_run(path):
    m = fit.facts(read_gguf(path))
    for chk in fit.check(str(path), SUBSET, decode=True):
        assert chk.ok, chk.error
        p = fit.plan(m, CPU, chk.options)
        assert p.cpu.kv == pytest.approx(chk.kv, rel=0.01), chk.options
        assert p.cpu.compute == pytest.approx(chk.compute, rel=0.05), chk.options
        # what ordinary generation writes: llama.cpp's reserve with one output per sequence
        # (exact to 0.1% with flash attention, an f16 cache and one sequence; within 15% otherwise)
        tight = chk.options.fa and chk.options.cache_type_k == "f16" and chk.options.n_seq == 1
        assert fit.decode_compute_bytes(m, chk.options) == \
            pytest.approx(chk.compute_decode, rel=0.01 if tight else 0.15), chk.options
        theirs = m.weights_bytes + chk.kv + chk.compute + chk.output
        ours = m.weights_bytes + p.cpu.kv + p.cpu.compute + p.cpu.output
        assert ours == pytest.approx(theirs, rel=0.03), chk.options


def test_plan_matches_dry_run_smollm2(smollm2_gguf):
    _assert_matches_dry_run(smollm2_gguf)


def test_plan_matches_dry_run_gemma3(gemma3_gguf):
    _assert_matches_dry_run(gemma3_gguf)


@pytest.mark.parametrize("shape", sorted(synthetic.SHAPES))
def test_plan_matches_dry_run_synthetic(synthetic_models, shape):
    _assert_matches_dry_run(synthetic_models[shape])


def test_gemma3_sliding_window_layers(gemma3_gguf):
    m = fit.facts(read_gguf(gemma3_gguf))
    assert m.swa_layers.count(False) == 3 and m.n_swa == 512  # every 6th layer is global
    p = fit.plan(m, CPU, fit.Options(n_ctx=4096, n_ubatch=512))
    assert (p.n_ctx, p.n_ctx_swa) == (4096, 1024)
    # 3 global layers x 4096 cells + 15 SWA layers x 1024 cells, 1 KV head of 256, K+V f16
    assert p.cpu.kv == (3 * 4096 + 15 * 1024) * 256 * 2 * 2
    full = fit.plan(m, CPU, fit.Options(n_ctx=4096, swa_full=True))
    assert full.cpu.kv == 18 * 4096 * 256 * 2 * 2


def test_context_padding_and_batch_clamp(smollm2_gguf):
    m = fit.facts(read_gguf(smollm2_gguf))
    p = fit.plan(m, CPU, fit.Options(n_ctx=1000, n_ubatch=512))
    assert p.n_ctx == 1024 and p.n_ubatch == 512
    assert fit.plan(m, CPU, fit.Options(n_ctx=300)).n_ubatch == 300  # n_batch = min(n_ctx, n_batch)


@pytest.mark.parametrize("model, options", [
    ("smollm2", fit.Options(n_ctx=512, n_ubatch=512, mmap=False)),
    ("gemma3", fit.Options(n_ctx=512, n_ubatch=128, cache_type_k="q8_0", cache_type_v="q8_0", mmap=False)),
], ids=["smollm2-512-ub512-f16", "gemma3-512-ub128-q8_0"])
def test_real_load_kv_and_resident_rss(request, model, options):
    """A real load with mmap off and the context filled as in ordinary generation (the prompt in
    ubatches, then tokens one at a time): llama.cpp's logged KV equals ours, the process RSS is
    within 10% of our resident estimate and below the allocated total, whose logits rows for a
    whole ubatch a decode of one token's logits never writes."""
    from scripts import bench_fit

    path = request.getfixturevalue(f"{model}_gguf")
    r = bench_fit.rss_run(path, options, timeout=120)
    assert "error" not in r, r["error"]
    assert r["n_tokens"] == r["n_ctx"] == options.n_ctx  # the context is full
    p = fit.plan(read_gguf(path), CPU, options)
    assert p.cpu.kv == pytest.approx(r["kv"], rel=0.01)
    assert p.cpu.resident == pytest.approx(r["rss"], rel=0.10)
    assert r["rss"] < p.cpu.total
    assert r["runtime"] == pytest.approx(fit.RUNTIME_RSS, rel=0.25)  # the measured basis of the constant


def test_resident_at_most_total(smollm2_gguf, gemma3_gguf, llama8b):
    """resident = total less the compute pages ordinary generation never writes: never above
    total, equal to it where the CPU computes no logits (a GPU holds the output layer)."""
    models = [fit.facts(read_gguf(smollm2_gguf)), fit.facts(read_gguf(gemma3_gguf)), llama8b]
    hws = [CPU, hardware.profile("RTX 4090"), hardware.profile("M3 Max 64GB"),
           fit.Hardware("small", ram=64 * GIB, vram=2 * GIB, backend="cuda")]
    opts = [fit.Options(n_ctx=n, n_ubatch=ub, cache_type_k=kv, cache_type_v=kv if fa == "on" else "f16",
                        flash_attn=fa) for n in (512, 32768) for ub in (1, 16, 512) for kv in ("f16", "q4_0")
            for fa in ("on", "off")]
    for m in models:
        for hw in hws:
            for o in opts:
                p = fit.plan(m, hw, o)
                for mem in (p.cpu, p.gpu):
                    assert 0 <= mem.untouched <= mem.compute
                    assert mem.resident <= mem.total
                    assert mem.as_dict()["resident"] == mem.resident
                assert p.resident <= p.total and p.as_dict()["resident"] == p.resident
                if p.gpu_layers or hw.backend == "cuda" and p.n_ubatch >= fit.CUDA_OFFLOAD_MIN_BATCH:
                    assert p.cpu.resident == p.cpu.total  # no logits computed on the CPU
                else:
                    assert p.cpu.untouched == max(0, p.cpu.compute - fit.decode_compute_bytes(m, o))
    # SmolLM2 at n_ctx 4096, n_ubatch 512: 512 rows of 49,152 logits are allocated, one is written
    m = models[0]
    p = fit.plan(m, CPU, fit.Options(n_ctx=4096, n_ubatch=512))
    assert p.cpu.total - p.cpu.resident > 512 * m.n_vocab * 4 * 0.8
    assert p.cpu.overhead == fit.process_bytes(m) > fit.RUNTIME_RSS + fit.LLAMA_STATE_RSS  # + tokenizer


# --- GPU planning, pure arithmetic ---------------------------------------------------------

@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    d = tmp_path_factory.mktemp("l8b")
    return fit.facts(read_gguf(synthetic.write(synthetic.LLAMA3_8B, d / "l.gguf")))


def test_partial_offload_arithmetic(llama8b):
    m = llama8b
    hw = fit.Hardware("test", ram=64 * GIB, vram=3 * GIB, backend="cuda")
    o = fit.Options(n_ctx=4096, n_ubatch=512)
    p = fit.plan(m, hw, o)
    assert p.verdict == "partial" and 0 < p.gpu_layers < m.n_layer + 1
    n = p.gpu_layers
    # llama.cpp puts the output layer and the last n-1 blocks on the GPU
    gpu_blocks = range(m.n_layer - (n - 1), m.n_layer)
    assert p.gpu.weights == sum(m.layer_bytes[i] for i in gpu_blocks) + m.output_bytes
    assert p.gpu.kv == sum(fit.kv_layer_bytes(m, o, i) for i in gpu_blocks)
    # with mmap (the default) the CPU mapping may also span GPU tensors stored between CPU ones
    assert p.cpu.weights + p.gpu.weights >= m.weights_bytes
    cpu_nommap, gpu_nommap = fit.memory(m, hw, replace(o, mmap=False), n)
    assert cpu_nommap.weights + gpu_nommap.weights == m.weights_bytes
    assert p.cpu.kv + p.gpu.kv == fit.plan(m, CPU, o).cpu.kv
    assert p.gpu.total <= hw.vram * (1 - fit.VRAM_MARGIN)
    more = fit.memory(m, hw, o, n + 1)[1]
    assert more.total > hw.vram * (1 - fit.VRAM_MARGIN)  # one more layer would not fit


def test_profiles_verdicts(llama8b):
    o = fit.Options(n_ctx=8192)
    assert fit.plan(llama8b, hardware.profile("RTX 4090"), o).verdict == "gpu"
    assert fit.plan(llama8b, hardware.profile("H100 80GB"), o).gpu_layers == llama8b.n_layer + 1
    assert fit.plan(llama8b, hardware.profile("RTX 3060"), fit.Options(n_ctx=8192)).verdict in ("gpu", "partial")
    assert fit.plan(llama8b, hardware.profile("CPU 16GB"), o).verdict == "cpu"
    tiny = fit.Hardware("tiny", ram=2 * GIB)
    assert fit.plan(llama8b, tiny, o).verdict == "no-fit"


def test_largest_context_and_quantized_kv(llama8b):
    hw = fit.Hardware("24G", ram=64 * GIB, vram=24 * GIB, backend="cuda")
    o = fit.Options(gpu_layers=llama8b.n_layer + 1)
    f16 = fit.largest_context(llama8b, hw, o, limit=1 << 20)
    q8 = fit.largest_context(llama8b, hw, replace(o, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on"),
                             limit=1 << 20)
    assert f16 % 256 == 0 and q8 > f16 * 1.7
    assert fit.plan(llama8b, hw, replace(o, n_ctx=f16)).fits
    assert not fit.plan(llama8b, hw, replace(o, n_ctx=f16 + 256)).fits
    assert fit.largest_context(llama8b, hw, o) == llama8b.n_ctx_train  # capped by training context


def test_draft_adds_its_memory(llama8b, smollm2_gguf):
    hw = hardware.profile("RTX 4090")
    alone = fit.plan(llama8b, hw, fit.Options(n_ctx=4096))
    both = fit.plan(llama8b, hw, fit.Options(n_ctx=4096), draft=read_gguf(smollm2_gguf))
    assert both.draft is not None and both.draft.verdict == "gpu"
    assert both.draft.gpu.kv == fit.plan(read_gguf(smollm2_gguf), CPU, fit.Options(n_ctx=4096)).cpu.kv
    assert both.gpu_layers <= alone.gpu_layers


def test_a_cpu_draft_adds_its_memory_but_not_a_second_runtime(smollm2_gguf, gemma3_gguf):
    o = fit.Options(n_ctx=4096)
    target, draft = fit.plan(read_gguf(gemma3_gguf), CPU, o), fit.plan(read_gguf(smollm2_gguf), CPU, o)
    both = fit.plan(read_gguf(gemma3_gguf), CPU, o, draft=read_gguf(smollm2_gguf))
    assert both.draft.cpu.total == draft.cpu.total - fit.RUNTIME_RSS
    assert both.cpu.total == target.cpu.total
    assert both.draft.cpu.overhead > 0  # its llama.cpp state and tokenizer remain


def test_no_suggestions_for_a_model_that_already_fits(llama8b):
    o = fit.Options(n_ctx=8192)
    for hw in (hardware.profile("CPU 16GB"), hardware.profile("RTX 4090")):
        assert fit.plan(llama8b, hw, o).fits
        assert fit.suggestions(llama8b, hw, o) == [], hw.name  # never "a smaller quant" here


def test_suggestions_for_a_partial_offload_put_more_layers_on_the_gpu(llama8b):
    hw = fit.Hardware("test", ram=64 * GIB, vram=3 * GIB, backend="cuda")
    o = fit.Options(n_ctx=4096, n_ubatch=512)
    base = fit.plan(llama8b, hw, o)
    tips = fit.suggestions(llama8b, hw, o)
    assert base.verdict == "partial" and tips
    assert all(s.plan.fits and s.plan.gpu_layers > base.gpu_layers for s in tips)


def test_suggestions_for_a_model_that_does_not_fit(llama8b):
    o = fit.Options(n_ctx=8192)
    tight = fit.Hardware("tight", ram=int(fit.plan(llama8b, CPU, o).total * 1.05))
    assert not fit.plan(llama8b, tight, o).fits
    tips = fit.suggestions(llama8b, tight, o)
    assert tips and all(s.plan.fits for s in tips)
    hopeless = fit.Hardware("tiny", ram=1 * GIB)
    tips = fit.suggestions(llama8b, hopeless, o)
    assert tips and not any(s.plan.fits for s in tips)  # each still shows what it would need


def test_cli_fit_suggests_nothing_for_a_model_that_fits(infer, gemma3_gguf):
    r = infer("fit", str(gemma3_gguf))
    assert r.returncode == 0, r.stderr
    assert "Verdict" in r.stdout and "smaller" not in r.stdout and "To " not in r.stdout
    doc = json.loads(infer("fit", str(gemma3_gguf), "--json").stdout)
    assert doc["plan"]["fits"] and doc["suggestions"] == []


def test_cli_fit_suggestions_when_it_does_not_fit(infer, smollm2_gguf):
    r = infer("fit", str(smollm2_gguf), "--ram", "100M")
    assert r.returncode == 0, r.stderr
    assert "does not fit" in r.stdout and ("To make it fit:" in r.stdout or "None of these" in r.stdout)


def test_the_servers_prompt_cache_is_planned_beside_the_kv(infer, smollm2_gguf, gemma3_gguf):
    # infer serve keeps finished prompts' KV in RAM: up to the KV cache's size, at most a quarter
    # of the memory; none for one sequence, nor for a sliding-window model (kept in the pool)
    m = fit.facts(read_gguf(smollm2_gguf))
    p = fit.plan(m, CPU, fit.Options(n_ctx=8192, n_seq=4))
    assert fit.serve_prompt_cache(m, p) == p.cpu.kv > 0
    small = fit.Hardware("small", ram=p.cpu.kv * 2)
    assert fit.serve_prompt_cache(m, fit.plan(m, small, fit.Options(n_ctx=8192, n_seq=4))) == p.cpu.kv // 2
    assert fit.serve_prompt_cache(m, fit.plan(m, CPU, fit.Options(n_ctx=8192))) == 0
    g = fit.facts(read_gguf(gemma3_gguf))
    assert fit.serve_prompt_cache(g, fit.plan(g, CPU, fit.Options(n_ctx=8192, n_seq=4))) == 0

    doc = json.loads(infer("fit", str(smollm2_gguf), "--parallel", "4", "--ctx", "8192", "--ram",
                           "64G", "--json").stdout)
    assert doc["serve_prompt_cache"] == doc["plan"]["devices"]["cpu"]["kv"]
    assert any("infer serve" in n for n in doc["plan"]["notes"])
    r = infer("fit", str(smollm2_gguf), "--ctx", "8192", "--ram", "64G")
    assert "infer serve" not in r.stdout + r.stderr
    assert "infer serve" in infer("fit", str(smollm2_gguf), "--parallel", "4").stderr


def test_options_rejected():
    with pytest.raises(BadOption):
        fit.Options(cache_type_v="q8_0", flash_attn="off").check()
    with pytest.raises(BadOption):
        hardware.profile("Voodoo 2")
    with pytest.raises(BadOption):
        hardware.parse_size("lots")
    assert hardware.parse_size("24G") == 24 * GIB and hardware.parse_size("512MiB") == 512 << 20


def test_hardware_probes():
    info = hardware.detect()
    assert info.ram_total > 0 and info.logical_cores >= 1
    assert info.llama_devices and info.llama_devices[0].startswith("CPU")
    assert "AVX2" in info.simd or info.simd  # whatever the CPU has, llama.cpp names some
    gpus = hardware.parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564, 23000, 8.9, 550.54.15\n")
    assert gpus[0].vram_total == 24564 << 20 and gpus[0].compute_capability == "8.9"
    assert hardware.profile("rtx4090").vram == 24 * GIB


# --- CLI ----------------------------------------------------------------------------------

def test_cli_fit_local_json_fast(infer, gemma3_gguf):
    # as fast as reading the header: relative to `infer show` timed just before, so that a busy
    # machine cannot fail it (the plan itself is arithmetic; detecting the hardware adds a little)
    t0 = time.perf_counter()
    assert infer("show", str(gemma3_gguf), "--json").returncode == 0
    header = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = infer("fit", str(gemma3_gguf), "--json")
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["plan"]["verdict"] == "cpu" and doc["plan"]["devices"]["cpu"]["kv"] > 0
    assert set(doc["largest_context"]) == {"f16", "q8_0", "q4_0"}
    assert doc["machine"]["ram_total"] > 0
    assert elapsed < 3 * header, f"fit {elapsed:.2f} s, show {header:.2f} s"


def test_cli_fit_what_if_and_check(infer, smollm2_gguf):
    r = infer("fit", str(smollm2_gguf), "--vram", "0.5G", "--ram", "8G", "--ctx", "32768", "--check")
    assert r.returncode == 0, r.stderr
    assert "Verdict" in r.stdout and "Cross-check" in r.stdout and "Hardware" not in r.stdout
    r = infer("fit", str(smollm2_gguf), "--gpu", "RTX 4090", "--json")
    doc = json.loads(r.stdout)
    assert doc["plan"]["verdict"] == "gpu" and doc["plan"]["devices"]["gpu"]["weights"] > 0


def test_cli_fit_hardware_only(infer):
    r = infer("fit", "--hardware", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["machine"]["cpu_model"]


def test_cli_fit_bad_gpu(infer, smollm2_gguf):
    r = infer("fit", str(smollm2_gguf), "--gpu", "Voodoo 2")
    assert r.returncode == 2 and "RTX 4090" in r.stderr


def test_hub_repo_headers_only(hub, infer, smollm2_gguf, smollm2_f16):
    """Every quant of a repo is planned from its header alone (HTTP range requests), each with
    its own weights: the F16 file plans about twice the RAM of the Q4_1 one."""
    files = {"model-Q4_1.gguf": smollm2_gguf.read_bytes(), "model-F16.gguf": smollm2_f16.read_bytes()}
    hub.add_repo("org/models-GGUF", {**files, "README.md": b"# card\n"})
    r = infer("fit", "org/models-GGUF", "--json", env={"HF_ENDPOINT": hub.url})
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert {row["quant"] for row in doc["matrix"]} == {"Q4_1", "F16"}
    assert {row["hardware"] for row in doc["matrix"]} >= {"RTX 4090", "CPU 16GB"}
    for name, data in files.items():
        gets = hub.file_gets(name)
        assert gets and all(g.range for g in gets)
        fetched = sum(int(g.range.split("-")[1]) - int(g.range.split("=")[1].split("-")[0]) + 1
                      for g in gets)
        assert fetched < len(data) // 10
    local = {"Q4_1": smollm2_gguf, "F16": smollm2_f16}
    for row in doc["matrix"]:  # the remote headers give what the local files give
        assert row["weights"] == fit.facts(read_gguf(local[row["quant"]])).weights_bytes
        if row["hardware"] == "CPU 16GB":
            assert row["verdict"] == "cpu" and row["largest_context"] > 0
    w = {row["quant"]: row["weights"] for row in doc["matrix"]}
    assert w["F16"] > 1.8 * w["Q4_1"]


# --- CUDA rules, against a real run ---------------------------------------------------------
# Facts from real loads on an NVIDIA H200 (llama.cpp 0c1e570 built for CUDA, .gpu/run.sh,
# .gpu/results/llama_logs.txt and .gpu/results-after/llama_logs.txt): the synthetic Llama-3-8B-shaped and Gemma-3-27B-shaped files,
# n_ubatch 512, flash attention auto, mmap on. llama.cpp logs sizes in MiB with 2 decimals.
H200 = fit.Hardware("NVIDIA H200", ram=135148564480, vram=150109880320, backend="cuda")
MIB = 1 << 20


@pytest.fixture(scope="module")
def gemma27b(tmp_path_factory):
    d = tmp_path_factory.mktemp("g27b")
    return fit.facts(read_gguf(synthetic.write(synthetic.GEMMA3_27B, d / "g.gguf")))


def _mib(x):
    return pytest.approx(x * MIB, abs=0.02 * MIB)


def test_cuda_zero_layers_still_computes_on_the_gpu(llama8b):
    # n_gpu_layers 0: "CUDA0 compute buffer size = 669.48 MiB" = 258.50 (logits + hidden)
    # + 410.98 (output.weight, Q6_K, copied in for the offloaded logits matmul);
    # "CUDA_Host compute buffer size = 20.01 MiB"; CPU_Mapped 4932.80 MiB.
    p = fit.plan(llama8b, H200, fit.Options(n_ctx=4096, gpu_layers=0))
    assert p.verdict == "cpu" and p.gpu_layers == 0
    assert p.gpu.weights == 0 and p.gpu.kv == 0
    assert p.gpu.compute == _mib(669.48)
    assert p.gpu.overhead == fit.GPU_OVERHEAD["cuda"]  # the CUDA context exists all the same
    assert p.cpu.compute == _mib(20.01)
    assert p.cpu.weights == _mib(4932.80)
    # below ggml-cuda's offload batch (32 rows) nothing is offloaded: CPU only for real
    small = fit.plan(llama8b, H200, fit.Options(n_ctx=4096, n_ubatch=16, gpu_layers=0))
    assert small.gpu.total == 0
    assert small.cpu.compute == fit.plan(llama8b, CPU, fit.Options(n_ctx=4096, n_ubatch=16)).cpu.compute


def test_cuda_host_compute_is_embeddings_and_masks(llama8b, gemma27b):
    # CUDA_Host compute: 20.01 MiB at n_ctx 4096 (n_gpu_layers 0, 12 and 33 alike), 48.01 at
    # 32768 (the f16 mask: +28 MiB), 26.52 for Gemma (full and sliding-window masks).
    for ngl in (0, 12, 33):
        assert fit.plan(llama8b, H200, fit.Options(n_ctx=4096, gpu_layers=ngl)).cpu.compute == _mib(20.01)
    assert fit.plan(llama8b, H200, fit.Options(n_ctx=32768, gpu_layers=12)).cpu.compute == _mib(48.01)
    assert fit.plan(gemma27b, H200, fit.Options(n_ctx=4096, gpu_layers=20)).cpu.compute == _mib(26.52)
    # without flash attention: 28.01 MiB (we have 24: an f32 mask; 4 MiB not yet explained)
    off = fit.plan(llama8b, H200, fit.Options(n_ctx=4096, gpu_layers=12, flash_attn="off"))
    assert off.cpu.compute == pytest.approx(28.01 * MIB, rel=0.15)


def test_cuda_gpu_compute(llama8b, gemma27b):
    # CUDA0 compute: 258.50 MiB = 512 x 4 x (n_vocab + n_embd) with every layer on the GPU and
    # at n_ctx 32768 with 12 layers; 266.51 with 12 layers at 4096; 522.62 for Gemma with 20;
    # 305.00 without flash attention (12 layers).
    assert fit.plan(llama8b, H200, fit.Options(n_ctx=4096, gpu_layers=33)).gpu.compute == _mib(258.50)
    assert fit.plan(llama8b, H200, fit.Options(n_ctx=32768, gpu_layers=12)).gpu.compute == _mib(258.50)
    assert fit.plan(llama8b, H200, fit.Options(n_ctx=4096, gpu_layers=12)).gpu.compute == \
        pytest.approx(266.51 * MIB, rel=0.035)
    assert fit.plan(gemma27b, H200, fit.Options(n_ctx=4096, gpu_layers=20)).gpu.compute == \
        pytest.approx(522.62 * MIB, rel=0.005)
    assert fit.plan(llama8b, H200, fit.Options(n_ctx=4096, gpu_layers=12, flash_attn="off")).gpu.compute == \
        pytest.approx(305.00 * MIB, rel=0.03)
    # a long context with the blocks on the CPU: their K and V are copied in for the attention
    # (second H200 run, .gpu/results-after: n_gpu_layers 1, n_ctx 65536 -> 345.00 MiB)
    assert fit.plan(llama8b, H200, fit.Options(n_ctx=65536, gpu_layers=1)).gpu.compute == \
        pytest.approx(345.00 * MIB, rel=0.01)


def test_mmap_span_covers_gpu_tensors_in_between(llama8b, gemma27b):
    # CPU_Mapped model buffer: 3475.30 MiB with 12 layers (output.weight, on the GPU, is stored
    # between token_embd and blk.0), 281.81 with 33, 11622.23 for Gemma with 20.
    o = fit.Options(n_ctx=4096)
    assert fit.plan(llama8b, H200, replace(o, gpu_layers=12)).cpu.weights == _mib(3475.30)
    assert fit.plan(llama8b, H200, replace(o, gpu_layers=33)).cpu.weights == _mib(281.81)
    assert fit.plan(gemma27b, H200, replace(o, gpu_layers=20)).cpu.weights == _mib(11622.23)
    # without mmap the CPU buffer holds only the CPU tensors
    nomap = fit.plan(llama8b, H200, replace(o, gpu_layers=12, mmap=False)).cpu.weights
    assert nomap == sum(llama8b.layer_bytes[:21]) + llama8b.embd_bytes
