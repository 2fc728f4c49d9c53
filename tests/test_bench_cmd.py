"""infer bench --quick on the test models: every section in the table, KL growing from Q8_0 to
Q2_K, the JSON and the table saying the same, the plot, the saved result shown by --show, the
comparison with it, skipped sections with their reasons, Ctrl-C keeping finished sections.

One quick bench of SmolLM2 F16 (with its Q4_1 as the draft) is shared by the module; the others
measure one cheap section each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_infer

SECTIONS = ("precision", "kv", "flash-attn", "batching", "speculative")
# One thread: on a shared two-core machine two llama.cpp threads wait for each other at every
# barrier whenever another process holds a core, and a run slows down many times over. The
# tests check what is measured, not how fast.
FAST = ("--quick", "--threads", "1")


def _env(home: Path) -> dict:
    return {"INFER_HOME": str(home), "HF_HOME": str(home / "hf"), "COLUMNS": "200"}


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-home")


@pytest.fixture(scope="module")
def quick(home, smollm2_f16, smollm2_gguf, tmp_path_factory):
    """(the --json document, the plot file or None, the process) of one quick bench."""
    args = ["bench", str(smollm2_f16), *FAST, "--ctx", "512", "--draft", str(smollm2_gguf), "--json"]
    plot = None
    if _has_matplotlib():
        plot = tmp_path_factory.mktemp("plot") / "bench.png"
        args += ["--plot", str(plot)]
    t0 = time.perf_counter()
    r = run_infer(*args, env=_env(home), timeout=900)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    doc["_wall_s"] = seconds
    return doc, plot, r


def _section(doc, name):
    return next(s for s in doc["sections"] if s["name"] == name)


def test_every_section_is_measured(quick):
    doc, _, r = quick
    assert [s["name"] for s in doc["sections"]] == list(SECTIONS)
    assert all(s["status"] == "done" for s in doc["sections"]), [(s["name"], s["reason"]) for s in doc["sections"]]
    summary_sections = {row["section"] for row in doc["summary"]}
    assert summary_sections == set(SECTIONS)
    for s in doc["sections"]:
        assert s["load"] is not None and "cpu_percent" in s["load"]
    assert "Estimated time" in r.stderr
    assert doc["estimate_s"] > 0
    # every repetition is in the document (one with --quick)
    f16 = _section(doc, "precision")["rows"][0]["metrics"]
    assert len(f16["decode_tps"]["reps"]) == 1 and f16["decode_tps"]["median"] > 0


def test_kl_grows_from_q8_0_to_q2_k(quick):
    doc, _, _ = quick
    rows = {r["label"]: r for r in _section(doc, "precision")["rows"]}
    kl = [rows[t]["metrics"]["quality"]["kl_mean"] for t in ("Q8_0", "Q4_K_M", "Q2_K")]
    assert 0 < kl[0] < kl[1] < kl[2], kl
    sizes = [rows[t]["metrics"]["size"] for t in ("Q8_0", "Q4_K_M", "Q2_K")]
    assert sizes == sorted(sizes, reverse=True)
    kv = {r["label"]: r for r in _section(doc, "kv")["rows"]}
    assert kv["q8_0"]["metrics"]["kv_bytes"] < kv["f16"]["metrics"]["kv_bytes"]
    assert kv["q8_0"]["metrics"]["quality"]["kl_mean"] < kv["q4_0"]["metrics"]["quality"]["kl_mean"]


def test_json_matches_the_table_and_show(quick, home, smollm2_f16):
    doc, _, _ = quick
    r = run_infer("bench", str(smollm2_f16), "--show", env=_env(home))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for row in doc["summary"]:
        line = next((ln for ln in lines if ln.startswith(row["technique"] + "  ")), None)
        assert line is not None, row["technique"]
        if row["speed_gain"] is not None:
            assert f"{row['speed_gain']:.2f}x" in line, (row, line)
        if row["kl_mean"] is not None:
            assert f"KL {row['kl_mean']:.4f}" in line, (row, line)
    for title in ("Precision", "KV cache type", "Flash attention", "Batching", "Speculative decoding"):
        assert any(ln.startswith(title) for ln in lines), title
    shown = run_infer("bench", str(smollm2_f16), "--show", "--json", env=_env(home))
    assert shown.returncode == 0
    saved = json.loads(shown.stdout)
    assert saved["finished"] == doc["finished"] and saved["summary"] == doc["summary"]


def test_plot_files_are_valid(quick, home, smollm2_f16, tmp_path):
    if not _has_matplotlib():
        r = run_infer("bench", str(smollm2_f16), "--show", "--plot", str(tmp_path / "p.png"), env=_env(home))
        assert r.returncode != 0 and "infer-cli[plot]" in r.stderr
        return
    _, plot, _ = quick
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "bench.svg"
    r = run_infer("bench", str(smollm2_f16), "--show", "--plot", str(svg), env=_env(home))
    assert r.returncode == 0, r.stderr
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text


def test_skipped_sections_carry_their_reason(quick, home):
    """An already-Q2_K model cannot be quantized further, and a context the machine cannot hold
    skips the KV section; batching is still measured."""
    q2k = next((home / "bench" / "quants").rglob("*.Q2_K.gguf"))
    r = run_infer("bench", str(q2k), *FAST, "--only", "precision,kv,batching", "--ctx",
                  "50000000", env=_env(home), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already Q2_K" in r.stdout and "cannot be quantized further" in r.stdout
    lines = r.stdout.splitlines()
    kv_line = next(ln for ln in lines if ln.startswith("KV cache"))
    assert "skipped" in kv_line
    assert "context of 50000000 tokens" in r.stdout
    shown = json.loads(run_infer("bench", str(q2k), "--show", "--json", env=_env(home)).stdout)
    status = {s["name"]: (s["status"], s["reason"]) for s in shown["sections"]}
    assert status["precision"][0] == "skipped" and "already Q2_K" in status["precision"][1]
    assert status["kv"][0] == "skipped" and "needs" in status["kv"][1]
    assert status["batching"][0] == "done"
    assert {row["section"]: row["skipped"] for row in shown["summary"]}["kv"]


def test_a_second_run_is_compared_with_the_saved_one(quick, home, smollm2_f16):
    r = run_infer("bench", str(smollm2_f16), *FAST, "--ctx", "512", "--only", "batching", env=_env(home),
                  timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Compared with the run of" in r.stdout
    shown = json.loads(run_infer("bench", str(smollm2_f16), "--show", "--json", env=_env(home)).stdout)
    assert shown["comparison"]["previous"] == quick[0]["finished"]
    # the sections this run did not measure stay in the saved result, marked as older
    assert [s["name"] for s in shown["sections"]] == list(SECTIONS)
    carried = {s["name"]: s.get("carried_from") for s in shown["sections"]}
    assert carried.pop("batching") is None
    assert set(carried.values()) == {quick[0]["finished"]}


def test_comparison_lists_what_moved():
    from infer_cli.bench.results import compare

    def doc(tps, kl):
        return {"finished": "t", "settings": {"quick": True},
                "sections": [{"name": "precision", "rows": [
                    {"label": "Q8_0", "metrics": {"decode_tps": {"median": tps},
                                                  "quality": {"kl_mean": kl}}}]}]}

    same = compare(doc(100.0, 0.01), doc(105.0, 0.01))
    assert same["changed"] == [] and same["unchanged"] == 2
    moved = compare(doc(100.0, 0.01), doc(130.0, 0.01))
    assert [(c["metric"], round(c["change"], 2)) for c in moved["changed"]] == [("decode_tps", 0.3)]


def test_bad_input_is_one_line(smollm2_gguf, home):
    r = run_infer("bench", str(smollm2_gguf), "--only", "precision,warp", env=_env(home))
    assert r.returncode == 2 and r.stderr.startswith("Error: --only warp")
    assert "Traceback" not in r.stderr
    r = run_infer("bench", str(smollm2_gguf), "--plot", "out.jpg", env=_env(home))
    assert r.returncode == 2 and "--plot out.jpg" in r.stderr
    r = run_infer("bench", str(smollm2_gguf), "--show", env=_env(home / "empty"))
    assert r.returncode != 0 and r.stderr.startswith("Error: no saved bench result")
    assert "Traceback" not in r.stderr


def test_ctrl_c_keeps_finished_sections(smollm2_gguf, tmp_path):
    env = {**os.environ, **_env(tmp_path)}
    p = subprocess.Popen([sys.executable, "-m", "infer_cli", "bench", str(smollm2_gguf), *FAST,
                          "--only", "batching,speculative"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        err = []
        deadline = time.time() + 240
        while time.time() < deadline:
            line = p.stderr.readline()
            if not line:
                break
            err.append(line)
            if line.startswith("batching: done"):
                p.send_signal(signal.SIGINT)
                break
        out, rest = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, "".join(err) + rest
    assert "Batching" in out and "Interrupted" in out
    saved = json.loads(next((tmp_path / "bench").glob("*.json")).read_text())
    assert saved["interrupted"] is True
    status = {s["name"]: s["status"] for s in saved["sections"]}
    assert status == {"batching": "done", "speculative": "interrupted"}


def test_bench_serve_pairs_each_repetition_with_the_server_that_ran_beside_it():
    """The machine speeds up over the run (70, 80, then 120 tok/s for llama-server) and infer gets
    0.9 of whatever llama-server got beside it, except in one repetition: the paired ratio is
    the 0.9 of most repetitions, and the ratio of the medians is not."""
    from tests.scripts import load_script

    bench = load_script("bench_serve")
    theirs, mine = [70.0, 80.0, 120.0], [63.0, 40.0, 108.0]
    raw = {("infer4", "held-out", 1): [{"agg_tps": v, "ttft_p50_ms": 100.0} for v in mine],
           ("llama4", "held-out", 1): [{"agg_tps": v, "ttft_p50_ms": 100.0} for v in theirs]}
    assert bench.paired(raw, "infer4", "llama4", "held-out", 1, "agg_tps") == 0.9
    summary = bench.summarize({k: [{**r, "ttft_p95_ms": 1.0, "wall_s": 1.0, "tokens": 1,
                                    "complete": 1, "requests": 1, "usage_reported": True,
                                    "server_cpu_pct": 200.0, "loadavg_1m": 1.0} for r in v]
                               for k, v in raw.items()})
    (row,) = bench.compute_ratios(summary, ["held-out"], raw)
    assert row["paired"] == 0.9 and row["value"] == 63.0 / 80.0 and not row["met"]
    # llama-server missed the middle repetition: the others still pair with their own partners
    # (the repetition each result carries), not with whatever comes next in the list
    for key in raw:
        raw[key] = [{**r, "rep": i} for i, r in enumerate(raw[key])]
    del raw[("llama4", "held-out", 1)][1]
    assert bench.pair_ratios(raw, "infer4", "llama4", "held-out", 1, "agg_tps") == [0.9, 0.9]
    # results pooled from two runs (--merge) pair within their run only
    raw[("infer4", "held-out", 1)].append({"agg_tps": 50.0, "rep": 0, "run": 1})
    assert bench.pair_ratios(raw, "infer4", "llama4", "held-out", 1, "agg_tps") == [0.9, 0.9]
    raw[("llama4", "held-out", 1)].append({"agg_tps": 100.0, "rep": 0, "run": 1})
    assert bench.pair_ratios(raw, "infer4", "llama4", "held-out", 1, "agg_tps") == [0.9, 0.9, 0.5]
    assert bench.paired(raw, "infer4", "llama4", "nowhere", 1, "agg_tps") is None


def test_bench_serve_interval_brackets_the_paired_median_and_widens_with_noise():
    from tests.scripts import load_script

    bench = load_script("bench_serve")
    assert bench.interval([1.0, 1.1, 0.9]) is None  # too few repetitions to say anything
    tight = [0.99, 1.0, 1.01, 1.0, 0.995, 1.005, 1.0, 0.99]
    noisy = [0.8, 1.2, 0.85, 1.15, 1.0, 0.9, 1.1, 0.95]
    lo, hi = bench.interval(tight)
    assert lo <= 1.0 <= hi and hi - lo <= 0.02
    lo2, hi2 = bench.interval(noisy)
    assert lo2 < lo and hi2 > hi and lo2 < 0.95  # this run cannot tell 1.0 from a 0.95 bound
    assert bench.interval(noisy) == (lo2, hi2)  # seeded: the same table twice


def test_bench_serve_asks_for_equal_work_only_when_told():
    """--ignore-eos sends llama-server's extra so that every answer runs to max_tokens; without
    it the request is a plain OpenAI one (llama-cpp-python's server gets the same body)."""
    from tests.scripts import load_script

    bench = load_script("bench_serve")
    plain = bench.chat_payload("Hi", 128)
    assert "ignore_eos" not in plain and plain["max_tokens"] == 128 and plain["stream"]
    assert bench.chat_payload("Hi", 128, ignore_eos=True)["ignore_eos"] is True


def test_bench_serve_merge_pools_runs_of_the_same_settings_and_refuses_others(tmp_path):
    """Two saved runs (one with its table printed before the JSON, as --json does) pool into one
    table whose paired ratio takes every repetition of both; a run with another max_tokens is
    refused with one line, as is a file that holds no run."""
    def doc(mine, theirs, max_tokens=128):
        load = {"ttft_p50_ms": 100.0, "ttft_p95_ms": 120.0, "wall_s": 5.0, "tokens": 500,
                "complete": 4, "requests": 4, "usage_reported": True, "server_cpu_pct": 197.0,
                "loadavg_1m": 1.5}
        return {"settings": {"model": "m.gguf", "reps": len(mine), "ctx": 8192, "threads": 2,
                             "max_tokens": max_tokens, "total_s": 60.0},
                "raw": [{"server": "infer4", "set": "held-out", "clients": 1,
                         "reps": [{**load, "agg_tps": v, "rep": i} for i, v in enumerate(mine)]},
                        {"server": "llama4", "set": "held-out", "clients": 1,
                         "reps": [{**load, "agg_tps": v, "rep": i} for i, v in enumerate(theirs)]}]}

    a, b, c = tmp_path / "a.txt", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text("| a table |\n" + json.dumps(doc([90.0, 100.0], [100.0, 100.0]), indent=1))
    b.write_text(json.dumps(doc([120.0, 105.0], [100.0, 100.0])))
    c.write_text(json.dumps(doc([1.0], [1.0], max_tokens=64)))
    script = [sys.executable, str(Path(__file__).resolve().parent.parent / "scripts" / "bench_serve.py")]
    out = subprocess.run([*script, "--merge", str(a), str(b), "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "median of 4 reps pooled from 2 runs;" in out.stdout
    (row,) = json.loads(out.stdout[out.stdout.index("\n{\n") + 1:])["ratios"]
    assert row["pairs"] == 4 and row["paired"] == (1.0 + 1.05) / 2
    bad = subprocess.run([*script, "--merge", str(a), str(c)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "another max_tokens" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "d.txt").write_text("no run here")
    bad = subprocess.run([*script, "--merge", str(tmp_path / "d.txt")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "no --json output" in bad.stderr


def test_bench_engine_pairs_each_repetition_with_the_native_run_beside_it():
    """As bench_serve: llama-bench speeds up over the run and infer decodes at 0.95 of whatever
    it got beside it, but once, so the paired ratio is 0.95 and the ratio of the medians is not;
    it is reported beside that ratio, which `met` still judges."""
    from tests.scripts import load_script

    bench = load_script("bench_engine")
    s = bench.Series(native=[80.0, 100.0, 120.0], infer=[76.0, 80.0, 114.0])
    assert abs(bench.paired(s) - 0.95) < 1e-9
    text, (row,) = bench.table({"smollm2": {"path": "m.gguf", "decode": s}}, None,
                               type("Args", (), {"cache_tokens": 1500})())
    assert abs(row["paired"] - 0.95) < 1e-9 and row["ratio"] == 80.0 / 100.0 and not row["met"]
    assert "| 0.800 | 0.950 |" in text
    # an infer side that failed part-way: no pairing is claimed
    assert bench.paired(bench.Series(native=[80.0, 100.0], infer=[76.0])) is None
    # four repetitions or more: the paired ratio comes with its interval
    s4 = bench.Series(native=[80.0, 100.0, 120.0, 90.0], infer=[76.0, 80.0, 114.0, 85.5])
    text, (row,) = bench.table({"smollm2": {"path": "m.gguf", "decode": s4}}, None,
                               type("Args", (), {"cache_tokens": 1500})())
    lo, hi = row["paired_90"]
    assert lo <= row["paired"] <= hi and f"| 0.950 [{lo:.3f}, {hi:.3f}] |" in text


def test_bench_speculative_counts_the_prompts_whose_runs_decided_alike():
    """Two prompts, three repetitions: the first prompt's runs made the same choices each time;
    in one run of the second the clock's cost figure switched speculation off at another token,
    so its speed may differ for a reason other than the machine, and it is not counted."""
    from tests.scripts import load_script

    bench = load_script("bench_speculative")

    def run(rounds, drafted, accepted, switches=()):
        return {"rounds": rounds, "drafted": drafted, "accepted": accepted,
                "switches": [{"token": t, "to": to, "why": "a reason worded per run"}
                             for t, to in switches]}

    same = run(23, 264, 228)
    off_on = [(21, "off"), (72, "on")]
    specs = [same, run(23, 235, 209, off_on),          # repetition 1: prompts 0 and 1
             same, run(23, 235, 209, off_on),          # repetition 2
             same, run(23, 235, 209, [(21, "off"), (88, "on")])]  # back on later this time
    assert bench.same_decisions(specs, 2) == 1
    specs[5] = run(23, 235, 209, off_on)
    assert bench.same_decisions(specs, 2) == 2
    # the wording of a switch's reason (which carries measured figures) is not a decision
    assert bench.decisions(specs[1]) == bench.decisions(run(23, 235, 209, off_on))


def test_bench_speculative_counts_the_runs_that_measured_the_cost_again():
    """The summary row says in how many runs the policy measured its cost figure again before a
    switch-off (a re-check), beside the runs it switched off in."""
    from tests.scripts import load_script

    bench = load_script("bench_speculative")
    quiet = {"rounds": 23, "drafted": 264, "accepted": 228, "switches": [], "rechecks": []}
    rechecked = {**quiet, "rounds": 24, "rechecks": [{"token": 21, "why": "w"}]}
    r = {"runs": {"plain": [40.0, 42.0], "spec": [60.0, 62.0], "native8": [50.0, 52.0]},
         "per_prompt": {"plain": [[40.0, 42.0]], "spec": [[60.0, 62.0]], "native8": [[50.0, 52.0]]},
         "same": [[True, True]], "specs": [quiet, rechecked]}
    s = bench.summarize("pair", r, 1)
    assert s["rechecked"] == "1/2" and s["offs"] == "0/2" and s["decisions"] == "0/1"
    line = bench.row(s)
    assert "| 0/2 / 0/2 | 1/2 | 0/1 |" in line
    assert line.count("|") == bench.HEADER.splitlines()[0].count("|")
