"""What a command does with a model: load it (with its draft and prompt cache) from one read of
its header, settle the context and GPU layers from the plan, and answer a conversation.

``infer run`` renders what ``Runner.answer`` yields; the batching engine (``scheduler``) serves
many sequences from the same pieces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from infer_cli.engine import generate
from infer_cli.engine.chat import Conversation
from infer_cli.engine.context import Session
from infer_cli.engine.model import Model
from infer_cli.engine.sampling import Sampling
from infer_cli.options import Options, default_context


@dataclass(frozen=True)
class SpecSettings:
    draft: object | None      # a store.Resolved draft model, or None
    lookup: bool
    draft_max: int = 16
    p_min: float = 0.5


@dataclass(frozen=True)
class RunSettings:
    system: str | None
    raw: bool
    max_tokens: int
    stop: tuple[str, ...]
    ignore_eos: bool
    truncate: bool
    prompt_cache: bool
    sampling: Sampling
    spec: SpecSettings | None = None


def read_header(resolved):
    """The GGUF header of a resolved model (every shard of a split one): read once per command."""
    from infer_cli.models.gguf_info import read_gguf, read_split

    if len(resolved.paths) == 1:
        return read_gguf(resolved.path)
    return read_split([str(p) for p in resolved.paths])


def settle(opts: Options, info, entry=None, *, draft_info=None) -> Options:
    """``opts`` with the context (0: models.toml's, else the model's default) and the GPU layers
    (None: as many as the memory plan puts on the GPU; none on a CPU-only build) decided."""
    if not opts.n_ctx:
        opts = replace(opts, n_ctx=default_context(info.context_length, entry.context if entry else None))
    opts = with_rpc(opts, entry)
    if opts.tensor_split and not opts.rpc:
        from infer_cli.errors import BadOption

        raise BadOption("--tensor-split", ",".join(f"{x:g}" for x in opts.tensor_split),
                        "--rpc as well (the shares are per worker device)")
    if opts.rpc:
        opts = settle_rpc(opts, info)
    elif opts.gpu_layers is None:
        import llama_cpp

        from infer_cli.engine.binding import gpu_offload
        from infer_cli.plan import hardware

        layers = 0
        if gpu_offload(llama_cpp):  # not for an RPC backend alone
            from infer_cli.plan import fit

            layers = fit.plan(info, hardware.detect().hardware(), opts, draft=draft_info).gpu_layers
        opts = replace(opts, gpu_layers=layers)
    opts.check()
    return opts


def with_rpc(opts: Options, entry) -> Options:
    """``opts`` with the workers models.toml names for the model (``rpc = [...]``) when none
    were given (--rpc, INFER_RPC)."""
    if not opts.rpc and entry is not None and getattr(entry, "rpc", ()):
        return replace(opts, rpc=tuple(entry.rpc))
    return opts


def settle_rpc(opts: Options, info) -> Options:
    """With RPC workers: probe each (a typed error names one that is unreachable, busy or of
    another version), plan the split over their devices against the memory they report, and
    refuse a worker that cannot hold its layers; ``opts`` then carries the planned GPU layers
    and the shares, so that llama.cpp places exactly what was planned."""
    from infer_cli.engine import rpc
    from infer_cli.errors import DoesNotFit, WorkerTooSmall
    from infer_cli.plan import hardware, rpc_fit

    devices = rpc_fit.devices_of(rpc.probe_all(opts.rpc))
    p = rpc_fit.plan(info, devices, hardware.detect(llama=False).hardware(), opts)
    for d in p.devices:
        if not d.fits:
            raise WorkerTooSmall(d.device.endpoint, d.device.name, d.layers, d.memory.total,
                                 d.budget, d.device.free)
    if not p.cpu_fits:
        raise DoesNotFit(opts.n_ctx, opts.n_seq, p.cpu.total, p.cpu_budget, 0)
    return replace(opts, gpu_layers=p.gpu_layers, tensor_split=tuple(p.split))


def sampling_for(entry, seed: int, given: dict) -> Sampling:
    """Sampling from the model's models.toml defaults, overridden by what was given."""
    defaults = entry.sampling if entry else {}
    return Sampling(seed=seed, **{**defaults, **given})


