"""Generation through llama.cpp's C API: a model, a context, a decode loop yielding events.

Layers, as in mlx-lm: ``Model`` (weights + vocabulary), ``Session`` (a context: the KV cache and
the tokens in it), ``stream`` (a generator of ``Event``s with timings). The CLI only renders.
The loop calls llama.cpp once per token with preallocated ctypes buffers, so Python costs little
next to the decode itself.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from . import llama_log
from .errors import BadOption, ContextOverflow, ModelLoadFailed, PromptTooLong

# The KV cache types llama.cpp accepts for --cache-type-k/-v (ggml type ids).
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20,
            "q5_0": 6, "q5_1": 7}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


@dataclass(frozen=True)
class EngineOptions:
    """How the model is loaded and the context built. Defaults mirror llama.cpp's tools."""

    n_ctx: int = 4096
    n_batch: int = 2048
    n_ubatch: int = 512
    threads: int | None = None        # None: the physical cores
    threads_batch: int | None = None  # None: same as threads
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    gpu_layers: int = 0
    mlock: bool = False
    mmap: bool = True
    swa_full: bool = False  # llama.cpp's small sliding-window cache unless asked
    warmup: bool = True     # one throw-away decode at load, as llama.cpp's own tools do

    def check(self) -> None:
        """Reject settings llama.cpp would refuse or crash on, with the fix in the message."""
        for name, value in (("--cache-type-k", self.cache_type_k), ("--cache-type-v", self.cache_type_v)):
            if value not in KV_TYPES:
                raise BadOption(name, value, f"one of {', '.join(KV_TYPES)}")
        if self.flash_attn not in FLASH_ATTN:
            raise BadOption("--flash-attn", self.flash_attn, "auto, on or off")
        if self.flash_attn == "off" and self.cache_type_v not in ("f32", "f16", "bf16"):
            raise BadOption("--cache-type-v", self.cache_type_v,
                            "f16 with --flash-attn off (a quantized V cache needs flash attention: "
                            "use --flash-attn auto or on)")
        if self.n_ctx < 8:
            raise BadOption("--ctx", str(self.n_ctx), "at least 8")
        if self.n_ubatch < 1 or self.n_batch < 1:
            raise BadOption("--batch/--ubatch", f"{self.n_batch}/{self.n_ubatch}", "positive sizes")


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's sampler chain: penalties, top-k, top-p, min-p, temperature, then a draw."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = -1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Stats:
    """Honest numbers for one generation. Rates count only work llama.cpp actually did."""

    load_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens whose KV came from a cache, not computed
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    ttft_s: float | None = None
    kv_used: int = 0
    kv_size: int = 0
    kv_bytes: int | None = None
    peak_rss_bytes: int = 0
    prompt_cache: str = "off"     # off | miss | hit
    speculative: dict | None = None  # drafted / accepted / speed-up, when speculating
    notes: list[str] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        computed = self.prompt_tokens - self.cached_tokens
        return computed / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # n tokens sampled need n-1 decodes after the first: the rate llama.cpp reports.
        steps = self.generated_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["prefill_tps"] = self.prefill_tps
        d["decode_tps"] = self.decode_tps
        return d


@dataclass
class Event:
    """A piece of text (possibly empty); the last event has ``finish_reason`` set."""

    text: str
    token: int | None
    stats: Stats
    finish_reason: str | None = None  # stop | length | interrupted


def _prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def load_mode(mmap: bool, mlock: bool) -> int:
    """llama.cpp's llama_load_mode for --no-mmap / --mlock (one enum, no use_mmap flag now)."""
    import llama_cpp as L

    if mmap:
        return L.LLAMA_LOAD_MODE_MMAP_MLOCK if mlock else L.LLAMA_LOAD_MODE_MMAP
    return L.LLAMA_LOAD_MODE_MLOCK if mlock else L.LLAMA_LOAD_MODE_NONE


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


# --- the model ------------------------------------------------------------------------------

