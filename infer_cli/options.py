"""How a model is loaded and its context built: one type for the engine and the planner.

``infer run``, ``infer batch`` and ``infer serve`` build an ``Options`` from the command line and
models.toml; the memory plan (``plan.fit``) predicts what the same ``Options`` will cost, and the
engine builds exactly that context. Light module: no llama_cpp, no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

from infer_cli.errors import BadOption

FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
# llama.cpp's n_gpu_layers for "every layer, the output layer included" (its own -1).
ALL_LAYERS = -1
DEFAULT_CTX = 4096


def prompt_cache_bound(free_ram: int) -> int:
    """The most bytes the server's prompt cache keeps in host memory: a quarter of the memory
    free when it starts (the engine bounds it so; the planner reports it)."""
    return free_ram // 4


def default_context(trained: int | None, configured: int | None = None) -> int:
    """The context when none is asked for: models.toml's, else the training context capped at
    4096 (enough for chat, small enough for any machine)."""
    if configured:
        return configured
    return min(trained, DEFAULT_CTX) if trained else DEFAULT_CTX


@dataclass(frozen=True)
class Options:
    """Load and context settings. Defaults mirror llama.cpp's own tools."""

    n_ctx: int = DEFAULT_CTX
    n_batch: int = 2048
    n_ubatch: int = 512
    n_seq: int = 1                    # sequences sharing one context (--parallel)
    threads: int | None = None        # None: the physical cores
    threads_batch: int | None = None  # None: same as threads
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"          # auto resolves to on: every backend here supports it
    swa_full: bool = False            # llama.cpp's small sliding-window cache unless asked
    gpu_layers: int | None = None     # None: planned (auto); ALL_LAYERS: every layer
    mlock: bool = False
    mmap: bool | None = None          # weights mapped from the file; None: auto (engine.model)
    repack: bool = True               # CPU weights repacked into llama.cpp's interleaved layouts
    warmup: bool = True               # one throw-away decode at load, as llama.cpp's tools do
    rpc: tuple[str, ...] = ()         # RPC workers (HOST:PORT) that hold the offloaded layers
    tensor_split: tuple[float, ...] = ()  # share of the offloaded layers per worker device
    # MoE: the routed experts of the first n_cpu_moe blocks stay in host memory whatever
    # gpu_layers is (llama.cpp's --n-cpu-moe); ALL_LAYERS: of every block (--cpu-moe)
    n_cpu_moe: int = 0

    def check(self) -> None:
        """Reject settings llama.cpp would refuse or crash on, with the fix in the message."""
        from infer_cli.ggml import KV_CACHE_TYPES, UNQUANTIZED_KV

        for name, value in (("--cache-type-k", self.cache_type_k), ("--cache-type-v", self.cache_type_v)):
            if value not in KV_CACHE_TYPES:
                raise BadOption(name, value, f"one of {', '.join(KV_CACHE_TYPES)}")
        if self.flash_attn not in FLASH_ATTN:
            raise BadOption("--flash-attn", self.flash_attn, "auto, on or off")
        if self.flash_attn == "off" and self.cache_type_v not in UNQUANTIZED_KV:
            raise BadOption("--cache-type-v", self.cache_type_v,
                            "f16 with --flash-attn off (a quantized V cache needs flash attention: "
                            "use --flash-attn auto or on)")
        if self.n_ctx < 8:
            raise BadOption("--ctx", str(self.n_ctx), "at least 8")
        if self.n_ubatch < 1 or self.n_batch < 1:
            raise BadOption("--batch/--ubatch", f"{self.n_batch}/{self.n_ubatch}", "positive sizes")
        if not 1 <= self.n_seq <= 256:
            raise BadOption("--parallel", str(self.n_seq), "between 1 and 256 (llama.cpp's limit)")
        if self.n_cpu_moe < ALL_LAYERS:
            raise BadOption("--n-cpu-moe", str(self.n_cpu_moe), "a number of layers, 0 or more")
        if self.tensor_split and (any(x < 0 for x in self.tensor_split) or not any(self.tensor_split)):
            raise BadOption("--tensor-split", ",".join(f"{x:g}" for x in self.tensor_split),
                            "non-negative shares, not all zero (e.g. 1,1 or 3,1)")

    @property
    def fa(self) -> bool:
        return self.flash_attn != "off"

    @property
    def kv_type_ids(self) -> tuple[int, int]:
        from infer_cli.ggml import type_id

        return type_id(self.cache_type_k), type_id(self.cache_type_v)
