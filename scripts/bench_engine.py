#!/usr/bin/env python3
"""Engine benchmark: infer against llama.cpp's own tools, built from the same source.

    .venv/bin/python scripts/bench_engine.py                 # both test models, 2 threads, 5 reps
    .venv/bin/python scripts/bench_engine.py --models smollm2 --reps 7 --json
    .venv/bin/python scripts/bench_engine.py --side native   # only the llama-bench half

Measures, per model, native and infer runs alternating (the order flips every repetition):
  decode   tokens/s: llama-bench tg128        vs `infer run M --raw --temp 0 --ignore-eos -n 128`
  prefill  tokens/s: llama-bench pp512        vs `infer run` on a prompt of exactly 512 tokens, -n 1
  cache    time to first token of a ~1,500-token prompt: after `infer cache clear` (cold), then
           again with the prompt cache warm
Each ratio is given twice: of the two sides' medians (what the targets judge) and paired (the
median of each repetition's own ratio, whose two runs ran back to back).
And once, for the default test model, the start-up: launching `infer run smollm2 "Hi" -n 8
--temp 0` to the first byte on its stdout.

The native binaries come from scripts/native.sh (built once, ~10 minutes on two cores) unless
--native-bin names a folder. llama-bench is given infer's engine defaults explicitly (n_batch
2048, n_ubatch 512, flash attention auto, f16 KV cache), which are also llama-bench's defaults.
Every timed `infer run` also gets --infer-args (default `--repeat-penalty 1`: llama-bench does
no sampling at all, and infer's default penalty is extra work per token; pass --infer-args=''
to time infer's defaults). Models are resolved with `infer pull NAME --json` under INFER_HOME (default .cache/test-home, where
the test suite keeps the test models), so nothing is downloaded when they are already there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchstats import interval  # noqa: E402

DEFAULT_MODELS = ["smollm2", "gemma3-270m"]
METRICS = ("decode", "prefill", "cache", "startup")
TARGETS = {  # metric: (comparison, bound, text)
    "decode": (">=", 0.97, ">= 0.97 x native"),
    "prefill": (">=", 0.95, ">= 0.95 x native"),
    "cache": ("<=", 0.10, "<= 0.10 x cold"),
    "startup": ("<=", 1.0, "<= 1.0 s"),
}
# infer's engine defaults (infer_cli/engine.py Options), given to llama-bench explicitly.
ENGINE_DEFAULTS = {"n_batch": 2048, "n_ubatch": 512, "flash_attn": "auto", "type_k": "f16",
                   "type_v": "f16"}
SHORT_PROMPT = "The history of the printing press begins"
WORDS = ("the history of science is a long story of people who looked closely at the world "
         "around them and asked simple questions about why things happen as they do while "
         "others built tools machines and instruments that let them measure time distance "
         "weight heat and light with ever greater care so that over many centuries small "
         "observations added up to large ideas about motion matter energy life and the stars "
         "each generation standing on the work of the one before it").split()


class ContractError(RuntimeError):
    """infer's output is not what the `infer run --json` contract promises."""


class ToolError(RuntimeError):
    """A command failed; the message carries its stderr tail."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def tail(text: str, n: int = 12) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:])


def run_cmd(cmd: list[str], *, env: dict | None = None, timeout: float = 900) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ToolError(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} ...") from None
    if p.returncode != 0:
        shown = " ".join(c if len(c) < 80 else c[:40] + "...(%d chars)" % len(c) for c in cmd)
        raise ToolError(f"exit {p.returncode}: {shown}\n{tail(p.stderr or p.stdout)}")
    return p.stdout


class LoadProbe:
    """How much of the machine's CPU time went to processes other than our children during a
    run: on a small machine another job on one core can slow a 2-thread llama.cpp run many
    times over (its threads spin at barriers), so such runs are flagged and retried."""

    def __enter__(self):
        self.t, self.busy, self.kids = time.perf_counter(), self._busy(), self._kids()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        ticks = os.sysconf("SC_CLK_TCK")
        busy = (self._busy() - self.busy) / ticks
        kids = self._kids() - self.kids
        cpus = os.cpu_count() or 1
        self.foreign = max(0.0, (busy - kids) / (wall * cpus)) if wall > 0 else 0.0
        return False

    @staticmethod
    def _busy() -> int:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0
        return sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait

    @staticmethod
    def _kids() -> float:
        import resource

        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (up to ``max_wait`` seconds) for a second in which other processes use at most
    ``limit`` of the CPUs; returns how long it waited."""
    t0 = time.perf_counter()
    while True:
        with LoadProbe() as probe:
            time.sleep(0.5)
        waited = time.perf_counter() - t0
        if probe.foreign <= limit or waited >= max_wait:
            if waited > 1:
                log(f"  (waited {waited:.0f} s for other processes to leave the CPUs"
                    + (")" if probe.foreign <= limit else "; they did not)"))
            return waited


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# --- the native side --------------------------------------------------------------------------