class Model:
    """A loaded GGUF: weights and vocabulary. ``close()`` frees it (also on garbage collection)."""

    def __init__(self, path: Path, opts: EngineOptions):
        import llama_cpp as L

        from .gguf_info import read_gguf

        self.L = L
        self.path = Path(path)
        self.info = read_gguf(self.path)  # a bad file gets a clear error, not a native crash
        llama_log.install()
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.n_gpu_layers = opts.gpu_layers
        if not opts.mmap or opts.mlock:  # else llama.cpp's own default (mmap where it can)
            params.load_mode = load_mode(opts.mmap, opts.mlock)
        mark = llama_log.mark()
        t0 = time.perf_counter()
        self.ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ModelLoadFailed(str(path), llama_log.last_error(mark) or "unknown reason")
        self.load_s = time.perf_counter() - t0
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.ptr)
        self.n_swa = L.llama_model_n_swa(self.ptr)
        self._piece = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self.L.llama_token * cap)()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: llama.cpp says how many it needs
            cap = -n
            buf = (self.L.llama_token * cap)()
            n = self.L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (cached: the decode loop asks for the same ones often)."""
        key = token if not special else -1 - token
        cached = self._pieces.get(key)
        if cached is not None:
            return cached
        n = self.L.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = self.L.llama_token_to_piece(self.vocab, token, big, len(big), 0, special)
            out = big.raw[:n]
        else:
            out = self._piece.raw[:n]
        self._pieces[key] = out
        return out

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def token_text(self, token_id: int) -> str:
        return self.piece(token_id, special=True).decode("utf-8", "replace")

    @property
    def bos_text(self) -> str:
        tok = self.L.llama_vocab_bos(self.vocab)
        return self.token_text(tok) if tok >= 0 else ""

    @property
    def eos_text(self) -> str:
        tok = self.L.llama_vocab_eos(self.vocab)
        return self.token_text(tok) if tok >= 0 else ""

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.L.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


# --- the context ----------------------------------------------------------------------------

class Session:
    """A llama.cpp context on one sequence, remembering which tokens its KV cache holds.

    ``prefill`` reuses the longest common prefix with what is already cached, so a chat turn or
    a prompt restored from the prompt cache costs only its new tokens."""

    def __init__(self, model: Model, opts: EngineOptions):
        opts.check()
        L = model.L
        self.L, self.model, self.opts = L, model, opts
        params = L.llama_context_default_params()
        params.n_ctx = opts.n_ctx
        params.n_batch = opts.n_batch
        params.n_ubatch = min(opts.n_ubatch, opts.n_batch)
        threads = opts.threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = opts.threads_batch or threads
        params.type_k = KV_TYPES[opts.cache_type_k]
        params.type_v = KV_TYPES[opts.cache_type_v]
        params.flash_attn_type = FLASH_ATTN[opts.flash_attn]
        params.swa_full = opts.swa_full
        params.no_perf = True
        mark = llama_log.mark()
        self.ptr = L.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise ModelLoadFailed(str(model.path), llama_log.last_error(mark) or "could not create a context")
        log = llama_log.since(mark)
        self.kv_bytes = llama_log.kv_cache_bytes(log)
        self.compute_bytes = llama_log.buffer_bytes(log, "compute")
        self.n_ctx = L.llama_n_ctx(self.ptr)
        self.mem = L.llama_get_memory(self.ptr)
        self.tokens: list[int] = []  # what the KV cache holds, position by position
        self._one = (L.llama_token * 1)()
        self._one_batch = L.llama_batch_get_one(self._one, 1)
        self._batch = None  # llama_batch_init'd on first use by decode_all
        self._batch_cap = 0
        self.can_trim = model.n_swa == 0  # a sliding-window cache forgets; no partial reuse
        if opts.warmup:
            self._warm_up()
        # llama.cpp may lower the batch sizes (never above n_ctx): use what it settled on.
        self.align = min(L.llama_n_ubatch(self.ptr), L.llama_n_batch(self.ptr))

    def _warm_up(self) -> None:
        """Touch every weight once (page faults, CPU repacking, first graph) so that the first
        prompt runs at full speed; llama.cpp's tools do the same before they time anything."""
        bos = self.L.llama_vocab_bos(self.model.vocab)
        self.decode_one(bos if bos >= 0 else 0)
        self.L.llama_synchronize(self.ptr)
        self.clear()

    # KV bookkeeping ------------------------------------------------------------------------

    def clear(self) -> None:
        self.L.llama_memory_clear(self.mem, True)
        self.tokens = []

    def trim(self, n: int) -> bool:
        """Keep the first ``n`` cached tokens; False if this cache cannot drop a tail."""
        if n >= len(self.tokens):
            return True
        if not self.can_trim and n < len(self.tokens):
            return False
        if not self.L.llama_memory_seq_rm(self.mem, 0, n, -1):
            return False
        del self.tokens[n:]
        return True

    # decoding ------------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int]) -> None:
        """Feed ``tokens`` after what is cached; logits of the last one.

        Chunks end on multiples of n_ubatch counted from position 0, so a token's KV is computed
        in the same batch whether the prefix before it came from a cache or not: llama.cpp's
        kernels depend on the batch shape, and this keeps greedy output identical either way."""
        L = self.L
        pos, i = len(self.tokens), 0
        while i < len(tokens):
            n = min(self.align - (pos + i) % self.align, len(tokens) - i)
            chunk = tokens[i:i + n]
            arr = (L.llama_token * n)(*chunk)
            rc = L.llama_decode(self.ptr, L.llama_batch_get_one(arr, n))
            if rc != 0:
                raise ContextOverflow(pos + i + n, self.n_ctx) if rc == 1 \
                    else ModelLoadFailed(str(self.model.path), f"llama_decode returned {rc}")
            self.tokens.extend(chunk)
            i += n

    def decode_one(self, token: int) -> None:
        self._one[0] = token
        rc = self.L.llama_decode(self.ptr, self._one_batch)
        if rc != 0:
            raise ContextOverflow(len(self.tokens) + 1, self.n_ctx)
        self.tokens.append(token)

    def decode_all(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` in one batch with logits at every position (for verification)."""
        L, n = self.L, len(tokens)
        if self._batch is None or self._batch_cap < n:
            if self._batch is not None:
                L.llama_batch_free(self._batch)
            self._batch_cap = max(n, 32)
            self._batch = L.llama_batch_init(self._batch_cap, 0, 1)
        b, pos = self._batch, len(self.tokens)
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1
        b.n_tokens = n
        rc = L.llama_decode(self.ptr, b)
        if rc != 0:
            raise ContextOverflow(pos + n, self.n_ctx)
        self.tokens.extend(tokens)

    def rollback(self, n: int) -> None:
        """Forget every cached token from position ``n`` on.

        Only for the tail the last few decode calls added (rejected drafts): a sliding-window
        cache still holds every cell those positions' windows need, which is not true of an
        arbitrary cut (see ``trim``)."""
        if n < len(self.tokens):
            if not self.L.llama_memory_seq_rm(self.mem, 0, n, -1):
                raise ContextOverflow(n, self.n_ctx)
            del self.tokens[n:]

    def sync(self, tokens: Sequence[int], *, max_rollback: int = 64) -> None:
        """Make the cache hold exactly ``tokens`` (a draft model following its target)."""
        keep = _prefix_len(self.tokens, tokens)
        if keep < len(self.tokens):
            if self.can_trim or len(self.tokens) - keep <= max_rollback:
                self.rollback(keep)
            else:
                self.clear()
                keep = 0
        self.decode(tokens[keep:])

    def top(self, idx: int = -1, k: int = 10) -> tuple[int, float]:
        """The most likely next token at output ``idx`` and its probability among the ``k``
        best (llama.cpp's drafts judge confidence the same way, after a top-10 cut)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ptr, idx),
                                       shape=(self.model.n_vocab,))
        best = int(logits.argmax())
        head = np.partition(logits, -k)[-k:]
        return best, 1.0 / float(np.exp(head - logits[best]).sum())

    def reusable(self, cached: Sequence[int], tokens: Sequence[int], *, aligned: bool = False) -> int:
        """How many leading ``tokens`` a cache holding ``cached`` can serve as they are.

        All of them if ``cached`` covers them, else the common prefix; ``aligned`` rounds that
        down to a chunk boundary (see ``decode``), which a state from the prompt cache needs
        for a warm run to compute exactly what a cold one did. Zero when it would mean
        cutting a sliding-window cache, which cannot drop a tail."""
        common = _prefix_len(cached, tokens)
        keep = common if common == len(tokens) or not aligned else common - common % self.align
        if keep < len(cached) and not self.can_trim:
            return 0
        return keep

    def extend(self, tokens: Sequence[int]) -> int:
        """Make the cache hold exactly ``tokens``, reusing what it can; returns how many it reused."""
        keep = self.reusable(self.tokens, tokens)
        if not self.trim(keep):
            self.clear()
            keep = 0
        self.decode(tokens[keep:])
        return keep

    def prefill(self, tokens: Sequence[int], *, last_alone: bool = False) -> int:
        """The prompt's KV with logits for its last token; returns how many tokens were reused.

        ``last_alone`` gives the last token a decode call of its own, as a prompt restored from
        the prompt cache (which stores the state before it) must: cold and warm runs then
        compute exactly the same thing. Without a cache one call is faster."""
        if not tokens:
            raise PromptTooLong(0, self.n_ctx, "the prompt is empty")
        if not last_alone:
            keep = self.reusable(self.tokens, tokens)
            keep = min(keep, len(tokens) - 1)  # the last token must be decoded for its logits
            if not self.trim(keep):
                self.clear()
                keep = 0
            self.decode(tokens[keep:])
            return keep
        reused = self.extend(tokens[:-1])
        self.decode_one(tokens[-1])
        return reused

    # state, for the prompt cache -----------------------------------------------------------

    def state_bytes(self) -> bytes:
        L = self.L
        size = L.llama_state_seq_get_size(self.ptr, 0)
        buf = (ctypes.c_uint8 * size)()
        written = L.llama_state_seq_get_data(self.ptr, buf, size, 0)
        return bytes(buf[:written])

    def load_state(self, data: bytes, tokens: list[int]) -> bool:
        """Restore a saved sequence; False (and an empty cache) if llama.cpp refuses it."""
        L = self.L
        self.clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if L.llama_state_seq_set_data(self.ptr, buf, len(data), 0) != len(data):
            self.clear()
            return False
        if L.llama_memory_seq_pos_max(self.mem, 0) + 1 != len(tokens):
            self.clear()
            return False
        self.tokens = list(tokens)
        return True

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self.L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ptr", None):
            self.L.llama_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


# --- sampling -------------------------------------------------------------------------------

class Sampler:
    """llama.cpp's native sampler chain, built once per generation."""

    def __init__(self, model: Model, s: Sampling):
        L = model.L
        self.L = L
        # Plain greedy is an argmax: numpy does it on the logits in place, where llama.cpp's
        # chain first copies the whole vocabulary into a candidate list (0.25 ms a token with
        # Gemma's 262k vocabulary, a few percent of decode speed).
        self.argmax = s.greedy and s.repeat_penalty == 1.0
        self.n_vocab = model.n_vocab
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        add = lambda smpl: L.llama_sampler_chain_add(self.ptr, smpl)  # noqa: E731
        if s.repeat_penalty != 1.0:
            add(L.llama_sampler_init_penalties(model.n_vocab, s.repeat_last_n, s.repeat_penalty, 0.0, 0.0))
        if s.greedy:
            add(L.llama_sampler_init_greedy())
            return
        if s.top_k > 0:
            add(L.llama_sampler_init_top_k(s.top_k))
        if 0 < s.top_p < 1:
            add(L.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0:
            add(L.llama_sampler_init_min_p(s.min_p, 1))
        add(L.llama_sampler_init_temp(s.temperature))
        seed = s.seed if s.seed >= 0 else int.from_bytes(os.urandom(4), "little")
        add(L.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, ctx) -> int:
        return self.sample_at(ctx, -1)

    def sample_at(self, ctx, idx: int) -> int:
        """Sample from the logits of output ``idx`` (-1: the last)."""
        if self.argmax:
            import numpy as np

            logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
            return int(logits.argmax())  # the first maximum, as llama.cpp's greedy sampler
        # llama_sampler_sample also accepts the token (penalties see it).
        return self.L.llama_sampler_sample(self.ptr, ctx, idx)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.L.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


# --- stop strings ---------------------------------------------------------------------------

class StopFilter:
    """Holds back text that might be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show now, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return buf[:cut], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --- the generation loop --------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    tokens: tuple[int, ...]
    sampling: Sampling = Sampling()
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def check_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt >= n_ctx:
        raise PromptTooLong(n_prompt, n_ctx)


def truncate(tokens: list[int], n_ctx: int, reserve: int) -> list[int]:
    """Keep the end of a prompt so that it and ``reserve`` new tokens fit the context."""
    keep = max(1, n_ctx - max(reserve, 1))
    return tokens[-keep:] if len(tokens) > keep else tokens


def stream(session: Session, req: Request, *, stats: Stats | None = None,
           prompt_cache=None, speculator=None) -> Iterator[Event]:
    """Prefill ``req.tokens`` (through the prompt cache when given) and yield generated text.

    With a ``speculator`` (see speculative.py) each step may produce several tokens; the text
    is the same either way. Ctrl-C (KeyboardInterrupt) ends the stream with finish reason
    ``interrupted``; reaching ``max_tokens`` or the context size ends it with ``length``."""
    stats = stats or Stats()
    model = session.model
    tokens = list(req.tokens)
    stats.prompt_tokens = len(tokens)
    stats.kv_size = session.n_ctx
    stats.kv_bytes = session.kv_bytes
    check_fits(len(tokens), session.n_ctx)
    t0 = time.perf_counter()
    sampler = Sampler(model, req.sampling)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    stopper = StopFilter(req.stop)
    finish = None
    try:
        if prompt_cache is None:
            stats.cached_tokens = session.prefill(tokens)
        else:
            # The cache keeps the state *before* the last prompt token: a later run restores it
            # and decodes that one token for its logits, as `prefill(last_alone=True)` does.
            head = tokens[:-1]
            stats.prompt_cache = prompt_cache.restore(session, head, stats.notes)
            stats.cached_tokens = session.extend(head)
            if stats.cached_tokens < len(head):
                prompt_cache.save(session)
            session.decode_one(tokens[-1])
        if speculator is not None:
            speculator.reproducible = not req.sampling.greedy and req.sampling.seed >= 0
            speculator.prepare(tokens)
        stats.prefill_s = time.perf_counter() - t0
        pending = [sampler.sample(session.ptr)]
        t_first = time.perf_counter()
        stats.ttft_s = t_first - t0
        if speculator is not None:
            speculator.on_tokens(pending)
        while finish is None:
            for tok in pending:
                if model.is_eog(tok) and not req.ignore_eos:
                    finish = "stop"
                    break
                stats.generated_tokens += 1
                text, stopped = stopper.feed(decoder.decode(model.piece(tok)))
                if text:
                    yield Event(text, tok, stats)
                if stopped:
                    finish = "stop"
                elif stats.generated_tokens >= req.max_tokens:
                    finish = "length"
                elif len(session.tokens) >= session.n_ctx:
                    finish = "length"
                    stats.notes.append(f"the context is full ({session.n_ctx} tokens); --ctx raises it")
                if finish:
                    break
            stats.decode_s = time.perf_counter() - t_first
            if finish:
                break
            last = pending[-1]
            if speculator is None:
                session.decode_one(last)
                pending = [sampler.sample(session.ptr)]
            else:
                budget = min(req.max_tokens - stats.generated_tokens,
                             session.n_ctx - len(session.tokens) - 1)
                pending = speculator.step(session, sampler, last, budget)
                speculator.on_tokens(pending)
    except KeyboardInterrupt:
        finish = "interrupted"
    finally:
        sampler.close()
    if finish != "stop":
        tail = stopper.flush() + decoder.decode(b"", final=True)
    else:
        tail = ""
    stats.kv_used = len(session.tokens)
    stats.peak_rss_bytes = peak_rss()
    if speculator is not None:
        stats.speculative = speculator.stats.as_dict()
        if speculator.stats.switched_off:
            stats.notes.append(speculator.stats.switched_off)
    yield Event(tail, None, stats, finish)
