"""Compression: apply an ordered list of stage configs to a model and record what changed.

```python
base = compress(model, [PruneConfig(ffn_ratio=0.25), QuantizeConfig(method="nf4")],
                calibration=calibration_ids(tokenizer, text, 16, 128), tokenizer=tokenizer)
base.save("runs/base")            # plain AutoModelForCausalLM.from_pretrained("runs/base") reloads it
```

Stages are looked up by config type in a registry (:mod:`cpet.compress.stages`): each registered stage
validates before any work, applies ``(model, config, context) -> (model, index maps relative to its input)``
and rebuilds what it changed when a saved base is loaded. Pruning, MoEfication and quantization register
themselves on import; a new stage is one ``register_stage(MyConfig, MyStage(), rank=...)`` away.
"""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..config import stage_config_to_dict
from ..evaluate import count_parameters, memory_bytes
from ..models import family_of, geometry, model_fingerprint
from . import moefy as moefy_mod  # noqa: F401  (registers MoEfyConfig)
from . import prune as prune_mod  # noqa: F401  (registers PruneConfig)
from . import quantize as quantize_mod  # noqa: F401  (registers QuantizeConfig)
from .calibration import calibration_ids, check_calibration_ids
from .index_maps import IndexMaps
from .io import CompressedBase
from .manifest import Manifest, StageRecord
from .moefy import MoEfyConfig, router_digest
from .stages import STAGES, Stage, StageContext, check_order, register_stage, registration, unregister_stage


def _geometry_dict(model: nn.Module) -> dict:
    return dict(geometry(model).__dict__)


def validate_stages(model: nn.Module, stages: Sequence, *, calibration: torch.Tensor | None = None) -> list:
    """Every check of ``stages`` against ``model``, changing nothing (the random stream included): what
    :func:`compress` runs first.

    Callers that do expensive work before compressing (measuring the original model) call it beforehand.
    Returns the stages' registry entries, in order.
    Raises:
        ValueError: unregistered or misordered stages, or any stage's own validation.
        UnsupportedArchitectureError: a model without a CPET module map.
    """
    family_of(model)
    entries = check_order(stages)
    checks = StageContext(calibration, progress=False)  # validation predicts layouts; it shows no progress
    # stages may build probe modules to check a model (their random init draws numbers): "changing nothing"
    # includes the caller's random stream, so that validating first changes no later result
    with torch.random.fork_rng(devices=[]):
        for i, (stage, entry) in enumerate(zip(stages, entries)):
            entry.stage.validate(model, stage, checks, tuple(stages[:i]))
    return entries


def compress(model: nn.Module, stages: Sequence, *, calibration: torch.Tensor | None = None,
             tokenizer=None, source_name: str = "", inplace: bool = False, progress: bool = True,
             after_stage: Callable[[int, nn.Module], None] | None = None,
             source_fingerprint: str | None = None) -> CompressedBase:
    """Apply ``stages`` in order and return the frozen :class:`CompressedBase` with its manifest.

    Args:
        model: a supported transformers causal LM in full precision.
        stages: configs of registered stages (``PruneConfig``, ``QuantizeConfig``, ...), in rank order.
        calibration: ``[n, seq]`` token ids for Taylor / activation importance.
        tokenizer: saved beside the weights when given.
        inplace: modify ``model`` itself instead of a deep copy.
        after_stage: called as ``after_stage(i, model)`` after stage ``i`` (reports measure each stage).
        source_fingerprint: the source model's content fingerprint when the caller knows it (e.g. taken on
            its fp32 weights before a cast: ``LoadedBase.content_fingerprint``); else computed from ``model``.
    Raises:
        ValueError: unregistered or misordered stages, or any stage's own validation (before any work).
        UnsupportedArchitectureError: a model without a CPET module map.
    """
    family = family_of(model)
    if calibration is not None:  # (validate_stages also takes an empty placeholder, as CPET.check_stages passes)
        check_calibration_ids(calibration, model)
    entries = validate_stages(model, stages, calibration=calibration)  # fail early: every check before any work
    if not inplace:
        model = copy.deepcopy(model)
    source = {"name": source_name, "fingerprint": source_fingerprint or model_fingerprint(model),
              "model_type": model.config.model_type}
    geometry_before = _geometry_dict(model)
    maps = IndexMaps.identity(geometry(model), family.roles)
    context = StageContext(calibration, progress)
    records = []
    for stage, entry in tqdm(list(zip(stages, entries)), desc="compress", disable=not progress):
        params, size = count_parameters(model), memory_bytes(model)
        start = time.perf_counter()
        model, local = entry.stage.apply(model, stage, context)
        if local is not None:
            if not local.uniform():  # transformers' config.json states one width per role for all layers
                context.custom_layout = context.custom_layout or f"per-layer widths ({stage.stage})"
            maps = maps.compose(local)
        records.append(StageRecord(stage_config_to_dict(stage), params, count_parameters(model), size,
                                   memory_bytes(model), time.perf_counter() - start))
        if after_stage is not None:
            after_stage(len(records) - 1, model)
    model.requires_grad_(False)
    model.eval()
    manifest = Manifest(source=source, stages=records, geometry_before=geometry_before,
                        geometry_after=_geometry_dict(model), uniform=context.uniform,
                        cpet_version=__version__).finalize(maps, router_digest(model))
    return CompressedBase(model, manifest, maps, tokenizer)


__all__ = ["compress", "validate_stages", "MoEfyConfig", "CompressedBase", "Manifest", "IndexMaps", "StageRecord",
           "STAGES", "Stage", "StageContext", "register_stage", "unregister_stage", "registration", "calibration_ids"]
