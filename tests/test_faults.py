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


def test_temporaries_of_killed_processes_are_swept_by_the_next_writer(tmp_path):
    """What a SIGKILLed writer left (its `.name.<pid>.partial`) goes when the next process writes
    the same target; a live process's temporary stays."""
    import os
    import subprocess
    import sys

    from infer_cli.files import atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    target = tmp_path / "model.gguf"
    stale = tmp_path / f".model.gguf.{dead}.partial"
    stale.write_bytes(b"half a model")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".model.gguf.{alive.pid}.partial"
        live.write_bytes(b"being written")
        other = tmp_path / f".other.gguf.{dead}.partial"  # another target's: not this writer's to judge
        other.write_bytes(b"x")
        atomic_write(target, b"whole")
        assert target.read_bytes() == b"whole"
        assert not stale.exists() and live.exists() and other.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [target.name, live.name, other.name])
    finally:
        alive.kill()
        alive.wait()


def test_ctrl_c_inside_llama_cpp_log_callback_stops_the_run(smollm2_gguf):
    """A real SIGINT delivered while llama.cpp is inside infer's log callback (stderr is wrapped
    so that the callback's own write sends it): the run stops with exit 130 once llama.cpp has
    returned, instead of ctypes printing 'Exception ignored ...' and the run going on."""
    import subprocess
    import sys

    code = ("import os, signal, sys\n"
            "class Once:\n"
            "    def __init__(self, f):\n"
            "        self.f, self.sent = f, False\n"
            "    def write(self, s):\n"
            "        if not self.sent and 'llama_model_loader' in s:\n"
            "            self.sent = True\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return self.f.write(s)\n"
            "    def __getattr__(self, name):\n"
            "        return getattr(self.f, name)\n"
            "sys.stderr = Once(sys.stderr)\n"
            f"sys.argv = ['infer', 'run', {str(smollm2_gguf)!r}, 'Hello', '-n', '4', '--no-prompt-cache']\n"
            "from infer_cli.console import main\n"
            "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={**__import__("os").environ, "INFER_DEBUG": "1"})
    assert p.returncode == 130, (p.returncode, p.stderr[-1500:])
    assert "Exception ignored" not in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""  # stopped during the load: no answer began
