"""`infer quantize ORG/REPO`: a tiny checkpoint served by the fake hub is fetched into the
Hugging Face cache (checkpoint files only), converted and quantized; a second run under
HF_HUB_OFFLINE uses the cache without a request; unknown repos, an uncached repo offline and an
unreachable hub are typed one-line errors."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("tokenizers")

REPO = "tiny-org/tiny-qwen3"


@pytest.fixture
def tiny_repo(hub, tmp_path):
    from tests.test_quantize_tiny import tiny_checkpoint

    folder, _ = tiny_checkpoint(tmp_path / "src" / "tiny-qwen3", "qwen3")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    files["README.md"] = b"# tiny\n"
    files["pytorch_model.bin"] = b"\0" * 64  # not a safetensors checkpoint file: never fetched
    hub.add_repo(REPO, files)
    return files


def test_quantize_hub_repo_then_offline(infer, hub, tiny_repo, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "out"
    r = infer("quantize", REPO, "--to", "Q8_0,Q4_K_M", "-o", str(out), "--no-report", "--json")
    assert r.returncode == 0, r.stderr
    made = sorted(p.name for p in out.iterdir())
    assert made == ["tiny-qwen3.Q4_K_M.gguf", "tiny-qwen3.Q8_0.gguf"]
    rd = GGUFReader(str(out / "tiny-qwen3.Q8_0.gguf"))
    assert rd.fields["general.name"].contents() == "tiny-qwen3"
    assert rd.fields["general.architecture"].contents() == "qwen3"
    snaps = list((tmp_path / "hf-home" / "hub" / "models--tiny-org--tiny-qwen3" / "snapshots").iterdir())
    assert len(snaps) == 1
    assert sorted(p.name for p in snaps[0].iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert not hub.file_gets("pytorch_model.bin") and not hub.file_gets("README.md")

    hub.clear_log()
    out2 = tmp_path / "out2"
    r = infer("quantize", REPO, "--to", "Q8_0", "-o", str(out2), "--no-report",
              env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert (out2 / "tiny-qwen3.Q8_0.gguf").is_file()
    assert hub.requests() == []


def test_hub_source_errors(hub, tiny_repo, tmp_path, monkeypatch):
    from infer_cli.errors import DownloadFailed, NotCachedOffline, RepoNotFound
    from quantize.hub_source import fetch_checkpoint

    with pytest.raises(RepoNotFound):
        fetch_checkpoint("tiny-org/nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotCachedOffline):
        fetch_checkpoint(REPO)
    with pytest.raises(NotCachedOffline, match="at revision 'v9'"):
        fetch_checkpoint(REPO, "v9")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(DownloadFailed):
        fetch_checkpoint(REPO)


def test_quantize_unknown_hub_repo_is_one_line(infer, hub, tmp_path):
    r = infer("quantize", "tiny-org/missing", "--to", "Q8_0", "-o", str(tmp_path / "o"), "--no-report")
    assert r.returncode != 0
    first = r.stderr.splitlines()[0]
    assert first.startswith("Error:") and "tiny-org/missing" in first, r.stderr
    assert "hf auth login" in r.stderr and "Traceback" not in r.stderr  # private repos answer so too
    assert not (tmp_path / "o").exists()


def _checkpoint_files(tmp_path, kind: str, name: str) -> dict[str, bytes]:
    from tests.test_quantize_tiny import tiny_checkpoint

    folder, _ = tiny_checkpoint(tmp_path / "src" / name, kind)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_quantize_hub_revision(infer, hub, tiny_repo, tmp_path):
    """--revision picks a branch or a commit; offline, the snapshot that revision points at."""
    from gguf import GGUFReader

    commit = hub.add_revision(REPO, "llama-variant", _checkpoint_files(tmp_path, "llama3", "v2"))
    arch = lambda p: GGUFReader(str(p)).fields["general.architecture"].contents()  # noqa: E731
    r = infer("quantize", REPO, "--revision", "llama-variant", "--to", "Q8_0", "-o", str(tmp_path / "a"),
              "--no-report")
    assert r.returncode == 0, r.stderr
    assert arch(tmp_path / "a" / "tiny-qwen3.Q8_0.gguf") == "llama"
    assert any(f"/revision/llama-variant" in q.path for q in hub.requests(server="hub"))

    r = infer("quantize", REPO, "--revision", commit, "--to", "Q8_0", "-o", str(tmp_path / "b"), "--no-report")
    assert r.returncode == 0, r.stderr
    assert arch(tmp_path / "b" / "tiny-qwen3.Q8_0.gguf") == "llama"
    r = infer("quantize", REPO, "--to", "Q8_0", "-o", str(tmp_path / "c"), "--no-report")
    assert r.returncode == 0, r.stderr
    assert arch(tmp_path / "c" / "tiny-qwen3.Q8_0.gguf") == "qwen3"  # main is untouched

    hub.clear_log()
    r = infer("quantize", REPO, "--revision", "llama-variant", "--to", "Q8_0", "-o", str(tmp_path / "d"),
              "--no-report", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert arch(tmp_path / "d" / "tiny-qwen3.Q8_0.gguf") == "llama" and hub.requests() == []

    r = infer("quantize", REPO, "--revision", "no-such-branch", "--to", "Q8_0", "-o", str(tmp_path / "e"))
    assert r.returncode == 3 and r.stderr.startswith("Error:") and "no-such-branch" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "e").exists()


def test_revision_needs_a_hub_source(infer, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    r = infer("quantize", str(folder), "--revision", "main", "--to", "Q8_0")
    assert r.returncode == 2 and r.stderr.startswith("Error: --revision main"), r.stderr


def test_quantize_hub_shows_download_progress_on_a_terminal(infer, hub, tiny_repo, tmp_path):
    """On a terminal the checkpoint's files get `infer pull`'s bar: bytes, speed, time left;
    piped, nothing of it."""
    size = len(tiny_repo["model.safetensors"])
    hub.rate = 400_000  # bytes per second: a transfer long enough for a speed to be measured
    r = infer("quantize", REPO, "--to", "Q8_0", "-o", str(tmp_path / "a"), "--no-report",
              env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "0", "COLUMNS": "160"})
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if "model.safetensors" in x)
    assert f"{size / 1024:.1f}/{size / 1024:.1f} KiB" in line, line  # bytes done / in all
    assert re.search(r"\d [kMG]?B/s", line), line  # and the speed

    r = infer("quantize", REPO, "--to", "Q8_0", "-o", str(tmp_path / "b"), "--no-report",
              env={"HF_HUB_OFFLINE": "1"})  # piped
    assert r.returncode == 0 and "KiB" not in r.stderr, r.stderr


def test_quantize_gated_repo_says_how_to_log_in(infer, hub, tmp_path):
    gated = "tiny-org/gated-qwen3"
    hub.add_repo(gated, _checkpoint_files(tmp_path, "qwen3", "gated"), gated_token="hf_secret")
    r = infer("quantize", gated, "--to", "Q8_0", "-o", str(tmp_path / "o"), "--no-report")
    assert r.returncode == 3, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("Error:") and gated in first, r.stderr
    assert "hf auth login" in r.stderr and "HF_TOKEN" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    assert not list((tmp_path / "hf-home" / "hub").glob("models--tiny-org--gated-qwen3/snapshots/*/*.safetensors"))

    r = infer("quantize", gated, "--to", "Q8_0", "-o", str(tmp_path / "o"), "--no-report",
              env={"HF_TOKEN": "hf_secret"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "gated-qwen3.Q8_0.gguf").is_file()