class Runner:
    """A loaded model with its session, conversation and prompt cache."""

    def __init__(self, resolved, opts: Options, settings: RunSettings, *, info=None):
        t0 = time.perf_counter()
        info = info if info is not None else read_header(resolved)
        spec = settings.spec
        draft_info = read_header(spec.draft) if spec and spec.draft else None
        self.opts = opts = settle(opts, info, resolved.entry, draft_info=draft_info)
        if not opts.rpc:  # settle() planned the workers and the local CPU
            check_fits_memory(info, opts, draft=draft_info)
        self.model = Model(resolved.path, opts, info=info)
        self.session = Session(self.model, opts)
        self.load_s = time.perf_counter() - t0
        self.settings = settings
        template = None if settings.raw else info.chat_template
        self.conversation = Conversation(template, settings.system, bos=self.model.bos_text,
                                         eos=self.model.eos_text)
        self.notes: list[str] = []
        if template is None and not settings.raw:
            self.notes.append("this model has no chat template: plain completion")
        self.draft_model = self.draft_session = None
        if draft_info is not None:
            from infer_cli.engine.speculative import check_compatible

            self.draft_model = Model(spec.draft.path, opts, info=draft_info)
            check_compatible(self.model, self.draft_model)
            self.draft_session = Session(self.draft_model, opts)
            self.load_s = time.perf_counter() - t0
        self.cache = None
        if settings.prompt_cache:
            from infer_cli.engine.prompt_cache import PromptCache, model_identity

            ident = model_identity(resolved.path, info.data_offset)
            kv = {"n_ctx": self.session.n_ctx, "type_k": opts.cache_type_k,
                  "type_v": opts.cache_type_v, "flash_attn": opts.flash_attn,
                  "swa_full": opts.swa_full}
            self.cache = PromptCache(resolved.path, ident, kv)

    def tokens_for(self, text: str) -> list[int]:
        return prompt_tokens(self.model, text, templated=self.conversation.template is not None)

    def answer(self, user_text: str):
        """Add a user turn and stream the reply: yields engine events."""
        conv = self.conversation
        conv.add("user", user_text)
        tokens = self.tokens_for(conv.prompt())
        n_ctx = self.session.n_ctx
        if len(tokens) >= n_ctx:
            if not self.settings.truncate:
                conv.messages.pop()
                generate.check_fits(len(tokens), n_ctx)
            reserve = self.settings.max_tokens if self.settings.max_tokens > 0 else n_ctx // 4
            tokens = generate.truncate(tokens, n_ctx, min(reserve, n_ctx // 2))
            self.notes.append(f"the prompt was cut to its last {len(tokens)} tokens (--truncate)")
        s = self.settings
        req = generate.Request(tuple(tokens), s.sampling,
                               s.max_tokens if s.max_tokens > 0 else n_ctx, s.stop, s.ignore_eos)
        stats = generate.Stats(load_s=self.load_s, notes=self.notes)
        parts = []
        for event in generate.stream(self.session, req, stats=stats, prompt_cache=self.cache,
                                     speculator=self._speculator()):
            parts.append(event.text)
            yield event
        conv.add("assistant", "".join(parts))
        self.notes = []
        self.load_s = 0.0  # paid once

    def _speculator(self):
        """A fresh speculator per answer (its statistics are per answer)."""
        spec = self.settings.spec
        if spec is None:
            return None
        from infer_cli.engine import speculative

        if spec.lookup:
            return speculative.PromptLookup(draft_max=spec.draft_max,
                                            stats=speculative.SpecStats("lookup", draft_max=spec.draft_max))
        return speculative.DraftModel(draft_max=spec.draft_max, p_min=spec.p_min,
                                      draft_session=self.draft_session,
                                      stats=speculative.SpecStats("draft", draft_max=spec.draft_max))


def prompt_tokens(model: Model, text: str, *, templated: bool) -> list[int]:
    """Token ids of a rendered prompt. A template that writes the BOS itself must not get a
    second one from the tokenizer."""
    bos = model.bos_text
    add_special = not (templated and bos and text.startswith(bos))
    return model.tokenize(text, add_special=add_special, parse_special=True)


class BatchEngine:
    """A model, one context of ``opts.n_seq`` sequences and its scheduler: what `infer batch`
    and `infer serve` run on."""

    def __init__(self, model: Model, context, scheduler, template: str | None, notes: list[str]):
        self.model, self.context, self.scheduler = model, context, scheduler
        self.template, self.notes = template, notes

    @classmethod
    def load(cls, resolved, opts: Options, *, share_prefixes: bool = True, keep_idle: bool = False,
             info=None) -> "BatchEngine":
        from infer_cli.engine.context import Context
        from infer_cli.engine.scheduler import Scheduler

        info = info if info is not None else read_header(resolved)
        opts = settle(opts, info, resolved.entry)
        if not opts.rpc:  # settle() planned the workers and the local CPU
            check_fits_memory(info, opts)
        model = Model(resolved.path, opts, info=info)
        context = Context(model, opts)
        if opts.warmup:
            context.warm_up()
        notes = [] if info.chat_template else ["this model has no chat template: plain completion"]
        return cls(model, context, Scheduler(model, context, share_prefixes=share_prefixes,
                                                keep_idle=keep_idle),
                   info.chat_template, notes)

    def close(self) -> None:
        self.scheduler.close()
        self.context.close()
        self.model.close()


def check_fits_memory(info, opts: Options, *, draft=None) -> None:
    """Refuse, before anything is loaded, a model (with its draft), context and sequence count
    this machine cannot hold, with the numbers and the largest context that would fit: llama.cpp
    itself would allocate until the kernel killed the process."""
    from infer_cli.errors import DoesNotFit
    from infer_cli.plan import fit, hardware

    hw = hardware.detect(llama=False).hardware()
    plan = fit.plan(info, hw, opts, draft=draft)
    if plan.fits:
        return
    largest = fit.largest_context(info, hw, replace(opts, gpu_layers=None), draft=draft)
    raise DoesNotFit(opts.n_ctx, opts.n_seq, plan.total, hw.ram + hw.vram, largest)
