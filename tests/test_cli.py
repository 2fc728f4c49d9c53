"""The command line as a user meets it: real subprocesses, real llama.cpp, the real test model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from infer_cli.errors import InferError, _TABLE


def test_help_is_instant(infer):
    # Cold interpreter each time; the best of three absorbs a noisy neighbour.
    for args in (["--help"], ["pull", "--help"]):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            proc = infer(*args)
            best = min(best, time.perf_counter() - t0)
            assert proc.returncode == 0, proc.stderr
        assert best < 0.3, f"infer {' '.join(args)} took {best:.2f} s"
    assert "pull" in infer("--help").stdout


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from infer_cli.cli import app; "
            "heavy = [m for m in ('llama_cpp', 'numpy', 'huggingface_hub', 'gguf') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_shell_completion_is_offered(infer):
    proc = infer("--show-completion", env={"SHELL": "/bin/bash"})
    assert proc.returncode == 0 and "complete" in proc.stdout


def test_every_error_type_has_a_row_in_the_table():
    import inspect
    from infer_cli import errors
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, InferError) and cls is not InferError:
            assert cls in _TABLE, f"{name} has no row in the error table"


def test_run_default_model_prints_generated_text(infer, smollm2_in_home):
    proc = infer("run", "Name three colours.", "-n", "24", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip()) > 10
    assert "tokens/s" in proc.stderr and "Traceback" not in proc.stderr


def test_run_json_is_one_document(infer, smollm2_in_home):
    proc = infer("run", "smollm2", "Say hi.", "-n", "8", "--temp", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["model"] == "smollm2" and doc["generated_tokens"] > 0 and doc["text"]


def test_greedy_run_is_reproducible(infer, smollm2_in_home):
    a = infer("run", "Count to five.", "-n", "16", "--temp", "0").stdout
    b = infer("run", "Count to five.", "-n", "16", "--temp", "0").stdout
    assert a == b and a.strip()


def test_unknown_model_is_one_line_and_exit_3(infer):
    proc = infer("show", "no-such-alias")
    assert proc.returncode == 3
    assert proc.stderr.startswith("Error: no model 'no-such-alias'")
    assert "Traceback" not in proc.stderr


def test_debug_env_shows_the_traceback(infer):
    proc = infer("show", "no-such-alias", env={"INFER_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
