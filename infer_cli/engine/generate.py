"""The generation loop: prefill a prompt, then yield text events with honest timings."""

from __future__ import annotations

import codecs
import resource
import time
from dataclasses import dataclass, field
from typing import Iterator

from infer_cli.engine.context import Session
from infer_cli.engine.sampling import Sampler, StopFilter
from infer_cli.engine.sequence import Request
from infer_cli.errors import PromptTooLong


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


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


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

    Plain generation runs through the batching scheduler (one sequence); with a ``speculator``
    (see speculative.py) a step of its own verifies drafts and may produce several tokens, the
    text being the same either way. Ctrl-C (KeyboardInterrupt) ends the stream with finish reason
    ``interrupted``; reaching ``max_tokens`` or the context size ends it with ``length``."""
    stats = stats or Stats()
    model = session.model
    tokens = list(req.tokens)
    stats.prompt_tokens = len(tokens)
    stats.kv_size = session.n_ctx
    stats.kv_bytes = session.kv_bytes
    check_fits(len(tokens), session.n_ctx)
    if speculator is None:
        yield from _scheduled(session, req, stats, prompt_cache)
        return
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
        speculator.reproducible = not req.sampling.greedy and req.sampling.seed >= 0
        speculator.prepare(tokens)
        stats.prefill_s = time.perf_counter() - t0
        pending = [sampler.sample(session.ptr)]
        t_first = time.perf_counter()
        stats.ttft_s = t_first - t0
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
            budget = min(req.max_tokens - stats.generated_tokens,
                         session.n_ctx - len(session.tokens) - 1)
            pending = speculator.step(session, sampler, pending[-1], budget)
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
    stats.speculative = speculator.stats.as_dict()
    if speculator.stats.switches or speculator.stats.rechecks:  # when and why, in the notes too
        stats.notes.append(f"speculation {speculator.stats.summary()}")
    yield Event(tail, None, stats, finish)



def _scheduled(session: Session, req: Request, stats: Stats, prompt_cache) -> Iterator[Event]:
    """Plain generation through the batching scheduler with this one sequence, so `infer run`
    decodes through the same loop as `infer batch` and `infer serve`. With the prompt cache, the
    prompt's KV up to its last token comes first (restored, or computed and saved); without it,
    what the session's last turn left is reused and the scheduler computes the rest of the
    prompt and its first token's logits in one batch, as llama.cpp's own tools do."""
    from infer_cli.engine.scheduler import Scheduler

    tokens = list(req.tokens)
    t0 = time.perf_counter()
    head = tokens[:-1]
    if prompt_cache is not None:
        # The cache keeps the state *before* the last prompt token: a later run restores it and
        # decodes that one token for its logits, as every run does.
        stats.prompt_cache = prompt_cache.restore(session, head, stats.notes)
        stats.cached_tokens = session.extend(head)
        if stats.cached_tokens < len(head):
            prompt_cache.save(session)
        done = len(head)
    else:
        done = session.reusable(session.tokens, head)
        if not session.trim(done):
            session.clear()
            done = 0
        stats.cached_tokens = done
    if session.scheduler is None:
        session.scheduler = Scheduler(session.model, session.context, share_prefixes=False)
    sched = session.scheduler
    pieces: list[str] = []
    seq = sched.adopt(req, session.seq, done, on_text=lambda _s, text: pieces.append(text))
    finish = None
    try:
        while not seq.finished:
            sched.step()
            if stats.ttft_s is None and seq.timings.first is not None:
                stats.prefill_s = stats.ttft_s = seq.timings.first - t0
            stats.generated_tokens = seq.n_generated
            if seq.timings.first is not None:
                stats.decode_s = time.perf_counter() - seq.timings.first
            text = "".join(pieces)
            pieces.clear()
            if text:  # one token a step: the piece it completed (a held-back stop prefix is not)
                yield Event(text, seq.tokens[-1] if seq.n_generated else None, stats)
        finish = seq.finish_reason
    except KeyboardInterrupt:
        finish = "interrupted"
        sched.cancel(seq)
    session.tokens = seq.tokens[:seq.n_computed]
    tail = "".join(pieces)
    if finish == "length" and len(seq.tokens) > session.n_ctx:
        stats.notes.append(f"the context is full ({session.n_ctx} tokens); --ctx raises it")
    stats.kv_used = len(session.tokens)
    stats.peak_rss_bytes = peak_rss()
    yield Event(tail, None, stats, finish)
