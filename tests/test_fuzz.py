"""A short run of each fuzz target of scripts/fuzz.py (the full campaigns run 10,000 cases
each from the script), and every case a campaign once found, kept under tests/fuzz_cases/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "tests" / "fuzz_cases"


fuzz = load_script("fuzz")
TARGETS = sorted(fuzz.TARGETS)


def _report(res) -> str:
    return "\n".join(f"case {i}: {outcome}\n{detail[-1500:]}" for i, outcome, detail in res.details)


@pytest.mark.parametrize("target", TARGETS)
def test_short_campaign_finds_nothing(target, tmp_path, request):
    if target == "gguf-load":
        request.getfixturevalue("smollm2_gguf")  # the real model whose header is mutated
    t = fuzz.TARGETS[target]
    res = fuzz.campaign(target, t.suite_cases, seed=20261202, save_root=tmp_path / "found")
    assert res.cases >= t.suite_cases * 0.9
    assert res.failures == 0, _report(res)
    assert res.counts.get("ok", 0) + sum(v for k, v in res.counts.items()
                                         if k.startswith("rejected")) == res.cases


def _saved():
    return [pytest.param(p.parent.name, p, id=f"{p.parent.name}/{p.name}")
            for p in sorted(CASES.glob("*/*")) if p.is_dir()]


@pytest.mark.parametrize("target,folder", _saved())
def test_found_case_is_now_refused_cleanly(target, folder, request):
    if target == "gguf-load":
        request.getfixturevalue("smollm2_gguf")
    res = fuzz.replay(target, [folder])
    assert res.failures == 0, _report(res)
    expected = (folder / "EXPECT.txt").read_text().strip() if (folder / "EXPECT.txt").exists() else None
    if expected:
        assert expected in res.counts, res.counts
