"""Knowledge inheritance: map a LoRA trained on the original model onto a compressed base.

A LoRA delta on linear ``W: [d_out, d_in]`` is ``B A`` with ``A: [r, d_in]`` and ``B: [d_out, r]``.
Compression keeps (a subset or permutation of) the rows and/or columns of each linear and/or changes how the
kept values are stored. The base's index maps say, per layer and role, which original rows and columns the
compressed weight holds and in which order (:class:`cpet.compress.index_maps.IndexMaps`), so the inherited
LoRA is the original one restricted to them, whichever stage made them:

    B_new = B[rows(layer, role)]        A_new = A[:, cols(layer, role)]       (None: the axis is unchanged)

On the kept coordinates it then adds exactly the delta it added before: ``B_new A_new = (B A)[rows][:, cols]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .assembly import ADAPTER_REMEDY, AdapterError, naming_damaged_safetensors
from .models import family_of

_LAYER_RE = re.compile(r"\.(\d+)\.")


def _role_of(key: str, suffix_to_role: dict[str, str]) -> tuple[int, str] | None:
    """``(layer index, role)`` of a peft LoRA state-dict key, or None for keys outside the module map."""
    module_path = key.split(".lora_")[0]
    attr = module_path.rsplit(".", 1)[-1]
    match = _LAYER_RE.search(module_path)
    if attr not in suffix_to_role or match is None:
        return None
    return int(match.group(1)), suffix_to_role[attr]


def kept_indices(index_maps, layer: int, role: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(kept output rows, kept input columns)`` of a role's weight in original coordinates (None = all)."""
    return index_maps.rows(layer, role), index_maps.cols(layer, role)


def inherit_lora_state(state: dict[str, torch.Tensor], config, index_maps) -> dict[str, torch.Tensor]:
    """Restrict a peft LoRA state dict (original coordinates) to what the compressed base kept.

    Args:
        state: ``{"...q_proj.lora_A.weight": [r, d_in], "...q_proj.lora_B.weight": [d_out, r], ...}``
            as saved in ``adapter_model.safetensors``.
        config: the (original) model config; it names the family and thus the role of every module.
        index_maps: the compressed base's index maps (``rows(layer, role)`` / ``cols(layer, role)``).
    Returns:
        a state dict with the same keys whose tensors have the compressed shapes. A key outside the family's
        module map is copied unchanged: callers refuse such LoRAs first (``plain_peft_meta`` names a LoRA on
        ``lm_head`` or an embedding), since nothing here knows what compression did to those modules.
    """
    family = family_of(config)
    suffix_to_role = {attr: role for role, attr in family.linears.items()}
    out = {}
    for key, tensor in state.items():
        located = _role_of(key, suffix_to_role)
        if located is None:
            out[key] = tensor.clone()
            continue
        layer, role = located
        rows, cols = kept_indices(index_maps, layer, role)
        if ".lora_B." in key and rows is not None:
            tensor = tensor.index_select(0, rows)
        elif ".lora_A." in key and cols is not None:
            tensor = tensor.index_select(1, cols)
        out[key] = tensor.clone().contiguous()
    return out


def load_lora_state(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a PEFT adapter directory (``adapter_model.safetensors``; pickles are refused)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"{adapter_dir} has no adapter_model.safetensors; CPET only reads safetensors adapters "
            "(re-save a .bin adapter with `save_pretrained(..., safe_serialization=True)`)")
    with naming_damaged_safetensors(path, ADAPTER_REMEDY, AdapterError):  # a damaged file: named, with the fix
        return load_file(str(path))
