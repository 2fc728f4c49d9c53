"""The command line as a user meets it: real subprocesses, real llama.cpp, the real test model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from infer_cli.errors import InferError, TABLE


HEAVY = ("llama_cpp", "numpy", "huggingface_hub", "gguf", "psutil")


def _best_of(n: int, *argv: str, env: dict | None = None) -> float:
    """The fastest of n cold runs of a command, in seconds."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        best = min(best, time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
    return best


# The same help texts from a bare two-command Typer app: the floor typer and rich set.
TYPER_FLOOR = """
import sys, typer, rich.console
app = typer.Typer(rich_markup_mode=None)
@app.command()
def pull(model: str = None):
    "Pull."
@app.command()
def other():
    "Other."
app(sys.argv[1:], prog_name="floor")
"""


def test_help_is_instant(tmp_path):
    # Relative to the same machine at the same moment, so a busy machine cannot fail it: what
    # infer's help costs above a bare interpreter stays within twice what a bare Typer app's
    # help costs (importing llama_cpp or numpy alone would break that). Runs interleave, and
    # each figure is the best of five, to absorb a noisy neighbour. Both sides run from
    # bytecode, as an installed infer does (pip compiles it): with PYTHONDONTWRITEBYTECODE set
    # (as in some shells and CI images) a checkout would recompile every module on each run
    # while typer and rich, installed by pip, would not. A cache of their own keeps the tree clean.
    py = sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    bare = []
    times = {args: ([], []) for args in (("--help",), ("pull", "--help"))}
    for args in times:  # the first runs write the bytecode
        _best_of(1, py, "-c", TYPER_FLOOR, *args, env=env)
        _best_of(1, py, "-m", "infer_cli", *args, env=env)
    for _ in range(5):
        bare.append(_best_of(1, py, "-c", "pass", env=env))
        for args, (floor, ours) in times.items():
            floor.append(_best_of(1, py, "-c", TYPER_FLOOR, *args, env=env))
            ours.append(_best_of(1, py, "-m", "infer_cli", *args, env=env))
    base = min(bare)
    for args, (floor, ours) in times.items():
        cost, floor_cost = min(ours) - base, max(min(floor) - base, 0.01)
        assert cost < 2 * floor_cost, (f"infer {' '.join(args)} costs {cost:.3f} s over a bare interpreter, "
                                       f"a bare Typer app {floor_cost:.3f} s")


