"""A few trials of scripts/faults.py (the script runs 20 of SIGINT and 20 of SIGKILL per
operation): infer interrupted at random moments leaves no target file that looks complete but is
not, and the next command ends verified."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


faults = load_script("faults")


@pytest.mark.parametrize("operation,trials", [("pull", 2), ("batch", 1), ("prompt-cache", 1),
                                              ("quantize", 1)])
def test_interrupted_at_random_moments(operation, trials, smollm2_gguf, smollm2_f16):
    rows = faults.campaign([operation], trials, seed=7)
    for row in rows:
        assert row.trials == trials
        assert (row.hangs, row.tracebacks, row.bad_targets, row.failed_recoveries) == (0, 0, 0, 0), \
            row.notes
