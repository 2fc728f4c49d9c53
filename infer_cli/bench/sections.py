"""What `infer bench` measures, section by section, with a time estimate made before it starts
and the reason a section (or one of its rows) is skipped when it cannot run.

``Bench(settings)`` reads the model's header and settles what can run; ``estimate()`` times a
short calibration run and predicts each section's seconds from it; ``run(progress)`` yields one
finished ``Section`` at a time, so that a caller interrupted by Ctrl-C keeps the finished ones.

Speeds are repeated ``reps`` times, alternating the order of a section's configurations every
repetition (A B C, C B A, ...) so that a machine that slows down or warms up over a section
does not favour one of them; the figures are medians with their spread. Quality numbers come
from the quality report of `infer quantize` (``quantize.report.Reference``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from infer_cli.bench import SECTIONS
from infer_cli.bench import measure as M
from infer_cli.errors import InferError, WorkerBusy, WorkerLost, WorkerUnreachable, human_bytes

DEFAULT_QUANTS = ("F16", "Q8_0", "Q4_K_M", "Q2_K")
KV_TYPES = ("f16", "q8_0", "q4_0")
CTX_PAD = 256
SHORT_PROMPT = M.SHORT_PROMPT
COPY_INTRO = "Here is a passage:\n\n"
COPY_ASK = "\n\nThe same passage, repeated word for word:\n\n"
# seconds per parameter and thread for llama.cpp's quantizer (k-quants of a 135M model on this
# kind of machine: 1-2 s with 2 threads); only for the estimate
QUANT_S_PER_PARAM = 2.5e-8


@dataclass(frozen=True)
class Cost:
    """What the calibration run measured, in seconds: a prefill token, a decode token, a load,
    a token of a quality run's decode (logits at every position) and of its log-softmax."""

    prefill: float
    decode: float
    load: float
    scored: float
    softmax: float


# The KV section's quality run holds every position's logits (llama.cpp's output buffer, the
# log-probabilities and a copy): at most this share of the available RAM.
QUALITY_RAM_SHARE = 0.3
# With --rpc: a worker gone ends the bench (the others would only find it gone too).
_WORKER_ERRORS = (WorkerBusy, WorkerLost, WorkerUnreachable)

# (progress) description of the current step, estimated seconds done, estimated seconds in all
Progress = Callable[[str, float, float], None]


@dataclass(frozen=True)
class Sizes:
    """How much each section measures: the full set, or --quick's."""

    pp: int               # prefill prompt tokens
    tg: int               # decode tokens
    eval_tokens: int      # evaluation text for the precisions' quality
    quality_ctx: int      # chunk length of that evaluation
    ctx: int              # the long context (kv, flash-attn), unless --ctx
    levels: tuple[int, ...]
    batch_prompt: int
    batch_gen: int
    spec_gen: int
    passage: int          # tokens of the passage prompt lookup copies


FULL = Sizes(pp=512, tg=128, eval_tokens=2048, quality_ctx=512, ctx=4096, levels=(1, 4, 16),
             batch_prompt=32, batch_gen=64, spec_gen=128, passage=200)
QUICK = Sizes(pp=128, tg=32, eval_tokens=256, quality_ctx=256, ctx=1024, levels=(1, 4, 16),
              batch_prompt=16, batch_gen=16, spec_gen=48, passage=96)


@dataclass(frozen=True)
class Settings:
    model: Path
    name: str
    quick: bool = False
    reps: int = 3
    ctx: int | None = None            # the long context; None: 4096 (--quick 1024), at most the model's
    threads: int | None = None
    quants: tuple[str, ...] = DEFAULT_QUANTS
    only: tuple[str, ...] = SECTIONS
    draft: Path | None = None
    draft_name: str | None = None
    no_draft: str | None = None       # why there is no draft model
    eval_text: str | None = None
    cache_dir: Path | None = None     # where the temporary quants are made
    rpc: tuple[str, ...] = ()         # RPC workers (HOST:PORT) the offloaded layers go to


@dataclass
class Row:
    label: str
    metrics: dict = field(default_factory=dict)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Section:
    name: str
    title: str
    status: str = "done"              # done | skipped | interrupted
    reason: str | None = None         # why it was skipped
    baseline: str | None = None       # the label of the row the others are measured against
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: dict | None = None
    seconds: float = 0.0
    estimate_s: float = 0.0

    def row(self, label: str) -> Row | None:
        return next((r for r in self.rows if r.label == label), None)

    def as_dict(self) -> dict:
        return asdict(self)


