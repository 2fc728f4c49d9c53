"""Memory plan for a GGUF from its header alone: weights, KV cache, compute and output buffers
per device, the number of GPU layers that fit, and the largest context.

Everything here is a pure function of (GGUF facts, hardware description, options), so plans for
hardware that is not present (``--gpu "RTX 4090"``) are as exact as for the local machine. The
rules follow llama.cpp 0c1e570 (vendored by llama-cpp-python 0.3.36):

- context: n_ctx is padded to 256 cells (llama-context.cpp); n_batch = min(n_ctx, n_batch),
  n_ubatch = min(n_batch, n_ubatch);
- sliding-window layers (llama-kv-cache-iswa.cpp) get pad(min(n_ctx, n_swa + n_ubatch), 256)
  cells unless swa_full; which layers slide comes from ``{arch}.attention.sliding_window_pattern``
  or the architecture's default period (llama-hparams.cpp ``set_swa_pattern``);
- layers go to the GPU from the top: n_gpu_layers = k puts the output layer and the last k-1
  blocks there (llama-model.cpp ``i_gpu_start``); the token embedding stays on the CPU, and a
  tied output matrix is duplicated onto the GPU;
- the compute buffer is the peak of the graph allocator, modelled from the three places where it
  peaks (measured against llama.cpp's dry run, see scripts/bench_fit.py): the logits of a ubatch,
  the attention scores without flash attention, the feed-forward activations.

- with CUDA and n_ubatch >= 32, ggml-cuda runs the whole ubatch on the GPU whatever
  n_gpu_layers is: the CUDA compute buffer also holds copies of CPU weights, and the CPU
  (CUDA_Host) one only the token embedding rows and the masks (``_offloaded``);
- with mmap, the CPU mapping spans from the first to the last CPU tensor in file order.

Two figures for RAM: ``Memory.total`` is what llama.cpp allocates (the worst case: a ubatch with
the logits of every token) plus the process itself; ``Memory.resident`` is what the process
holds once the context is full in ordinary generation, where each decode asks for the logits of
one token and the logits rows of the compute buffer are never written (``decode_compute_bytes``).

``check`` runs llama.cpp's own dry run in a subprocess for comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from infer_cli import ggml
from infer_cli.errors import BadModelFile, BadOption
from infer_cli.options import ALL_LAYERS, FLASH_ATTN, Options, prompt_cache_bound

MIB = 1 << 20
GIB = 1 << 30
CTX_PAD = 256
# Default sliding-window period per architecture when the GGUF has no pattern key
# (load_swa_pattern calls in src/models/*.cpp); (period, dense_first).
SWA_DEFAULT_PATTERN = {"gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False),
                       "gemma-embedding": (6, False), "cohere2": (4, False), "llama4": (4, False),
                       "exaone4": (4, False), "olmo2": (4, False), "openai-moe": (2, False),
                       "gpt-oss": (2, False), "afmoe": (4, False), "smallthinker": (4, True)}
# Stated allowances: what a GPU runtime takes before any buffer (CUDA context, cuBLAS
# workspace, memory pool; Metal's command queues), and what the process itself needs in RAM.
# CUDA: measured on an H200 (CUDA 13, driver 580) with llama.cpp 0c1e570: 528-532 MiB beyond
# llama.cpp's buffers once the context exists, 608-619 MiB after the first decode (cuBLAS and
# the pool grow), 718 MiB with flash attention off. Other cards and drivers differ a little.
GPU_OVERHEAD = {"cuda": 640 * MIB, "metal": 256 * MIB, "": 0}
# ggml-cuda's offload_op (GGML_OP_OFFLOAD_MIN_BATCH, default 32): an op whose weight lives in
# host memory runs on the GPU when its batch has at least this many rows. llama.cpp reserves its
# compute buffers for a ubatch of n_ubatch tokens, so with n_ubatch >= 32 every layer computes on
# the GPU during prompt processing, even with n_gpu_layers 0 (the weights are copied in, one
# matmul at a time: ggml-backend.cpp starts a new split for each weight from an incompatible
# buffer, so only one such copy is alive at once).
CUDA_OFFLOAD_MIN_BATCH = 32
# What the process holds in RAM besides llama.cpp's buffers (the CPU's ``Memory.overhead``),
# measured on Linux x86-64 with Python 3.11 and llama-cpp-python 0.3.36 (RSS deltas of
# scripts/bench_fit.py's --rss child, mmap off, 2 threads, SmolLM2-135M and Gemma 3 270M):
# - RUNTIME_RSS: the interpreter with infer_cli.engine, llama_cpp (libllama + libggml), numpy
#   and psutil imported, before any model: 42.8-43.0 MiB in that child over 16 runs (`infer`'s
#   CLI module with the engine and llama_cpp: 42.3 MiB);
# - LLAMA_STATE_RSS: llama.cpp's own bookkeeping: backend init 0.9 MiB, model load beyond the
#   weights and the tokenizer 1.8-2.3, context creation beyond KV and output buffers 3.3-3.8,
#   the decodes beyond the compute pages they write (thread pool, work buffer) 2.5-4.5;
# - the tokenizer (llama-vocab's tables: token strings, scores, token -> id map, piece cache,
#   BPE ranks), from a vocab_only load: 16.3 MiB for SmolLM2 (49,152 tokens, 48,900 merges),
#   41.4 for Gemma 3 270M (262,144 tokens), 18.7 and 39.7 for the Llama-3-8B- and Gemma-3-27B-
#   shaped files (128,256 and 262,208 tokens): 153-166 bytes per token, 190 per merge.
RUNTIME_RSS = 42 * MIB
LLAMA_STATE_RSS = 10 * MIB
VOCAB_TOKEN_BYTES = 160
VOCAB_MERGE_BYTES = 190
VRAM_MARGIN = 0.05      # keep 5% of the GPU's memory free
RAM_MARGIN = 0.10       # and 10% of the available RAM


# ----------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class Model:
    """What the plan needs from a GGUF header (``facts(info)``)."""

    name: str
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]   # per layer
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int
    swa_layers: tuple[bool, ...]
    layer_bytes: tuple[int, ...]  # weights of each block
    embd_bytes: int               # token embedding (always on the CPU)
    output_bytes: int             # output matrix + final norm (with the output layer)
    tied_output: bool             # output matrix is the token embedding: duplicated on a GPU
    tied_bytes: int               # that duplicate (counted in output_bytes; 0 when untied)
    file_bytes: int
    quant: str = ""
    # (offset in the file, bytes, group) of every tensor: group = block index, -1 the token
    # embedding, -2 the output layer (final norm, output matrix, ...). Empty for hand-made models.
    tensors: tuple[tuple[int, int, int], ...] = ()
    n_merges: int = 0             # BPE merges of the tokenizer (its tables take RAM)
    # Mixture of experts (all 0/empty for a dense model). n_ff above is then the width a token
    # passes through: the used experts side by side (n_expert_used x n_ff_exp), or the shared
    # expert or a dense block's FFN where wider (they run one after the other).
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    n_ff_exp: int = 0
    expert_bytes: tuple[int, ...] = ()  # routed-expert tensors of each block (in layer_bytes)
    # (offset, bytes, block) of every routed-expert tensor (ffn_{up,down,gate}_exps)
    expert_tensors: tuple[tuple[int, int, int], ...] = ()
    n_params: int = 0
    n_active_params: int = 0      # parameters one token passes through

    def moe_cpu_blocks(self, o: Options) -> range:
        """The blocks whose routed experts ``o`` keeps in host memory (--cpu-moe, --n-cpu-moe)."""
        if not any(self.expert_bytes) or not o.n_cpu_moe:
            return range(0)
        return range(self.n_layer if o.n_cpu_moe == ALL_LAYERS else min(o.n_cpu_moe, self.n_layer))

    def largest_expert_tensor(self, blocks) -> int:
        """The largest routed-expert tensor of the given blocks (0 when unknown)."""
        return max((b for _, b, g in self.expert_tensors if g in blocks), default=0)

    def largest_block_tensor(self, blocks: range) -> int:
        """The largest single tensor of the given blocks (0 when unknown)."""
        return max((b for _, b, g in self.tensors if g in blocks), default=0)

    def mapped_span(self, groups, expert_blocks=()) -> int | None:
        """With mmap, llama.cpp's CPU_Mapped buffer covers the file from the first to the last
        byte of the tensors it holds (llama-model-loader ``get_mapping_range``), GPU tensors
        stored between them included; ``expert_blocks``: blocks whose routed experts are held
        there too (--cpu-moe). None when the tensor table is not known."""
        sel = [(o, b) for o, b, g in self.tensors if g in groups]
        if not sel:
            return None
        sel += [(o, b) for o, b, g in self.expert_tensors if g in expert_blocks]
        return max(o + b for o, b in sel) - min(o for o, _ in sel)

    @property
    def weights_bytes(self) -> int:
        """What the file holds: a tied output matrix counts once."""
        return sum(self.layer_bytes) + self.embd_bytes + self.output_bytes - self.tied_bytes


@dataclass(frozen=True)
class Hardware:
    """The memory a plan may use. ``vram`` 0 means no usable GPU."""

    name: str
    ram: int
    vram: int = 0
    backend: str = ""       # "cuda" | "metal" | ""
    unified: bool = False   # Apple: the GPU's memory is the RAM


# ----------------------------------------------------------------------------------------------
# Outputs


@dataclass
class Memory:
    """Bytes on one device, by component. ``total`` is what is allocated; ``resident`` what
    ordinary generation actually touches (``untouched``: compute-buffer bytes it never writes)."""

    weights: int = 0
    kv: int = 0
    compute: int = 0
    output: int = 0
    overhead: int = 0
    untouched: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output + self.overhead

    @property
    def resident(self) -> int:
        return self.total - self.untouched

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total, "resident": self.resident}


@dataclass
class Plan:
    model: str
    hardware: Hardware
    options: Options
    n_ctx: int                 # cells, after llama.cpp's padding
    n_ctx_swa: int             # cells of each sliding-window layer (== n_ctx without SWA)
    n_ubatch: int
    n_layer: int
    gpu_layers: int            # llama.cpp's n_gpu_layers (n_layer + 1 = everything)
    cpu: Memory
    gpu: Memory
    verdict: str               # "gpu" | "partial" | "cpu" | "no-fit"
    fits: bool
    kv_per_token: int          # bytes of KV per context cell over all full-attention layers
    draft: "Plan | None" = None
    notes: list[str] = field(default_factory=list)
    # MoE with --cpu-moe / --n-cpu-moe: blocks on the GPU whose routed experts stay in RAM,
    # and those experts' bytes (counted in cpu.weights)
    moe_cpu_layers: int = 0
    moe_cpu_bytes: int = 0

    @property
    def total(self) -> int:
        return self.cpu.total + self.gpu.total

    @property
    def resident(self) -> int:
        return self.cpu.resident + self.gpu.resident

    @property
    def verdict_text(self) -> str:
        text = {"gpu": "fits on the GPU", "cpu": "CPU only",
                "partial": f"partial offload: {self.gpu_layers} of {self.n_layer + 1} layers on the GPU",
                "no-fit": "does not fit"}[self.verdict]
        if self.moe_cpu_layers and self.verdict in ("gpu", "partial"):
            text += f", with the experts of {self.moe_cpu_layers} layers in RAM"
        return text

    def as_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "hardware": asdict(self.hardware), "options": asdict(self.options),
             "n_ctx": self.n_ctx, "n_ctx_swa": self.n_ctx_swa, "n_ubatch": self.n_ubatch,
             "n_layer": self.n_layer, "gpu_layers": self.gpu_layers, "verdict": self.verdict,
             "verdict_text": self.verdict_text, "fits": self.fits,
             "devices": {"cpu": self.cpu.as_dict(), "gpu": self.gpu.as_dict()},
             "total": self.total, "resident": self.resident, "kv_per_token": self.kv_per_token, "notes": self.notes,
             "moe_cpu_layers": self.moe_cpu_layers, "moe_cpu_bytes": self.moe_cpu_bytes}
        if self.draft is not None:
            d["draft"] = self.draft.as_dict()
        return d


# ----------------------------------------------------------------------------------------------
# From the GGUF header


def facts(info) -> Model:
    """The plan's view of a ``gguf_info.GGUFInfo``; BadModelFile when a needed key is missing."""
    from infer_cli.models.gguf_info import ArrayInfo, is_expert_tensor

    arch = info.architecture or "?"
    n_layer, n_embd, n_head = info.block_count, info.embedding_length, info.head_count
    if not (n_layer and n_embd and n_head):
        raise BadModelFile(info.path, "the header lacks block_count, embedding_length or head_count")
    raw_kv = info.head_count_kv_raw
    if isinstance(raw_kv, list) and len(raw_kv) == n_layer:
        kv_heads = tuple(int(v) for v in raw_kv)
    else:
        kv_heads = (info.head_count_kv or n_head,) * n_layer
    n_swa = info.sliding_window or 0
    layer_bytes = [0] * n_layer
    expert_bytes = [0] * n_layer
    experts, ffn_width = [], {}  # (offset, bytes, block); widest FFN a token passes per block
    embd = output = 0
    has_output = False
    spans = []
    single_file = len(getattr(info, "paths", ()) or ()) <= 1
    for t in info.tensors:
        if t.name.startswith("blk."):
            try:
                il = int(t.name.split(".")[1])
            except ValueError:
                il = -1
            if 0 <= il < n_layer:
                layer_bytes[il] += t.n_bytes
                spans.append((t.offset, t.n_bytes, il))
                if is_expert_tensor(t.name):
                    expert_bytes[il] += t.n_bytes
                    experts.append((t.offset, t.n_bytes, il))
                if (len(t.shape) >= 2 and t.name.endswith(".weight")
                        and (".ffn_up" in t.name or ".ffn_gate_up" in t.name)):
                    # up: {n_embd, n_ff[, n_expert]}; a fused gate_up is twice as wide
                    width = t.shape[1] // (2 if ".ffn_gate_up" in t.name else 1)
                    if is_expert_tensor(t.name):
                        width *= max(1, min(info.expert_used_count, info.expert_count))
                    ffn_width[il] = max(ffn_width.get(il, 0), width)
                continue
        if t.name.startswith("token_embd."):
            embd += t.n_bytes
            spans.append((t.offset, t.n_bytes, -1))
        else:
            output += t.n_bytes
            has_output |= t.name == "output.weight"
            spans.append((t.offset, t.n_bytes, -2))
    tied = not has_output
    merges = info.get("tokenizer.ggml.merges")
    tok = info.tensor("token_embd.weight")
    tied_bytes = tok.n_bytes if tied and tok is not None else 0
    output += tied_bytes
    n_ff = info.feed_forward_length or 4 * n_embd
    moe = bool(experts) and info.expert_count > 0
    if moe and ffn_width:
        n_ff = max(ffn_width.values())
    return Model(
        name=info.name or os.path.basename(info.path), arch=arch, n_layer=n_layer, n_embd=n_embd,
        n_head=n_head, n_head_kv=kv_heads, head_dim_k=info.key_length or n_embd // n_head,
        head_dim_v=info.value_length or n_embd // n_head, n_ff=n_ff,
        n_vocab=info.vocab_size or 0, n_ctx_train=info.context_length or 4096, n_swa=n_swa,
        swa_layers=_swa_layers(info, arch, n_layer, n_swa), layer_bytes=tuple(layer_bytes),
        embd_bytes=embd, output_bytes=output, tied_output=tied, tied_bytes=tied_bytes, file_bytes=info.file_size,
        quant=info.file_type_name or "", tensors=tuple(spans) if single_file else (),
        n_merges=len(merges) if isinstance(merges, (list, ArrayInfo)) else 0,
        n_expert=info.expert_count if moe else 0, n_expert_used=info.expert_used_count if moe else 0,
        n_expert_shared=info.expert_shared_count if moe else 0,
        n_ff_exp=(info.expert_feed_forward_length or info.feed_forward_length or 0) if moe else 0,
        # what --cpu-moe's pattern moves, with or without the expert keys
        expert_bytes=tuple(expert_bytes) if experts else (), expert_tensors=tuple(experts),
        n_params=info.n_params, n_active_params=info.n_active_params)


