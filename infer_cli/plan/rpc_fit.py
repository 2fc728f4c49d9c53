"""Memory plan for a model split over RPC workers: which layers each worker device gets, its
weights, KV and compute, against the memory it reports; what stays on the local CPU.

Pure functions of (GGUF facts, worker devices, local hardware, options), like ``plan.fit``, so a
what-if (``--rpc-ram 64G,64G``) is as exact as a plan against live workers. The placement is
llama.cpp 0c1e570's (llama-model.cpp ``load_tensors``) with ``split_mode = LAYER``:

- the token embedding stays on the local CPU; with n_gpu_layers = k (k <= n_layer + 1), blocks
  below ``n_layer + 1 - k`` stay on the local CPU too, and the k offloaded layers (the output
  layer counting as the last) are spread over the devices in order;
- offloaded layer j (0-based among the k) goes to the first device i whose cumulative share
  exceeds j / k, the shares being ``tensor_split`` or, when none is given, each device's free
  memory; shares equal to whole layer counts therefore give each device exactly that many;
- a layer's KV cache lives on its device; each device that holds layers has its own compute
  buffer (the same peak rule as a GPU's: ``fit.compute_bytes``); the RPC backend runs no op of
  a CPU-held weight remotely, so the local CPU keeps a compute buffer for its own layers.

A worker's memory is what it reports for its device (``GET_DEVICE_MEMORY``: the worker's free
RAM for a CPU device, the GPU's free memory for a CUDA one); the same margins as the local plan
apply (10% of RAM, 5% of a GPU's memory), and a worker process needs its runtime besides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from infer_cli.options import ALL_LAYERS, Options
from infer_cli.plan import fit
from infer_cli.plan.fit import Memory

# A worker's process besides its buffers: the interpreter with llama_cpp imported and
# llama.cpp's bookkeeping (fit.RUNTIME_RSS + fit.LLAMA_STATE_RSS; a worker loads no tokenizer).
WORKER_RSS = fit.RUNTIME_RSS + fit.LLAMA_STATE_RSS


@dataclass(frozen=True)
class WorkerDevice:
    """One device a worker offers (a worker with two GPUs offers two)."""

    name: str          # llama.cpp's client device name: RPC0, RPC1, ...
    endpoint: str
    free: int
    total: int
    gpu: bool = False  # a GPU behind the worker: the GPU margin instead of the RAM one


@dataclass
class DevicePlan:
    device: WorkerDevice
    blocks: list[int]
    output: bool
    memory: Memory
    budget: int

    @property
    def layers(self) -> int:
        return len(self.blocks) + (1 if self.output else 0)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device.name, "endpoint": self.device.endpoint,
                "free": self.device.free, "total_memory": self.device.total,
                "layers": self.layers, "blocks": _ranges(self.blocks), "output_layer": self.output,
                "memory": self.memory.as_dict(), "budget": self.budget, "fits": self.fits}


@dataclass
class RpcPlan:
    model: str
    options: Options
    n_layer: int
    gpu_layers: int                  # offloaded layers (n_layer + 1 = everything)
    split: list[float]               # the shares used (the free memory when none was given)
    cpu: Memory                      # the local machine
    cpu_budget: int
    devices: list[DevicePlan]
    balanced: list[int]              # whole layers per device that balance their use
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_fits(self) -> bool:
        return self.cpu.total <= self.cpu_budget

    @property
    def fits(self) -> bool:
        return self.cpu_fits and all(d.fits for d in self.devices)

    @property
    def verdict_text(self) -> str:
        if not self.fits:
            bad = [d.device.name for d in self.devices if not d.fits] + ([] if self.cpu_fits else ["the local CPU"])
            return "does not fit (" + ", ".join(bad) + ")"
        if self.gpu_layers >= self.n_layer + 1:
            return f"fits: all {self.n_layer + 1} layers on {len(self.devices)} worker device(s)"
        return f"fits: {self.gpu_layers} of {self.n_layer + 1} layers on the workers, the rest on the local CPU"

    @property
    def total(self) -> int:
        return self.cpu.total + sum(d.memory.total for d in self.devices)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "options": asdict(self.options), "n_layer": self.n_layer,
                "gpu_layers": self.gpu_layers, "split": self.split, "fits": self.fits,
                "verdict_text": self.verdict_text,
                "cpu": {**self.cpu.as_dict(), "budget": self.cpu_budget, "fits": self.cpu_fits},
                "devices": [d.as_dict() for d in self.devices],
                "balanced_tensor_split": ",".join(map(str, self.balanced)),
                "total": self.total, "notes": self.notes}


def _ranges(blocks: list[int]) -> str:
    if not blocks:
        return ""
    return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])


def assign(n_layer: int, gpu_layers: int, split: list[float]) -> list[int]:
    """The device index of each block and, last, of the output layer (-1: the local CPU),
    by llama.cpp's rule (see the module docstring)."""
    import numpy as np  # float32 arithmetic, as llama.cpp computes the split points

    n_dev = len(split)
    k = n_layer + 1 if gpu_layers == ALL_LAYERS else max(0, min(gpu_layers, n_layer + 1))
    start = max(n_layer + 1 - k, 0)
    act = 0 if n_dev == 0 else min(k, n_layer + 1)
    cum = np.cumsum(np.asarray(split, dtype=np.float32), dtype=np.float32)
    total = cum[-1] if n_dev else np.float32(1)
    points = (cum / total).astype(np.float32) if n_dev else cum
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= act:
            out.append(-1)
            continue
        x = np.float32(il - start) / np.float32(act)
        out.append(min(int(np.searchsorted(points, x, side="right")), n_dev - 1))
    return out