def native_bin(arg: str | None) -> Path:
    if arg:
        path = Path(arg)
    else:
        log("native: scripts/native.sh (builds llama.cpp's tools the first time, ~10 minutes)...")
        p = subprocess.run([str(ROOT / "scripts" / "native.sh")], stdout=subprocess.PIPE,
                           text=True)
        if p.returncode != 0:
            sys.exit(f"scripts/native.sh failed (exit {p.returncode}); see its output above")
        path = Path(p.stdout.strip().splitlines()[-1])
    if not (path / "llama-bench").is_file():
        sys.exit(f"no llama-bench in {path}")
    return path


def llama_bench(bin_dir: Path, model: Path, threads: int, *, n_prompt: int, n_gen: int) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen),
           "-t", str(threads), "-r", "1", "-b", str(ENGINE_DEFAULTS["n_batch"]),
           "-ub", str(ENGINE_DEFAULTS["n_ubatch"]), "-fa", ENGINE_DEFAULTS["flash_attn"],
           "-ctk", ENGINE_DEFAULTS["type_k"], "-ctv", ENGINE_DEFAULTS["type_v"], "-o", "json"]
    out = run_cmd(cmd)
    try:
        rows = json.loads(out)
    except json.JSONDecodeError as e:
        raise ToolError(f"llama-bench printed no JSON ({e}):\n{tail(out)}") from None
    row = next((r for r in rows if r.get("n_prompt") == n_prompt and r.get("n_gen") == n_gen), None)
    if row is None or "avg_ts" not in row:
        raise ToolError(f"llama-bench JSON has no row for p={n_prompt} n={n_gen}: {out[:300]}")
    return row


# --- the infer side ---------------------------------------------------------------------------

def dig(doc: dict, dotted: str, what: str):
    """doc["a"]["b"] for "a.b", or a ContractError naming the missing field."""
    cur = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            have = sorted(cur) if isinstance(cur, dict) else type(cur).__name__
            where = dotted[:dotted.index(part) + len(part)]
            raise ContractError(f"`infer {what} --json` output has no field `{where}`"
                                + (f" (wanted `{dotted}`)" if where != dotted else "")
                                + f"; it has {have}: see the --json contract")
        cur = cur[part]
    return cur


@dataclass
class Infer:
    exe: str
    home: str
    extra: list[str] = field(default_factory=list)  # --infer-args, on every `run` but start-up
    env: dict = field(init=False)

    def __post_init__(self):
        self.env = {**os.environ, "INFER_HOME": self.home}

    def json(self, args: list[str], what: str) -> dict:
        out = run_cmd([self.exe, *args], env=self.env)
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            raise ContractError(f"`infer {what} --json` did not print one JSON document:\n"
                                f"{tail(out)}") from None

    def pull(self, name: str) -> Path:
        doc = self.json(["pull", name, "--json"], "pull")
        paths = dig(doc, "paths", "pull")
        return Path(paths[0])

    def run(self, model: Path, prompt: str, threads: int, *extra: str) -> dict:
        return self.json(["run", str(model), "--raw", "--temp", "0", "--json", "--threads",
                          str(threads), *self.extra, *extra, prompt], "run")

    def cache_clear(self) -> None:
        try:
            run_cmd([self.exe, "cache", "clear"], env=self.env)
        except ToolError as first:
            try:  # a confirmation prompt, perhaps
                run_cmd([self.exe, "cache", "clear", "--yes"], env=self.env)
            except ToolError:
                raise ToolError(f"`infer cache clear` failed: {first}") from None


