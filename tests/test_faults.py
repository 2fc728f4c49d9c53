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


def test_ctrl_c_while_the_command_line_is_still_importing(tmp_path):
    """A real SIGINT delivered while the console entry point imports Typer (an import hook sends
    it the moment `typer` is first imported): exit 130 and one line, no traceback."""
    import subprocess
    import sys

    hook = ("import os, signal, sys\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'typer':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Hook())\n"
            "sys.argv = ['infer', '--help']\n"
            "from infer_cli.console import main\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", hook], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert p.returncode == 130, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and p.stderr.strip() == "Interrupted."
    assert p.stdout == ""
