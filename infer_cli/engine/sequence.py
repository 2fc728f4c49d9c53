"""One generation in the batching engine: its tokens, its sampler, its text and its timings.

A ``Sequence`` knows which of its tokens the KV cache already holds (``n_computed``); the
scheduler feeds it the rest, a prompt chunk or the one token it sampled last, and hands each
sampled token back to ``accept``. Text comes out through the same UTF-8 decoder and stop-string
filter as ``infer run``.
"""

from __future__ import annotations

import codecs
import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from infer_cli.engine.sampling import Sampling, StopFilter


@dataclass(frozen=True)
class Request:
    """What to generate: the prompt's tokens and how to sample after them."""

    tokens: tuple[int, ...]
    sampling: Sampling = Sampling()
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # report each token's log-probability and this many alternatives
    # Start from KV another sequence or an idle slot already holds for the prompt's beginning.
    # Off, the whole prompt is computed in the same shapes every time: llama.cpp's kernels give
    # slightly different numbers for other batch shapes, so a seeded draw can differ with it on.
    reuse_prefix: bool = True


class Status(enum.Enum):
    WAITING = "waiting"    # queued, no KV slot yet
    RUNNING = "running"    # in a slot: prompt being computed, or generating
    FINISHED = "finished"


@dataclass
class Timings:
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None   # took a slot
    first: float | None = None     # first token sampled
    ended: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first is None else self.first - self.submitted


class Sequence:
    """A request in flight. ``tokens`` is the prompt followed by what was generated; the KV
    cache of slot ``slot`` holds ``tokens[:n_computed]``."""

    def __init__(self, req: Request, ident: Any = None, on_text: Callable | None = None):
        self.req = req
        self.id = ident
        self.on_text = on_text          # called as on_text(seq, text) for each new piece
        self.n_prompt = len(req.tokens)
        self.tokens: list[int] = list(req.tokens)
        self.n_computed = 0
        self.cached_tokens = 0          # prompt tokens whose KV was copied, not computed
        self.slot = -1
        self.status = Status.WAITING
        self.sampler = None
        self.finish_reason: str | None = None  # stop | length | cancelled | error
        self.error: str | None = None
        self.text_parts: list[str] = []
        self.timings = Timings()
        self.batch_index = -1           # row of this step's logits, when it has one
        self.wait_for: tuple[Sequence, int] | None = None  # (donor, shared prefix length)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stopper = StopFilter(req.stop)
        self.cancel_requested = False
        self.keep_cache = False         # leave its cells in place when it ends (a chat's next turn)
        self.eog = False                # it ended on the model's end-of-generation token
        # one entry per generated token (see ``token_logprobs``) when the request asks for them;
        # ``logprobs_sent`` counts those already handed to a streaming client
        self.logprobs: list[dict] | None = [] if req.logprobs is not None else None
        self.logprobs_sent = 0

    # what the scheduler reads ------------------------------------------------------------------

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - self.n_prompt

    @property
    def remaining(self) -> int:
        """Tokens still to feed before this sequence can sample (1 while generating)."""
        return len(self.tokens) - self.n_computed

    @property
    def generating(self) -> bool:
        return self.remaining == 1 and self.n_generated > 0

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def decode_tps(self) -> float:
        t = self.timings
        steps = self.n_generated - 1
        if steps <= 0 or t.first is None or t.ended is None or t.ended <= t.first:
            return 0.0
        return steps / (t.ended - t.first)

    # what the scheduler calls ------------------------------------------------------------------

    def accept(self, token: int, model, n_ctx: int) -> None:
        """Take one sampled token: end the sequence on end-of-generation, a stop string, its
        token budget or a full context; otherwise queue it to be decoded next step."""
        if self.timings.first is None:
            self.timings.first = time.perf_counter()
        if model.is_eog(token) and not self.req.ignore_eos:
            self.eog = True
            self.finish("stop")
            return
        self.tokens.append(token)
        text, stopped = self._stopper.feed(self._decoder.decode(model.piece(token)))
        self._emit(text)
        if stopped:
            self.finish("stop")
        elif self.n_generated >= self.req.max_tokens or len(self.tokens) > n_ctx:
            # (the last sampled token needs no cell: with n_ctx cells full it still counts)
            self.finish("length")

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.status is Status.FINISHED:
            return
        if reason != "stop":
            self._emit(self._stopper.flush() + self._decoder.decode(b"", final=True))
        self.finish_reason, self.error = reason, error
        self.status = Status.FINISHED
        self.timings.ended = time.perf_counter()
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        if self.on_text is not None:
            self.on_text(self, "")

    def _emit(self, text: str) -> None:
        if text:
            self.text_parts.append(text)
            if self.on_text is not None:
                self.on_text(self, text)

    def new_logprobs(self) -> list[dict]:
        """The entries not handed out yet (for a streamed answer's next chunk)."""
        if not self.logprobs:
            return []
        out = self.logprobs[self.logprobs_sent:]
        self.logprobs_sent = len(self.logprobs)
        return out

    def usage(self) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_generated,
                "cached_tokens": self.cached_tokens}


def token_logprobs(model, ctx, idx: int, token: int, top: int) -> dict:
    """``token``'s log-probability under the model's distribution at output ``idx`` (the raw
    logits' softmax, before temperature and truncation, as OpenAI reports it), with the ``top``
    most likely tokens. One pass over the vocabulary: only sequences that ask pay for it."""
    import numpy as np

    from infer_cli.engine.sampling import logits_row

    logits = logits_row(model.L, ctx, idx, model.n_vocab)
    peak = float(logits.max())
    norm = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))

    def entry(tok: int) -> dict:
        piece = model.piece(tok)
        return {"id": tok, "token": piece.decode("utf-8", "replace"), "bytes": list(piece),
                "logprob": float(logits[tok]) - norm}

    out = entry(token)
    if top > 0:
        best = np.argpartition(logits, -top)[-top:]
        best = best[np.argsort(-logits[best], kind="stable")]
        out["top_logprobs"] = [entry(int(t)) for t in best]
    else:
        out["top_logprobs"] = []
    return out