class Tokens:
    """Prompt text of an exact token count, counted by llama.cpp's own tokenizer."""

    def __init__(self, model: Path):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        # As infer's engine tokenizes: add BOS (if the model wants one), parse special tokens.
        return len(self.llm.tokenize(text.encode(), add_bos=True, special=True))

    def prompt(self, n: int) -> str:
        """Words of ordinary prose, then single-token fillers, to exactly ``n`` tokens (BOS
        included, as llama-bench's pp512 counts it)."""
        def words(k: int) -> str:
            return " ".join(WORDS[j % len(WORDS)] for j in range(k)).capitalize()

        lo, hi = 0, 1  # the most words whose count stays <= n, by doubling then bisection
        while self.count(words(hi)) <= n:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.count(words(mid)) <= n else (lo, mid)
        text = words(lo)
        fillers = [" a", " I", " 1", ".", ",", " x"]
        while self.count(text) < n:
            for f in fillers:
                if self.count(text + f) <= n:
                    text += f
                    break
            else:
                break
        got = self.count(text)
        if got != n:
            raise RuntimeError(f"could not build a prompt of exactly {n} tokens (got {got})")
        return text


# --- the benchmark ----------------------------------------------------------------------------

@dataclass
class Series:
    native: list[float] = field(default_factory=list)
    infer: list[float] = field(default_factory=list)
    raw_native: list[dict] = field(default_factory=list)
    raw_infer: list[dict] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    busy_runs: int = 0  # runs kept although other processes loaded the CPUs


def bench_pair(series: Series, reps: int, warmup: int, native_fn, infer_fn, label: str, *,
               busy_limit: float = 0.10, busy_retries: int = 2, quiet_wait: float = 0) -> None:
    """Alternate native and infer runs; the order flips every repetition. A failing infer side
    (contract or CLI error) is recorded once and skipped from then on."""
    def one(side: str, record: bool, rep: int) -> None:
        if side == "infer" and (infer_fn is None or series.error):
            return
        if side == "native" and native_fn is None:
            return
        fn = native_fn if side == "native" else infer_fn
        for attempt in range(busy_retries + 1):
            if record and quiet_wait > 0:
                wait_quiet(busy_limit, quiet_wait)
            try:
                with LoadProbe() as probe:
                    value, raw = fn()
            except (ContractError, ToolError) as e:
                if side == "native":
                    raise
                series.error = str(e)
                log(f"  {label}: infer side failed: {e}")
                return
            if not record:
                return
            if probe.foreign <= busy_limit:
                break
            log(f"  {label} rep {rep + 1} {side}: {value:.4g} while other processes used "
                f"{probe.foreign:.0%} of the CPUs" + ("; again" if attempt < busy_retries else ""))
        else:
            series.busy_runs += 1
        getattr(series, side).append(value)
        getattr(series, "raw_" + side).append({"value": value, "foreign_cpu": probe.foreign,
                                                "output": raw})
        log(f"  {label} rep {rep + 1} {side}: {value:.4g}")

    for w in range(warmup):
        one("native", False, w)
        one("infer", False, w)
    for rep in range(reps):
        for side in (("native", "infer") if rep % 2 == 0 else ("infer", "native")):
            one(side, True, rep)


def check_stats(doc: dict, checks: dict[str, object], series: Series, label: str) -> None:
    for key, want in checks.items():
        got = dig(doc, key, "run")
        if got != want:
            note = f"{label}: infer reported {key} = {got!r}, expected {want!r}"
            if note not in series.notes:
                series.notes.append(note)
                log("  note: " + note)


