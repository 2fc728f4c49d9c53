"""`infer batch` as a library: a JSONL file of prompts through the batching scheduler.

Every input line is parsed and checked before anything runs, so a bad line costs nothing.
Results come back in input order, each as soon as it and every line before it are done; a run
with the same output file skips the ids that file already holds complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from infer_cli.engine.chat import render
from infer_cli.engine.runner import prompt_tokens
from infer_cli.engine.sampling import Sampling
from infer_cli.engine.sequence import Request
from infer_cli.errors import BadInputLine

# Per-line fields and the types they must have (JSON numbers: int or float).
_SAMPLING_FIELDS = {"temperature": (int, float), "top_p": (int, float), "top_k": (int,),
                    "min_p": (int, float), "seed": (int,)}
_FIELDS = {"id", "prompt", "messages", "max_tokens", "stop", "system", *_SAMPLING_FIELDS}
_FAILED = ("error", "cancelled", "interrupted")


@dataclass
class Job:
    line: int                 # 1-based line number in the input
    id: Any
    prompt: str | None = None
    messages: list | None = None
    system: str | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    sampling: dict = field(default_factory=dict)
    error: str | None = None  # a bad line kept with --skip-bad

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(ident: Any) -> str:
    return json.dumps(ident, sort_keys=True)


def parse_line(text: str, line: int, source: str) -> Job:
    """One input line as a Job; BadInputLine names the line and what is wrong with it."""
    def bad(reason: str):
        raise BadInputLine(source, line, reason)

    try:
        obj = json.loads(text)
    except ValueError as e:
        bad(f"not JSON ({e.msg})")
    if not isinstance(obj, dict):
        bad("not a JSON object")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        bad(f"unknown field {unknown[0]!r}")
    job = Job(line, obj.get("id", line))
    if isinstance(job.id, (dict, list)):
        bad("id must be a string or a number")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        bad("it has neither prompt nor messages")
    if prompt is not None and messages is not None:
        bad("give prompt or messages, not both")
    if prompt is not None and not isinstance(prompt, str):
        bad("prompt must be a string")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            bad("messages must be a non-empty list of {role, content} strings")
    job.prompt, job.messages = prompt, messages
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        bad("system must be a string")
    job.system = system
    mt = obj.get("max_tokens")
    if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
        bad("max_tokens must be a positive integer")
    job.max_tokens = mt
    stop = obj.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        bad("stop must be a string or a list of strings")
    job.stop = tuple(stop or ())
    for name, types in _SAMPLING_FIELDS.items():
        if name in obj:
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, types):
                bad(f"{name} must be a number")
            job.sampling[name] = value
    return job


def read_jobs(lines: Iterator[str], source: str, *, skip_bad: bool = False) -> list[Job]:
    """Every non-blank line as a Job. A bad line raises, or with ``skip_bad`` becomes a Job
    that carries its error (recorded in the output, never run)."""
    jobs, seen = [], set()
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            job = parse_line(text, n, source)
            if job.key in seen:
                raise BadInputLine(source, n, f"id {job.id!r} appears twice")
        except BadInputLine as e:
            if not skip_bad:
                raise
            job = Job(n, f"line {n}", error=e.reason)
        seen.add(job.key)
        jobs.append(job)
    return jobs


def completed_ids(lines: Iterator[str]) -> set[str]:
    """Ids an earlier run of the same output file finished (a torn last line is ignored)."""
    done = set()
    for text in lines:
        try:
            rec = json.loads(text)
        except ValueError:
            continue
        if isinstance(rec, dict) and "id" in rec and rec.get("finish_reason") not in _FAILED:
            done.add(id_key(rec["id"]))
    return done


@dataclass(frozen=True)
class Defaults:
    """What a line does not say: the command line's settings."""

    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...] = ()
    system: str | None = None
    raw: bool = False
    ignore_eos: bool = False


