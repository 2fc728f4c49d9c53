"""Mixture-of-experts checkpoints (Qwen2-MoE, Qwen3-MoE, Mixtral) for the converter.

Hugging Face stores one 2-D matrix per expert and projection; llama.cpp wants one 3-D tensor per
layer and projection, ``blk.N.ffn_{gate,up,down}_exps`` with the expert as the outer axis (numpy
shape (experts, rows, cols), ggml's ne {cols, rows, experts}). ``stack_experts`` checks the
per-expert tensors against config.json and replaces them by one ``Stacked`` ref per projection,
which the writer loads when it reaches it: memory stays near one stacked tensor. The Qwen MoE
checkpoints' fused layout (``experts.gate_up_proj`` / ``experts.down_proj``, already 3-D) is
split into the same three tensors by ``Rows``, as llama.cpp's converter does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from infer_cli.errors import BadCheckpoint

from .safetensors_io import TensorRef, load_f32


@dataclass(frozen=True)
class Layout:
    block: str                         # the layer's MoE module: "mlp" or "block_sparse_moe"
    projections: tuple[str, str, str]  # HF names of each expert's gate, up and down matrices
    count_key: str                     # config.json's number of experts
    ff_key: str                        # config.json's hidden size of one expert
    shared: bool                       # a shared expert beside the routed ones (Qwen2-MoE)
    renormalise: bool                  # what llama.cpp's graph does with the top-k weights


LAYOUTS = {
    "Qwen2MoeForCausalLM": Layout("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                                  "moe_intermediate_size", True, False),
    "Qwen3MoeForCausalLM": Layout("mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts",
                                  "moe_intermediate_size", False, True),
    "MixtralForCausalLM": Layout("block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts",
                                 "intermediate_size", False, True),
}

MAX_EXPERTS = 1 << 12
_EXPERT = re.compile(r"model\.layers\.(?P<layer>\d+)\.(?P<block>\w+)\.experts\.(?P<expert>\d+)\."
                     r"(?P<proj>\w+)\.weight")


@dataclass(frozen=True)
class Stacked:
    """One expert tensor per row block: ``parts[i]`` is expert i's matrix."""
    name: str
    parts: tuple[TensorRef, ...]

    @property
    def shape(self):
        return (len(self.parts),) + tuple(self.parts[0].shape)

    def load(self):
        import numpy as np

        out = np.empty(self.shape, dtype=np.float32)
        for i, p in enumerate(self.parts):
            out[i] = load_f32(p)
        return out


@dataclass(frozen=True)
class Rows:
    """Rows ``lo:hi`` of every expert of a fused 3-D tensor (experts, rows, cols), under the name
    of the projection they hold: transformers' fused ``experts.gate_up_proj`` is the gate then
    the up projection of each expert, stacked by rows."""
    name: str
    ref: TensorRef
    lo: int
    hi: int

    @property
    def shape(self):
        e, _, cols = self.ref.shape
        return (e, self.hi - self.lo, cols)

    def load(self):
        import numpy as np

        from .safetensors_io import DTYPES

        raw = np.memmap(self.ref.file, dtype=np.dtype(DTYPES[self.ref.dtype]), mode="r",
                        offset=self.ref.start, shape=self.ref.shape)[:, self.lo:self.hi]
        if self.ref.dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return np.asarray(raw, dtype=np.float32)


def layout_of(config: dict) -> Layout | None:
    archs = config.get("architectures") or [config.get("model_type", "")]
    return LAYOUTS.get(archs[0])


def _int(config: dict, key: str, lo: int, hi: int, where: str) -> int:
    v = config.get(key)
    if type(v) is not int or not lo <= v <= hi:
        shown = "missing" if v is None else repr(v)[:40]
        raise BadCheckpoint(where, f"{key} is {shown}; it must be an integer from {lo} to {hi:,}")
    return v


def check_config(config: dict, where: str) -> None:
    """The MoE keys of config.json: counts in range, and routing llama.cpp's graph can run."""
    lay = layout_of(config)
    if lay is None:
        return
    n = _int(config, lay.count_key, 1, MAX_EXPERTS, where)
    _int(config, "num_experts_per_tok", 1, n, where)
    if lay.ff_key != "intermediate_size":
        _int(config, lay.ff_key, 1, 1 << 20, where)
    if lay.shared:
        _int(config, "shared_expert_intermediate_size", 1, 1 << 20, where)
    if lay.block == "mlp":
        # HF's default is False for both Qwen MoE configs; llama.cpp hard-codes one choice per arch
        norm = config.get("norm_topk_prob", False)
        if bool(norm) != lay.renormalise:
            raise BadCheckpoint(where, f"norm_topk_prob is {json_bool(norm)}, but llama.cpp's graph for "
                                f"{config['architectures'][0]} always "
                                f"{'renormalises' if lay.renormalise else 'keeps'} the top-k router weights")
        if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
            raise BadCheckpoint(where, "dense layers among the expert layers (mlp_only_layers, "
                                "decoder_sparse_step) are not supported by llama.cpp's graph")


def json_bool(v) -> str:
    return "true" if v is True else "false" if v is False else repr(v)[:20]