def bench_model(name: str, path: Path, args, bin_dir: Path | None, infer: Infer | None) -> dict:
    T = args.threads
    use_native = bin_dir is not None
    result: dict = {"path": str(path)}
    tok = Tokens(path) if infer else None

    if "decode" in args.only:
        s = Series()

        def native():
            row = llama_bench(bin_dir, path, T, n_prompt=0, n_gen=128)
            return row["avg_ts"], row

        def inf():
            doc = infer.run(path, SHORT_PROMPT, T, "--ignore-eos", "-n", "128", "--no-prompt-cache")
            check_stats(doc, {"stats.generated_tokens": 128}, s, "decode")
            return float(dig(doc, "stats.decode_tps", "run")), doc

        log(f"{name}: decode (tg128)")
        bench_pair(s, args.reps, args.warmup, native if use_native else None,
                   inf if infer else None, "decode",
                   busy_limit=args.busy_limit, busy_retries=args.busy_retries,
                   quiet_wait=args.quiet_wait)
        result["decode"] = s

    if "prefill" in args.only:
        s = Series()
        prompt = tok.prompt(512) if tok else ""

        def native():
            row = llama_bench(bin_dir, path, T, n_prompt=512, n_gen=0)
            return row["avg_ts"], row

        def inf():
            doc = infer.run(path, prompt, T, "-n", "1", "--no-prompt-cache")
            check_stats(doc, {"stats.prompt_tokens": 512, "stats.cached_tokens": 0}, s, "prefill")
            return float(dig(doc, "stats.prefill_tps", "run")), doc

        log(f"{name}: prefill (pp512)")
        bench_pair(s, args.reps, args.warmup, native if use_native else None,
                   inf if infer else None, "prefill",
                   busy_limit=args.busy_limit, busy_retries=args.busy_retries,
                   quiet_wait=args.quiet_wait)
        result["prefill"] = s

    if "cache" in args.only and infer:
        # "native" here is the cold run, "infer" the warm one: ratio = warm / cold.
        s = Series()
        prompt = tok.prompt(args.cache_tokens)
        log(f"{name}: prompt cache ({args.cache_tokens}-token prompt, cold then warm)")
        for rep in range(args.reps):
            try:
                infer.cache_clear()
                wait_quiet(args.busy_limit, args.quiet_wait)
                with LoadProbe() as p_cold:
                    cold = infer.run(path, prompt, T, "-n", "1")
                wait_quiet(args.busy_limit, args.quiet_wait)
                with LoadProbe() as p_warm:
                    warm = infer.run(path, prompt, T, "-n", "1")
                check_stats(cold, {"stats.prompt_cache": "miss"}, s, "cache cold")
                check_stats(warm, {"stats.prompt_cache": "hit"}, s, "cache warm")
                c, w = float(dig(cold, "stats.ttft_s", "run")), float(dig(warm, "stats.ttft_s", "run"))
            except (ContractError, ToolError) as e:
                s.error = str(e)
                log(f"  cache: infer failed: {e}")
                break
            s.native.append(c)
            s.infer.append(w)
            s.raw_native.append({"value": c, "foreign_cpu": p_cold.foreign, "output": cold})
            s.raw_infer.append({"value": w, "foreign_cpu": p_warm.foreign, "output": warm})
            busy = max(p_cold.foreign, p_warm.foreign)
            if busy > args.busy_limit:
                s.busy_runs += 1
            log(f"  cache rep {rep + 1}: cold {c:.3f} s, warm {w:.3f} s"
                + (f" (other processes used {busy:.0%} of the CPUs)" if busy > args.busy_limit else ""))
        result["cache"] = s
    return result


def bench_startup(infer: Infer, args, model: str = "smollm2") -> Series:
    """Launch to the first byte on stdout, as a person at a terminal would wait for it."""
    s = Series()
    cmd = [infer.exe, "run", model, "Hi", "-n", "8", "--temp", "0"]
    log(f"start-up: {' '.join(cmd[1:])} (to the first byte on stdout)")
    for rep in range(args.reps + 1):  # the first launch warms the page cache; not counted
        err = open("/tmp/bench_engine_startup.err", "w+")
        if rep:
            wait_quiet(args.busy_limit, args.quiet_wait)
        probe = LoadProbe().__enter__()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                             env=infer.env, bufsize=0)
        first = p.stdout.read(1)
        t1 = time.perf_counter()
        rest = p.stdout.read()
        rc = p.wait()
        total = time.perf_counter() - t0
        probe.__exit__(None, None, None)
        err.seek(0)
        if rc != 0 or not first:
            s.error = f"`infer {' '.join(cmd[1:])}` exit {rc}, stdout {len(first + rest)} bytes:\n" \
                      f"{tail(err.read())}"
            log("  start-up failed: " + s.error)
            break
        err.close()
        if rep == 0:
            continue
        s.infer.append(t1 - t0)
        s.raw_infer.append({"first_byte_s": t1 - t0, "exit_s": total, "foreign_cpu": probe.foreign,
                            "stdout": (first + rest).decode("utf-8", "replace")})
        if probe.foreign > args.busy_limit:
            s.busy_runs += 1
        log(f"  start-up rep {rep}: first byte {t1 - t0:.3f} s, exit {total:.3f} s"
            + (f" (other processes used {probe.foreign:.0%} of the CPUs)"
               if probe.foreign > args.busy_limit else ""))
    return s


# --- report -----------------------------------------------------------------------------------

