"""Timed runs through the engine, as `infer run`, `infer batch` and speculation do them, the
median and spread of repetitions, and the machine's load before a section.

Prefill is the time to the first token of a prompt of exactly N tokens with an empty KV cache
(llama-bench's ppN); decode is the rate of the tokens after the first, greedy and past the
end-of-text token (llama-bench's tgN), measured after a short prompt or after a long one (the
rate at a full context).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

# Other processes using this share of the CPUs before a section make it a busy machine: on a
# small machine a llama.cpp run whose threads share cores with another job slows down many
# times over (its threads wait for each other at every barrier).
BUSY_PERCENT = 25.0


def spread(values: list[float]) -> dict:
    """Repetitions as {median, min, max, reps}; an empty list gives None figures."""
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "reps": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "reps": vals}


def median(m) -> float | None:
    """The median of a ``spread`` dict (or a plain number)."""
    if isinstance(m, dict):
        return m.get("median")
    return m


def sample_load(interval: float = 0.5) -> dict:
    """How busy the machine is right now, while this process waits: the CPU share used by every
    process (percent of all CPUs) over ``interval`` seconds, and the 1-minute load average."""
    import psutil

    cpu = float(psutil.cpu_percent(interval=interval))
    try:
        load1 = os.getloadavg()[0]
    except (OSError, AttributeError):
        load1 = None
    cores = psutil.cpu_count() or 1
    return {"cpu_percent": cpu, "loadavg_1m": load1, "cpus": cores, "busy": cpu >= BUSY_PERCENT}


def busy_note(load: dict | None) -> str | None:
    if not load or not load.get("busy"):
        return None
    la = load.get("loadavg_1m")
    return (f"the machine was busy before this section ({load['cpu_percent']:.0f}% of its CPUs "
            f"in use by other processes" + (f", load average {la:.1f}" if la is not None else "")
            + "): its speeds are likely low")


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall clock, CPU seconds of every process, CPU seconds of this one), for ``foreign``."""
    import psutil

    t = psutil.cpu_times()
    busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = psutil.Process().cpu_times()
    return time.perf_counter(), busy, own.user + own.system + own.children_user + own.children_system


def foreign(start: tuple[float, float, float]) -> float | None:
    """The share of all CPUs (percent) other processes used since ``start``."""
    import psutil

    end = cpu_snapshot()
    wall = end[0] - start[0]
    if wall <= 0:
        return None
    others = (end[1] - start[1]) - (end[2] - start[2])
    return max(0.0, 100.0 * others / (wall * (psutil.cpu_count() or 1)))


def foreign_note(percent: float | None) -> str | None:
    if percent is None or percent < BUSY_PERCENT:
        return None
    return (f"other processes used {percent:.0f}% of the CPUs while this section ran: its speeds "
            "are likely low")


# --- tokens ---------------------------------------------------------------------------------

def bos(model) -> list[int]:
    """[BOS] when the model starts its prompts with one, else []."""
    tok = model.L.llama_vocab_bos(model.vocab)
    return [tok] if tok >= 0 and model.L.llama_vocab_get_add_bos(model.vocab) else []


def text_tokens(model, text: str, n: int) -> list[int]:
    """Exactly ``n`` tokens of ``text`` (repeated when it is shorter), after a BOS when the model
    wants one."""
    toks = model.tokenize(text, add_special=False, parse_special=False)
    if not toks:
        toks = model.tokenize("The quick brown fox jumps over the lazy dog. ", add_special=False)
    head = bos(model)
    while len(head) + len(toks) < n:
        toks = toks + toks
    return (head + toks)[:n]


# --- single-sequence runs ---------------------------------------------------------------------

class Loaded:
    """A model and one session (its own context, warmed up) for ``opts``; a context manager."""

    def __init__(self, path: Path, opts, *, model=None):
        from infer_cli.engine import Model, Session

        self.owns_model = model is None
        self.model = model if model is not None else Model(path, opts)
        try:
            self.session = Session(self.model, opts)
        except BaseException:
            if self.owns_model:
                self.model.close()
            raise

    def __enter__(self) -> "Loaded":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        self.session.close()
        if self.owns_model:
            self.model.close()


