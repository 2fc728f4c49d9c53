"""A llama.cpp context: the KV cache of one sequence and the tokens it holds."""

from __future__ import annotations

import ctypes
from typing import Sequence

from infer_cli.engine.model import Model, default_threads
from infer_cli.errors import ContextOverflow, ModelLoadFailed, PromptTooLong
from infer_cli.engine import llama_log
from infer_cli.options import FLASH_ATTN, Options


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Context:
    """A llama.cpp context: the KV cache (``opts.n_seq`` sequences in one unified pool), the
    thread pool and the compute buffers. Sequences are used through ``Session``s (one here) or
    the batching ``Scheduler``."""

    def __init__(self, model: Model, opts: Options):
        opts.check()
        L = model.L
        self.L, self.model, self.opts = L, model, opts
        params = L.llama_context_default_params()
        params.n_ctx = opts.n_ctx
        params.n_batch = opts.n_batch
        params.n_ubatch = min(opts.n_ubatch, opts.n_batch)
        params.n_seq_max = opts.n_seq
        # several sequences share one pool, each free to use any cell (a long prompt beside short
        # ones); a lone sequence keeps llama.cpp's default layout
        params.kv_unified = opts.n_seq > 1
        threads = opts.threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = opts.threads_batch or threads
        params.type_k, params.type_v = opts.kv_type_ids
        params.flash_attn_type = FLASH_ATTN[opts.flash_attn]
        params.swa_full = opts.swa_full
        params.no_perf = True
        mark = llama_log.mark()
        self.ptr = L.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise ModelLoadFailed(str(model.path), llama_log.last_error(mark) or "could not create a context")
        # llama.cpp reports its buffer sizes only in its log (no API returns them).
        log = llama_log.since(mark)
        self.kv_bytes = llama_log.kv_cache_bytes(log)
        self.compute_bytes = llama_log.buffer_bytes(log, "compute")
        self.n_ctx = L.llama_n_ctx(self.ptr)
        self.n_seq = opts.n_seq
        self.mem = L.llama_get_memory(self.ptr)
        # llama.cpp may lower the batch sizes (never above n_ctx): use what it settled on.
        self.n_batch = L.llama_n_batch(self.ptr)
        self.align = min(L.llama_n_ubatch(self.ptr), self.n_batch)

    def warm_up(self) -> None:
        """Touch every weight once (page faults, CPU repacking, first graph) so that the first
        prompt runs at full speed; llama.cpp's tools do the same before they time anything."""
        L = self.L
        bos = L.llama_vocab_bos(self.model.vocab)
        one = (L.llama_token * 1)(bos if bos >= 0 else 0)
        L.llama_decode(self.ptr, L.llama_batch_get_one(one, 1))
        L.llama_synchronize(self.ptr)
        L.llama_memory_clear(self.mem, True)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            self.L.llama_free(self.ptr)
            self.ptr = None

    def __del__(self):
        # A Ctrl-C landing while the interpreter finalizes objects must not print a traceback.
        try:
            self.close()
        except KeyboardInterrupt:
            pass