def verdict(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    op, bound, _ = TARGETS[metric]
    ok = value >= bound if op == ">=" else value <= bound
    return "yes" if ok else "**no**"


def fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "n/a"
    return (f"{x:.3f}{unit}" if x < 10 else f"{x:.1f}{unit}")


def spread(xs: list[float]) -> str:
    def short(x: float) -> str:
        return f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    return f" ({short(min(xs))}-{short(max(xs))})" if len(xs) > 1 else ""


def pair_ratios(s: Series) -> list[float]:
    """Each repetition's infer / native, the two runs of a repetition back to back: a VM whose
    speed drifts within a run moves them less than the ratio of the two medians."""
    if len(s.native) != len(s.infer):  # a side that failed part-way: no pairs to claim
        return []
    return [i / n for n, i in zip(s.native, s.infer) if n]


def paired(s: Series) -> float | None:
    """The median of ``pair_ratios``."""
    ratios = pair_ratios(s)
    return median(ratios) if ratios else None


def table(results: dict, startup: Series | None, args) -> tuple[str, list[dict]]:
    head = ("| model | measure | native / cold | infer / warm | ratio | paired [90%] | target | met |\n"
            "|---|---|---|---|---|---|---|---|")
    lines, rows = [head], []
    names = {"decode": "decode t/s (tg128)", "prefill": "prefill t/s (pp512)",
             "cache": f"TTFT s, {args.cache_tokens}-token prompt"}
    for model, res in results.items():
        for metric in ("decode", "prefill", "cache"):
            s: Series | None = res.get(metric)
            if s is None:
                continue
            a, b = median(s.native), median(s.infer)
            ratio = b / a if a and b is not None else None
            pair, band = paired(s), interval(pair_ratios(s))
            unit = " s" if metric == "cache" else ""
            cells = [model, names[metric], fmt(a, unit) + spread(s.native),
                     fmt(b, unit) + spread(s.infer), fmt(ratio),
                     fmt(pair) + (" [{}, {}]".format(*map(fmt, band)) if band else ""), TARGETS[metric][2],
                     verdict(metric, ratio)]
            if s.error:
                cells[3] = "error (below)"
            lines.append("| " + " | ".join(cells) + " |")
            rows.append({"model": model, "metric": metric, "native_median": a, "infer_median": b,
                         "ratio": ratio, "paired": pair, "paired_90": band, "target": TARGETS[metric][2],
                         "met": verdict(metric, ratio) == "yes", "error": s.error})
    if startup is not None:
        m = median(startup.infer)
        lines.append("| smollm2 | start-up to first byte | | "
                     + (fmt(m, " s") + spread(startup.infer) if not startup.error else "error (below)")
                     + f" | | | {TARGETS['startup'][2]} | {verdict('startup', m)} |")
        rows.append({"model": "smollm2", "metric": "startup", "infer_median": m,
                     "target": TARGETS["startup"][2], "met": verdict("startup", m) == "yes",
                     "error": startup.error})
    return "\n".join(lines), rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                    help="model names (resolved by `infer pull`) or .gguf paths "
                         f"(default: {' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--threads", "-t", type=int, default=2, help="threads for both sides (2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per side (5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per side first (1)")
    ap.add_argument("--only", default=",".join(METRICS),
                    help=f"comma-separated subset of {','.join(METRICS)}")
    ap.add_argument("--side", choices=("both", "native", "infer"), default="both")
    ap.add_argument("--cache-tokens", type=int, default=1500, help="prompt-cache prompt size")
    ap.add_argument("--native-bin", help="folder with llama-bench (default: scripts/native.sh)")
    ap.add_argument("--infer", default=str(ROOT / ".venv" / "bin" / "infer"), help="infer executable")
    ap.add_argument("--infer-home", default=os.environ.get("BENCH_INFER_HOME",
                                                           str(ROOT / ".cache" / "test-home")))
    ap.add_argument("--busy-limit", type=float, default=0.10,
                    help="a run during which other processes used more than this share of the "
                         "CPUs is repeated (0.10)")
    ap.add_argument("--busy-retries", type=int, default=2, help="how many times (2)")
    ap.add_argument("--quiet-wait", type=float, default=30,
                    help="before each timed run, wait up to this many seconds for the CPUs to "
                         "be free of other processes (30; 0 to not wait)")
    ap.add_argument("--infer-args", default="--repeat-penalty 1",
                    help="extra options (give them as --infer-args='...') for every timed `infer run` "
                         "except the start-up one "
                         "(default: '--repeat-penalty 1': llama-bench does not sample, and infer's "
                         "default repetition penalty costs ~0.8 ms a token on a 262k vocabulary)")
    ap.add_argument("--json", action="store_true", help="also print every raw number as JSON")
    args = ap.parse_args()
    args.only = {m.strip() for m in args.only.split(",") if m.strip()}
    if bad := args.only - set(METRICS):
        ap.error(f"--only: unknown {', '.join(sorted(bad))}")

    import shlex

    resolver = Infer(args.infer, args.infer_home, shlex.split(args.infer_args))
    infer = resolver if args.side in ("both", "infer") else None
    needs_native = args.side in ("both", "native") and bool(args.only & {"decode", "prefill"})
    bin_dir = native_bin(args.native_bin) if needs_native else None

    results: dict[str, dict] = {}
    failed = False
    for name in args.models:
        path = Path(name)
        if not (path.suffix == ".gguf" and path.is_file()):
            try:
                path = resolver.pull(name)
            except (ContractError, ToolError) as e:
                sys.exit(f"could not resolve model {name}: {e}")
        label = name if not name.endswith(".gguf") else path.stem
        try:
            results[label] = bench_model(label, path, args, bin_dir, infer)
        except ToolError as e:  # the native side failed: nothing to compare against
            sys.exit(f"{label}: {e}")

    startup = bench_startup(infer, args) if infer and "startup" in args.only else None

    text, rows = table(results, startup, args)
    native_info = {}
    for res in results.values():
        for s in res.values():
            if isinstance(s, Series) and s.raw_native and "avg_ts" in s.raw_native[0]["output"]:
                r = s.raw_native[0]["output"]
                native_info = {k: r.get(k) for k in ("cpu_info", "backends", "n_threads", "n_batch",
                                                     "n_ubatch", "flash_attn", "type_k", "type_v",
                                                     "poll", "repack")}
                break
        if native_info:
            break
    if bin_dir is not None:
        commit = bin_dir / "LLAMA_CPP_COMMIT"
        native_info["llama_cpp_commit"] = commit.read_text().strip() if commit.is_file() else "?"
        native_info["bin"] = str(bin_dir)
    native_desc = (f"native = llama.cpp {native_info.get('llama_cpp_commit', '?')[:7]} llama-bench "
                   f"with -b {ENGINE_DEFAULTS['n_batch']} -ub {ENGINE_DEFAULTS['n_ubatch']} "
                   f"-fa {ENGINE_DEFAULTS['flash_attn']} (infer's engine defaults); "
                   if bin_dir is not None else "")
    print(f"\nEngine benchmark: {args.threads} threads, median of {args.reps} (range in brackets); "
          f"{native_desc}infer run given `{args.infer_args}`\n")
    print(text)
    print("\nratio: of the two medians (what `met` judges); paired: the median of each "
          "repetition's own ratio, its two runs back to back, with a 90% bootstrap interval for "
          "it in square brackets (4 repetitions or more).")
    problems = []
    for model, res in results.items():
        for metric, s in res.items():
            if isinstance(s, Series):
                problems += [f"- {model} {metric}: {n}" for n in s.notes]
                if s.busy_runs:
                    problems.append(f"- {model} {metric}: {s.busy_runs} run(s) kept although other "
                                    "processes were loading the CPUs: treat with care")
                if s.error:
                    problems.append(f"- {model} {metric}: {s.error}")
    if startup and startup.error:
        problems.append(f"- start-up: {startup.error}")
    if startup and startup.busy_runs:
        problems.append(f"- start-up: {startup.busy_runs} run(s) while other processes were "
                        "loading the CPUs: treat with care")
    if problems:
        failed = any(r.get("error") for r in rows)
        print("\n" + "\n".join(problems))

    if args.json:
        doc = {"threads": args.threads, "reps": args.reps, "native": native_info,
               "infer_args": args.infer_args,
               "llama_bench_args": ENGINE_DEFAULTS, "summary": rows, "models": {}}
        for model, res in results.items():
            doc["models"][model] = {"path": res["path"]}
            for metric, s in res.items():
                if isinstance(s, Series):
                    doc["models"][model][metric] = {
                        ("cold" if metric == "cache" else "native"): s.native,
                        ("warm" if metric == "cache" else "infer"): s.infer,
                        "raw_native" if metric != "cache" else "raw_cold": s.raw_native,
                        "raw_infer" if metric != "cache" else "raw_warm": s.raw_infer,
                        "error": s.error, "notes": s.notes}
        if startup is not None:
            doc["startup"] = {"first_byte_s": startup.infer, "raw": startup.raw_infer,
                              "error": startup.error}
        print("\n```json\n" + json.dumps(doc, indent=1) + "\n```")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