TITLES = {"precision": "Precision (weights)", "kv": "KV cache type",
          "flash-attn": "Flash attention", "batching": "Batching",
          "speculative": "Speculative decoding"}


class Skip(Exception):
    """A section or row that cannot run here; the message is its reason."""


def _pad(n: int, to: int = CTX_PAD) -> int:
    return -(-n // to) * to


class Bench:
    def __init__(self, settings: Settings):
        from infer_cli.engine.runner import settle
        from infer_cli.models.gguf_info import read_gguf
        from infer_cli.options import Options
        from infer_cli.plan import fit, hardware
        from quantize.report import default_eval_text
        from quantize.types import lookup

        self.s = s = settings
        self.sizes = QUICK if s.quick else FULL
        self.reps = max(1, s.reps)
        self.path = Path(s.model)
        self.info = read_gguf(self.path)
        self.facts = fit.facts(self.info)
        self.hw = hardware.detect(llama=False).hardware()
        self.text = s.eval_text or default_eval_text()
        limit = self.info.context_length or FULL.ctx
        self.ctx = s.ctx or min(self.sizes.ctx, limit)
        self.notes: list[str] = []
        if s.ctx and self.info.context_length and s.ctx > self.info.context_length:
            self.notes.append(f"--ctx {s.ctx} is beyond the model's training context "
                              f"({self.info.context_length})")
        base = Options(n_ctx=_pad(self.sizes.pp + self.sizes.tg + 16), threads=s.threads,
                       rpc=tuple(s.rpc))
        # with workers: probed, and the layers split over their devices (every load below)
        self.base = settle(base, self.info)
        if s.rpc:
            self.notes.append(f"over RPC workers {', '.join(s.rpc)}: speeds include the network; "
                              "quality references and memory figures are computed on this machine")
        self.src_type = self.info.file_type_name or "unknown"
        self.src_qt = lookup(self.src_type)
        self.src_bpw = self.src_qt.bpw if self.src_qt else (self.info.bits_per_weight or 16.0)
        self.cache_dir = Path(s.cache_dir) if s.cache_dir else self.path.parent
        self.cost: Cost | None = None  # from calibrate()
        self.interrupted = False

    def reference_room(self, positions: int) -> str | None:
        """Why the reference log-probabilities of ``positions`` positions cannot be kept on disk
        in the cache folder (None when they can)."""
        from infer_cli.files import free_bytes

        need = positions * (self.facts.n_vocab or 1) * 4
        free = free_bytes(self.cache_dir)
        if need > free:
            return (f"not enough disk space in {self.cache_dir} for the reference log-probabilities: "
                    f"needs {human_bytes(need)}, {human_bytes(free)} free")
        return None

    # --- planning -------------------------------------------------------------------------

    def fits(self, **changes) -> tuple[bool, str]:
        """Whether the model with ``changes`` to the options fits this machine, and if not, why."""
        from infer_cli.plan import fit

        opts = replace(self.base, **changes)
        p = fit.plan(self.info, self.hw, opts)
        if p.fits:
            return True, ""
        largest = fit.largest_context(self.info, self.hw, replace(opts, gpu_layers=None))
        why = (f"a context of {opts.n_ctx} tokens" + (f" for {opts.n_seq} sequences" if opts.n_seq > 1 else "")
               + f" needs {human_bytes(p.total)}; this machine has {human_bytes(self.hw.ram + self.hw.vram)}")
        if largest:
            why += f" (the largest that fits: {largest}; --ctx sets it)"
        return False, why

    def precision_targets(self) -> list[tuple[object, str | None]]:
        """(QuantType, reason it is skipped or None) for each of --quants, the source excluded."""
        from quantize.types import lookup

        out = []
        for name in self.s.quants:
            qt = lookup(name)
            if qt is None or (self.src_qt is not None and qt.name == self.src_qt.name):
                continue
            if qt.bpw >= self.src_bpw:
                out.append((qt, f"not below the model's own precision ({self.src_type}): made from "
                                "it, it could not be better"))
            elif qt.needs_imatrix:
                out.append((qt, "needs an importance matrix (`infer quantize --imatrix`)"))
            else:
                out.append((qt, None))
        return out

    def static_skip(self, name: str) -> str | None:
        """Why section ``name`` cannot run at all, known before measuring anything."""
        if name == "precision":
            targets = self.precision_targets()
            if targets and all(r for _, r in targets):
                if self.src_bpw <= min(t.bpw for t, _ in targets):
                    return f"the model is already {self.src_type}: it cannot be quantized further"
                return "; ".join(f"{t.name}: {r}" for t, r in targets)
            if not targets:
                return f"no precision to compare with {self.src_type} (--quants)"
        if name == "kv":
            ok, why = self.fits(n_ctx=self.ctx)
            if not ok:
                return why
        return None

    # --- the estimate ---------------------------------------------------------------------

    def calibrate(self) -> None:
        """A short run of the model: what a prefill token, a decode token and a load cost here."""
        import numpy as np

        from quantize.report import log_softmax_rows

        t0 = time.perf_counter()
        opts = replace(self.base, n_ctx=CTX_PAD)
        with M.Loaded(self.path, opts) as t:
            load = time.perf_counter() - t0
            toks = M.text_tokens(t.model, self.text, 64)
            st = M.generate(t.session, toks, 1)
            p = st.prefill_s / max(st.prompt_tokens, 1)
            st = M.generate(t.session, t.model.tokenize(SHORT_PROMPT), 17)
            d = st.decode_s / 16 if st.decode_s else p
            # the quality runs: every position's logits, then their log-softmax (numpy)
            t1 = time.perf_counter()
            t.session.clear()
            t.session.decode_all(toks)
            t2 = time.perf_counter()
            logits = np.ctypeslib.as_array(t.model.L.llama_get_logits(t.session.ptr),
                                           shape=(len(toks), t.model.n_vocab))
            for _ in log_softmax_rows(logits):
                pass
            scored = (t2 - t1) / max(len(toks), 1)
            softmax = (time.perf_counter() - t2) / max(len(toks), 1)
        self.cost = Cost(p, d, load, scored, softmax)

    def _attn(self) -> float:
        """Attention's cost per token of depth, relative to a token's matrix products."""
        f = self.facts
        width = max(f.head_dim_k, 1) * max(f.n_head, 1)
        return 2.0 * f.n_layer * width / max(self.info.n_params, 1)

    def _kv_share(self) -> float:
        """KV bytes per cell of depth, relative to the weights (what a decode step reads)."""
        f = self.facts
        per = sum(2 * h * f.head_dim_k * 2 for h in f.n_head_kv)
        return per / max(self.info.weights_bytes, 1)

    def t_prefill(self, n: int, depth: int = 0, scale: float = 1.0) -> float:
        p = self.cost.prefill
        return n * p * scale * (1 + self._attn() * (depth + n / 2))

    def t_decode(self, n: int, depth: int = 0, size_ratio: float = 1.0) -> float:
        d = self.cost.decode
        return n * d * (0.3 + 0.7 * size_ratio) * (1 + self._kv_share() * depth + self._attn() * depth * 0.2)

    def t_score(self, n: int, chunk: int, *, compare: bool = False) -> float:
        """A quality run over ``n`` tokens in chunks of ``chunk``: the reference's
        log-probabilities, or (``compare``) another model's against them, the KL divergence
        being a second pass over every row."""
        c = self.cost
        return n * (c.scored * (1 + self._attn() * chunk / 2) + c.softmax * (2.0 if compare else 1.0))

    def estimate(self) -> dict[str, float]:
        """Seconds per section (calibrating first when needed)."""
        if self.cost is None:
            self.calibrate()
        sz, reps, load = self.sizes, self.reps, self.cost.load
        est: dict[str, float] = {}
        for name in self.s.only:
            if self.static_skip(name):
                est[name] = 0.0
                continue
            if name == "precision":
                todo = [t for t, r in self.precision_targets() if r is None]
                q = sum(QUANT_S_PER_PARAM * self.info.n_params * 2 / max(self.base.threads or 2, 1)
                        for _ in todo)
                quality = ((1 + len(todo)) * load + self.t_score(sz.eval_tokens, sz.quality_ctx)
                           + len(todo) * self.t_score(sz.eval_tokens, sz.quality_ctx, compare=True))
                speed = sum(load + self.t_prefill(sz.pp) + self.t_decode(sz.tg, size_ratio=r)
                            for r in [1.0] + [t.bpw / self.src_bpw for t in todo])
                est[name] = q + quality + reps * speed
            elif name == "kv":
                n = self.ctx - sz.tg - 2
                qctx = self.kv_quality_ctx()[0]
                est[name] = (len(KV_TYPES) * (self.t_prefill(n) + load)
                             + reps * len(KV_TYPES) * self.t_decode(sz.tg, depth=n)
                             + len(KV_TYPES) * load + self.t_score(qctx, qctx)
                             + (len(KV_TYPES) - 1) * self.t_score(qctx, qctx, compare=True))
            elif name == "flash-attn":
                n = self.ctx - sz.tg - 2
                long_ok = self.fits(n_ctx=self.ctx)[0]
                per = self.t_prefill(sz.pp) + self.t_decode(sz.tg)
                if long_ok:
                    per += self.t_prefill(n) + self.t_decode(sz.tg, depth=n)
                est[name] = 2 * load + reps * 2 * per
            elif name == "batching":
                est[name] = load + reps * sum(self.t_prefill(sz.batch_prompt * k) + self.t_decode(sz.batch_gen) * (1 + 0.15 * k)
                                              for k in sz.levels)
            elif name == "speculative":
                runs = 2 + (2 if self.s.draft else 0)
                est[name] = 2 * load + reps * runs * (self.t_decode(sz.spec_gen) + self.t_prefill(sz.passage * 2))
        return est

    # --- running ----------------------------------------------------------------------------

    def run(self, progress: Progress | None = None, estimate: dict[str, float] | None = None) -> Iterator[Section]:
        """Each section in turn, measured (or skipped with its reason). A Ctrl-C is raised after
        the finished sections have been yielded; ``interrupted`` names the one it stopped."""
        if self.cost is None:
            self.calibrate()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        est = estimate or {n: 0.0 for n in self.s.only}
        total = sum(est.values()) or 1.0
        done = 0.0
        for name in self.s.only:
            sec = Section(name, TITLES[name], estimate_s=est.get(name, 0.0))
            t0 = time.perf_counter()
            reason = self.static_skip(name)
            if reason:
                sec.status, sec.reason = "skipped", reason
                yield sec
                continue
            sec.load = M.sample_load(0.3 if self.s.quick else 0.5)
            note = M.busy_note(sec.load)
            if note:
                sec.notes.append(note)
            spent = [0.0]
            snap = M.cpu_snapshot()

            def tick(label: str, seconds: float, _base=done, _sec=sec) -> None:
                if progress is not None:
                    progress(f"{name}: {label}", _base + min(spent[0], _sec.estimate_s), total)
                spent[0] += seconds

            try:
                getattr(self, "_" + name.replace("-", "_"))(sec, tick)
            except KeyboardInterrupt:
                self.interrupted = True
                sec.status = "interrupted"
                sec.seconds = time.perf_counter() - t0
                raise
            except Skip as e:
                sec.status, sec.reason = "skipped", str(e)
            except InferError as e:
                if self.s.rpc and isinstance(e, _WORKER_ERRORS):  # the workers are gone: the bench too
                    raise
                sec.status, sec.reason = "skipped", str(e)
            except Exception as e:  # noqa: BLE001 - one section failing must not cost the others
                if os.environ.get("INFER_DEBUG"):
                    raise
                sec.status, sec.reason = "skipped", f"failed: {type(e).__name__}: {e}"
            sec.load["foreign_percent_during"] = M.foreign(snap)
            note = M.foreign_note(sec.load["foreign_percent_during"])
            if note:
                sec.notes.append(note)
            sec.seconds = time.perf_counter() - t0
            done += est.get(name, 0.0)
            if progress is not None:
                progress(f"{name}: done", done, total)
            yield sec

    # precision ---------------------------------------------------------------------------

    def _quant_path(self, qt) -> tuple[Path, bool]:
        """Where the quant of ``qt`` is (beside the model, or in the cache) and whether it exists."""
        from quantize.api import output_path

        beside = output_path(self.path, self.path.parent, qt)
        if beside.exists():
            return beside, True
        cached = output_path(self.path, self.cache_dir, qt)
        return cached, cached.exists()

    def _precision(self, sec: Section, tick) -> None:
        from infer_cli.files import free_bytes
        from quantize.llama_quant import QuantOptions, estimate_size, is_quantized, quantize

        sz = self.sizes
        ref = Row(f"{self.src_type} (model)", {"path": str(self.path), "size": self.path.stat().st_size,
                                               "bpw": self.src_bpw, "made": False})
        sec.baseline = ref.label
        sec.rows.append(ref)
        measured: list[tuple[Row, Path]] = [(ref, self.path)]
        requant = is_quantized(self.path)
        opts = QuantOptions(allow_requantize=requant, threads=self.base.threads or 0)
        room = None
        for qt, reason in self.precision_targets():
            row = Row(qt.name, {"bpw": qt.bpw})
            sec.rows.append(row)
            if reason:
                row.skipped = reason
                continue
            path, exists = self._quant_path(qt)
            if not exists:
                need = estimate_size(self.path, qt)
                room = free_bytes(self.cache_dir) if room is None else room
                if need > room:
                    row.skipped = (f"not enough disk space in {self.cache_dir} for it: needs "
                                   f"{human_bytes(need)}, {human_bytes(room)} free")
                    continue
                tick(f"quantizing to {qt.name}", QUANT_S_PER_PARAM * self.info.n_params * 2
                     / max(self.base.threads or 2, 1))
                try:
                    res = quantize(self.path, path, qt, opts)
                except InferError as e:
                    row.skipped = str(e)
                    continue
                room -= res.size
                for w in res.warnings:
                    if w not in sec.notes:
                        sec.notes.append(w)
                row.metrics["made"] = True
            else:
                row.metrics["made"] = False
            row.metrics.update(path=str(path), size=path.stat().st_size)
            measured.append((row, path))
        # quality against the model itself, on the evaluation text of `infer quantize`
        load = self.cost.load if self.cost else 0.0
        no_room = self.reference_room(sz.eval_tokens)
        if no_room:
            sec.notes.append(f"quality not measured: {no_room}")
        else:
            self._precision_quality(sec, tick, ref, measured, load)
        self._precision_speed(sec, tick, ref, measured, load)

    def _precision_quality(self, sec, tick, ref, measured, load) -> None:
        from quantize.report import Reference

        sz = self.sizes
        tick("reference log-probabilities", self.t_score(sz.eval_tokens, sz.quality_ctx) + load)
        reference = Reference(self.path, self.text, n_tokens=sz.eval_tokens, n_ctx=sz.quality_ctx,
                              threads=self.base.threads, workdir=self.cache_dir)
        try:
            positions = sum(len(c) - 1 for c in reference.chunks)
            ref.metrics["quality"] = {"kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0, "ppl": reference.ppl,
                                      "ref_ppl": reference.ppl, "positions": positions}
            for row, path in measured[1:]:
                tick(f"quality of {row.label}",
                     self.t_score(sz.eval_tokens, sz.quality_ctx, compare=True) + load)
                row.metrics["quality"] = asdict(reference.compare(path))
        finally:
            reference.close()

    def _precision_speed(self, sec, tick, ref, measured, load) -> None:
        sz = self.sizes
        speeds = {row.label: ([], []) for row, _ in measured}
        for rep in range(self.reps):
            order = measured if rep % 2 == 0 else measured[::-1]
            for row, path in order:
                ratio = row.metrics["size"] / max(ref.metrics["size"], 1)
                tick(f"speed of {row.label} ({rep + 1}/{self.reps})",
                     load + self.t_prefill(sz.pp) + self.t_decode(sz.tg, size_ratio=ratio))
                with M.Loaded(path, self.base) as t:
                    pp, tg = M.prefill_decode(t, self.text, sz.pp, sz.tg)
                speeds[row.label][0].append(pp)
                speeds[row.label][1].append(tg)
        for row, path in measured:
            row.metrics["prefill_tps"] = M.spread(speeds[row.label][0])
            row.metrics["decode_tps"] = M.spread(speeds[row.label][1])
            row.metrics.update(self._memory(path))
        positions = (ref.metrics.get("quality") or {}).get("positions", 0)
        sec.notes.append(f"quality on {positions} positions of the evaluation "
                         f"text; speeds: prefill of {sz.pp} tokens, decode of {sz.tg}; memory from the "
                         f"fit plan at a {self.ctx}-token context")

    def _memory(self, path: Path, **changes) -> dict:
        from infer_cli.models.gguf_info import read_gguf
        from infer_cli.plan import fit

        info = self.info if Path(path) == self.path else read_gguf(path)
        p = fit.plan(info, self.hw, replace(self.base, n_ctx=changes.pop("n_ctx", self.ctx), **changes))
        return {"weights_bytes": p.cpu.weights + p.gpu.weights, "kv_bytes": p.cpu.kv + p.gpu.kv,
                "compute_bytes": p.cpu.compute + p.gpu.compute, "memory_bytes": p.total}

    # kv ------------------------------------------------------------------------------------

    def kv_quality_ctx(self) -> tuple[int, str | None]:
        """The chunk length for the KV section's KL (the long context, unless its logits would
        not fit in memory) and a note when it is shorter."""
        vocab = self.facts.n_vocab or 1
        n = self.ctx
        limit = int(self.hw.ram * QUALITY_RAM_SHARE)
        while n > 256 and 3 * n * vocab * 4 > limit:
            n //= 2
        ok = self.fits(n_ctx=n, n_batch=n, n_ubatch=n)[0]
        while not ok and n > 256:
            n //= 2
            ok = self.fits(n_ctx=n, n_batch=n, n_ubatch=n)[0]
        if n < self.ctx:
            return n, (f"KL measured on {n} tokens: the logits of every position of a {self.ctx}-token "
                       "chunk would not fit in memory")
        return n, None

    def _kv(self, sec: Section, tick) -> None:
        from infer_cli.engine import Model
        from quantize.report import Reference

        sz = self.sizes
        load = self.cost.load if self.cost else 0.0
        sec.baseline = "f16"
        n_long = self.ctx - sz.tg - 2
        rows = {t: Row(t) for t in KV_TYPES}
        sec.rows.extend(rows.values())
        model = Model(self.path, self.base, info=self.info)
        live: dict[str, M.Loaded] = {}
        try:
            for t in KV_TYPES:
                try:
                    live[t] = M.Loaded(self.path, replace(self.base, n_ctx=self.ctx, cache_type_k=t,
                                                          cache_type_v=t), model=model)
                except InferError as e:
                    rows[t].skipped = str(e)
            if not live:
                raise Skip("no KV cache type could be set up: " + "; ".join(r.skipped for r in rows.values()))
            long_tokens = M.text_tokens(model, self.text, n_long)
            dec = {t: [] for t in live}
            pre = {t: [] for t in live}
            for rep in range(self.reps):
                order = [t for t in KV_TYPES if t in live]
                order = order if rep % 2 == 0 else order[::-1]
                for t in order:
                    first = rep == 0
                    tick(f"decode at {self.ctx} tokens, {t} ({rep + 1}/{self.reps})",
                         (self.t_prefill(n_long) if first else 0.0) + self.t_decode(sz.tg, depth=n_long))
                    st = M.generate(live[t].session, long_tokens, sz.tg, clear=False)
                    dec[t].append(st.decode_tps)
                    if st.cached_tokens == 0:
                        pre[t].append(st.prefill_tps)
            for t, lo in live.items():
                rows[t].metrics.update(decode_tps=M.spread(dec[t]), prefill_tps=M.spread(pre[t]),
                                       kv_bytes_measured=lo.session.kv_bytes, depth=n_long)
                rows[t].metrics.update(self._memory(self.path, cache_type_k=t, cache_type_v=t))
        finally:
            for lo in live.values():
                lo.close()
            model.close()
        # quality: KL against the f16 cache at the long context
        qctx, note = self.kv_quality_ctx()
        if note:
            sec.notes.append(note)
        no_room = self.reference_room(qctx)
        if no_room:
            sec.notes.append(f"quality not measured: {no_room}")
            return
        tick(f"f16 log-probabilities at {qctx} tokens", self.t_score(qctx, qctx) + load)
        reference = Reference(self.path, self.text, n_tokens=qctx, n_ctx=qctx,
                              threads=self.base.threads, workdir=self.cache_dir)
        try:
            rows["f16"].metrics["quality"] = {"kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0,
                                              "ppl": reference.ppl, "ref_ppl": reference.ppl,
                                              "positions": sum(len(c) - 1 for c in reference.chunks)}
            for t in KV_TYPES[1:]:
                if t not in live:
                    continue
                tick(f"quality of a {t} cache", self.t_score(qctx, qctx, compare=True) + load)
                try:
                    rows[t].metrics["quality"] = asdict(reference.compare(self.path, kv=(t, t)))
                except InferError as e:
                    rows[t].notes.append(f"quality not measured: {e}")
        finally:
            reference.close()
        sec.notes.append(f"decode of {sz.tg} tokens after {n_long} (a full {self.ctx}-token context); "
                         f"KL on {qctx} tokens of the evaluation text; K and V caches of the same type")

    # flash attention --------------------------------------------------------------------------

    def _flash_attn(self, sec: Section, tick) -> None:
        from infer_cli.engine import Model

        sz = self.sizes
        sec.baseline = "off"
        long_ok, why = self.fits(n_ctx=self.ctx)
        n_ctx = self.ctx if long_ok else self.base.n_ctx
        n_long = self.ctx - sz.tg - 2
        model = Model(self.path, self.base, info=self.info)
        live: dict[str, M.Loaded] = {}
        rows = {fa: Row(fa) for fa in ("off", "on")}
        sec.rows.extend(rows.values())
        try:
            for fa in rows:
                try:
                    live[fa] = M.Loaded(self.path, replace(self.base, n_ctx=n_ctx, flash_attn=fa), model=model)
                except InferError as e:
                    rows[fa].skipped = str(e)
            if len(live) < 2:
                raise Skip("flash attention cannot be turned " + " and ".join(
                    f"{fa} ({r.skipped})" for fa, r in rows.items() if r.skipped))
            long_tokens = M.text_tokens(model, self.text, n_long) if long_ok else None
            keys = ("prefill_tps", "decode_tps", "prefill_long_tps", "decode_long_tps")
            got = {fa: {k: [] for k in keys} for fa in rows}
            for rep in range(self.reps):
                for fa in (("off", "on") if rep % 2 == 0 else ("on", "off")):
                    est = self.t_prefill(sz.pp) + self.t_decode(sz.tg)
                    if long_ok:
                        est += self.t_prefill(n_long) + self.t_decode(sz.tg, depth=n_long)
                    tick(f"flash attention {fa} ({rep + 1}/{self.reps})", est)
                    s = live[fa].session
                    g = got[fa]
                    pp, tg = M.prefill_decode(live[fa], self.text, sz.pp, sz.tg)
                    g["prefill_tps"].append(pp)
                    g["decode_tps"].append(tg)
                    if long_ok:
                        g["prefill_long_tps"].append(M.generate(s, long_tokens, 1).prefill_tps)
                        g["decode_long_tps"].append(M.generate(s, long_tokens, sz.tg, clear=False).decode_tps)
            for fa, lo in live.items():
                r = rows[fa]
                for k in keys:
                    if got[fa][k]:
                        r.metrics[k] = M.spread(got[fa][k])
                r.metrics["compute_bytes_measured"] = lo.session.compute_bytes
                r.metrics.update(self._memory(self.path, n_ctx=n_ctx, flash_attn=fa))
        finally:
            for lo in live.values():
                lo.close()
            model.close()
        if long_ok:
            sec.notes.append(f"short: prefill of {sz.pp} tokens and decode of {sz.tg}; long: prefill "
                             f"of {n_long} tokens and decode of {sz.tg} after them")
        else:
            sec.notes.append(f"long context not measured: {why}")

    # batching --------------------------------------------------------------------------------

    def _batching(self, sec: Section, tick) -> None:
        from infer_cli.engine import Model

        sz = self.sizes
        sec.baseline = "1"
        model = Model(self.path, self.base, info=self.info)
        rigs: dict[int, M.BatchRig] = {}
        rows = {k: Row(str(k)) for k in sz.levels}
        sec.rows.extend(rows.values())
        try:
            pool = M.text_tokens(model, self.text, sz.batch_prompt * max(sz.levels) + 1)[1:]
            prompts = [M.bos(model) + pool[i * sz.batch_prompt:(i + 1) * sz.batch_prompt]
                       for i in range(max(sz.levels))]
            for k in sz.levels:
                n_ctx = k * _pad(sz.batch_prompt + sz.batch_gen + 8)  # a context of its own each
                ok, why = self.fits(n_ctx=n_ctx, n_seq=k)
                if not ok:
                    rows[k].skipped = why
                    continue
                try:
                    rigs[k] = M.BatchRig(model, replace(self.base, n_ctx=n_ctx, n_seq=k))
                except InferError as e:
                    rows[k].skipped = str(e)
            if not rigs:
                raise Skip("no batch could be set up: " + "; ".join(r.skipped or "" for r in rows.values()))
            got = {k: ([], []) for k in rigs}
            for rep in range(self.reps):
                order = sorted(rigs) if rep % 2 == 0 else sorted(rigs, reverse=True)
                for k in order:
                    tick(f"{k} sequences ({rep + 1}/{self.reps})",
                         self.t_prefill(sz.batch_prompt * k) + self.t_decode(sz.batch_gen) * (1 + 0.15 * k))
                    res = rigs[k].run(prompts[:k], sz.batch_gen)
                    got[k][0].append(res.throughput)
                    got[k][1].append(res.per_sequence)
            for k, rig in rigs.items():
                rows[k].metrics.update(sequences=k, throughput_tps=M.spread(got[k][0]),
                                       per_sequence_tps=M.spread(got[k][1]),
                                       kv_bytes_measured=rig.kv_bytes)
                rows[k].metrics.update(self._memory(self.path, n_ctx=rig.context.n_ctx, n_seq=k))
        finally:
            for rig in rigs.values():
                rig.close()
            model.close()
        sec.notes.append(f"each sequence: a different {sz.batch_prompt}-token prompt, {sz.batch_gen} "
                         "greedy tokens; throughput counts every sequence's tokens over the wall time")

    # speculative -----------------------------------------------------------------------------

    def _speculative(self, sec: Section, tick) -> None:
        from infer_cli.engine import Model, Session
        from infer_cli.engine.speculative import check_compatible

        sz = self.sizes
        dname = self.s.draft_name or (str(self.s.draft) if self.s.draft else "")
        if "/" in dname or dname.endswith(".gguf"):
            dname = Path(dname).name
        draft_label = f"draft {dname}".strip()
        rows = {"draft": Row(draft_label if self.s.draft else "draft model"),
                "lookup": Row("prompt lookup (copy task)")}
        sec.rows.extend(rows.values())
        n_ctx = _pad(sz.passage * 2 + sz.spec_gen + 64)
        opts = replace(self.base, n_ctx=n_ctx)
        target = M.Loaded(self.path, opts)
        draft_model = draft_session = None
        try:
            model = target.model
            if self.s.draft is None:
                rows["draft"].skipped = self.s.no_draft or "no draft model (--draft MODEL)"
            else:
                try:
                    draft_model = Model(self.s.draft, opts)
                    check_compatible(model, draft_model)
                    draft_session = Session(draft_model, opts)
                except InferError as e:
                    rows["draft"].skipped = str(e)
            prompt = model.tokenize(SHORT_PROMPT)
            passage = M.text_tokens(model, self.text, sz.passage + 1)[1:]
            words = model.tokenize(COPY_INTRO, add_special=True)
            copy_prompt = (words + passage + model.tokenize(COPY_ASK, add_special=False)
                           + passage[:8])
            runs = {"lookup": (copy_prompt, "lookup")}
            if draft_session is not None:
                runs["draft"] = (prompt, "draft")
            got = {k: {"plain": [], "spec": [], "acceptance": [], "drafted": 0, "accepted": 0, "notes": []}
                   for k in runs}
            for rep in range(self.reps):
                for k, (toks, kind) in runs.items():
                    for mode in (("plain", "spec") if rep % 2 == 0 else ("spec", "plain")):
                        tick(f"{rows[k].label}, {'plain' if mode == 'plain' else 'speculative'} "
                             f"({rep + 1}/{self.reps})", self.t_decode(sz.spec_gen) + self.t_prefill(len(toks)))
                        spec = None
                        if mode == "spec":
                            spec = M.speculator(kind, draft_session=draft_session)
                        st = M.generate(target.session, toks, sz.spec_gen, speculator=spec)
                        g = got[k]
                        g[mode].append(st.decode_tps)
                        if spec is not None and st.speculative:
                            sp = st.speculative
                            g["acceptance"].append(sp.get("acceptance") or 0.0)
                            g["drafted"] += sp.get("drafted", 0)
                            g["accepted"] += sp.get("accepted", 0)
                            off = sp.get("switched_off")
                            if off and off not in g["notes"]:
                                g["notes"].append(off)
            for k, g in got.items():
                r = rows[k]
                plain, spec = M.spread(g["plain"]), M.spread(g["spec"])
                r.metrics.update(plain_tps=plain, speculative_tps=spec,
                                 speedup=(spec["median"] / plain["median"]) if plain["median"] else None,
                                 acceptance=M.spread(g["acceptance"]), drafted=g["drafted"],
                                 accepted=g["accepted"], tokens=sz.spec_gen)
                r.notes.extend(g["notes"])
            if draft_session is not None:
                from infer_cli.models.gguf_info import read_gguf
                from infer_cli.plan import fit

                dp = fit.plan(read_gguf(self.s.draft), self.hw, opts)
                rows["draft"].metrics["draft_memory_bytes"] = dp.total
                rows["draft"].metrics["draft_weights_bytes"] = dp.cpu.weights + dp.gpu.weights
        finally:
            if draft_session is not None:
                draft_session.close()
            if draft_model is not None:
                draft_model.close()
            target.close()
        sec.notes.append(f"{sz.spec_gen} greedy tokens per run, plain and speculative alternating; the "
                         f"copy task repeats a {sz.passage}-token passage of the prompt")
