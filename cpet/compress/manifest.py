"""What compression changed: the manifest (source identity, ordered stages with configs and sizes, geometry,
``base_id``); the index maps it hashes live in :mod:`cpet.compress.index_maps` (re-exported here).

Index maps are what later stages read: LoRA inheritance slices A/B with them, residual-SVD recovery
restricts the original weights with them, and the loader of non-uniform bases resizes modules with them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import stage_config_from_dict
from .index_maps import IndexMaps, LayerIndex  # noqa: F401  (re-exported: where they lived before)

MANIFEST_VERSION = 1
INDEX_MAPS_FILE = "index_maps.safetensors"
MANIFEST_FILE = "manifest.json"
ORIGINAL_BASE_ID = "original"  # the base_id recorded by what was made on the uncompressed source model


def short_base_id(base_id: str | None) -> str:
    """A base id as messages show it: a 64-hex id cut to its first 12 characters, anything else as is."""
    return base_id[:12] if isinstance(base_id, str) and re.fullmatch(r"[0-9a-f]{64}", base_id) else str(base_id)


def describe_base(base_id: str | None) -> str:
    """A base as messages name it: ``the original model`` or ``compressed base 1a2b3c4d5e6f``."""
    if base_id == ORIGINAL_BASE_ID:
        return "the original model"
    return f"compressed base {short_base_id(base_id)}" if base_id else "a base it does not record"


@dataclass
class StageRecord:
    """One applied stage: its config (as a dict with ``"stage"``), sizes before/after, seconds spent."""

    config: dict
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    seconds: float = 0.0


LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "torch-pruning", "cpet")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    if found.get("cpet") is None:  # a source checkout run without installing it
        from .. import __version__

        found["cpet"] = __version__
    return found


@dataclass
class Manifest:
    """Everything needed to identify and rebuild a compressed base.

    ``base_id`` is the SHA-256 of the canonical JSON of all other fields plus the index maps' digest, so
    it changes whenever the source, any stage config, or any kept channel changes. Timings are excluded,
    and so is provenance that describes how the base was made rather than what it is (:data:`PROVENANCE`:
    calibration settings, library versions): a library upgrade must not rename an unchanged base (CPET's own
    version is part of the identity: another CPET may compress differently), what calibration selected is
    already in the index maps' digest, and what compression trained on it (MoEfy routers) is in
    ``trained_digest``.

    Attributes:
        trained_digest: SHA-256 of the weights compression trained (:func:`cpet.compress.moefy.router_digest`);
            empty when no stage trains any, and then left out of ``base_id`` (bases made before the field keep
            their id).
        calibration: (provenance, outside ``base_id``) ``{"corpus", "samples", "seq_len", "seed"}`` of the
            calibration text (empty when the caller passed token ids directly).
        libraries: (provenance) versions of the libraries that made the base (:func:`library_versions`).
    """

    source: dict
    stages: list[StageRecord]
    geometry_before: dict
    geometry_after: dict
    uniform: bool = True
    cpet_version: str = ""
    version: int = MANIFEST_VERSION
    index_digest: str = ""
    trained_digest: str = ""
    base_id: str = field(default="")
    calibration: dict = field(default_factory=dict)
    libraries: dict = field(default_factory=dict)

    PROVENANCE = ("calibration", "libraries")

    def identity_payload(self) -> dict:
        """Every field that identifies the base: all but ``base_id``, stage timings and :data:`PROVENANCE`."""
        payload = asdict(self)
        for key in ("base_id", *self.PROVENANCE):
            payload.pop(key)
        if not payload["trained_digest"]:
            payload.pop("trained_digest")
        for stage in payload["stages"]:
            stage.pop("seconds", None)
        return payload

    def compute_base_id(self) -> str:
        canonical = json.dumps(self.identity_payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def finalize(self, index_maps: IndexMaps, trained_digest: str = "") -> "Manifest":
        """Set ``index_digest``, ``trained_digest`` and ``base_id``, and record the library versions of this
        process."""
        self.index_digest = index_maps.digest()
        self.trained_digest = trained_digest
        self.base_id = self.compute_base_id()
        self.libraries = self.libraries or library_versions()
        return self

    def stage_configs(self) -> list:
        """The stage config objects, in order (each stage's type must be registered: ``register_stage``)."""
        return [stage_config_from_dict(record.config) for record in self.stages]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """The manifest in file ``path`` (ValueError naming the file when it is damaged or of another version)."""
        try:
            return cls.from_json(Path(path).read_text())
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """The manifest in ``text``. Raises ValueError for invalid JSON, another version, or fields that are not
        a manifest's (a damaged file: a KeyError or TypeError would not say which file is at fault)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the manifest is not a JSON object: the file is damaged")
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {data.get('version')} is not supported (this CPET reads "
                             f"version {MANIFEST_VERSION})")
        try:
            data["stages"] = [StageRecord(**s) for s in data["stages"]]
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"the manifest's fields are not a manifest's ({type(exc).__name__}: {exc}): the file is "
                             "damaged") from None
