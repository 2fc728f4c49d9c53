"""Continuous batching: many sequences in one llama.cpp context, one ``llama_batch`` per step.

As in llama-server and nano-vllm: sequences wait in a queue and run in slots (llama.cpp
sequence ids sharing one unified KV pool). Each ``step``:

1. ``_admit``: waiting sequences take free slots; one whose prompt starts like another's
   (a system prompt, few-shot examples, a document with many questions) gets that prefix's KV
   copied (``llama_memory_seq_cp``) instead of computing it, waiting for the donor to reach it
   if need be;
2. ``_build``: the next token of every generating sequence first, then prompt chunks of the
   others up to the batch budget, so a long prompt never stalls the ones already generating;
3. one ``llama_decode``; on a full KV cache the prompt chunks are dropped, then the newest
   sequence is preempted (its cells freed, recomputed later);
4. ``_postprocess``: each sequence samples from its own row of logits with its own sampler
   chain; a finished or cancelled sequence frees its cells at once and its slot is free for
   the next step.

With ``keep_idle`` (the server) a finished sequence's KV is kept as a prompt cache, as
llama-server keeps its slots': the next request whose prompt shares a prefix with a cached one
(a system prompt, the earlier turns of a chat) gets that KV back and computes only the rest.
The cache lives in host memory, copied out of the pool when the sequence ends
(``llama_state_seq_get_data``) and into a free slot when a prompt reuses it: in llama.cpp's
unified pool every decoded token attends over the span of all cells in use, so cells left in
the pool would slow every step of the sequences that run (SmolLM2-135M decoding alone beside
4,500 idle cells: 8% slower). It holds at most as many tokens as the context and a quarter of
the memory free when it was made; the least recently used entry goes first.

Two exceptions keep the cache in the pool, in the slot where the sequence ran, until a batch
needs the cells (the least recently used goes first): a sliding-window model (Gemma 2 and 3,
gpt-oss), of whose sequences llama.cpp saves only the window, so that a prefix shorter than the
whole entry could not be restored (only its few full-attention layers pay for the span); and a
pool on RPC workers, whose KV would cross the network out and back for every request.

Not thread-safe: one thread calls ``submit``, ``cancel`` and ``step`` (the server runs this loop
in its own thread and hands requests over through a queue).
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from infer_cli.engine.context import Context, common_prefix
from infer_cli.engine.model import Model
from infer_cli.engine.sampling import Sampler
from infer_cli.engine.sequence import Request, Sequence, Status, token_logprobs
from infer_cli.errors import ModelLoadFailed

MIN_SHARED_PREFIX = 16  # shorter common prefixes are cheaper to compute than to wait for
                        # (or to restore from the prompt cache)


@dataclass
class Saved:
    """A finished sequence's KV in the prompt cache: the tokens it holds and, out of the pool,
    llama.cpp's bytes (none while it is still in its slot)."""

    tokens: list[int]
    state: Any = None  # a ctypes byte array
    size: int = 0


@dataclass
class StepStats:
    steps: int = 0
    decoded_tokens: int = 0     # tokens llama.cpp computed (prompt chunks + generated)
    prompt_tokens: int = 0      # of which prompt (or recomputed) tokens
    shared_tokens: int = 0      # prompt tokens copied from another sequence instead
    preempted: int = 0
    decode_s: float = 0.0       # inside llama_decode
    step_s: float = 0.0         # whole steps: decode + sampling + bookkeeping


