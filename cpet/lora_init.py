"""Initialising a compressed base's task LoRA: inherited from the original model, or residual-SVD (LoftQ).

Both functions take a peft ``PeftModel`` built on the compressed base and overwrite its LoRA tensors:

- :func:`apply_inherited_lora`: the original model's task LoRA restricted through the index maps
  (:mod:`cpet.inherit`);
- :func:`apply_residual_svd_lora`: ``B A`` = best rank-r approximation of the compression residual
  ``W_orig[kept] - dequant(W_compressed)`` (less what attached shared recovery already adds), so the adapter
  starts where the original weights were (the
  training-free starting point of LoftQ, computed once with CPET's own index maps because peft's LoftQ
  re-quantizes the model itself and knows nothing about pruning).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapters import check_inheritable
from .assembly import AdapterSource, as_source
from .inherit import inherit_lora_state, load_lora_state
from .models import iter_layer_linears, unwrap
from .recovery import compression_residual, low_rank_factors, relative_error


def lora_shape_of(adapter_dir: AdapterSource | str | Path) -> dict:
    """The LoRA structure of a PEFT adapter, as keyword arguments of :func:`cpet.adapters.add_lora`.

    ``{"rank", "alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
    "layers_pattern", "exclude_modules"}``: a LoRA built with them on the compressed model has, module by
    module, the source's modules, rank and scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA), so the
    tensors :func:`apply_inherited_lora` copies compute the source's delta on the kept weights, and no module
    gets a LoRA the source did not have (compression keeps every layer, so layer indices still match).
    ``target_modules`` stays as peft wrote it: a list of module-name suffixes or one regex string.

    Raises:
        ValueError: an adapter CPET cannot inherit (not a LoRA, or a DoRA: see
            :func:`cpet.adapters.check_inheritable`).
    """
    source = as_source(adapter_dir)
    config = source.config
    check_inheritable(config, source.directory)
    targets = config["target_modules"]
    return {"rank": config["r"], "alpha": config["lora_alpha"],
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "use_rslora": bool(config.get("use_rslora", False)),
            "rank_pattern": dict(config.get("rank_pattern") or {}),
            "alpha_pattern": dict(config.get("alpha_pattern") or {}),
            "layers_to_transform": config.get("layers_to_transform"),
            "layers_pattern": config.get("layers_pattern"),
            "exclude_modules": config.get("exclude_modules")}


def apply_inherited_lora(peft_model, adapter_dir: AdapterSource | str | Path, index_maps, original_config) -> int:
    """Load the original model's LoRA from ``adapter_dir`` into ``peft_model``, restricted to kept weights.

    Returns the number of LoRA tensors set. Raises ValueError if ``peft_model`` lacks any of them.
    """
    from peft import set_peft_model_state_dict

    lora_state = adapter_dir.tensors if isinstance(adapter_dir, AdapterSource) else load_lora_state(adapter_dir)
    state = inherit_lora_state(lora_state, original_config, index_maps)
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"the compressed model's LoRA lacks {len(unexpected)} inherited tensors, e.g. "
                         f"{unexpected[0]}: create it with the same target modules as {adapter_dir}")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:  # a LoRA the source never trained would start fresh: not what "inherited" promises
        raise ValueError(f"the compressed model has {len(missing)} LoRA tensors that {adapter_dir} does not hold, "
                         f"e.g. {missing[0]}: create it with lora_shape_of({adapter_dir!s}) (the source's modules "
                         "and layers)")
    return len(state)


def _base_layer(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def lora_shapes(peft_model, adapter_name: str = "default") -> dict[str, tuple[int, int]]:
    """``{module name: (out, in)}`` of every linear that carries LoRA ``adapter_name`` in ``peft_model``."""
    return {name: (module.lora_B[adapter_name].weight.shape[0], module.lora_A[adapter_name].weight.shape[1])
            for name, module in peft_model.named_modules()
            if hasattr(module, "lora_A") and adapter_name in getattr(module, "lora_A", {})}


@torch.no_grad()
def apply_residual_svd_lora(peft_model, original_model: nn.Module, index_maps, adapter_name: str = "default"
                            ) -> dict[str, float]:
    """Set every LoRA pair of ``peft_model`` to the truncated SVD of its layer's compression residual.

    With shared recovery attached (linear bypasses approximating the same residual), the LoRA takes what they
    leave: ``W_orig[kept] - dequant(W) - B_rec A_rec * scale``; correcting the full residual on top of them
    would add the correction twice. Returns ``{module name: relative residual error left}``.

    Raises:
        ValueError: attached shared recovery with nonlinear (GELU) bypasses, which no weight residual describes.
    """
    from .recovery import SHARED, attached_recovery

    shared = attached_recovery(peft_model).get(SHARED)
    if shared is not None and shared.config.activation != "identity":
        raise ValueError(f"init='svd' with {shared.config.activation} shared recovery: its bypasses are not linear, "
                         "so the residual they leave is no weight to approximate; use init='random' or 'inherit'")
    errors = {}
    originals = {layer.index: layer for layer in iter_layer_linears(original_model)}
    for layer in iter_layer_linears(unwrap(peft_model)):
        for role, module in layer.modules.items():
            if not hasattr(module, "lora_A") or adapter_name not in module.lora_A:
                continue
            rows, cols = index_maps.rows(layer.index, role), index_maps.cols(layer.index, role)
            residual = compression_residual(originals[layer.index][role], _base_layer(module), rows, cols)
            recovered = shared.weight_delta(layer.names[role]) if shared is not None else None
            if recovered is not None:
                residual = residual - recovered.to(residual.device)
            lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            B, A = low_rank_factors(residual, lora_A.shape[0])
            # a component of singular value 0 would start with A's row and B's column both zero, and a LoRA
            # component zero on both sides gets no gradient: it keeps peft's start (random A, B = 0), as
            # init='random' would. That is every component where compression changed nothing: a base only
            # pruned or MoEfied (rows and columns kept or reordered), linears a quantization stage left alone.
            live = live_components(B, A).to(lora_A.device)
            lora_B.copy_(torch.where(live.unsqueeze(0), (B / module.scaling[adapter_name]).to(lora_B), 0))
            lora_A.copy_(torch.where(live.unsqueeze(1), A.to(lora_A), lora_A))
            errors[layer.names[role]] = relative_error(residual, B @ A)
    return errors


def live_components(B: torch.Tensor, A: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """``[rank]`` bool: the components of ``B [out, rank] A [rank, in]`` that carry some of the product, i.e.
    whose ``||B[:, j]|| ||A[j]||`` (their singular value) is above ``tolerance`` times the largest (none where the
    product is zero)."""
    strength = B.norm(dim=0) * A.norm(dim=1)
    top = strength.max() if strength.numel() else strength.new_zeros(())
    return strength > tolerance * top if top > 0 else torch.zeros_like(strength, dtype=torch.bool)