def _budget(dev: WorkerDevice) -> int:
    margin = fit.VRAM_MARGIN if dev.gpu else fit.RAM_MARGIN
    return int(dev.free * (1 - margin))


def memory(m: fit.Model, o: Options, devices: list[WorkerDevice], gpu_layers: int,
           split: list[float]) -> tuple[Memory, list[DevicePlan]]:
    """(local CPU, per device) memory for this placement."""
    c = fit.cache_shape(m, o)
    where = assign(m.n_layer, gpu_layers, split)
    plans = [DevicePlan(d, [], False, Memory(), _budget(d)) for d in devices]
    cpu = Memory(weights=m.embd_bytes)
    for il in range(m.n_layer):
        mem = cpu if where[il] < 0 else plans[where[il]].memory
        mem.weights += m.layer_bytes[il]
        mem.kv += fit.kv_layer_bytes(m, o, il, c)
        if where[il] >= 0:
            plans[where[il]].blocks.append(il)
    out = where[m.n_layer]
    if out < 0:
        cpu.weights += m.output_bytes - m.tied_bytes  # the output is the token embedding itself
    else:
        plans[out].output = True
        plans[out].memory.weights += m.output_bytes
    cpu_groups = {-1, *(il for il in range(m.n_layer) if where[il] < 0)} | ({-2} if out < 0 else set())
    if o.mmap is not False and any(w >= 0 for w in where):
        span = m.mapped_span(cpu_groups)
        if span is not None:
            cpu.weights = max(cpu.weights, span)
    cpu.output = fit.pad(fit.output_bytes(m, o.n_seq), 32)
    cpu_blocks = any(where[il] < 0 for il in range(m.n_layer))
    if all(w < 0 for w in where):
        cpu.compute = fit.compute_bytes(m, o, c)
    else:
        cpu.compute = fit.compute_bytes(m, o, c, logits=out < 0, attention=cpu_blocks)
    for i, p in enumerate(plans):
        if p.blocks or p.output:
            p.memory.compute = fit.compute_bytes(m, o, c, logits=p.output, attention=bool(p.blocks))
            p.memory.overhead = WORKER_RSS
    cpu.overhead = fit.process_bytes(m)
    return cpu, plans


