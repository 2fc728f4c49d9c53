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
    assert doc["model"] == "smollm2" and doc["stats"]["generated_tokens"] > 0 and doc["text"]


def test_model_sampling_defaults_come_from_models_toml(infer, smollm2_in_home):
    doc = json.loads(infer("run", "Hi", "-n", "2", "--json").stdout)
    assert doc["sampling"]["temperature"] == 0.2 and doc["sampling"]["repeat_penalty"] == 1.1
    doc = json.loads(infer("run", "Hi", "-n", "2", "--temp", "0.5", "--json").stdout)
    assert doc["sampling"]["temperature"] == 0.5 and doc["sampling"]["top_p"] == 0.9


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


@pytest.mark.parametrize("make", [
    lambda src: src.read_bytes()[:1000],                      # truncated in the key/values
    lambda src: src.read_bytes()[:3 << 20],                   # truncated in the weights
    lambda src: bytes(range(256)) * 64,                       # not GGUF at all
])
@pytest.mark.parametrize("command", [["show"], ["run", "--temp", "0"]])
def test_bad_gguf_is_one_clean_line(infer, tmp_path, smollm2_gguf, make, command):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(make(smollm2_gguf))
    args = [*command[:1], str(bad), *(["hello"] if command[0] == "run" else []), *command[1:]]
    t0 = time.perf_counter()
    proc = infer(*args)
    assert time.perf_counter() - t0 < 5
    assert proc.returncode == 65, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"Error: {bad} is not a usable GGUF file")
    assert len(lines) == 2 and "Traceback" not in proc.stderr  # the message and its hint
    assert proc.stdout == ""
    assert bad.exists()  # never deletes a file of the user's


def test_show_json_has_the_header_facts(infer, gemma3_gguf):
    proc = infer("show", str(gemma3_gguf), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["architecture"] == "gemma3" and doc["sliding_window"] == 512
    assert doc["vocab_size"] == 262144 and doc["quant"] == "Q4_K_M" and doc["block_count"] == 18


def test_list_and_rm_a_store_model(infer, smollm2_in_home):
    listed = json.loads(infer("list", "--json").stdout)["models"]
    assert [(m["name"], m["quant"], m["parameters"]) for m in listed] == [("smollm2", "Q4_1", 134515008)]
    refused = infer("rm", "smollm2")  # no terminal and no --yes: refuse rather than guess
    assert refused.returncode == 2 and smollm2_in_home.exists()
    proc = infer("rm", "smollm2", "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["deleted"] and doc["freed"] == 98362432
    assert not smollm2_in_home.exists()
    assert json.loads(infer("list", "--json").stdout)["models"] == []
    assert infer("rm", "smollm2", "--yes").returncode == 3


def test_rm_of_a_local_file_only_forgets_it(infer, smollm2_gguf, tmp_path):
    mine = tmp_path / "mine.gguf"
    os.link(smollm2_gguf, mine)
    assert infer("run", str(mine), "hi", "-n", "2").returncode == 0
    assert [m["path"] for m in json.loads(infer("list", "--json").stdout)["models"]] == [str(mine)]
    proc = infer("rm", str(mine))
    assert proc.returncode == 0 and "stays" in proc.stdout and mine.exists()
    assert json.loads(infer("list", "--json").stdout)["models"] == []
