"""`infer fit --rpc` / `--rpc-ram`: the plan of a model split over RPC workers, rendered.

Only rendering and the choice of devices here; the plan is ``infer_cli.plan.rpc_fit``, the probe
``infer_cli.engine.rpc``.
"""

from __future__ import annotations

from infer_cli.errors import BadOption, human_bytes


def devices(endpoints: tuple[str, ...], rpc_ram: str | None):
    """The worker devices to plan for: ``--rpc-ram`` sizes (a what-if, nothing is contacted;
    named after ``--rpc`` endpoints when both are given), else what each worker reports."""
    from infer_cli.plan import hardware, rpc_fit

    if rpc_ram is not None:
        sizes = [hardware.parse_size(s, "--rpc-ram") for s in rpc_ram.split(",") if s.strip()]
        if not sizes:
            raise BadOption("--rpc-ram", rpc_ram, "one size per worker, e.g. 64G,64G")
        if endpoints and len(endpoints) != len(sizes):
            raise BadOption("--rpc-ram", rpc_ram, f"{len(endpoints)} sizes, one per --rpc worker")
        return rpc_fit.what_if(sizes, list(endpoints) or None)
    from infer_cli.engine import rpc

    return rpc_fit.devices_of(rpc.probe_all(endpoints))


def emit(out, name: str, m, p, json_mode: bool, local_name: str) -> None:
    """Print the plan ``p`` (an ``rpc_fit.RpcPlan``) for model facts ``m``."""
    if json_mode:
        out.json({"model": name, "rpc_plan": p.as_dict()})
        return
    o = p.options
    out.result(f"\n[bold]{name}[/]: {m.arch}, {m.n_layer} layers, {m.quant or '?'}, "
               f"{human_bytes(m.weights_bytes)} of weights")
    given = bool(o.tensor_split) and list(o.tensor_split) == list(p.split)
    split = (",".join(f"{x:g}" for x in p.split) if given else
             "by free memory (" + ", ".join(human_bytes(x) for x in p.split) + ")")
    out.result(f"Plan over {len(p.devices)} RPC worker device(s): context {o.n_ctx}, ubatch "
               f"{o.n_ubatch}, KV {o.cache_type_k}/{o.cache_type_v}, --gpu-layers {p.gpu_layers}, "
               f"split {split}")
    cpu_blocks = m.n_layer - sum(len(d.blocks) for d in p.devices)
    out_local = not any(d.output for d in p.devices)
    rows = [("CPU", local_name, _layers_text(list(range(cpu_blocks)), out_local, embd=True),
             p.cpu, p.cpu.compute + p.cpu.output, p.cpu_budget, p.cpu_fits)]
    rows += [(d.device.name, d.device.endpoint, _layers_text(d.blocks, d.output), d.memory,
              d.memory.compute, d.budget, d.fits) for d in p.devices]
    for dev, where, layers, mem, compute, budget, ok in rows:
        out.result(f"  [bold]{dev}[/] {where}: {layers}")
        out.result(f"      weights {human_bytes(mem.weights)}, KV {human_bytes(mem.kv)}, compute "
                   f"{human_bytes(compute)}, runtime {human_bytes(mem.overhead)} = "
                   f"{human_bytes(mem.total)} of {human_bytes(budget)} it may use: {_yes(ok)}")
    colour = "green" if p.fits else "red"
    out.result(f"Verdict: [{colour}]{p.verdict_text}[/]")
    if p.balanced and [float(x) for x in p.balanced] != [float(x) for x in p.split]:
        out.result(f"Balanced: --tensor-split {','.join(map(str, p.balanced))} "
                   "(whole layers per device; the fullest device is then as empty as it can be)")
    for note in p.notes:
        out.info(f"[dim]note: {note}[/]")


def _layers_text(blocks: list[int], output: bool, embd: bool = False) -> str:
    parts = ["token embedding"] if embd else []
    if blocks:
        parts.append(f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
    if output:
        parts.append("output layer")
    n = len(blocks) + (1 if output else 0)
    return (", ".join(parts) or "nothing") + (f" ({n} layer{'s' if n != 1 else ''})" if n else "")


def _yes(ok: bool) -> str:
    return "[green]fits[/]" if ok else "[red]does not fit[/]"
