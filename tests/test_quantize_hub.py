"""`infer quantize ORG/REPO`: a tiny checkpoint served by the fake hub is fetched into the
Hugging Face cache (checkpoint files only), converted and quantized; a second run under
HF_HUB_OFFLINE uses the cache without a request; unknown repos, an uncached repo offline and an
unreachable hub are typed one-line errors."""

from __future__ import annotations


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
    assert not (tmp_path / "o").exists()