def generate(session, tokens: list[int], n_gen: int, *, speculator=None, clear: bool = True):
    """One greedy generation of ``n_gen`` tokens after ``tokens``; returns the engine's Stats.

    ``clear`` empties the KV cache first (a cold prompt); without it the cached prefix is reused,
    which times decoding at a long context without paying for its prompt again. A Ctrl-C inside
    the engine's loop ends its stream quietly: here it is raised again."""
    from infer_cli.engine import Request, Sampling, stream

    if clear:
        session.clear()
    req = Request(tuple(tokens), Sampling(temperature=0, repeat_penalty=1.0), n_gen, (), True)
    last = None
    for event in stream(session, req, speculator=speculator):
        last = event
    if last is None or last.finish_reason == "interrupted":
        raise KeyboardInterrupt
    return last.stats


SHORT_PROMPT = "The history of the printing press begins"


def prefill_decode(loaded: Loaded, text: str, pp: int, tg: int) -> tuple[float, float]:
    """(prefill tokens/s of exactly ``pp`` tokens of ``text``, decode tokens/s of ``tg`` tokens
    after a short prompt): llama-bench's ppN and tgN through the engine."""
    pre = generate(loaded.session, text_tokens(loaded.model, text, pp), 1)
    dec = generate(loaded.session, loaded.model.tokenize(SHORT_PROMPT), tg)
    return pre.prefill_tps, dec.decode_tps


def speculator(kind: str, *, draft_session=None, draft_max: int = 16, p_min: float = 0.5):
    """A fresh speculator as `infer run --draft` / `--lookup` makes one (statistics per run)."""
    from infer_cli.engine import speculative

    stats = speculative.SpecStats(kind, draft_max=draft_max)
    if kind == "lookup":
        return speculative.PromptLookup(draft_max=draft_max, stats=stats)
    return speculative.DraftModel(draft_max=draft_max, p_min=p_min, draft_session=draft_session,
                                  stats=stats)


# --- many sequences -------------------------------------------------------------------------

@dataclass
class BatchResult:
    throughput: float        # generated tokens per second, all sequences together
    per_sequence: float      # mean decode tokens/s of one sequence
    generated: int
    seconds: float


class BatchRig:
    """One context of ``opts.n_seq`` sequences and the batching scheduler on it."""

    def __init__(self, model, opts):
        from infer_cli.engine.context import Context
        from infer_cli.engine.scheduler import Scheduler

        self.model = model
        self.context = Context(model, opts)
        try:
            self.context.warm_up()
            self.scheduler = Scheduler(model, self.context, share_prefixes=False)
        except BaseException:
            self.context.close()
            raise
        self.kv_bytes = self.context.kv_bytes
        self.compute_bytes = self.context.compute_bytes

    def run(self, prompts: list[list[int]], n_gen: int) -> BatchResult:
        """Every prompt at once, ``n_gen`` greedy tokens each; Ctrl-C cancels them and is raised."""
        from infer_cli.engine import Request, Sampling

        sched = self.scheduler
        greedy = Sampling(temperature=0, repeat_penalty=1.0)
        t0 = time.perf_counter()
        seqs = [sched.submit(Request(tuple(p), greedy, n_gen, (), True), i) for i, p in enumerate(prompts)]
        try:
            while sched.busy:
                sched.step()
        except KeyboardInterrupt:
            for s in seqs:
                sched.cancel(s)
            raise
        seconds = time.perf_counter() - t0
        generated = sum(s.n_generated for s in seqs)
        rates = [s.decode_tps for s in seqs if s.decode_tps]
        return BatchResult(generated / seconds if seconds > 0 else 0.0,
                           statistics.fmean(rates) if rates else 0.0, generated, seconds)

    def close(self) -> None:
        self.scheduler.close()
        self.context.close()