def _swa_layers(info, arch: str, n_layer: int, n_swa: int) -> tuple[bool, ...]:
    if n_swa <= 0:
        return (False,) * n_layer
    pattern = info.arch_get("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) >= n_layer:
        return tuple(bool(v) for v in pattern[:n_layer])
    period, dense_first = SWA_DEFAULT_PATTERN.get(arch, (0, False))
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        period = pattern
    if period == 0:
        return (True,) * n_layer
    if dense_first:
        return tuple(il % period != 0 for il in range(n_layer))
    return tuple(il % period < period - 1 for il in range(n_layer))


# ----------------------------------------------------------------------------------------------
# Components


def pad(n: int, to: int) -> int:
    """``n`` rounded up to a multiple of ``to``, as llama.cpp pads its buffers."""
    return (n + to - 1) // to * to


def _row_bytes(n: int, kv_type: str) -> int:
    return ggml.row_bytes(n, kv_type)


@dataclass(frozen=True)
class CacheShape:
    """The KV cache llama.cpp allocates for some options (see ``cache_shape``)."""

    n_ctx: int      # padded cells
    n_swa: int      # cells of SWA layers
    n_ubatch: int


def cache_shape(m: Model, o: Options) -> CacheShape:
    n_ctx = pad(o.n_ctx, CTX_PAD)
    n_batch = min(o.n_ctx, o.n_batch)
    n_ubatch = min(n_batch, o.n_ubatch)
    n_swa = n_ctx
    if any(m.swa_layers) and not o.swa_full:
        # one unified pool: every sequence keeps its own window (llama-kv-cache-iswa.cpp)
        n_swa = pad(min(n_ctx, m.n_swa * o.n_seq + n_ubatch), CTX_PAD)
    return CacheShape(n_ctx, n_swa, n_ubatch)


def kv_layer_bytes(m: Model, o: Options, il: int, c: CacheShape | None = None) -> int:
    """KV bytes of block ``il``: K and V rows of n_head_kv x head_dim, one per cell."""
    c = c or cache_shape(m, o)
    cells = c.n_swa if m.swa_layers[il] else c.n_ctx
    k = _row_bytes(m.n_head_kv[il] * m.head_dim_k, o.cache_type_k)
    v = _row_bytes(m.n_head_kv[il] * m.head_dim_v, o.cache_type_v)
    return cells * (k + v)


def compute_bytes(m: Model, o: Options, c: CacheShape | None = None, *, logits: bool = True,
                  attention: bool = True, gpu: bool = False) -> int:
    """Peak of llama.cpp's compute buffer for one device.

    ``logits``: the output layer runs here; ``attention``: some blocks run here; ``gpu``: the
    CUDA buffer, where the logits phase holds one activation less (H200 run, see
    ``_offloaded``)."""
    c = c or cache_shape(m, o)
    ub = c.n_ubatch
    phases = [ub * 4 * 2 * m.n_embd]
    if logits:
        # logits of the whole ubatch (f32) and the hidden state feeding them; without flash
        # attention the allocator keeps up to one more activation alive.
        hidden = m.n_embd if gpu and o.fa else 2 * m.n_embd if o.fa else 5 * m.n_embd // 2
        phases.append(ub * 4 * (m.n_vocab + hidden))
    if attention:
        n_kv = c.n_ctx if not all(m.swa_layers) else c.n_swa
        act = ub * 4 * 6 * m.n_embd  # q, k, v, residual, norms of a ubatch
        if o.fa:
            phases.append(n_kv * pad(ub, 64) * 2 + act)  # f16 mask
        else:
            masks = n_kv * ub * 4 + (c.n_swa * ub * 4 if any(m.swa_layers) and c.n_swa != n_kv else 0)
            phases.append(n_kv * ub * 4 * m.n_head + masks + act)  # f32 scores of every head
        phases.append(ub * 4 * (3 * m.n_ff + 2 * m.n_embd))
        if m.n_expert_used:
            # a MoE layer peaks where the used experts' outputs sit beside the FFN inputs and
            # the masks (what one token's decode writes too; the ubatch's logits may be larger)
            phases.append(decode_compute_bytes(m, o, c))
    return max(phases)


def _moe_outputs(m: Model) -> int:
    """f32 values per token alive where a MoE layer's used experts write their outputs
    (n_embd for each used expert, before they are weighted and summed) beside the residual and
    its norm; 0 for a dense model. A loose model of where the graph allocator peaks: against
    llama.cpp's reserve for one token's logits (tests/synthetic.py's shapes, n_ubatch 128-512)
    the Qwen3-30B-A3B shape (8 of 128 experts, n_embd 2048) is 13-18% above what this and the
    FFN activations give, Qwen1.5-MoE (4 of 60 + shared) 7-10% above, Mixtral (2 of 8, where the
    FFN activations peak) within 0.1%; 2-layer toys range from 18% above to 33% below."""
    return 2 * m.n_embd * m.n_expert_used + 2 * m.n_embd if m.n_expert_used else 0


def decode_compute_bytes(m: Model, o: Options, c: CacheShape | None = None) -> int:
    """The part of the CPU compute buffer (``compute_bytes``) that ordinary generation writes.

    llama.cpp sizes the buffer for a ubatch of n_ubatch tokens that all want logits, so its peak
    is the f32 logits of the ubatch. A decode through ``llama_batch_get_one`` asks for the logits
    of the last token only: the graph keeps that one row (``inp_out_ids``) before the output
    matrix, the graph allocator then peaks elsewhere and the pages above that peak are
    allocated but never written, hence never resident. The peak of that graph is llama.cpp's
    own reserve with ``n_outputs_max = 1`` (scripts/bench_fit.py compares them), where with
    flash attention the feed-forward activations of the ubatch (gate, up and their product,
    three n_embd-wide states, the n_head x head_dim attention output) sit beside the f16 masks
    (full-attention and sliding-window), graph inputs alive through every layer. That matched
    the dry run to 0.1% with an f16 cache on SmolLM2-135M, Gemma 3 270M and the Llama-3-8B and
    Gemma-3-27B shapes (n_ctx 512-32768, n_ubatch 64-512); quantized caches move it by -10..+8%.
    Without flash attention the f32 scores of every head may peak instead (-13..+10%). Against the
    pages a real process wrote: SmolLM2, n_ctx 512, n_ubatch 512, the last written page of the
    98.25 MiB buffer ends at 13.97 MiB (this gives 14.00); Gemma 3 270M, n_ctx 4096, at 22.77
    of 514.50 (this gives 22.75)."""
    c = c or cache_shape(m, o)
    ub = c.n_ubatch
    full, swa = not all(m.swa_layers), any(m.swa_layers)
    ffn = ub * 4 * max(3 * m.n_ff + 3 * m.n_embd + m.n_head * m.head_dim_k, _moe_outputs(m))
    if o.fa:
        rows = pad(ub, 64)
        cells = (c.n_ctx if full else 0) + (c.n_swa if swa else 0)
        return ffn + cells * rows * 2
    masks = (c.n_ctx * ub * 4 if full else 0) + (c.n_swa * ub * 4 if swa else 0)
    n_kv = c.n_ctx if full else c.n_swa
    scores = n_kv * ub * 4 * m.n_head + masks + ub * 4 * 6 * m.n_embd
    return max(ffn + masks, scores)


def process_bytes(m: Model) -> int:
    """RAM of the process besides llama.cpp's buffers: the runtime, llama.cpp's bookkeeping
    and the model's tokenizer tables (see RUNTIME_RSS)."""
    return RUNTIME_RSS + LLAMA_STATE_RSS + m.n_vocab * VOCAB_TOKEN_BYTES + m.n_merges * VOCAB_MERGE_BYTES


def _offloaded(m: Model, o: Options, c: CacheShape, first_gpu: int, out_on_gpu: bool,
               moe_cpu: range = range(0)) -> tuple[int, int]:
    """(CUDA_Host, CUDA0) compute buffers when ggml-cuda runs the ubatch's ops on the GPU
    whatever n_gpu_layers is (n_ubatch >= CUDA_OFFLOAD_MIN_BATCH).

    GPU: every phase of the graph, plus, at each op whose weight stayed on the CPU, a copy of
    that weight: the output matrix next to the logits when the output layer is on the CPU, the
    largest block tensor next to the feed-forward activations when blocks are on the CPU, and
    the K and V of one CPU layer next to the attention activations (with flash attention:
    the K/V views of a CPU KV buffer are copied in as split inputs).
    CPU (CUDA_Host): only what never leaves it: the token embedding rows (get_rows is never
    offloaded) with the copy that feeds the GPU, and the attention masks (graph inputs).
    Measured on an H200 (llama.cpp 0c1e570 built for CUDA, Llama-3-8B-shaped Q4_K file, n_ubatch
    512, n_ctx 4096): n_gpu_layers 0 -> CUDA0 669.48 MiB = 258.50 (logits + hidden) + 410.98
    (output.weight, Q6_K); CUDA_Host 20.01 MiB at n_ctx 4096, 48.01 at 32768 (the f16 mask grows
    by 28 MiB), 26.52 for the Gemma-3-27B shape (full + sliding-window masks)."""
    ub = c.n_ubatch
    cpu_blocks = range(min(first_gpu, m.n_layer))
    gpu = compute_bytes(m, o, c, logits=True, attention=True, gpu=True)
    if not out_on_gpu:
        hidden = m.n_embd if o.fa else 5 * m.n_embd // 2
        out_matrix = m.tied_bytes or m.output_bytes
        gpu = max(gpu, ub * 4 * (m.n_vocab + hidden) + out_matrix)
    # routed experts kept in RAM (--cpu-moe) for blocks that run on the GPU: MUL_MAT_ID is
    # offloaded too (its batch is the ubatch's tokens), so one whole 3-D expert tensor is copied in
    moe_gpu = [il for il in moe_cpu if il >= first_gpu]
    if len(cpu_blocks) or moe_gpu:
        largest = max(m.largest_block_tensor(cpu_blocks), m.largest_expert_tensor(moe_gpu))
        gpu = max(gpu, ub * 4 * (3 * m.n_ff + 2 * m.n_embd) + largest)
    if len(cpu_blocks):
        if o.fa:
            n_kv = c.n_ctx if not all(m.swa_layers) else c.n_swa
            # measured: n_gpu_layers 1, n_ctx 65536 -> CUDA0 compute 345.00 MiB = K + V of a
            # CPU layer (256) + the f16 mask (64) + ~3 activations of the ubatch (24)
            act = ub * 4 * 3 * m.n_embd + n_kv * pad(ub, 64) * 2
            gpu = max(gpu, act + max(kv_layer_bytes(m, o, il, c) for il in cpu_blocks))
    masks = 0
    mask_cells = ([c.n_ctx] if not all(m.swa_layers) else []) + ([c.n_swa] if any(m.swa_layers) else [])
    for cells in mask_cells:
        masks += cells * pad(ub, 64) * 2 if o.fa else cells * ub * 4
    cpu = 2 * ub * 4 * m.n_embd + masks
    return cpu, gpu


def output_bytes(m: Model, n_seq: int = 1) -> int:
    """The logits of one output row per sequence, f32, as llama.cpp first reserves them."""
    return m.n_vocab * 4 * n_seq


# ----------------------------------------------------------------------------------------------
# Planning


def memory(m: Model, hw: Hardware, o: Options, gpu_layers: int) -> tuple[Memory, Memory]:
    """(cpu, gpu) memory with ``gpu_layers`` offloaded (llama.cpp's n_gpu_layers semantics)."""
    c = cache_shape(m, o)
    gpu_layers = layers_on_gpu(m, gpu_layers) if hw.vram > 0 else 0
    first_gpu = m.n_layer + 1 - gpu_layers  # blocks il >= first_gpu run on the GPU
    out_on_gpu = gpu_layers >= 1
    cpu, gpu = Memory(), Memory()
    cpu.weights = m.embd_bytes
    moe_cpu = m.moe_cpu_blocks(o)
    moe_gpu = [il for il in moe_cpu if il >= first_gpu]  # experts in RAM, the rest on the GPU
    for il in range(m.n_layer):
        dev = gpu if il >= first_gpu else cpu
        dev.weights += m.layer_bytes[il]
        dev.kv += kv_layer_bytes(m, o, il, c)
    moved = sum(m.expert_bytes[il] for il in moe_gpu)
    gpu.weights -= moved
    cpu.weights += moved
    out_dev = gpu if out_on_gpu else cpu
    out_dev.weights += m.output_bytes
    if not out_on_gpu:
        cpu.weights -= m.tied_bytes  # the output is the token embedding itself
    if o.mmap is not False and gpu_layers:
        # the mapping spans from the first to the last CPU tensor in file order
        groups = {-1, *range(first_gpu)} | (set() if out_on_gpu else {-2})
        span = m.mapped_span(groups, moe_gpu)
        if span is not None:
            cpu.weights = max(cpu.weights, span)
    cpu.output = pad(output_bytes(m, o.n_seq), 32)
    if hw.vram > 0 and hw.backend == "cuda" and c.n_ubatch >= CUDA_OFFLOAD_MIN_BATCH:
        cpu.compute, gpu.compute = _offloaded(m, o, c, first_gpu, out_on_gpu, moe_cpu)
        gpu.overhead = GPU_OVERHEAD["cuda"]  # the CUDA context exists even with 0 layers
    elif gpu_layers:
        gpu.compute = compute_bytes(m, o, c, logits=True, attention=first_gpu < m.n_layer)
        # the CPU still embeds tokens and holds what moves between devices (and runs the
        # experts it keeps)
        cpu.compute = compute_bytes(m, o, c, logits=False, attention=first_gpu > 0 or bool(moe_gpu))
        gpu.overhead = GPU_OVERHEAD.get(hw.backend, GPU_OVERHEAD["cuda"])
    else:
        cpu.compute = compute_bytes(m, o, c)
        # the logits rows of the ubatch that an ordinary decode (one token's logits) never writes
        cpu.untouched = max(0, cpu.compute - decode_compute_bytes(m, o, c))
    cpu.overhead = process_bytes(m)
    return cpu, gpu


def _budgets(hw: Hardware) -> tuple[int, int]:
    vram = int(hw.vram * (1 - VRAM_MARGIN))
    ram = int(hw.ram * (1 - RAM_MARGIN))
    return ram, vram


def _fits(hw: Hardware, cpu: Memory, gpu: Memory) -> bool:
    ram, vram = _budgets(hw)
    if hw.unified:  # one pool: the GPU's share is capped by the working-set limit
        return gpu.total <= vram and cpu.total + gpu.total <= ram
    return cpu.total <= ram and gpu.total <= vram


def plan(info_or_model, hardware: Hardware, options: Options = Options(), *,
         draft=None) -> Plan:
    """The memory plan for a model (a GGUFInfo or a ``Model``) on ``hardware``.

    With ``options.gpu_layers`` None, the most layers whose memory fits with the safety
    margins; otherwise the given count. ``draft`` (a GGUFInfo or Model) adds a draft model
    with the same context, placed on the GPU first when it fits (its plan is ``plan.draft``).
    """
    options.check()
    m = info_or_model if isinstance(info_or_model, Model) else facts(info_or_model)
    d = None
    if draft is not None:
        dm = draft if isinstance(draft, Model) else facts(draft)
        # --cpu-moe is the target's (llama.cpp has --cpu-moe-draft for a draft's experts)
        d = plan(dm, hardware, replace(options, gpu_layers=options.gpu_layers and dm.n_layer + 1, n_cpu_moe=0))
        # one process: the runtime (interpreter, libraries) is counted once, with the target
        d.cpu.overhead = max(0, d.cpu.overhead - RUNTIME_RSS)
    hw = hardware
    if d is not None:  # the target gets what the draft leaves
        hw = replace(hardware, ram=hardware.ram - int(d.cpu.total / (1 - RAM_MARGIN)),
                     vram=max(0, hardware.vram - int((d.gpu.total - d.gpu.overhead) / (1 - VRAM_MARGIN))))
    c = cache_shape(m, options)
    if options.gpu_layers is not None:
        n = layers_on_gpu(m, options.gpu_layers) if hw.vram > 0 else 0
    else:
        n = _most_layers(m, hw, options)
    cpu, gpu = memory(m, hw, options, n)
    fits = _fits(hw, cpu, gpu)
    if not fits:
        verdict = "no-fit"
    elif n == 0:
        verdict = "cpu"
    elif n >= m.n_layer + 1:
        verdict = "gpu"
    else:
        verdict = "partial"
    kv_tok = sum(kv_layer_bytes(m, replace(options, n_ctx=CTX_PAD), il) for il in range(m.n_layer)
                 if not m.swa_layers[il]) // CTX_PAD
    p = Plan(model=m.name, hardware=hardware, options=options, n_ctx=c.n_ctx, n_ctx_swa=c.n_swa,
             n_ubatch=c.n_ubatch, n_layer=m.n_layer, gpu_layers=n, cpu=cpu, gpu=gpu,
             verdict=verdict, fits=fits, kv_per_token=kv_tok, draft=d)
    moe_gpu = [il for il in m.moe_cpu_blocks(options) if il >= m.n_layer + 1 - n] if n else []
    p.moe_cpu_layers, p.moe_cpu_bytes = len(moe_gpu), sum(m.expert_bytes[il] for il in moe_gpu)
    if options.n_cpu_moe and not any(m.expert_bytes):
        p.notes.append("the model has no experts: --cpu-moe / --n-cpu-moe change nothing")
    if options.n_ctx > m.n_ctx_train:
        p.notes.append(f"context {options.n_ctx} is beyond the training context {m.n_ctx_train}")
    return p


def serve_prompt_cache(m: Model, p: Plan) -> int:
    """The most RAM `infer serve` may use beyond the plan to keep finished prompts' KV for reuse:
    as many tokens as the context (the KV cache's size), at most a quarter of the memory free when
    it starts (here the plan's RAM). Sliding-window models keep those cells in the KV cache itself
    (llama.cpp saves only the window of such a sequence), as do RPC workers: nothing beyond."""
    if p.options.n_seq <= 1 or any(m.swa_layers) or p.options.rpc:
        return 0
    return min(p.cpu.kv + p.gpu.kv, prompt_cache_bound(p.hardware.ram))


def layers_on_gpu(m: Model, gpu_layers: int) -> int:
    """llama.cpp's reading of n_gpu_layers: ALL_LAYERS (or more than there are) is every layer."""
    return m.n_layer + 1 if gpu_layers == ALL_LAYERS else max(0, min(gpu_layers, m.n_layer + 1))


def _most_layers(m: Model, hw: Hardware, o: Options) -> int:
    if hw.vram <= 0:
        return 0
    for n in range(m.n_layer + 1, 0, -1):
        cpu, gpu = memory(m, hw, o, n)
        if _fits(hw, cpu, gpu):
            return n
    return 0


def largest_context(info_or_model, hardware: Hardware, options: Options = Options(), *,
                    draft=None, limit: int | None = None) -> int:
    """The largest n_ctx (a multiple of 256, at most the training context or ``limit``) whose
    plan fits; 0 when not even 256 tokens fit. Keeps ``options.gpu_layers`` (None: chosen
    anew for each size, so a long context may push layers back to the CPU)."""
    m = info_or_model if isinstance(info_or_model, Model) else facts(info_or_model)
    top = limit or m.n_ctx_train
    dm = None if draft is None else (draft if isinstance(draft, Model) else facts(draft))

    def ok(n: int) -> bool:
        return plan(m, hardware, replace(options, n_ctx=n), draft=dm).fits

    lo, hi = 0, top // CTX_PAD
    if hi and ok(hi * CTX_PAD):
        return hi * CTX_PAD
    while lo < hi - 1:
        mid = (lo + hi) // 2
        if ok(mid * CTX_PAD):
            lo = mid
        else:
            hi = mid
    return lo * CTX_PAD


@dataclass
class Suggestion:
    change: str
    plan: Plan
    note: str = ""  # what else it gains (--cpu-moe: the largest context)


def suggestions(m: Model, hardware: Hardware, options: Options, *, draft=None) -> list[Suggestion]:
    """Changes that gain something, each with its plan: when ``options`` do not fit, the changes
    that make the model fit (all of them, if none does alone: each shows what it saves);
    when they fit, only those that fit with more layers on the GPU. Nothing else: a smaller
    quant, a shorter context or a quantized KV cache costs quality or room, and is no advice
    for a model that already runs as well as this hardware allows."""
    base = plan(m, hardware, options, draft=draft)
    tries = []
    if options.cache_type_k != "q8_0" or options.cache_type_v != "q8_0":
        tries.append(("--cache-type-k q8_0 --cache-type-v q8_0",
                      replace(options, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on")))
    if options.n_ctx > 2048:
        tries.append((f"--ctx {options.n_ctx // 2}", replace(options, n_ctx=options.n_ctx // 2)))
    if options.n_ubatch > 128:
        tries.append(("--ubatch 128", replace(options, n_ubatch=128)))
    out = [Suggestion(change, plan(m, hardware, o, draft=draft)) for change, o in tries]
    if m.quant:
        # a smaller quant: the weights scale with bits per weight (Q4_K_M ~4.8, Q3_K_M ~3.9)
        small = replace(m, layer_bytes=tuple(int(b * 0.6) for b in m.layer_bytes),
                        output_bytes=int(m.output_bytes * 0.6), embd_bytes=int(m.embd_bytes * 0.6),
                        tied_bytes=int(m.tied_bytes * 0.6))
        out.append(Suggestion("a quant ~40% smaller (e.g. Q4_K_M instead of Q8_0, Q3_K_M instead of Q4_K_M)",
                              plan(small, hardware, options, draft=draft)))
    moe = _cpu_moe_suggestions(m, hardware, options, base, draft=draft)
    if not base.fits:
        return moe + ([s for s in out if s.plan.fits] or out)
    return moe + [s for s in out if s.plan.fits and s.plan.gpu_layers > base.gpu_layers]


def _cpu_moe_suggestions(m: Model, hardware: Hardware, options: Options, base: Plan, *,
                         draft=None) -> list[Suggestion]:
    """For a MoE model that does not fit the GPU whole: its routed experts in RAM, the rest on
    the GPU (--cpu-moe), and the fewest blocks whose experts must stay in RAM for every layer
    to go to the GPU (--n-cpu-moe N), where that fits with more layers on the GPU or a longer
    largest context than ``options`` give."""
    if hardware.vram <= 0 or not any(m.expert_bytes) or options.n_cpu_moe == ALL_LAYERS:
        return []
    if base.fits and base.verdict == "gpu":
        return []
    auto = replace(options, gpu_layers=None)
    every = m.n_layer + 1

    def all_on_gpu(n: int) -> Plan:
        return plan(m, hardware, replace(auto, n_cpu_moe=n), draft=draft)

    tries = [("--cpu-moe", replace(auto, n_cpu_moe=ALL_LAYERS))]
    lo, hi = max(options.n_cpu_moe, 0), m.n_layer  # the fewest N with every layer on the GPU
    top = all_on_gpu(hi)
    if top.fits and top.gpu_layers == every:
        while lo < hi:
            mid = (lo + hi) // 2
            p = all_on_gpu(mid)
            if p.fits and p.gpu_layers == every:
                hi = mid
            else:
                lo = mid + 1
        if 0 < hi < m.n_layer:
            tries.append((f"--n-cpu-moe {hi}", replace(auto, n_cpu_moe=hi)))
    base_ctx = largest_context(m, hardware, options, draft=draft)
    out = []
    for change, o in tries:
        p = plan(m, hardware, o, draft=draft)
        if not p.fits:
            continue
        ctx = largest_context(m, hardware, o, draft=draft)
        if p.gpu_layers <= base.gpu_layers and ctx <= base_ctx:
            continue
        out.append(Suggestion(change, p, f"largest context {ctx:,} (now {base_ctx:,})" if ctx > base_ctx else ""))
    return out


# ----------------------------------------------------------------------------------------------
# llama.cpp's own dry run


@dataclass
class Check:
    """What llama.cpp's dry run logged for one configuration (bytes; None when not logged)."""

    options: Options
    ok: bool
    kv: int | None = None
    compute: int | None = None
    output: int | None = None
    error: str | None = None
    compute_decode: int | None = None  # the compute buffer reserved with n_outputs_max = 1


def check(path: str, configs: list[Options], *, timeout: float = 120, decode: bool = False) -> list[Check]:
    """Run llama.cpp's dry run (no_alloc, load_mode 0) for each of ``configs`` on the CPU, in a
    subprocess so that a native abort cannot take the caller down. ``decode``: also reserve a
    context with one output per ubatch (what ordinary generation asks for), giving
    ``compute_decode`` to compare with ``decode_compute_bytes``."""
    payload = json.dumps({"path": str(path), "configs": [asdict(c) for c in configs], "decode": decode})
    proc = subprocess.run([sys.executable, "-m", "infer_cli.plan.fit"], input=payload, text=True,
                          capture_output=True, timeout=timeout)
    results = []
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    for o, ln in zip(configs, lines):
        r = json.loads(ln)
        results.append(Check(o, r["ok"], r.get("kv"), r.get("compute"), r.get("output"), r.get("error"),
                             r.get("compute_decode")))
    for o in configs[len(results):]:
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        results.append(Check(o, False, error=f"the dry run stopped: {err}"))
    return results


def _dry_run_main() -> None:
    import ctypes

    import llama_cpp as L

    from infer_cli.engine import llama_log

    req = json.loads(sys.stdin.read())
    llama_log.install()
    L.llama_backend_init()
    p = L.llama_model_default_params()
    p.no_alloc = True
    p.load_mode = 0
    p.n_gpu_layers = 0
    mark = llama_log.mark()
    model = L.llama_model_load_from_file(req["path"].encode(), p)
    if not model:
        err = llama_log.last_error(mark) or "could not load"
        for _ in req["configs"]:
            print(json.dumps({"ok": False, "error": err}), flush=True)
        return

    def params(cfg, n_outputs_max=0):
        c = L.llama_context_default_params()
        c.n_ctx, c.n_batch, c.n_ubatch = cfg["n_ctx"], cfg["n_batch"], cfg["n_ubatch"]
        c.n_seq_max = cfg.get("n_seq", 1)
        c.kv_unified = c.n_seq_max > 1  # as the engine builds it
        c.type_k, c.type_v = ggml.type_id(cfg["cache_type_k"]), ggml.type_id(cfg["cache_type_v"])
        c.flash_attn_type = FLASH_ATTN[cfg["flash_attn"]]
        c.swa_full = cfg["swa_full"]
        c.no_perf = True
        c.n_threads = c.n_threads_batch = 1
        c.n_outputs_max = n_outputs_max  # 0: n_batch, every token of a ubatch may want logits
        return c

    for cfg in req["configs"]:
        mark = llama_log.mark()
        ctx = L.llama_init_from_model(model, params(cfg))
        log = llama_log.since(mark)
        if not ctx:
            print(json.dumps({"ok": False, "error": llama_log.last_error(mark)}), flush=True)
            continue
        r = {"ok": True, "kv": llama_log.kv_cache_bytes(log), "compute": llama_log.buffer_bytes(log, "compute"),
             "output": llama_log.buffer_bytes(log, "output")}
        L.llama_free(ctx)
        if req.get("decode"):
            mark = llama_log.mark()
            # one output per sequence: what a decode step of every sequence asks for
            ctx = L.llama_init_from_model(model, params(cfg, cfg.get("n_seq", 1)))
            if ctx:
                r["compute_decode"] = llama_log.buffer_bytes(llama_log.since(mark), "compute")
                L.llama_free(ctx)
        print(json.dumps(r), flush=True)
    del ctypes


if __name__ == "__main__":
    _dry_run_main()


# ----------------------------------------------------------------------------------------------
# Hub repos: headers through HTTP range requests


def hub_infos(repo_id: str, *, revision: str | None = None) -> list[tuple[str, Any]]:
    """(quant, GGUFInfo) for each GGUF of a hub repo (first shard of a split), headers only:
    what `infer fit ORG/REPO` plans for, without downloading a model."""
    from infer_cli.models import remote

    return remote.repo_infos(repo_id, revision=revision)