class Session:
    """One sequence of a llama.cpp context, remembering which tokens its KV cache holds.

    ``prefill`` reuses the longest common prefix with what is already cached, so a chat turn or
    a prompt restored from the prompt cache costs only its new tokens. Without a ``context``
    the session makes (and owns) a context of its own."""

    def __init__(self, model: Model, opts: Options, *, context: Context | None = None, seq: int = 0):
        owns = context is None
        c = context or Context(model, opts)  # may raise: nothing is owned yet
        self.owns_context, self.context = owns, c
        L = model.L
        self.L, self.model, self.opts, self.seq = L, model, c.opts, seq
        self.ptr, self.mem, self.n_ctx, self.align = c.ptr, c.mem, c.n_ctx, c.align
        self.kv_bytes, self.compute_bytes = c.kv_bytes, c.compute_bytes
        self.tokens: list[int] = []  # what the KV cache holds, position by position
        self._one = (L.llama_token * 1)()
        # A lone sequence 0 takes llama.cpp's own one-token batch (no per-token struct filling).
        self._one_batch = L.llama_batch_get_one(self._one, 1) if seq == 0 else None
        self._batch = None  # llama_batch_init'd on first use
        self._batch_cap = 0
        self.can_trim = model.n_swa == 0  # a sliding-window cache forgets; no partial reuse
        self.scheduler = None  # the batching scheduler plain generation runs through, made on first use
        if self.owns_context and opts.warmup:
            c.warm_up()

    # KV bookkeeping ------------------------------------------------------------------------

    def clear(self) -> None:
        if self.owns_context:
            self.L.llama_memory_clear(self.mem, True)
        else:
            self.L.llama_memory_seq_rm(self.mem, self.seq, -1, -1)  # a whole sequence always goes
        self.tokens = []

    def trim(self, n: int) -> bool:
        """Keep the first ``n`` cached tokens; False if this cache cannot drop a tail."""
        if n >= len(self.tokens):
            return True
        if not self.can_trim and n < len(self.tokens):
            return False
        if not self.L.llama_memory_seq_rm(self.mem, self.seq, n, -1):
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
            if self._one_batch is not None:
                arr = (L.llama_token * n)(*chunk)
                rc = L.llama_decode(self.ptr, L.llama_batch_get_one(arr, n))
            else:
                rc = L.llama_decode(self.ptr, self._fill(chunk, pos + i, all_logits=False))
            if rc != 0:
                raise ContextOverflow(pos + i + n, self.n_ctx) if rc == 1 \
                    else ModelLoadFailed(str(self.model.path), f"llama_decode returned {rc}")
            self.tokens.extend(chunk)
            i += n

    def decode_one(self, token: int) -> None:
        if self._one_batch is not None:
            self._one[0] = token
            rc = self.L.llama_decode(self.ptr, self._one_batch)
        else:
            rc = self.L.llama_decode(self.ptr, self._fill((token,), len(self.tokens), all_logits=False))
        if rc != 0:
            raise ContextOverflow(len(self.tokens) + 1, self.n_ctx)
        self.tokens.append(token)

    def decode_all(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` in one batch with logits at every position (for verification)."""
        n, pos = len(tokens), len(self.tokens)
        rc = self.L.llama_decode(self.ptr, self._fill(tokens, pos, all_logits=True))
        if rc != 0:
            raise ContextOverflow(pos + n, self.n_ctx)
        self.tokens.extend(tokens)

    def _fill(self, tokens: Sequence[int], pos: int, *, all_logits: bool):
        """This sequence's ``tokens`` from position ``pos`` in the session's reusable batch,
        with logits for every token or only the last."""
        L, n = self.L, len(tokens)
        if self._batch is None or self._batch_cap < n:
            if self._batch is not None:
                L.llama_batch_free(self._batch)
            self._batch_cap = max(n, 32)
            self._batch = L.llama_batch_init(self._batch_cap, 0, 1)
        b, seq = self._batch, self.seq
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = all_logits
        b.logits[n - 1] = 1
        b.n_tokens = n
        return b

    def rollback(self, n: int) -> None:
        """Forget every cached token from position ``n`` on.

        Only for the tail the last few decode calls added (rejected drafts): a sliding-window
        cache still holds every cell those positions' windows need, which is not true of an
        arbitrary cut (see ``trim``)."""
        if n < len(self.tokens):
            if not self.L.llama_memory_seq_rm(self.mem, self.seq, n, -1):
                raise ContextOverflow(n, self.n_ctx)
            del self.tokens[n:]

    def sync(self, tokens: Sequence[int], *, max_rollback: int = 64) -> int:
        """Make the cache hold exactly ``tokens`` (a draft model following its target);
        returns how many of them it decoded."""
        keep = common_prefix(self.tokens, tokens)
        if keep < len(self.tokens):
            if self.can_trim or len(self.tokens) - keep <= max_rollback:
                self.rollback(keep)
            else:
                self.clear()
                keep = 0
        self.decode(tokens[keep:])
        return len(tokens) - keep

    def top(self, idx: int = -1, k: int = 10) -> tuple[int, float]:
        """The most likely next token at output ``idx`` and its probability among the ``k``
        best (llama.cpp's drafts judge confidence the same way, after a top-10 cut)."""
        import numpy as np

        from infer_cli.engine.sampling import logits_row

        logits = logits_row(self.L, self.ptr, idx, self.model.n_vocab)
        best = int(logits.argmax())
        head = np.partition(logits, -k)[-k:]
        return best, 1.0 / float(np.exp(head - logits[best]).sum())

    def reusable(self, cached: Sequence[int], tokens: Sequence[int], *, aligned: bool = False) -> int:
        """How many leading ``tokens`` a cache holding ``cached`` can serve as they are.

        All of them if ``cached`` covers them, else the common prefix; ``aligned`` rounds that
        down to a chunk boundary (see ``decode``), which a state from the prompt cache needs
        for a warm run to compute exactly what a cold one did. Zero when it would mean
        cutting a sliding-window cache, which cannot drop a tail."""
        common = common_prefix(cached, tokens)
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
        size = L.llama_state_seq_get_size(self.ptr, self.seq)
        buf = (ctypes.c_uint8 * size)()
        written = L.llama_state_seq_get_data(self.ptr, buf, size, self.seq)
        return bytes(buf[:written])

    def load_state(self, data: bytes, tokens: list[int]) -> bool:
        """Restore a saved sequence; False (and an empty cache) if llama.cpp refuses it."""
        L = self.L
        self.clear()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if L.llama_state_seq_set_data(self.ptr, buf, len(data), self.seq) != len(data):
            self.clear()
            return False
        if L.llama_memory_seq_pos_max(self.mem, self.seq) + 1 != len(tokens):
            self.clear()
            return False
        self.tokens = list(tokens)
        return True

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self.L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.close()
            self.scheduler = None
        if getattr(self, "owns_context", False):
            self.context.close()
        self.ptr = None

    def __del__(self):
        # A Ctrl-C landing while the interpreter finalizes objects must not print a traceback.
        try:
            self.close()
        except KeyboardInterrupt:
            pass
