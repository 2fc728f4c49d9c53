"""infer_cli.hub against the fake hub in tests/hubserver.py (no internet; HF_HOME under tmp_path)."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir

from infer_cli.models import hub as hubmod
from infer_cli import paths
from infer_cli.errors import (
    BadReference,
    ChecksumMismatch,
    DownloadFailed,
    ModelNotFound,
    NotCachedOffline,
    NotEnoughDisk,
    QuantNotFound,
    RepoNotFound,
)

REPO = "org/tiny-GGUF"


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """In-process retries without the real back-off waits, so the suite stays fast."""
    monkeypatch.setattr(hubmod, "RETRY_WAIT_S", 0.0)


@pytest.fixture
def tiny(hub):  # noqa: F811
    """A repo with three quants, a projector and a README; returns (files, commit)."""
    files = {
        "tiny-Q2_K.gguf": payload(100_000, 1),
        "tiny-Q4_K_M.gguf": payload(200_000, 2),
        "tiny-Q8_0.gguf": payload(300_000, 3),
        "mmproj-tiny-F16.gguf": payload(50_000, 4),
        "README.md": b"# tiny\n",
    }
    return files, hub.add_repo(REPO, files)


def storage():
    return paths.hf_cache_dir() / "models--org--tiny-GGUF"


def leftovers(suffix: str = "") -> list[str]:
    blobs = storage() / "blobs"
    return sorted(p.name for p in blobs.iterdir() if p.name.endswith(suffix)) if blobs.is_dir() else []


# ----------------------------------------------------------------------------------------------- pull


def test_pull_completes_in_hf_layout(hub, tiny):  # noqa: F811
    files, commit = tiny
    sel = hubmod.select(REPO)
    assert [f.filename for f in sel.files] == ["tiny-Q4_K_M.gguf"]
    assert sel.commit == commit and sel.revision == "main" and sel.quant == "Q4_K_M"
    assert sel.files[0].sha256 == sha(files["tiny-Q4_K_M.gguf"]) and sel.total_size == 200_000

    seen = []
    [path] = hubmod.pull(sel, progress=lambda name, done, total: seen.append((name, done, total)))

    data = files["tiny-Q4_K_M.gguf"]
    assert path == storage() / "snapshots" / commit / "tiny-Q4_K_M.gguf"
    assert path.read_bytes() == data
    assert path.is_symlink() and os.readlink(path) == f"../../blobs/{sha(data)}"
    assert (storage() / "blobs" / sha(data)).is_file() and not leftovers(".incomplete")
    assert (storage() / "refs" / "main").read_text() == commit
    assert seen[0] == ("tiny-Q4_K_M.gguf", 0, 200_000) and seen[-1] == ("tiny-Q4_K_M.gguf", 200_000, 200_000)
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)
    # huggingface_hub itself finds it, without the network.
    found = hf_hub_download(REPO, "tiny-Q4_K_M.gguf", local_files_only=True, cache_dir=paths.hf_cache_dir())
    assert found == str(path)
    [repo] = scan_cache_dir(paths.hf_cache_dir()).repos
    assert repo.repo_id == REPO and {f.file_name for r in repo.revisions for f in r.files} == {"tiny-Q4_K_M.gguf"}
    # The bytes came from the CDN origin, without re-sending the listing's sha or a Range.
    [cdn_get] = hub.file_gets("tiny-Q4_K_M.gguf")[-1:]
    assert cdn_get.server == "cdn" and cdn_get.range is None


def test_pull_again_downloads_nothing(hub, tiny):  # noqa: F811
    sel = hubmod.select(REPO, quant="Q8_0")
    first = hubmod.pull(sel)
    hub.clear_log()
    assert hubmod.pull(sel) == first
    assert hub.log == []  # selection pinned to a commit already in the cache: not even a HEAD
    assert hubmod.cached_paths(sel) == first


def test_blob_shared_with_another_snapshot_is_linked_not_downloaded(hub, tiny):  # noqa: F811
    files, commit = tiny
    hubmod.pull(hubmod.select(REPO))
    new_commit = hub.add_repo(REPO, {**files, "README.md": b"# changed\n"})
    hub.clear_log()
    [path] = hubmod.pull(hubmod.select(REPO))
    assert path.parent.name == new_commit != commit
    assert hub.file_gets("tiny-Q4_K_M.gguf") == [] and path.read_bytes() == files["tiny-Q4_K_M.gguf"]
    assert (storage() / "refs" / "main").read_text() == new_commit


def test_sha256_taken_from_linked_etag_when_listing_lacks_it(hub):  # noqa: F811
    data = payload(64_000, 9)
    hub.add_repo(REPO, {"tiny-Q4_0.gguf": data}, listing_has_lfs=False)
    sel = hubmod.select(REPO)
    assert sel.files[0].sha256 is None
    hubmod.pull(sel)
    assert sel.files[0].sha256 == sha(data) and sel.files[0].size == 64_000


def test_split_gguf_pulled_whole_and_in_order(hub):  # noqa: F811
    shards = {f"Q4_K_M/big-Q4_K_M-0000{i}-of-00003.gguf": payload(70_000, 10 + i) for i in (3, 1, 2)}
    hub.add_repo(REPO, {**shards, "big-Q8_0.gguf": payload(10, 5)})
    sel = hubmod.select(REPO, quant="q4_k_m")
    names = [f.filename for f in sel.files]
    assert names == sorted(shards) and sel.total_size == 210_000
    got = hubmod.pull(sel)
    assert [p.read_bytes() for p in got] == [shards[n] for n in names]
    # Naming any shard selects the whole split.
    again = hubmod.select(REPO, filename="Q4_K_M/big-Q4_K_M-00002-of-00003.gguf")
    assert [f.filename for f in again.files] == names


def test_split_with_a_missing_shard_is_refused(hub):  # noqa: F811
    hub.add_repo(REPO, {"m-Q4_K_M-00001-of-00003.gguf": b"a", "m-Q4_K_M-00003-of-00003.gguf": b"c"})
    with pytest.raises(ModelNotFound, match="m-Q4_K_M-00002-of-00003.gguf missing"):
        hubmod.select(REPO, quant="Q4_K_M")


# ----------------------------------------------------------------------------------------------- resume


def test_interrupted_pull_resumes_with_range_on_next_call(hub, tiny):  # noqa: F811
    files, _ = tiny
    name, data = "tiny-Q8_0.gguf", files["tiny-Q8_0.gguf"]
    sel = hubmod.select(REPO, quant="Q8_0")
    # Every GET stops at byte 120 000: the in-process retries make no progress and give up.
    hub.cut_after(name, 120_000, times=100)
    with pytest.raises(DownloadFailed, match="gave up"):
        hubmod.pull(sel)
    [partial] = (storage() / "blobs").glob("*.incomplete")
    kept = partial.stat().st_size
    assert kept == 120_000 and partial.read_bytes() == data[:kept]
    assert not (storage() / "blobs" / sha(data)).exists()
    assert len(hub.file_gets(name)) == hubmod.RETRIES + 1 + 1  # first GET, then retries until the limit

    hub.clear_faults()
    hub.clear_log()
    seen = []
    [path] = hubmod.pull(sel, progress=lambda n, done, total: seen.append(done))
    [resumed] = hub.file_gets(name)
    assert resumed.range == f"bytes={kept}-"
    assert seen[0] == kept and seen[-1] == len(data)
    assert path.read_bytes() == data and not leftovers(".incomplete")


def test_ctrl_c_keeps_the_partial_for_the_next_run(hub, tiny, monkeypatch):  # noqa: F811
    files, _ = tiny
    hub.cut_after("tiny-Q8_0.gguf", 90_000)  # so the first transfer is interrupted at a known point
    sel = hubmod.select(REPO, quant="Q8_0")

    def interrupt(name, done, total):
        if done >= 90_000:
            raise KeyboardInterrupt

    monkeypatch.setattr(hubmod, "PROGRESS_EVERY_S", 0.0)  # report every chunk: the "user" sees byte 90 000
    with pytest.raises(KeyboardInterrupt):
        hubmod.pull(sel, progress=interrupt)
    [partial] = (storage() / "blobs").glob("*.incomplete")
    assert partial.stat().st_size == 90_000
    hub.clear_log()
    [path] = hubmod.pull(sel)
    assert [r.range for r in hub.file_gets("tiny-Q8_0.gguf")] == ["bytes=90000-"]
    assert path.read_bytes() == files["tiny-Q8_0.gguf"]


def test_server_ignoring_range_restarts_cleanly(hub, tiny):  # noqa: F811
    files, _ = tiny
    sel = hubmod.select(REPO, quant="Q8_0")
    hub.cut_after("tiny-Q8_0.gguf", 100_000, times=100)
    with pytest.raises(DownloadFailed):
        hubmod.pull(sel)
    hub.clear_faults()
    hub.clear_log()
    hub.ignore_range = True
    [path] = hubmod.pull(sel)
    [get] = hub.file_gets("tiny-Q8_0.gguf")
    assert get.range == "bytes=100000-" and get.status == 200  # asked to resume, got the whole file
    assert path.read_bytes() == files["tiny-Q8_0.gguf"]


def test_dropped_connection_is_resumed_within_the_same_pull(hub, tiny):  # noqa: F811
    files, _ = tiny
    hub.cut_after("tiny-Q4_K_M.gguf", 50_000, times=1)
    [path] = hubmod.pull(hubmod.select(REPO))
    assert path.read_bytes() == files["tiny-Q4_K_M.gguf"]
    assert [r.range for r in hub.file_gets("tiny-Q4_K_M.gguf")] == [None, "bytes=50000-"]


def test_corrupt_download_is_deleted_and_reported(hub, tiny):  # noqa: F811
    files, _ = tiny
    hub.corrupt("tiny-Q4_K_M.gguf")
    sel = hubmod.select(REPO)
    with pytest.raises(ChecksumMismatch) as err:
        hubmod.pull(sel)
    assert err.value.expected == sha(files["tiny-Q4_K_M.gguf"]) != err.value.actual
    assert leftovers() == []  # neither blob nor partial
    assert not (storage() / "snapshots").exists()


def test_not_enough_disk_writes_nothing(hub, tiny):  # noqa: F811
    asked = []

    def tiny_disk(path):
        asked.append(path)
        return 1000

    with pytest.raises(NotEnoughDisk) as err:
        hubmod.pull(hubmod.select(REPO), free_space=tiny_disk)
    assert err.value.needed == 200_000 and err.value.free == 1000
    assert asked == [paths.hf_cache_dir()]
    assert leftovers() == [] and hub.requests("GET", server="cdn") == []


def test_disk_check_counts_only_missing_bytes(hub, tiny):  # noqa: F811
    hub.cut_after("tiny-Q8_0.gguf", 100_000, times=100)
    sel = hubmod.select(REPO, quant="Q8_0")
    with pytest.raises(DownloadFailed):
        hubmod.pull(sel)
    hub.clear_faults()
    with pytest.raises(NotEnoughDisk) as err:
        hubmod.pull(sel, free_space=lambda p: 150_000)
    assert err.value.needed == 200_000
    hubmod.pull(sel, free_space=lambda p: 200_000)


# ----------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        ("Q4_K_M", "m-Q4_K_M.gguf"),
        ("q4_k_m", "m-Q4_K_M.gguf"),
        ("Q4_K", "m.Q4_K.gguf"),  # not m-Q4_K_M
        ("iq4_xs", "m-IQ4_XS.gguf"),
        ("Q4_K_XL", "m-UD-Q4_K_XL.gguf"),  # delimiter-bounded fallback match
        ("UD-Q4_K_XL", "m-UD-Q4_K_XL.gguf"),
    ],
)
def test_quant_matches_whole_labels_case_insensitively(hub, quant, expected):  # noqa: F811
    names = ["m-Q4_K_M.gguf", "m.Q4_K.gguf", "m-IQ4_XS.gguf", "m-UD-Q4_K_XL.gguf", "mmproj-m-Q4_K_M.gguf"]
    hub.add_repo(REPO, {n: b"x" for n in names})
    assert hubmod.select(REPO, quant=quant).filename == expected


def test_quant_is_not_a_substring_match(hub):  # noqa: F811
    hub.add_repo(REPO, {"m-IQ4_0.gguf": b"x", "m-Q4_K_M.gguf": b"x", "m-Q4_0_4_4.gguf": b"x"})
    with pytest.raises(QuantNotFound) as err:
        hubmod.select(REPO, quant="Q4_0")
    assert err.value.quant == "Q4_0"
    with pytest.raises(QuantNotFound):
        hubmod.select(REPO, quant="Q4_K")


def test_missing_quant_lists_what_is_there(hub, tiny):  # noqa: F811
    with pytest.raises(QuantNotFound) as err:
        hubmod.select(REPO, quant="Q6_K")
    assert err.value.available == ["Q2_K", "Q4_K_M", "Q8_0"]  # mmproj's F16 is not a model quant


def test_repo_without_gguf(hub):  # noqa: F811
    hub.add_repo(REPO, {"model.safetensors": b"x", "config.json": b"{}"})
    with pytest.raises(QuantNotFound) as err:
        hubmod.select(REPO)
    assert err.value.available == []


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-Q2_K.gguf"], "m-Q4_K_M.gguf"),
        (["m-Q8_0.gguf", "m-Q5_K_M.gguf", "m-Q4_K_S.gguf"], "m-Q4_K_S.gguf"),
        (["m-Q8_0.gguf", "m-Q4_0.gguf", "m-Q6_K.gguf"], "m-Q4_0.gguf"),
        (["m-F16.gguf", "m-Q6_K.gguf", "m-Q3_K_M.gguf", "m-Q2_K.gguf"], "m-Q3_K_M.gguf"),  # smallest >= 3 bits
        (["m-IQ1_S.gguf", "m-IQ2_XXS.gguf"], "m-IQ2_XXS.gguf"),  # all below 3 bits: the best of them
        (["mmproj-m-F16.gguf", "m-imatrix.gguf", "m-F16.gguf"], "m-F16.gguf"),
        (["model.gguf"], "model.gguf"),
    ],
)
def test_default_quant(hub, names, expected):  # noqa: F811
    # Sizes follow the bits, as they would in a real repo.
    hub.add_repo(REPO, {n: b"x" * int(10 * (hubmod.quant_bits(hubmod.quant_of(n)) or 16)) for n in names})
    assert hubmod.select(REPO).filename == expected


def test_explicit_filename(hub, tiny):  # noqa: F811
    assert hubmod.select(REPO, filename="tiny-Q2_K.gguf").filename == "tiny-Q2_K.gguf"
    assert hubmod.select(REPO, filename="mmproj-tiny-F16.gguf").filename == "mmproj-tiny-F16.gguf"
    with pytest.raises(ModelNotFound, match="no such file"):
        hubmod.select(REPO, filename="nope.gguf")


def test_list_quants_sorted_by_bits():
    names = [
        "a/m-Q8_0.gguf", "m-Q2_K.gguf", "m-q4_k_m.gguf", "m-F16.gguf", "mmproj-BF16.gguf",
        "m-IQ3_XXS.gguf", "s-Q5_K_M-00001-of-00002.gguf", "s-Q5_K_M-00002-of-00002.gguf", "README.md",
    ]  # fmt: skip
    assert hubmod.list_quants(names) == ["Q2_K", "IQ3_XXS", "Q4_K_M", "Q5_K_M", "Q8_0", "F16"]
    assert hubmod.quant_of("Q4_K_M/model-00001-of-00002.gguf") == "Q4_K_M"
    assert hubmod.quant_of("Qwen2-7B-Q4_K_M_imatrix.gguf") == "Q4_K_M"
    assert hubmod.quant_of("Q2-model.gguf") is None


# ----------------------------------------------------------------------------------------------- errors


def test_unknown_repo_and_revision(hub, tiny):  # noqa: F811
    with pytest.raises(RepoNotFound) as err:
        hubmod.select("org/nothing-here")
    assert err.value.repo_id == "org/nothing-here"
    with pytest.raises(RepoNotFound) as err:
        hubmod.select(REPO, revision="no-such-branch")
    assert err.value.revision == "no-such-branch"
    with pytest.raises(BadReference):
        hubmod.select("not a repo id")


def test_gated_repo_needs_the_token(hub):  # noqa: F811
    data = payload(30_000, 7)
    hub.add_repo(REPO, {"g-Q4_K_M.gguf": data}, gated_token="hf_secret")
    sel = hubmod.select(REPO)
    with pytest.raises(RepoNotFound):
        hubmod.pull(sel)
    [path] = hubmod.pull(sel, token="hf_secret")
    assert path.read_bytes() == data
    cdn = hub.requests("GET", server="cdn")
    assert cdn and all("authorization" not in r.headers for r in cdn)  # the token never leaves the Hub


def test_unreachable_hub(hub, tiny):  # noqa: F811
    hub.stop()
    with pytest.raises(DownloadFailed, match="cannot connect"):
        hubmod.select(REPO)


def test_unreachable_hub_falls_back_to_cache(hub, tiny):  # noqa: F811
    [path] = hubmod.pull(hubmod.select(REPO))
    hub.stop()
    sel = hubmod.select(REPO)
    assert hubmod.pull(sel) == [path]


# ----------------------------------------------------------------------------------------------- offline


def test_offline_uses_cache_without_any_request(hub, tiny, monkeypatch):  # noqa: F811
    [path] = hubmod.pull(hubmod.select(REPO, quant="Q2_K"))
    hub.clear_log()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sel = hubmod.select(REPO, quant="q2_k")
    assert hubmod.pull(sel) == [path] == hubmod.cached_paths(sel)
    assert hubmod.select(REPO).filename == "tiny-Q2_K.gguf"  # the default among what is cached
    assert hub.log == []


def test_offline_without_cache(hub, tiny, monkeypatch):  # noqa: F811
    hubmod.pull(hubmod.select(REPO, quant="Q2_K"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    with pytest.raises(NotCachedOffline, match="org/tiny-GGUF:Q8_0"):
        hubmod.select(REPO, quant="Q8_0")
    with pytest.raises(NotCachedOffline):
        hubmod.select("org/never-pulled")
    assert hub.log == []


# ----------------------------------------------------------------------------------------------- cache


def test_list_and_remove_cached(hub, tiny):  # noqa: F811
    files, commit = tiny
    shards = {f"s-Q5_K_M-0000{i}-of-00002.gguf": payload(20_000, 20 + i) for i in (1, 2)}
    split_repo = "org/split"
    hub.add_repo(split_repo, shards)
    hubmod.pull(hubmod.select(REPO))
    hubmod.pull(hubmod.select(REPO, quant="Q2_K"))
    hubmod.pull(hubmod.select(split_repo))

    listed = hubmod.list_cached_ggufs()
    assert [(c.repo_id, c.filename, c.size, len(c.paths)) for c in listed] == [
        (split_repo, "s-Q5_K_M-00001-of-00002.gguf", 40_000, 2),  # a split: one entry, both shards
        (REPO, "tiny-Q2_K.gguf", 100_000, 1),
        (REPO, "tiny-Q4_K_M.gguf", 200_000, 1),
    ]
    first = listed[1]
    assert first.commit == commit and first.revisions == ["main"] and first.complete and first.quant == "Q2_K"
    assert first.path.read_bytes() == files["tiny-Q2_K.gguf"] and first.last_modified > 0

    blob = storage() / "blobs" / sha(files["tiny-Q4_K_M.gguf"])
    assert hubmod.remove_cached(REPO, "tiny-Q4_K_M.gguf") == 200_000
    assert not blob.exists() and (storage() / "blobs" / sha(files["tiny-Q2_K.gguf"])).exists()
    assert hubmod.remove_cached(split_repo, "s-Q5_K_M-00001-of-00002.gguf") == 40_000
    assert not (paths.hf_cache_dir() / "models--org--split").exists()
    assert [c.filename for c in hubmod.list_cached_ggufs()] == ["tiny-Q2_K.gguf"]
    with pytest.raises(ModelNotFound):
        hubmod.remove_cached(REPO, "tiny-Q4_K_M.gguf")


def test_remove_keeps_a_blob_another_snapshot_uses(hub, tiny):  # noqa: F811
    files, old = tiny
    hubmod.pull(hubmod.select(REPO))
    hub.add_repo(REPO, {**files, "README.md": b"new"})
    hubmod.pull(hubmod.select(REPO))
    old_link = storage() / "snapshots" / old / "tiny-Q4_K_M.gguf"
    # Both snapshots link to one blob: removing the file from both frees it once.
    assert len(hubmod.list_cached_ggufs()) == 2
    assert hubmod.remove_cached(REPO, "tiny-Q4_K_M.gguf") == 200_000
    assert not old_link.exists() and leftovers() == []


# ----------------------------------------------------------------------------------------------- remote headers


def _gguf_with_a_long_header(path):
    """A GGUF whose header (a 20k-token vocabulary) is far longer than the first range asked for."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("tokenizer.ggml.tokens", [f"token-{i}" for i in range(20_000)])
    w.add_tensor("token_embd.weight", np.zeros((1024, 1024), dtype=np.float32))  # 4 MiB of data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_read_remote_fetches_only_the_header(hub, tmp_path, ranges):  # noqa: F811
    from infer_cli.models import remote
    from infer_cli.models.gguf_info import read_gguf

    data = _gguf_with_a_long_header(tmp_path / "m.gguf")
    local = read_gguf(tmp_path / "m.gguf")
    hub.add_repo("org/remote-GGUF", {"m-Q8_0.gguf": data, "mmproj-m-F16.gguf": data, "README.md": b"#\n"})
    hub.ignore_range = not ranges  # a server that answers every GET with the whole file
    info = remote.read_remote("org/remote-GGUF", "m-Q8_0.gguf", len(data), first=4096)
    assert info.path == "org/remote-GGUF/m-Q8_0.gguf" and info.file_size == len(data)
    assert info.tensors == local.tensors and info.metadata == local.metadata
    gets = hub.file_gets("m-Q8_0.gguf")
    assert len(gets) > 1 and all(g.range for g in gets)  # grew from 4 KiB until the header fit
    if ranges:
        asked = [g.range.removeprefix("bytes=").split("-") for g in gets]
        assert sum(int(b) - int(a) + 1 for a, b in asked) < len(data) // 2

    [(label, whole)] = remote.repo_infos("org/remote-GGUF")  # the projector is no model
    assert label == "Q8_0" and whole.tensors == local.tensors


