"""What compression changed: index maps (kept channels and heads, in original coordinates) and the
manifest (source identity, ordered stages with configs and sizes, geometry, ``base_id``).

Index maps are what later stages read: LoRA inheritance slices A/B with them, residual-SVD recovery
restricts the original weights with them, and the loader of non-uniform bases resizes modules with them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models import Geometry

MANIFEST_VERSION = 1
INDEX_MAPS_FILE = "index_maps.safetensors"
MANIFEST_FILE = "manifest.json"


@dataclass
class LayerIndex:
    """Kept FFN channels, query heads and KV heads of one layer, sorted, in original coordinates."""

    ffn: torch.Tensor
    q_heads: torch.Tensor
    kv_heads: torch.Tensor


class IndexMaps:
    """Per-layer index maps of a compressed base, always in the *original* model's coordinates.

    Args:
        layers: one :class:`LayerIndex` per decoder layer.
        head_dim: width of one attention head (rows of q/k/v per head).
    """

    def __init__(self, layers: list[LayerIndex], head_dim: int):
        self.layers = layers
        self.head_dim = head_dim

    @classmethod
    def identity(cls, geo: Geometry) -> "IndexMaps":
        """Maps of an uncompressed model: everything kept."""
        layer = lambda: LayerIndex(torch.arange(geo.intermediate_size), torch.arange(geo.num_heads),  # noqa: E731
                                   torch.arange(geo.num_kv_heads))
        return cls([layer() for _ in range(geo.num_layers)], geo.head_dim)

    def __len__(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ views used by later stages
    def ffn_rows(self, layer: int) -> torch.Tensor:
        """Original FFN channel of each kept channel: gate/up rows, down columns. ``[kept]`` int64."""
        return self.layers[layer].ffn

    def _head_rows(self, heads: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.head_dim)
        return (heads.unsqueeze(1) * self.head_dim + offsets).reshape(-1)

    def q_rows(self, layer: int) -> torch.Tensor:
        """Original rows of q_proj (= columns of o_proj) that were kept. ``[kept_heads * head_dim]``."""
        return self._head_rows(self.layers[layer].q_heads)

    def kv_rows(self, layer: int) -> torch.Tensor:
        """Original rows of k_proj / v_proj that were kept."""
        return self._head_rows(self.layers[layer].kv_heads)

    def widths(self) -> list[dict[str, int]]:
        return [{"ffn": len(li.ffn), "q_heads": len(li.q_heads), "kv_heads": len(li.kv_heads)}
                for li in self.layers]

    # ------------------------------------------------------------------ composition
    def compose(self, local: "IndexMaps") -> "IndexMaps":
        """Maps after a further stage whose ``local`` maps index into *this* stage's output."""
        if len(local) != len(self):
            raise ValueError(f"cannot compose index maps of {len(self)} and {len(local)} layers")
        return IndexMaps([LayerIndex(mine.ffn[new.ffn], mine.q_heads[new.q_heads], mine.kv_heads[new.kv_heads])
                          for mine, new in zip(self.layers, local.layers)], self.head_dim)

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"head_dim": torch.tensor([self.head_dim])}
        for i, li in enumerate(self.layers):
            out[f"layers.{i}.ffn"] = li.ffn.to(torch.int64).contiguous()
            out[f"layers.{i}.q_heads"] = li.q_heads.to(torch.int64).contiguous()
            out[f"layers.{i}.kv_heads"] = li.kv_heads.to(torch.int64).contiguous()
        return out

    def digest(self) -> str:
        digest = hashlib.sha256()
        for key, value in sorted(self.tensors().items()):
            digest.update(key.encode())
            digest.update(value.numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: str | Path) -> None:
        save_file(self.tensors(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> "IndexMaps":
        tensors = load_file(str(path))
        n = len([k for k in tensors if k.endswith(".ffn")])
        layers = [LayerIndex(tensors[f"layers.{i}.ffn"], tensors[f"layers.{i}.q_heads"],
                             tensors[f"layers.{i}.kv_heads"]) for i in range(n)]
        return cls(layers, int(tensors["head_dim"][0]))

    def __eq__(self, other) -> bool:
        return isinstance(other, IndexMaps) and self.digest() == other.digest()


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
    calibration settings, library versions): a library upgrade must not rename an unchanged base, and what
    calibration selected is already in the index maps' digest.

    Attributes (provenance, outside ``base_id``):
        calibration: ``{"corpus", "samples", "seq_len"}`` of the calibration text (empty when the caller
            passed token ids directly).
        libraries: versions of the libraries that made the base (:func:`library_versions`).
    """

    source: dict
    stages: list[StageRecord]
    geometry_before: dict
    geometry_after: dict
    uniform: bool = True
    cpet_version: str = ""
    version: int = MANIFEST_VERSION
    index_digest: str = ""
    base_id: str = field(default="")
    calibration: dict = field(default_factory=dict)
    libraries: dict = field(default_factory=dict)

    PROVENANCE = ("calibration", "libraries")

    def identity_payload(self) -> dict:
        """Every field that identifies the base: all but ``base_id``, stage timings and :data:`PROVENANCE`."""
        payload = asdict(self)
        for key in ("base_id", *self.PROVENANCE):
            payload.pop(key)
        for stage in payload["stages"]:
            stage.pop("seconds", None)
        return payload

    def compute_base_id(self) -> str:
        canonical = json.dumps(self.identity_payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def finalize(self, index_maps: IndexMaps) -> "Manifest":
        """Set ``index_digest`` and ``base_id``, and record the library versions of this process."""
        self.index_digest = index_maps.digest()
        self.base_id = self.compute_base_id()
        self.libraries = self.libraries or library_versions()
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"manifest version {data.get('version')} is not supported (this CPET reads "
                             f"version {MANIFEST_VERSION})")
        data["stages"] = [StageRecord(**s) for s in data["stages"]]
        return cls(**data)