class Scheduler:
    """Runs ``Sequence``s on ``context`` (``context.n_seq`` slots)."""

    def __init__(self, model: Model, context: Context, *, share_prefixes: bool = True,
                 keep_idle: bool = False):
        L = model.L
        self.L, self.model, self.ctx = L, model, context
        self.n_ctx, self.n_batch = context.n_ctx, context.n_batch
        self.share_prefixes = share_prefixes
        self.keep_idle = keep_idle and share_prefixes
        # A sliding-window cache forgets old positions: a prefix can only be copied from a
        # donor whose cache ends exactly where the prefix does.
        self.exact_share = model.n_swa > 0
        # the prompt cache (see the module's docstring), least recently used first: by slot
        # while it stays in the pool, else by number
        self.idle: dict[int, Saved] = {}
        self.in_pool = self.exact_share or model.rpc is not None
        self._keys = itertools.count()
        self.idle_bytes_cap = _idle_bytes_cap() if self.keep_idle else 0  # not for run or batch
        self.free_slots = list(range(context.n_seq - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = StepStats()
        self._cap = max(self.n_batch, context.n_seq)
        self._batch = L.llama_batch_init(self._cap, 0, 1)

    # the client's side -----------------------------------------------------------------------

    def submit(self, req: Request, ident: Any = None, on_text: Callable | None = None) -> Sequence:
        seq = Sequence(req, ident, on_text)
        if not req.tokens:
            seq.finish("error", "the prompt is empty")
        elif len(req.tokens) >= self.n_ctx:
            seq.finish("error", f"the prompt is {len(req.tokens)} tokens but the context holds "
                                f"{self.n_ctx}")
        else:
            self.waiting.append(seq)
        return seq

    def adopt(self, req: Request, slot: int, n_cached: int, *, on_text: Callable | None = None) -> Sequence:
        """A sequence whose slot already holds the KV of ``req.tokens[:n_cached]`` (computed by a
        ``Session``: a prompt restored from the prompt cache, or a chat's earlier turns). It runs
        from there and leaves its cells in place when it ends, for the session's next turn."""
        seq = Sequence(req, on_text=on_text)
        if slot not in self.free_slots:
            raise ValueError(f"slot {slot} is in use")
        self.free_slots.remove(slot)
        if self.in_pool:
            self.idle.pop(slot, None)
        seq.slot, seq.n_computed, seq.keep_cache = slot, n_cached, True
        seq.status = Status.RUNNING
        seq.timings.started = seq.timings.submitted
        seq.sampler = Sampler(self.model, req.sampling)
        self.running.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the next step boundary (now, if it has no slot yet)."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.finish("cancelled")
        elif seq.status is Status.RUNNING:
            self._release(seq, "cancelled")

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_used(self) -> int:
        """Cells in use, counting a shared prefix once per sequence (an upper bound)."""
        return sum(s.n_computed for s in self.running)

    @property
    def kv_cached(self) -> int:
        """Tokens whose KV the prompt cache holds."""
        return sum(len(e.tokens) for e in self.idle.values())

    @property
    def idle_bytes(self) -> int:
        """Host memory the prompt cache holds."""
        return sum(e.size for e in self.idle.values())

    def drop_idle(self) -> None:
        """Empty the prompt cache."""
        while self.idle:
            self._drop_oldest_idle()

    def run(self) -> None:
        while self.busy:
            self.step()

    # one step --------------------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """One batch through llama.cpp; returns the sequences that sampled a token or finished."""
        t0 = time.perf_counter()
        self._admit()
        rows = self._build()
        touched: list[Sequence] = []
        if rows:
            td = time.perf_counter()
            rc = self.L.llama_decode(self.ctx.ptr, self._batch)
            while rc == 1:  # no KV cells left for this batch: idle caches in the pool go first
                if self.in_pool and self.idle:
                    self._drop_oldest_idle()
                else:
                    rows = self._shrink(rows)
                    if not rows:
                        break
                rc = self.L.llama_decode(self.ctx.ptr, self._batch)
            self.stats.decode_s += time.perf_counter() - td
            if rc not in (0, 1):
                for seq, _, _ in rows:
                    self._release(seq, "error", f"llama_decode returned {rc}")
                raise ModelLoadFailed(str(self.model.path), f"llama_decode returned {rc}")
            touched = self._postprocess(rows)
        self.stats.steps += 1
        self.stats.step_s += time.perf_counter() - t0
        return touched

    def _admit(self) -> None:
        for seq in [s for s in self.running if s.cancel_requested]:
            self._release(seq, "cancelled")
        for seq in [s for s in self.waiting if s.cancel_requested]:
            self.waiting.remove(seq)
            seq.finish("cancelled")
        for seq in [s for s in self.running if s.wait_for is not None]:
            self._try_share(seq)
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self._pick_slot(seq)
            seq.status = Status.RUNNING
            seq.timings.started = seq.timings.started or time.perf_counter()
            if seq.sampler is None:
                seq.sampler = Sampler(self.model, seq.req.sampling)
            self.running.append(seq)
            if self.share_prefixes and seq.n_computed == 0 and seq.req.reuse_prefix:
                self._find_donor(seq)

    def _pick_slot(self, seq: Sequence) -> int:
        """A free slot for ``seq``, holding the KV of the longest prefix of its prompt that the
        prompt cache has (restored into it, cut where the prompt goes another way). The cache
        keeps its copy for whoever comes next (the owner of another conversation that shares a
        system prompt); a chat's next turn, which holds all of it, replaces it when it ends."""
        if self.in_pool:
            return self._pick_pool_slot(seq)
        slot = self.free_slots.pop()
        if not self.idle or not seq.req.reuse_prefix:
            return slot
        limit = len(seq.tokens) - 1  # the last token is computed for its logits
        best, best_n = None, 0
        for key, saved in self.idle.items():
            n = common_prefix(seq.tokens[:limit], saved.tokens)
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < MIN_SHARED_PREFIX:
            return slot
        saved = self.idle.pop(best)
        self.idle[best] = saved  # the most recently used now
        mem = self.ctx.mem
        if self.L.llama_state_seq_set_data(self.ctx.ptr, saved.state, saved.size, slot) == saved.size \
                and (best_n == len(saved.tokens) or self.L.llama_memory_seq_rm(mem, slot, best_n, -1)):
            self._reused(seq, best_n)
        else:  # no room for it in the pool: computed in full
            self.L.llama_memory_seq_rm(mem, slot, -1, -1)
        return slot

    def _pick_pool_slot(self, seq: Sequence) -> int:
        """``_pick_slot`` where the cache stays in the pool: the slot whose cache shares most
        with the prompt is taken over (its cells past the common prefix dropped) when most of
        what it holds is that prefix (a chat's next turn). Otherwise its history (another
        conversation's) is left to its owner: ``seq`` gets an empty slot, else the least
        recently used other one, and the prefix is copied there, which in a unified cache shares
        the cells rather than copying them."""
        if not self.idle:
            return self.free_slots.pop()
        best, best_n = -1, 0
        if seq.req.reuse_prefix:
            limit = len(seq.tokens) - 1  # the last token is computed for its logits
            for slot, saved in self.idle.items():
                n = common_prefix(seq.tokens[:limit], saved.tokens)
                if n > best_n:
                    best, best_n = slot, n
        others = [s for s in self.free_slots if s not in self.idle] \
            or [s for s in reversed(self.idle) if s != best]  # least recently used last
        if best >= 0 and (not others or 2 * best_n >= len(self.idle[best].tokens)):
            self.free_slots.remove(best)
            cached = self.idle.pop(best).tokens
            if self._usable(best, best_n) and (
                    best_n == len(cached)
                    or self.L.llama_memory_seq_rm(self.ctx.mem, best, best_n, -1)):
                self._reused(seq, best_n)
            else:
                self.L.llama_memory_seq_rm(self.ctx.mem, best, -1, -1)
            return best
        slot = others[-1]
        self.free_slots.remove(slot)
        if self.idle.pop(slot, None) is not None:
            self.L.llama_memory_seq_rm(self.ctx.mem, slot, -1, -1)
        if best >= 0 and self._usable(best, best_n):
            self.L.llama_memory_seq_cp(self.ctx.mem, best, slot, 0, best_n)
            self._reused(seq, best_n)
        return slot

    def _usable(self, slot: int, n: int) -> bool:
        """Whether ``slot``'s cells up to ``n`` can be continued from: a sliding-window cache
        has dropped old positions, and the next token must still see a full window."""
        if not self.exact_share:
            return True
        return self.L.llama_memory_seq_pos_min(self.ctx.mem, slot) <= max(0, n - self.model.n_swa)

    def _reused(self, seq: Sequence, n: int) -> None:
        seq.n_computed = n
        seq.cached_tokens = min(n, seq.n_prompt)
        self.stats.shared_tokens += n

    def _drop_oldest_idle(self) -> None:
        key = next(iter(self.idle))
        del self.idle[key]
        if self.in_pool:
            self.L.llama_memory_seq_rm(self.ctx.mem, key, -1, -1)

    def _save(self, slot: int, tokens: list[int]) -> None:
        """Copy ``slot``'s KV (``tokens``) into the prompt cache, in place of any entry it holds
        whole (the same chat a turn ago); past the caps, the least recently used entries go."""
        for key, saved in list(self.idle.items()):
            if common_prefix(tokens, saved.tokens) == len(saved.tokens):
                del self.idle[key]
        size = self.L.llama_state_seq_get_size(self.ctx.ptr, slot)
        if not 0 < size <= self.idle_bytes_cap or len(tokens) > self.n_ctx:
            return
        # Its own anonymous mapping, unmapped when the entry goes: from malloc, buffers of a few
        # MiB that come and go would leave the heap grown (glibc raises its mmap threshold
        # after each such free), 90 MiB after 2,000 requests of stress_serve.py.
        state = (ctypes.c_uint8 * size).from_buffer(mmap.mmap(-1, size))
        got = self.L.llama_state_seq_get_data(self.ctx.ptr, state, size, slot)
        if got <= 0:
            return
        self.idle[next(self._keys)] = Saved(tokens, state, got)
        while self.kv_cached > self.n_ctx or self.idle_bytes > self.idle_bytes_cap:
            self._drop_oldest_idle()

    def _find_donor(self, seq: Sequence) -> None:
        best, best_len = None, 0
        limit = seq.n_prompt - 1  # the last prompt token is computed for its logits
        for other in self.running:
            if other is seq or other.wait_for is not None:
                continue
            n = common_prefix(seq.tokens[:limit], other.tokens)
            if n > best_len:
                best, best_len = other, n
        if best is None or best_len < MIN_SHARED_PREFIX:
            return
        if best.n_computed > best_len and self.exact_share:
            return
        seq.wait_for = (best, best_len)
        self._try_share(seq)

    def _try_share(self, seq: Sequence) -> None:
        donor, n = seq.wait_for
        if donor.status is not Status.RUNNING or (self.exact_share and donor.n_computed > n):
            seq.wait_for = None  # the donor left or went past the prefix: compute it
            return
        if donor.n_computed < n:
            return  # the donor's chunks stop at n (see _build); copy then
        self.L.llama_memory_seq_cp(self.ctx.mem, donor.slot, seq.slot, 0, n)
        seq.n_computed = seq.cached_tokens = n
        self.stats.shared_tokens += n
        seq.wait_for = None

    def _build(self) -> list[tuple[Sequence, int, bool]]:
        """Fill the batch; returns (sequence, tokens fed, whether prompt) per sequence in it."""
        b, n, rows = self._batch, 0, []
        for seq in self.running:
            if seq.generating:
                self._put(n, seq.tokens[-1], seq.n_computed, seq.slot, True)
                seq.batch_index = n
                rows.append((seq, 1, False))
                n += 1
        stops = {}  # donor -> where a waiting sequence needs its chunk to end
        for seq in self.running:
            if seq.wait_for is not None:
                donor, at = seq.wait_for
                stops[id(donor)] = min(stops.get(id(donor), at), at)
        for seq in self.running:
            if seq.generating or seq.wait_for is not None or n >= self._cap:
                continue
            end = len(seq.tokens)
            if id(seq) in stops and seq.n_computed < stops[id(seq)]:
                end = stops[id(seq)]
            take = min(end - seq.n_computed, self._cap - n, self.n_batch - n)
            if take <= 0:
                continue
            pos = seq.n_computed
            for i in range(take):
                self._put(n + i, seq.tokens[pos + i], pos + i, seq.slot, False)
            done = pos + take == len(seq.tokens)
            if done:
                b.logits[n + take - 1] = 1
            seq.batch_index = n + take - 1 if done else -1
            rows.append((seq, take, True))
            n += take
        b.n_tokens = n
        return rows

    def _put(self, i: int, token: int, pos: int, slot: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = slot
        b.logits[i] = logits

    def _shrink(self, rows):
        """The KV cache is full: drop the prompt chunks, else preempt the newest sequence."""
        if any(prompt for _, _, prompt in rows):
            keep = [r for r in rows if not r[2]]
        else:
            victim = self.running[-1]
            if len(self.running) == 1:
                self._release(victim, "length", "the KV cache is full")
            else:
                self._preempt(victim)
            keep = [r for r in rows if r[0] is not victim]
        n = 0
        for seq, _, _ in keep:  # generating rows only: one token each, rebuilt in place
            self._put(n, seq.tokens[-1], seq.n_computed, seq.slot, True)
            seq.batch_index = n
            n += 1
        self._batch.n_tokens = n
        return keep

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s cells and queue it first again: it recomputes prompt and text so far."""
        self.L.llama_memory_seq_rm(self.ctx.mem, seq.slot, -1, -1)
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        seq.slot, seq.n_computed, seq.status = -1, 0, Status.WAITING
        self.waiting.appendleft(seq)
        self.stats.preempted += 1

    def _postprocess(self, rows) -> list[Sequence]:
        touched = []
        stats = self.stats
        for seq, fed, prompt in rows:
            seq.n_computed += fed
            stats.decoded_tokens += fed
            if prompt:
                stats.prompt_tokens += fed
            if seq.batch_index < 0:
                continue
            token = seq.sampler.sample_at(self.ctx.ptr, seq.batch_index)
            if seq.logprobs is not None and not (self.model.is_eog(token) and not seq.req.ignore_eos):
                seq.logprobs.append(token_logprobs(self.model, self.ctx.ptr, seq.batch_index,
                                                   token, seq.req.logprobs))
            seq.accept(token, self.model, self.n_ctx)
            touched.append(seq)
            if seq.cancel_requested and not seq.finished:
                seq.finish("cancelled")
            if seq.finished:
                self._free(seq)
        return touched

    def _release(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish(reason, error)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            keep = self.keep_idle and not seq.keep_cache and seq.n_computed > 0 \
                and seq.finish_reason != "error"
            if keep and self.in_pool:
                self.idle[seq.slot] = Saved(seq.tokens[:seq.n_computed])
            else:
                if keep:
                    self._save(seq.slot, seq.tokens[:seq.n_computed])
                if not seq.keep_cache:
                    self.L.llama_memory_seq_rm(self.ctx.mem, seq.slot, -1, -1)
            self.free_slots.append(seq.slot)
            for other in self.running:  # nobody waits on a prefix that will not come
                if other.wait_for is not None and other.wait_for[0] is seq:
                    other.wait_for = None
        seq.slot = -1

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self.L.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self):
        # A Ctrl-C landing while the interpreter finalizes objects must not print a traceback.
        try:
            self.close()
        except KeyboardInterrupt:
            pass


def _idle_bytes_cap() -> int:
    """The prompt cache's bound in bytes, from the memory free now."""
    import psutil

    from infer_cli.options import prompt_cache_bound

    return prompt_cache_bound(psutil.virtual_memory().available)
