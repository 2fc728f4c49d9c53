"""`infer fit`: hardware, memory plan per device, GPU layers and the largest context.

Only parsing and rendering here; the plan is ``infer_cli.plan.fit``, the probes
``infer_cli.plan.hardware``.
Heavy modules are imported inside the command (``infer --help`` stays instant).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from infer_cli.cli.options import (BatchOpt, CacheTypeKOpt, CacheTypeVOpt, CpuMoeOpt, CtxOpt,
                                   EngineArgs, FlashAttnOpt, GpuLayersOpt, JsonOpt, NCpuMoeOpt,
                                   ParallelOpt, RpcOpt, SwaFullOpt, TensorSplitOpt, UbatchOpt)
from infer_cli.cli.output import output
from infer_cli.errors import human_bytes

KV_CHOICES = ("f16", "q8_0", "q4_0")


def register(app) -> None:
    """Add the `fit` command to the Typer app."""
    app.command("fit")(fit_command)


def fit_command(
    model: Annotated[Optional[str], typer.Argument(
        help="A .gguf path, alias, or org/repo (a hub repo: every quant, headers only).",
        show_default=False)] = None,
    hardware_only: Annotated[bool, typer.Option("--hardware", help="Only detect and print the hardware.")] = False,
    ctx: CtxOpt = None,
    ubatch: UbatchOpt = 512,
    batch: BatchOpt = 2048,
    cache_type_k: CacheTypeKOpt = "f16",
    cache_type_v: CacheTypeVOpt = "f16",
    flash_attn: FlashAttnOpt = "auto",
    swa_full: SwaFullOpt = False,
    parallel: ParallelOpt = 1,
    no_mmap: Annotated[bool, typer.Option("--no-mmap", help="Plan for weights read into memory instead of mapped (with mmap, the CPU mapping spans from the first to the last CPU tensor in the file).")] = False,
    gpu_layers: GpuLayersOpt = "auto",
    cpu_moe: CpuMoeOpt = False,
    n_cpu_moe: NCpuMoeOpt = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="Plan for a hardware profile instead: 'RTX 4090', 'H100 80GB', 'M3 Max 64GB', 'CPU 16GB', ...", show_default=False)] = None,
    ram: Annotated[Optional[str], typer.Option("--ram", help="Plan for this much RAM (e.g. 16G).", show_default=False)] = None,
    vram: Annotated[Optional[str], typer.Option("--vram", help="Plan for a CUDA GPU with this much memory (e.g. 24G).", show_default=False)] = None,
    draft: Annotated[Optional[str], typer.Option("--draft", help="Add a draft model (speculative decoding) to the plan.", show_default=False)] = None,
    check: Annotated[bool, typer.Option("--check", help="Also run llama.cpp's own dry run and show its sizes beside ours.")] = False,
    rpc: RpcOpt = None,
    tensor_split: TensorSplitOpt = None,
    rpc_ram: Annotated[Optional[str], typer.Option("--rpc-ram", help="Plan for RPC workers with this much memory each (e.g. 64G,64G), without contacting any.", show_default=False)] = None,
    json_mode: JsonOpt = False,
) -> None:
    """Predict RAM and VRAM per component, choose GPU layers and the largest context that fits."""
    from infer_cli.engine.runner import read_header
    from infer_cli.options import default_context
    from infer_cli.plan import fit, hardware

    out = output(json_mode)
    # a subset of the engine options, in its own order and with its own --no-mmap help: built
    # into the shared group by hand rather than through @option_groups
    opts = EngineArgs(ctx=ctx, batch=batch, ubatch=ubatch, cache_type_k=cache_type_k,
                      cache_type_v=cache_type_v, flash_attn=flash_attn, swa_full=swa_full,
                      gpu_layers=gpu_layers, mmap=False if no_mmap else None, rpc=rpc,
                      tensor_split=tensor_split, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe).options(parallel)
    if not opts.n_ctx and (hardware_only or (model is not None and _is_hub_repo(model))):
        opts = fit.replace(opts, n_ctx=default_context(None))
    what_if = gpu is not None or ram is not None or vram is not None
    machine = hardware.detect(llama=not what_if or hardware_only)
    hw = _target(machine, gpu, ram, vram)
    if hardware_only:
        _emit_hardware(out, machine, json_mode)
        return
    if model is not None and _is_hub_repo(model):
        _hub_matrix(out, model, opts, [hw] if what_if else _matrix_profiles(), json_mode)
        return
    from infer_cli.models import store

    resolved = store.resolve(model, download=False)
    info = read_header(resolved)
    if not opts.n_ctx:
        opts = fit.replace(opts, n_ctx=default_context(info.context_length,
                                                       resolved.entry.context if resolved.entry else None))
    from infer_cli.engine.runner import with_rpc

    opts = with_rpc(opts, resolved.entry)
    if opts.rpc or rpc_ram is not None:  # split over RPC workers: a plan per device
        from infer_cli.cli import fit_rpc
        from infer_cli.plan import rpc_fit

        p = rpc_fit.plan(info, fit_rpc.devices(opts.rpc, rpc_ram), hw, opts)
        if opts.n_cpu_moe:
            p.notes.append("--cpu-moe / --n-cpu-moe are not in the RPC plan: it places every "
                           "expert with its layer")
        fit_rpc.emit(out, resolved.name, fit.facts(info), p, json_mode, hw.name)
        return
    draft_info = read_header(store.resolve(draft, download=False)) if draft else None
    m = fit.facts(info)
    p = fit.plan(m, hw, opts, draft=draft_info)
    cache = fit.serve_prompt_cache(m, p)
    if cache:
        p.notes.append(f"with --parallel {parallel}, `infer serve` also keeps finished prompts' KV "
                       f"in RAM for reuse: up to {human_bytes(cache)} beyond this plan (as many "
                       "tokens as the context, at most a quarter of the memory free when it starts)")
    largest = {kv: fit.largest_context(m, hw, fit.replace(opts, cache_type_k=kv, cache_type_v=kv,
                                                          flash_attn="on" if kv != "f16" else opts.flash_attn),
                                       draft=draft_info) for kv in KV_CHOICES}
    # a plan with every layer on the GPU cannot gain layers; suggestions() keeps only gains
    tips = [] if p.fits and p.verdict == "gpu" else fit.suggestions(m, hw, opts, draft=draft_info)
    checks = fit.check(str(resolved.path), [opts]) if check else []
    if json_mode:
        doc = {"model": resolved.name, "path": str(resolved.path), "plan": p.as_dict(),
               "serve_prompt_cache": cache,
               "parameters": {"total": m.n_params, "active": m.n_active_params},
               "experts": _experts_doc(m), "largest_context": largest,
               "suggestions": [{"change": s.change, "verdict": s.plan.verdict_text, "fits": s.plan.fits,
                                "gpu_layers": s.plan.gpu_layers, "total": s.plan.total,
                                "note": s.note} for s in tips]}
        if not what_if:
            doc["machine"] = _machine_doc(machine)
        if checks:
            c = checks[0]
            doc["check"] = {"ok": c.ok, "kv": c.kv, "compute": c.compute, "output": c.output,
                            "error": c.error}
        out.json(doc)
        return
    if not what_if:
        _emit_hardware(out, machine, False)
    _emit_plan(out, resolved.name, m, p, largest, tips, checks)


def _experts_doc(m) -> dict | None:
    """A MoE model's experts (None for a dense one): how many, how many a token uses, and the
    bytes of the routed-expert tensors (all resident: llama.cpp allocates every expert)."""
    if not m.n_expert:
        return None
    return {"count": m.n_expert, "used": m.n_expert_used, "shared": m.n_expert_shared,
            "feed_forward_length": m.n_ff_exp, "bytes": sum(m.expert_bytes),
            "bytes_per_layer": list(m.expert_bytes)}


def _experts_text(m) -> str:
    """', MoE: 8 of 128 experts per token, 3.3B of 30.5B parameters active' (empty if dense)."""
    if not m.n_expert:
        return ""
    def _params(n: int) -> str:
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

    shared = f" + {m.n_expert_shared} shared" if m.n_expert_shared else ""
    return (f", MoE: {m.n_expert_used} of {m.n_expert} experts{shared} per token, "
            f"{_params(m.n_active_params)} of {_params(m.n_params)} parameters active "
            f"(every expert is loaded: {human_bytes(sum(m.expert_bytes))} of expert weights)")


def _target(machine, gpu: str | None, ram: str | None, vram: str | None):
    from infer_cli.plan import fit
    from infer_cli.plan import hardware

    if gpu is not None:
        hw = hardware.profile(gpu)
    elif vram is not None or ram is not None:
        hw = fit.Hardware("what-if", ram=machine.ram_total, vram=0, backend="cuda")
    else:
        return machine.hardware()
    if ram is not None:
        hw = fit.replace(hw, ram=hardware.parse_size(ram, "--ram"))
    if vram is not None:
        size = hardware.parse_size(vram, "--vram")
        hw = fit.replace(hw, vram=size, backend=hw.backend or "cuda")
    parts = [hw.name] if gpu else []
    parts += [f"RAM {human_bytes(hw.ram)}", f"VRAM {human_bytes(hw.vram)}" if hw.vram else "no GPU"]
    return fit.replace(hw, name=", ".join(parts) if not gpu else f"{hw.name} ({', '.join(parts[1:])})")


def _is_hub_repo(ref: str) -> bool:
    from infer_cli.models.registry import HubRef, load_catalog, parse_ref

    try:
        parsed = parse_ref(ref, load_catalog())
    except Exception:  # noqa: BLE001 - let resolve() report a bad reference
        return False
    if not isinstance(parsed, HubRef) or getattr(parsed, "quant", None) or getattr(parsed, "filename", None):
        return False
    from infer_cli.models import hub

    # a repo already pulled is planned from its local file
    return not hub.find_cached(parsed.repo_id)


def _matrix_profiles():
    from infer_cli.plan import hardware

    return [hardware.profile(p) for p in ("H100 80GB", "A100 40GB", "RTX 4090", "RTX 3060",
                                          "M3 Max 64GB", "M2 16GB", "CPU 16GB")]


# --- rendering ------------------------------------------------------------------------------

def _machine_doc(machine) -> dict:
    from dataclasses import asdict

    return asdict(machine)


def _emit_hardware(out, machine, json_mode: bool) -> None:
    if json_mode:
        out.json({"machine": _machine_doc(machine)})
        return
    from rich.table import Table

    t = Table(box=None, show_header=False, pad_edge=False, title="Hardware", title_justify="left")
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("CPU", f"{machine.cpu_model}, {machine.physical_cores} cores ({machine.logical_cores} threads)")
    if machine.simd:
        t.add_row("SIMD", " ".join(machine.simd))
    t.add_row("RAM", f"{human_bytes(machine.ram_total)} total, {human_bytes(machine.ram_available)} available")
    for g in machine.gpus:
        free = f", {human_bytes(g.vram_free)} free" if g.vram_free is not None else ""
        extra = ", ".join(x for x in (f"compute {g.compute_capability}" if g.compute_capability else "",
                                      f"driver {g.driver}" if g.driver else "") if x)
        t.add_row("GPU", f"{g.name}: {human_bytes(g.vram_total)}{free}" + (f" ({extra})" if extra else ""))
    if not machine.gpus:
        t.add_row("GPU", "none found")
    if machine.llama_devices:
        t.add_row("llama.cpp devices", ", ".join(machine.llama_devices))
    t.add_row("GPU offload", "yes" if machine.gpu_offload else "no (this llama.cpp build is CPU-only)")
    if machine.fix:
        t.add_row("fix", machine.fix)
    out.result(t)


def _emit_plan(out, name, m, p, largest, tips, checks) -> None:
    from rich.table import Table

    o = p.options
    out.result(f"\n[bold]{name}[/]: {m.arch}, {m.n_layer} layers, {m.quant or '?'}, "
               f"{human_bytes(m.weights_bytes)} of weights" + _experts_text(m))
    swa = f" ({p.n_ctx_swa} on sliding-window layers)" if p.n_ctx_swa != p.n_ctx else ""
    out.result(f"Plan for {p.hardware.name}: context {p.n_ctx}{swa}, ubatch {p.n_ubatch}, "
               f"KV {o.cache_type_k}/{o.cache_type_v}, flash attention {o.flash_attn}")
    t = Table(box=None, pad_edge=False)
    for col in ("", "CPU (RAM)", "GPU (VRAM)"):
        t.add_column(col, justify="right" if col else "left")
    for comp in ("weights", "kv", "compute", "output", "overhead", "total"):
        a, b = getattr(p.cpu, comp), getattr(p.gpu, comp)
        label = {"kv": "KV cache", "overhead": "runtime allowance", "total": "total allocated"}.get(comp, comp)
        t.add_row(label, human_bytes(a), human_bytes(b) if b else "-")
    out.result(t)
    if p.moe_cpu_layers:
        out.result(f"Experts in RAM: {human_bytes(p.moe_cpu_bytes)}, the routed experts of "
                   f"{p.moe_cpu_layers} GPU layers (counted in the CPU's weights)")
    if p.cpu.untouched:
        # llama.cpp reserves logits for a whole ubatch; a decode that wants one token's logits
        # never writes the rest, so those pages never become resident
        out.result(f"RAM: resident ~{human_bytes(p.cpu.resident)} in ordinary generation (context full, "
                   f"one token's logits per decode); {human_bytes(p.cpu.total)} allocated (worst case: "
                   f"logits for all {p.n_ubatch} tokens of a ubatch)")
    else:
        out.result(f"RAM: resident ~{human_bytes(p.cpu.resident)} in ordinary generation; "
                   f"{human_bytes(p.cpu.total)} allocated")
    if p.draft is not None:
        out.result(f"draft {p.draft.model}: {human_bytes(p.draft.total)} "
                   f"({p.draft.verdict_text}), included in the budget")
    colour = {"gpu": "green", "partial": "yellow", "cpu": "cyan", "no-fit": "red"}[p.verdict]
    out.result(f"Verdict: [{colour}]{p.verdict_text}[/] (--gpu-layers {p.gpu_layers})")
    out.result("Largest context: " + ", ".join(f"{kv} KV {n:,}" if n else f"{kv} KV none"
                                               for kv, n in largest.items()))
    for note in p.notes:
        out.info(f"[dim]note: {note}[/]")
    if tips:
        if p.fits:
            out.result("To do better (more layers on the GPU, or a longer context):")
        elif any(s.plan.fits for s in tips):
            out.result("To make it fit:")
        else:
            out.result("None of these alone makes it fit:")
        for s in tips:
            ctx = f", context {s.plan.n_ctx:,}" if s.plan.n_ctx != p.n_ctx else ""
            note = f"; {s.note}" if s.note else ""
            out.result(f"  {s.change}: {s.plan.verdict_text}{ctx}, {human_bytes(s.plan.total)} in all{note}")
    for c in checks:
        if not c.ok:
            out.result(f"llama.cpp dry run failed: {c.error}")
            continue
        ct = Table(box=None, pad_edge=False, title="Cross-check (llama.cpp dry run, CPU)", title_justify="left")
        for col in ("", "ours", "llama.cpp", "diff"):
            ct.add_column(col, justify="right" if col else "left")
        cpu_plan = p if p.gpu_layers == 0 else None
        for comp, theirs in (("kv", c.kv), ("compute", c.compute), ("output", c.output)):
            ours = (getattr(cpu_plan.cpu, comp) if cpu_plan else
                    getattr(p.cpu, comp) + getattr(p.gpu, comp) if comp == "kv" else None)
            if ours is None:
                from infer_cli.plan import fit

                ours = getattr(fit.memory(m, fit.Hardware("cpu", ram=1 << 50), p.options, 0)[0], comp)
            diff = f"{(ours - theirs) / theirs * 100:+.2f}%" if theirs else "-"
            ct.add_row(comp, human_bytes(ours), human_bytes(theirs) if theirs is not None else "-", diff)
        out.result(ct)


def _hub_matrix(out, repo_id: str, opts, profiles, json_mode: bool) -> None:
    from infer_cli.plan import fit

    rows = []
    for quant, info in fit.hub_infos(repo_id):
        m = fit.facts(info)
        for hw in profiles:
            p = fit.plan(m, hw, opts)
            rows.append({"quant": quant, "hardware": hw.name, "verdict": p.verdict,
                         "verdict_text": p.verdict_text, "gpu_layers": p.gpu_layers,
                         "weights": m.weights_bytes, "total": p.total,
                         "largest_context": fit.largest_context(m, hw, fit.replace(opts, gpu_layers=None))})
    if json_mode:
        out.json({"repo": repo_id, "options": fit.asdict(opts), "matrix": rows})
        return
    from rich.table import Table

    t = Table(box=None, pad_edge=False, title=f"{repo_id}: context {opts.n_ctx}", title_justify="left")
    for col in ("QUANT", "WEIGHTS", "HARDWARE", "VERDICT", "GPU LAYERS", "LARGEST CONTEXT"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["quant"], human_bytes(r["weights"]), r["hardware"], r["verdict_text"],
                  str(r["gpu_layers"]), f"{r['largest_context']:,}")
    out.result(t)