@pytest.mark.parametrize("args", [["--help"], ["pull", "--help"], ["run", "--help"], ["fit", "--help"]])
def test_help_does_not_import_heavy_modules(args):
    # the real property behind an instant --help: only light modules on the way to the text
    code = ("import sys\n"
            "from infer_cli.cli.app import main\n"
            "try:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\n"
            f"sys.stderr.write('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert "Usage:" in proc.stdout, proc.stderr
    assert proc.stderr.rsplit("HEAVY:", 1)[-1] == ""


def test_version_names_infer_the_binding_and_the_llama_cpp_build(infer):
    from infer_cli import PINNED_LLAMA_CPP, __version__

    proc = infer("--version")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"infer {__version__}"
    assert lines[1] == f"llama-cpp-python {PINNED_LLAMA_CPP}"
    assert lines[2].startswith("llama.cpp commit ") and "not recorded" not in lines[2]
    assert any(ln.startswith("ggml backends: ") and "CPU" in ln for ln in lines)
    assert any(ln.startswith("GPU backends: ") for ln in lines)


def test_pinned_binding_is_the_one_in_pyproject():
    import re
    from pathlib import Path

    from infer_cli import PINNED_LLAMA_CPP

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pins = [re.sub(r"\s", "", d) for d in project["dependencies"] if d.startswith("llama-cpp-python")]
    assert pins == [f"llama-cpp-python=={PINNED_LLAMA_CPP}"]


def test_another_binding_release_is_one_line_naming_the_fix():
    from infer_cli import PINNED_LLAMA_CPP
    from infer_cli.engine.binding import check_version
    from infer_cli.errors import BrokenInstall, describe

    check_version(PINNED_LLAMA_CPP)
    with pytest.raises(BrokenInstall) as err:
        check_version("0.3.20")
    r = describe(err.value)
    assert r.exit_code == 78 and "0.3.20" in r.message and PINNED_LLAMA_CPP in r.message
    assert r.hint == f"pip install llama-cpp-python=={PINNED_LLAMA_CPP}"


@pytest.mark.parametrize("command", [["--version"], ["run", "{model}", "hi", "-n", "1"]])
def test_another_binding_release_stops_the_cli_cleanly(smollm2_gguf, command):
    from infer_cli import PINNED_LLAMA_CPP

    # the real binding under another release number, as an upgrade by hand would leave it
    code = ("import sys, llama_cpp\n"
            "llama_cpp.__version__ = '0.3.20'\n"
            "from infer_cli.cli.app import main\n"
            "main(sys.argv[1:])\n")
    args = [a.replace("{model}", str(smollm2_gguf)) for a in command]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("Error: llama-cpp-python 0.3.20 is installed, but infer needs ")
    assert lines[1] == f"pip install llama-cpp-python=={PINNED_LLAMA_CPP}"
    assert len(lines) == 2 and "Traceback" not in proc.stderr


def test_shell_completion_is_offered(infer):
    proc = infer("--show-completion", env={"SHELL": "/bin/bash"})
    assert proc.returncode == 0 and "complete" in proc.stdout


def test_every_error_type_has_a_row_in_the_table():
    import inspect
    from infer_cli import errors
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, InferError) and cls is not InferError:
            assert cls in TABLE, f"{name} has no row in the error table"


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
    # A bad file is refused from its header, as fast as a good file's header is read (relative
    # to a good `infer show` timed just before, so that a busy machine cannot fail it).
    t0 = time.perf_counter()
    assert infer("show", str(smollm2_gguf)).returncode == 0
    good = time.perf_counter() - t0
    t0 = time.perf_counter()
    proc = infer(*args)
    assert time.perf_counter() - t0 < 3 * good + 1
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


# --- tables in a narrow terminal ------------------------------------------------------------

def _narrow(infer, *args, home):
    proc = infer(*args, env={"COLUMNS": "60", "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _fits(lines, width=60):
    """Every line within the width, except a lone path no terminal that narrow can hold."""
    for ln in lines:
        assert len(ln) <= width or " " not in ln.strip().split(": ", 1)[-1], ln
        assert ln == ln.rstrip(), repr(ln)


def test_list_fits_a_narrow_terminal(infer, smollm2_in_home, tmp_path):
    lines = _narrow(infer, "list", home=tmp_path)
    _fits(lines)
    assert lines[0].split() == ["NAME", "QUANT", "SIZE", "PARAMS", "LAST", "USED"]
    row = lines[1].split()
    assert row[:5] == ["smollm2", "Q4_1", "93.8", "MiB", "135M"]
    # the path whole, home as ~, on a line of its own
    assert lines[2].strip() == f"path: ~/{smollm2_in_home.relative_to(tmp_path)}"
    wide = infer("list", env={"COLUMNS": "200", "HOME": str(tmp_path)}).stdout.splitlines()
    assert wide[0].split()[-1] == "PATH" and wide[1].endswith(f"~/{smollm2_in_home.relative_to(tmp_path)}")


def test_aliases_fit_a_narrow_terminal(infer, tmp_path):
    from infer_cli.models.registry import load_catalog

    lines = _narrow(infer, "list", "--aliases", home=tmp_path)
    _fits(lines)
    text = "\n".join(lines)
    for e in load_catalog().entries.values():
        assert any(ln.startswith(e.name) for ln in lines), e.name
        if e.hub and not e.package:
            assert f"source: {e.hub.repo}" in text  # a repo id is never cut in two


def test_show_fits_a_narrow_terminal(infer, smollm2_in_home, tmp_path):
    lines = _narrow(infer, "show", "smollm2", home=tmp_path)
    _fits(lines)
    assert "93.8 MiB (98,362,432 bytes)" in "\n".join(lines)
    assert lines[-2] == "path" and lines[-1].strip() == f"~/{smollm2_in_home.relative_to(tmp_path)}"