def request_for(job: Job, model, template: str | None, d: Defaults, n_ctx: int) -> Request:
    """The engine request for a line: its prompt through the chat template, its sampling."""
    if d.raw or template is None:
        text = job.prompt if job.prompt is not None else "".join(m["content"] for m in job.messages)
    else:
        messages = list(job.messages) if job.messages is not None else [{"role": "user", "content": job.prompt}]
        system = job.system if job.system is not None else d.system
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        text = render(template, messages, bos=model.bos_text, eos=model.eos_text)
    tokens = prompt_tokens(model, text, templated=template is not None and not d.raw)
    sampling = replace(d.sampling, **job.sampling)
    max_tokens = job.max_tokens or (d.max_tokens if d.max_tokens > 0 else n_ctx)
    return Request(tuple(tokens), sampling, max_tokens, job.stop or d.stop, d.ignore_eos)


def record(job: Job, seq=None) -> dict:
    """The output line of a job (its error when it could not run)."""
    if seq is None:
        return {"id": job.id, "text": "", "finish_reason": "error", "error": job.error,
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0},
                "timings": {"ttft_s": None, "decode_tps": 0.0}}
    out = {"id": job.id, "text": seq.text, "finish_reason": seq.finish_reason,
           "usage": seq.usage(),
           "timings": {"ttft_s": _round(seq.timings.ttft_s), "decode_tps": round(seq.decode_tps, 2)}}
    if seq.error:
        out["error"] = seq.error
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@dataclass
class Summary:
    lines: int = 0
    skipped: int = 0           # already complete in the output file
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    interrupted: bool = False

    def as_dict(self) -> dict:
        return {"lines": self.lines, "skipped": self.skipped, "errors": self.errors,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "completion_tokens": self.completion_tokens, "wall_s": round(self.wall_s, 3),
                "throughput_tps": round(self.throughput, 2),
                "ttft_p50_s": _round(percentile(self.ttfts, 50)),
                "ttft_p95_s": _round(percentile(self.ttfts, 95)),
                "interrupted": self.interrupted}

    @property
    def throughput(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_jobs(scheduler, model, template, jobs: list[Job], defaults: Defaults, *,
             write, progress=None) -> Summary:
    """Run ``jobs`` through ``scheduler``, calling ``write(record)`` in input order as results
    complete. Ctrl-C stops within one engine step: every finished line is still written (those
    after an unfinished one too) and the summary says so."""
    summary = Summary(lines=len(jobs))
    t0 = time.perf_counter()
    seqs: dict[int, Any] = {}
    for i, job in enumerate(jobs):
        if job.error is None:
            try:
                req = request_for(job, model, template, defaults, scheduler.n_ctx)
            except Exception as e:  # a template that fails on this line's messages
                from infer_cli.errors import InferError

                if not isinstance(e, InferError):
                    raise
                job.error = str(e)
                continue
            seqs[i] = scheduler.submit(req, job.id)
    next_out = 0

    def flush(force: bool = False) -> None:
        nonlocal next_out
        while next_out < len(jobs):
            seq = seqs.get(next_out)
            if seq is not None and not seq.finished:
                if not force:
                    return
                next_out += 1
                continue
            job = jobs[next_out]
            rec = record(job, seq)
            _count(summary, rec, seq)
            write(rec)
            next_out += 1
            if progress is not None:
                progress(summary)

    try:
        flush()
        while scheduler.busy:
            scheduler.step()
            summary.wall_s = time.perf_counter() - t0
            flush()
        flush()
    except KeyboardInterrupt:
        summary.interrupted = True
        flush(force=True)
        for seq in seqs.values():
            if not seq.finished:
                scheduler.cancel(seq)
    summary.wall_s = time.perf_counter() - t0
    return summary


def _count(summary: Summary, rec: dict, seq) -> None:
    if rec["finish_reason"] == "error":
        summary.errors += 1
    u = rec["usage"]
    summary.prompt_tokens += u["prompt_tokens"]
    summary.cached_tokens += u["cached_tokens"]
    summary.completion_tokens += u["completion_tokens"]
    if seq is not None and seq.timings.ttft_s is not None:
        summary.ttfts.append(seq.timings.ttft_s)