def stack_experts(refs: dict[str, TensorRef], config: dict, where: str) -> dict:
    """``refs`` with each layer's per-expert tensors replaced by one ``Stacked`` ref per projection
    (named ``model.layers.N.<block>.experts.<proj>.weight``, as gguf-py's tensor map knows it), after
    checking that every layer has a router of the right shape and exactly ``num_experts`` experts
    of one shape; unchanged for a checkpoint without experts."""
    lay = layout_of(config)
    if lay is None:
        return refs
    check_config(config, where)
    n_exp = config[lay.count_key]
    d = config["hidden_size"]
    ff = config[lay.ff_key]
    n_layers = config["num_hidden_layers"]
    present: dict[tuple[int, str], set[int]] = {}
    for k in refs:
        m = _EXPERT.fullmatch(k)
        if m and m["block"] == lay.block:
            present.setdefault((int(m["layer"]), m["proj"]), set()).add(int(m["expert"]))
    for (layer, proj), ids in sorted(present.items()):
        if layer >= n_layers or proj not in lay.projections:
            raise BadCheckpoint(where, f"expert tensor model.layers.{layer}.{lay.block}.experts.{min(ids)}."
                                f"{proj}.weight is not part of a {config['architectures'][0]} with "
                                f"num_hidden_layers {n_layers}")
        if max(ids) >= n_exp:
            raise BadCheckpoint(where, f"layer {layer} has {len(ids)} experts (model.layers.{layer}.{lay.block}."
                                f"experts.{max(ids)}.{proj}.weight the last), but {lay.count_key} is {n_exp}")
    stacked: dict[str, Stacked | Rows] = {}
    taken: set[str] = set()
    for layer in range(n_layers):
        base = f"model.layers.{layer}.{lay.block}."
        router = refs.get(base + "gate.weight")
        if router is None:
            raise BadCheckpoint(where, f"the router {base}gate.weight is missing")
        if tuple(router.shape) != (n_exp, d):
            raise BadCheckpoint(where, f"the router {router.name} has shape {list(router.shape)}; "
                                f"{lay.count_key} {n_exp} and hidden_size {d} make it [{n_exp}, {d}]")
        if lay.shared:  # llama.cpp's qwen2moe graph requires the shared expert in every layer
            sff = config["shared_expert_intermediate_size"]
            for name, want in (("shared_expert.gate_proj", (sff, d)), ("shared_expert.up_proj", (sff, d)),
                               ("shared_expert.down_proj", (d, sff)), ("shared_expert_gate", (1, d))):
                ref = refs.get(f"{base}{name}.weight")
                if ref is None or tuple(ref.shape) != want:
                    found = "is missing" if ref is None else f"has shape {list(ref.shape)}"
                    raise BadCheckpoint(where, f"shared-expert tensor {base}{name}.weight {found}; "
                                        f"config.json makes it {list(want)}")
        prefix = base + "experts."
        if lay.block == "mlp" and _fused(refs, prefix + "gate_up_proj"):
            stacked.update(_fused_experts(refs, prefix, n_exp, ff, d, where, taken))
            continue
        for proj, want in zip(lay.projections, ((ff, d), (ff, d), (d, ff))):
            parts = []
            for e in range(n_exp):
                name = f"{prefix}{e}.{proj}.weight"
                ref = refs.get(name)
                if ref is None:
                    raise BadCheckpoint(where, f"expert tensor {name} is missing ({lay.count_key} is {n_exp})")
                if tuple(ref.shape) != want:
                    raise BadCheckpoint(where, f"expert tensor {name} has shape {list(ref.shape)}; "
                                        f"config.json makes it {list(want)}")
                parts.append(ref)
                taken.add(name)
            stacked[f"{prefix}{proj}.weight"] = Stacked(f"{prefix}{proj}.weight", tuple(parts))
    extra = sorted((k for k in refs if ".experts." in k and k not in taken), key=_natural)
    if extra:
        raise BadCheckpoint(where, f"tensor {extra[0]} is not an expert matrix the converter knows "
                            f"for {config['architectures'][0]}")
    out: dict = {}
    for k, ref in refs.items():
        if k not in taken:
            out[k] = ref
            continue
        prefix = k[:k.index(".experts.") + len(".experts.")]
        for merged in (prefix + p + ".weight" for p in lay.projections):
            out.setdefault(merged, stacked[merged])
    return out


def _fused(refs: dict, name: str) -> TensorRef | None:
    return refs.get(name) or refs.get(name + ".weight")


def _fused_experts(refs: dict, prefix: str, n_exp: int, ff: int, d: int, where: str, taken: set) -> dict:
    """transformers' fused layout: ``experts.gate_up_proj`` (experts, 2 x ff, hidden), gate rows
    first, and ``experts.down_proj`` (experts, hidden, ff)."""
    gu, down = _fused(refs, prefix + "gate_up_proj"), _fused(refs, prefix + "down_proj")
    if down is None:
        raise BadCheckpoint(where, f"expert tensor {prefix}down_proj is missing beside {gu.name}")
    for ref, want in ((gu, (n_exp, 2 * ff, d)), (down, (n_exp, d, ff))):
        if tuple(ref.shape) != want:
            raise BadCheckpoint(where, f"expert tensor {ref.name} has shape {list(ref.shape)}; "
                                f"config.json makes it {list(want)}")
    taken.update((gu.name, down.name))
    return {prefix + "gate_proj.weight": Rows(prefix + "gate_proj.weight", gu, 0, ff),
            prefix + "up_proj.weight": Rows(prefix + "up_proj.weight", gu, ff, 2 * ff),
            prefix + "down_proj.weight": Rows(prefix + "down_proj.weight", down, 0, d)}


# the refs whose ``load()`` the writer calls
LAZY = (Stacked, Rows)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def metadata(w, config: dict) -> None:
    """The expert keys llama.cpp's load_hparams reads for these archs."""
    lay = layout_of(config)
    if lay is None:
        return
    w.add_expert_count(int(config[lay.count_key]))
    w.add_expert_used_count(int(config["num_experts_per_tok"]))
    if lay.ff_key != "intermediate_size":
        w.add_expert_feed_forward_length(int(config[lay.ff_key]))
    if lay.shared:
        w.add_expert_shared_feed_forward_length(int(config["shared_expert_intermediate_size"]))
