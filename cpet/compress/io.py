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
quantization state, on CPU too. Other bases (``manifest.uniform`` false: per-layer widths, replaced modules)
need :meth:`CompressedBase.load`, which builds the architecture from ``config.json`` and lets every recorded
stage rebuild what it changed (:meth:`cpet.compress.stages.Stage.rebuild`) before loading the weights.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..assembly import BASE_REMEDY, naming_damaged_safetensors, read_safetensors
from ..assets import atomic_path
from .manifest import INDEX_MAPS_FILE, MANIFEST_FILE, IndexMaps, Manifest, short_base_id
from .stages import registration


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
            self.model.save_pretrained(str(tmp), safe_serialization=True, **_key_format(self.model, self.manifest))
            _record_dtype(tmp / "config.json", base_dtype(self.model))
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
        manifest = Manifest.read(directory / MANIFEST_FILE)
        if not isinstance(manifest.geometry_before, dict):  # read before the base_id check: a TypeError otherwise
            raise ValueError(f"{directory / MANIFEST_FILE} is damaged (geometry_before is "
                             f"{type(manifest.geometry_before).__name__}, not an object): restore it, or compress "
                             "again (`cpet compress --model MODEL --out PIPELINE ...`)")
        with naming_damaged_safetensors(directory / INDEX_MAPS_FILE, BASE_REMEDY):
            index_maps = IndexMaps.load(directory / INDEX_MAPS_FILE, SimpleNamespace(**manifest.geometry_before))
        if index_maps.digest() != manifest.index_digest or manifest.compute_base_id() != manifest.base_id:
            raise ValueError(f"{directory}: manifest and index maps do not match base_id "
                             f"{short_base_id(manifest.base_id)}; the directory was modified after it was written: "
                             "restore it, or compress again (`cpet compress --model MODEL --out PIPELINE ...`)")
        stages = _stage_configs(directory, manifest)
        if manifest.uniform:
            model = _rebuild(_load_plain(directory, device), stages, index_maps)
        else:
            # built on the CPU from config.json and filled there; bitsandbytes parameters move with .to()
            model = _load_rebuilt(directory, stages, index_maps).to(torch.device(device))
        model.requires_grad_(False)
        model.eval()
        tokenizer = None
        if (directory / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        return cls(model, manifest, index_maps, tokenizer)


def _stage_configs(directory: Path, manifest: Manifest) -> list:
    try:
        configs = manifest.stage_configs()
        for config in configs:
            registration(config)
    except ValueError as exc:
        raise ValueError(f"{directory} was compressed with a stage this process has not registered ({exc}): import "
                         "the module that registers it (`cpet.compress.register_stage`), or compress again") from None
    return configs


def _rebuild(model: nn.Module, stages: list, index_maps: IndexMaps) -> nn.Module:
    for config in stages:
        model = registration(config).stage.rebuild(model, config, index_maps)
    return model


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default floating dtype set to ``dtype`` for the block, then restored."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def base_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of a base's own layers: its first floating parameter outside the MoE routers, which stay
    fp32 in any base (``save_pretrained`` records the first floating parameter: with quantized embeddings, the
    first is a router's, and a bf16 MoEfied base was recorded, and reloaded, as fp32)."""
    from ..moe.layer import Router

    routers = {id(p) for module in model.modules() if isinstance(module, Router) for p in module.parameters()}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in routers),
                torch.float32)


def _record_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Write ``dtype`` as ``config.json``'s ``dtype`` (what :func:`saved_dtype` reads back)."""
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def saved_dtype(config) -> torch.dtype:
    """The floating dtype a base was saved in (``config.json``'s ``dtype``, written by ``save_pretrained`` from the
    model's own), so that it reloads as it was compressed and evaluated: a bf16 base read back in fp32 gave other
    logits (up to 0.065 on a tiny model) and twice the memory. fp32 where the config says nothing usable."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _key_format(model: nn.Module, manifest: Manifest) -> dict:
    """``save_pretrained`` keyword for the weights' key names.

    transformers >= 5 writes some families (exaone, flint, ...) under their original checkpoint names and renames
    them back in ``from_pretrained``. A uniform base is read by ``from_pretrained`` (and by other tools that expect
    the original names), so it keeps them; any other base is read key by key by :func:`_load_rebuilt` into the
    model's own module names, so it is saved under those (``save_original_format=False``).
    """
    if manifest.uniform or "save_original_format" not in inspect.signature(model.save_pretrained).parameters:
        return {}
    return {"save_original_format": False}


def _load_plain(directory: Path, device) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device)
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    dtype = saved_dtype(AutoConfig.from_pretrained(str(directory)))
    weights = _weights_files(directory)  # transformers' error would not say which file is damaged
    with naming_damaged_safetensors(weights[0] if len(weights) == 1 else directory / "*.safetensors", BASE_REMEDY):
        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, device_map=device_map)


def _weights_files(directory: Path) -> list[Path]:
    """A saved base's weights files (every safetensors file but the index maps)."""
    return [path for path in sorted(directory.glob("*.safetensors")) if path.name != INDEX_MAPS_FILE]


def _load_rebuilt(directory: Path, stages: list, index_maps: IndexMaps) -> nn.Module:
    """Build from config.json, let every stage rebuild what it changed, then load the safetensors weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory))
    dtype = saved_dtype(config)
    with default_dtype(dtype):  # the modules the stages rebuild take the base's dtype, as from_config's do
        model = _rebuild(AutoModelForCausalLM.from_config(config, dtype=dtype), stages, index_maps)
    state = {}
    for path in _weights_files(directory):
        state.update(read_safetensors(path, BASE_REMEDY, ValueError))
    loaded = set(_tied_keys(model))
    for config in stages:  # stages whose modules cannot read their weights through load_state_dict
        load_weights = getattr(registration(config).stage, "load_weights", None)
        if load_weights is not None:
            loaded |= set(load_weights(model, config, state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in loaded]
    if missing or unexpected:
        if _renamed_on_save(model):
            raise ValueError(
                f"{directory}: its weights are stored under names that {type(model).__name__} does not use (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}): transformers saves {model.config.model_type} models "
                "under their original checkpoint names, which CPET before this version also wrote for bases that "
                "plain transformers cannot load. Rebuild the base (`cpet compress` with the same options) to save "
                "it under the names its loader reads")
        raise ValueError(f"{directory}: weights do not fit the rebuilt shapes (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    if type(model.get_output_embeddings()) is nn.Linear:  # a quantized tied head shares the table already
        model.tie_weights()
    return model


def _renamed_on_save(model: nn.Module) -> bool:
    """Whether transformers renames this model's weights when it saves them in their original format."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # older transformers: no renaming on save
        return False
    return bool(get_model_conversion_mapping(model, add_legacy=False))


def _tied_keys(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
