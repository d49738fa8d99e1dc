"""Saving and loading a compressed base: one directory, written atomically.

```
base/
  config.json, model.safetensors, generation_config.json   transformers checkpoint (save_pretrained)
  tokenizer files                                         when a tokenizer was given
  manifest.json                                           source, stages, geometry, base_id
  index_maps.safetensors                                  kept channels / heads per layer
```

Uniform bases (pruned and/or bitsandbytes-quantized) reload with plain
``AutoModelForCausalLM.from_pretrained(dir)``: transformers serializes bnb int8 and 4-bit weights with their
quantization state, on CPU too. Bases with per-layer FFN widths need :meth:`CompressedBase.load`, which
builds the architecture from ``config.json`` and resizes each layer's FFN from the index maps first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..assets import atomic_path
from .manifest import INDEX_MAPS_FILE, MANIFEST_FILE, IndexMaps, Manifest
from .quantize import keep_4bit_layout


@dataclass
class CompressedBase:
    """A frozen compressed model with the manifest and index maps that describe it."""

    model: nn.Module
    manifest: Manifest
    index_maps: IndexMaps
    tokenizer: object = None

    @property
    def base_id(self) -> str:
        return self.manifest.base_id

    def save(self, directory: str | Path) -> Path:
        """Write the directory atomically (a temporary sibling renamed into place)."""
        directory = Path(directory)
        with atomic_path(directory) as tmp:
            self.model.save_pretrained(str(tmp), safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            self.index_maps.save(tmp / INDEX_MAPS_FILE)
            (tmp / MANIFEST_FILE).write_text(self.manifest.to_json())
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "CompressedBase":
        """Reload a saved base; refuses a directory whose index maps or manifest do not match its base_id."""
        directory = Path(directory)
        if not (directory / MANIFEST_FILE).exists():
            raise FileNotFoundError(f"{directory} has no {MANIFEST_FILE}: not a CPET compressed base")
        manifest = Manifest.from_json((directory / MANIFEST_FILE).read_text())
        index_maps = IndexMaps.load(directory / INDEX_MAPS_FILE)
        if index_maps.digest() != manifest.index_digest or manifest.compute_base_id() != manifest.base_id:
            raise ValueError(f"{directory}: manifest and index maps do not match base_id {manifest.base_id}; "
                             "the directory was modified after it was written")
        model = _load_uniform(directory, device) if manifest.uniform else _load_per_layer(directory, index_maps)
        model.requires_grad_(False)
        model.eval()
        tokenizer = None
        if (directory / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return cls(model, manifest, index_maps, tokenizer)


def _load_uniform(directory: Path, device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, device_map=device_map)
    return keep_4bit_layout(model)


def _load_per_layer(directory: Path, index_maps: IndexMaps) -> nn.Module:
    """Build from config.json, give every layer its own FFN width, then load the safetensors weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import layer_linears

    config = AutoConfig.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for index, kept in enumerate(index_maps.layers):
        linears = layer_linears(model, index)
        width = len(kept.ffn)
        for role in ("gate", "up"):
            if role in linears.modules:
                old = linears[role]
                _replace(model, linears.names[role], nn.Linear(old.in_features, width, bias=old.bias is not None))
        old = linears["down"]
        _replace(model, linears.names["down"], nn.Linear(width, old.out_features, bias=old.bias is not None))
    state = {}
    for path in sorted(directory.glob("*.safetensors")):
        if path.name != INDEX_MAPS_FILE:
            state.update(load_file(str(path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit the per-layer shapes (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.tie_weights()
    return model


def _tied_keys(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)