def balanced(m: fit.Model, o: Options, devices: list[WorkerDevice], gpu_layers: int) -> list[int]:
    """Whole layers per device (a ``--tensor-split``) that keep the most-used device's share of
    its budget lowest: one layer at a time to the device that would be least full after it
    (the output layer, the last, goes to the last device that gets layers)."""
    n = len(devices)
    if n == 0:
        return []
    k = m.n_layer + 1 if gpu_layers == ALL_LAYERS else max(0, min(gpu_layers, m.n_layer + 1))
    counts = [0] * n
    best = None
    # the placement is contiguous: try every count vector reachable by adding one layer at a
    # time to the device that stays least full (evaluated with the full memory model)
    for _ in range(k):
        scores = []
        for i in range(n):
            trial = counts.copy()
            trial[i] += 1
            # a partial vector: plan its layers as the first sum(trial) of the offload
            cpu, plans = memory(m, o, devices, sum(trial), [float(x) for x in trial])
            scores.append(max(p.memory.total / max(p.budget, 1) for p in plans))
        i = min(range(n), key=lambda j: (scores[j], j))
        counts[i] += 1
        best = counts
    return best or counts


def plan(info_or_model, devices: list[WorkerDevice], local: fit.Hardware, o: Options) -> RpcPlan:
    """The plan for the model over ``devices``. ``o.gpu_layers`` None: the most layers (from
    the top) that fit every device with the shares used; ``o.tensor_split`` empty: shares by
    each device's free memory (llama.cpp's default)."""
    from infer_cli.errors import BadOption

    o.check()
    m = info_or_model if isinstance(info_or_model, fit.Model) else fit.facts(info_or_model)
    if not devices:
        raise BadOption("--rpc", "(none)", "at least one worker")
    if o.tensor_split:
        if len(o.tensor_split) != len(devices):
            raise BadOption("--tensor-split", ",".join(f"{x:g}" for x in o.tensor_split),
                            f"{len(devices)} shares, one per worker device "
                            f"({', '.join(d.name for d in devices)})")
        split = [float(x) for x in o.tensor_split]
    else:
        split = [float(max(d.free, 1)) for d in devices]
    cpu_budget = int(local.ram * (1 - fit.RAM_MARGIN))
    if o.gpu_layers is not None:
        n = m.n_layer + 1 if o.gpu_layers == ALL_LAYERS else max(0, min(o.gpu_layers, m.n_layer + 1))
    else:
        n = 0
        for k in range(m.n_layer + 1, 0, -1):
            cpu, plans = memory(m, o, devices, k, split)
            if all(p.fits for p in plans) and cpu.total <= cpu_budget:
                n = k
                break
        if n == 0:
            n = m.n_layer + 1  # nothing fits: show the plan of llama.cpp's default
    cpu, plans = memory(m, o, devices, n, split)
    p = RpcPlan(m.name, replace(o, gpu_layers=n), m.n_layer, n, split, cpu, cpu_budget, plans,
                balanced(m, o, devices, n))
    if o.n_ctx > m.n_ctx_train:
        p.notes.append(f"context {o.n_ctx} is beyond the training context {m.n_ctx_train}")
    return p


def devices_of(workers) -> list[WorkerDevice]:
    """The devices of probed workers (``rpc.WorkerInfo``), named as llama.cpp will name them
    when they are added in this order in a fresh process (RPC0, RPC1, ...)."""
    out = []
    for w in workers:
        for d in w.devices:
            out.append(WorkerDevice(f"RPC{len(out)}", str(w.endpoint), d.free, d.total))
    return out


def what_if(sizes: list[int], endpoints: list[str] | None = None) -> list[WorkerDevice]:
    """Devices for ``--rpc-ram 64G,64G``: one CPU worker per size."""
    names = endpoints or [f"worker{i + 1}" for i in range(len(sizes))]
    return [WorkerDevice(f"RPC{i}", names[i] if i < len(names) else f"worker{i + 1}", s, s)
            for i, s in enumerate(sizes)]