def test_read_remote_of_a_bad_file_is_bad_model_file(hub):  # noqa: F811
    from infer_cli.errors import BadModelFile
    from infer_cli.models import remote

    hub.add_repo("org/bad-GGUF", {"m-Q4_0.gguf": b"PK\x03\x04" + payload(10_000)})
    with pytest.raises(BadModelFile, match="not a GGUF file"):
        remote.read_remote("org/bad-GGUF", "m-Q4_0.gguf", 10_004, first=1024)
    assert len(hub.file_gets("m-Q4_0.gguf")) == 1  # a wrong header is not fetched again, longer


def test_public_listing_and_cache_lookups(hub, tiny):  # noqa: F811
    files, commit = tiny
    got_commit, listed = hubmod.list_repo_files(REPO)
    assert got_commit == commit and {f.filename for f in listed} == set(files)
    units = hubmod.gguf_units(listed)
    assert [u.name for u in units if not u.aux] == ["tiny-Q2_K.gguf", "tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf"]
    assert [u.name for u in units if u.aux] == ["mmproj-tiny-F16.gguf"]
    with pytest.raises(RepoNotFound):
        hubmod.list_repo_files("org/no-such-repo")
    assert hubmod.cached_snapshots(REPO) == []
    hubmod.pull(hubmod.select(REPO))
    assert hubmod.cached_snapshots(REPO) == [storage() / "snapshots" / commit]
    assert "user-agent" in {k.lower() for k in hubmod.auth_headers()}
