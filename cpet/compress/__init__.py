"""Compression: apply an ordered list of stage configs to a model and record what changed.

```python
base = compress(model, [PruneConfig(ffn_ratio=0.25), QuantizeConfig(method="nf4")],
                calibration=calibration_ids(tokenizer, text, 16, 128), tokenizer=tokenizer)
base.save("runs/base")            # plain AutoModelForCausalLM.from_pretrained("runs/base") reloads it
```

Stages are looked up by config type in :data:`STAGES`; each takes ``(model, config, context)`` and returns
the (possibly new) model and its index maps relative to its input (None when no shape changes).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..config import PruneConfig, QuantizeConfig, stage_config_to_dict
from ..evaluate import count_parameters, memory_bytes
from ..models import family_of, geometry, model_fingerprint
from . import prune as prune_mod
from . import quantize as quantize_mod
from .calibration import calibration_ids
from .io import CompressedBase
from .manifest import IndexMaps, Manifest, StageRecord


@dataclass
class StageContext:
    """What stages may read besides the model and their config."""

    calibration: torch.Tensor | None
    progress: bool
    uniform: bool = True


def _prune_stage(model: nn.Module, config: PruneConfig, context: StageContext):
    maps = prune_mod.prune(model, config, context.calibration, progress=context.progress)
    context.uniform = context.uniform and len({len(li.ffn) for li in maps.layers}) == 1
    return model, maps


def _quantize_stage(model: nn.Module, config: QuantizeConfig, context: StageContext):
    quantize_mod.validate(model, config, context.uniform)
    return quantize_mod.quantize(model, config), None


STAGES: dict[type, Callable] = {PruneConfig: _prune_stage, QuantizeConfig: _quantize_stage}


def _validate_order(stages: Sequence) -> None:
    unknown = [type(s).__name__ for s in stages if type(s) not in STAGES]
    if unknown:
        raise ValueError(f"unknown compression stages {unknown}; known: {[t.__name__ for t in STAGES]}")
    kinds = [type(s) for s in stages]
    if kinds.count(QuantizeConfig) > 1:
        raise ValueError("a compression pipeline takes at most one QuantizeConfig")
    if QuantizeConfig in kinds and PruneConfig in kinds[kinds.index(QuantizeConfig):]:
        raise ValueError("pruning needs full-precision weights: put PruneConfig before QuantizeConfig")


def _geometry_dict(model: nn.Module) -> dict:
    return dict(geometry(model).__dict__)


def compress(model: nn.Module, stages: Sequence, *, calibration: torch.Tensor | None = None,
             tokenizer=None, source_name: str = "", inplace: bool = False, progress: bool = True,
             after_stage: Callable[[int, nn.Module], None] | None = None,
             source_fingerprint: str | None = None) -> CompressedBase:
    """Apply ``stages`` in order and return the frozen :class:`CompressedBase` with its manifest.

    Args:
        model: a supported transformers causal LM in full precision.
        stages: ``PruneConfig`` / ``QuantizeConfig`` objects, pruning before quantization.
        calibration: ``[n, seq]`` token ids for Taylor / activation importance.
        tokenizer: saved beside the weights when given.
        inplace: modify ``model`` itself instead of a deep copy.
        after_stage: called as ``after_stage(i, model)`` after stage ``i`` (reports measure each stage).
        source_fingerprint: the source model's content fingerprint when the caller knows it (e.g. taken on
            its fp32 weights before a cast: ``LoadedBase.content_fingerprint``); else computed from ``model``.
    Raises:
        ValueError: unknown or misordered stages, or any stage's own validation (before any work).
        UnsupportedArchitectureError: a model without a CPET module map.
    """
    family_of(model)
    _validate_order(stages)
    for stage in stages:  # fail early: every check that does not need the previous stages' output
        if isinstance(stage, PruneConfig):
            prune_mod.validate(model, stage, calibration)
        elif isinstance(stage, QuantizeConfig):
            quantize_mod.validate(model, stage, uniform=not any(
                isinstance(s, PruneConfig) and s.layer_schedule for s in stages))
    if not inplace:
        model = copy.deepcopy(model)
    source = {"name": source_name, "fingerprint": source_fingerprint or model_fingerprint(model),
              "model_type": model.config.model_type}
    geometry_before = _geometry_dict(model)
    maps = IndexMaps.identity(geometry(model))
    context = StageContext(calibration, progress)
    records = []
    for stage in tqdm(stages, desc="compress", disable=not progress):
        params, size = count_parameters(model), memory_bytes(model)
        start = time.perf_counter()
        model, local = STAGES[type(stage)](model, stage, context)
        if local is not None:
            maps = maps.compose(local)
        records.append(StageRecord(stage_config_to_dict(stage), params, count_parameters(model), size,
                                   memory_bytes(model), time.perf_counter() - start))
        if after_stage is not None:
            after_stage(len(records) - 1, model)
    model.requires_grad_(False)
    model.eval()
    manifest = Manifest(source=source, stages=records, geometry_before=geometry_before,
                        geometry_after=_geometry_dict(model), uniform=context.uniform,
                        cpet_version=__version__).finalize(maps)
    return CompressedBase(model, manifest, maps, tokenizer)


__all__ = ["compress", "CompressedBase", "Manifest", "IndexMaps", "StageRecord", "STAGES", "calibration_ids"]
