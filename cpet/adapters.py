"""Task adapters: peft LoRA on a frozen base, saved as standard PEFT directories plus ``cpet.json``.

``cpet.json`` records what the adapter needs to be used correctly: the ``base_id`` of the base it was
trained on, the source model's fingerprint, the task, its labels, prompt template and verbalizer, the
recovery modules it was trained with, and its metrics. Loaders refuse an adapter made for another base.

A plain PEFT LoRA directory trained elsewhere (no ``cpet.json``) can still be an inheritance source:
:func:`plain_peft_meta` checks that it was made for the same source model (its recorded base model name
and every LoRA tensor's shape) and describes it in the same form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from torch import nn

from .models import target_module_suffixes

ADAPTER_META = "cpet.json"


def add_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float,
             target_roles: Sequence[str] | None = None, target_modules: Sequence[str] | str | None = None,
             use_rslora: bool = False, rank_pattern: dict[str, int] | None = None,
             alpha_pattern: dict[str, float] | None = None, adapter_name: str = "default"):
    """Wrap a frozen causal LM with a fresh peft LoRA adapter on the given module-map roles.

    ``target_roles`` None means every mapped linear; ``target_modules`` (peft's module-name suffixes or
    regex, e.g. from an inherited adapter's config) overrides the roles. Each LoRA computes
    ``B A * scale`` with ``A: [r, d_in]``, ``B: [d_out, r]`` and ``scale = alpha / r`` (``alpha / sqrt(r)``
    with ``use_rslora``); ``rank_pattern`` / ``alpha_pattern`` (peft's ``{module-name pattern: value}``)
    override r / alpha per module. Inheritance passes the source adapter's values
    (:func:`cpet.lora_init.lora_shape_of`) so every copied pair keeps its shape and scale.
    Returns the ``PeftModel``; only the LoRA tensors (and modules registered as trainable afterwards)
    require grad. peft's default init is used: A Kaiming-uniform, B zero (the adapter starts as a no-op).
    """
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        target_modules = target_module_suffixes(model, None if target_roles is None else tuple(target_roles))
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=target_modules, use_rslora=use_rslora,
                        rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}))
    return get_peft_model(model, config, adapter_name=adapter_name)


def check_inheritable(config: dict, directory: str | Path) -> None:
    """Refuse a PEFT ``adapter_config.json`` (as a dict) whose adapter CPET cannot carry to a compressed base.

    Raises:
        ValueError: not a LoRA, or a DoRA. DoRA rescales each output row of ``W + B A * scale`` to a learned
            magnitude vector ``m: [d_out]`` measured against the row norms of the *full* weight; pruning and
            quantization change those norms, so ``m`` would have to be re-derived and copying A/B alone
            would not reproduce the source's delta.
    """
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter {directory} is a {config.get('peft_type')} adapter; CPET inherits LoRA only")
    if config.get("use_dora"):
        raise ValueError(f"adapter {directory} is a DoRA adapter (use_dora: true); CPET does not support DoRA "
                         "inheritance: its magnitude vector is per output row of the full weight and would need "
                         "re-deriving after pruning/quantization. Train a plain LoRA (use_dora: false) instead")


def is_cpet_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_META).exists()


def read_adapter_meta(directory: str | Path) -> dict:
    """The ``cpet.json`` of an adapter directory (clear error when the directory is not one)."""
    path = Path(directory) / ADAPTER_META
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_META}: not a CPET adapter directory")
    return json.loads(path.read_text())


def check_adapter_base(meta: dict, *, base_id: str | None = None, source_fingerprint: str | None = None,
                       where: str = "adapter") -> None:
    """Refuse an adapter made for another base (``base_id``) or another source model (fingerprint)."""
    if source_fingerprint is not None and meta.get("source_fingerprint") not in (None, source_fingerprint):
        raise ValueError(f"{where} was trained on source model {meta.get('source_fingerprint')[:16]}… "
                         f"({meta.get('source_name')}), not on this source model {source_fingerprint[:16]}…")
    if base_id is not None and meta.get("base_id") != base_id:
        raise ValueError(f"{where} was trained on base {meta.get('base_id')}, not on this base {base_id}")


def save_adapter(peft_model, directory: str | Path, meta: dict) -> None:
    """Write the PEFT directory (``adapter_config.json``, ``adapter_model.safetensors``) and ``cpet.json``.

    ``directory`` is expected to be a fresh (temporary) directory; callers make the final move atomic.
    """
    directory = Path(directory)
    peft_model.save_pretrained(str(directory), safe_serialization=True)
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))


def load_adapter(model: nn.Module, directory: str | Path, *, base_id: str | None = None,
                 adapter_name: str = "default", is_trainable: bool = False):
    """Load a CPET adapter onto ``model`` with plain peft after checking its ``base_id``."""
    from peft import PeftModel

    meta = read_adapter_meta(directory)
    check_adapter_base(meta, base_id=base_id, where=f"adapter {directory}")
    return PeftModel.from_pretrained(model, str(directory), adapter_name=adapter_name,
                                     is_trainable=is_trainable)


def _same_model_name(name: str, aliases: Sequence[str]) -> bool:
    """Whether a recorded base model name (hub id or path) names one of ``aliases`` (compared by last part)."""
    def key(text: str) -> str:
        return Path(str(text).rstrip("/")).name.lower()

    return key(name) in {key(alias) for alias in aliases}


def plain_peft_meta(directory: str | Path, model: nn.Module, aliases: Sequence[str]) -> dict:
    """Check a plain PEFT LoRA directory (trained outside CPET) against the source model; describe it.

    Args:
        directory: holds ``adapter_config.json`` and ``adapter_model.safetensors`` (pickled ``.bin``
            weights are refused).
        model: the uncompressed source model the adapter must fit.
        aliases: names of the source model (embedded name, hub id, local path); the adapter's recorded
            ``base_model_name_or_path``, if any, must name one of them.
    Returns:
        ``{"source_name": ..., "labels": None}`` (labels are unknown: the task's own verbalizer is used).
    Raises:
        FileNotFoundError: neither a CPET nor a PEFT adapter directory.
        ValueError: not a LoRA (or a DoRA, see :func:`check_inheritable`), made for another model (by name
            or by shapes), or LoRA on missing modules.
    """
    from .inherit import load_lora_state

    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} is neither a CPET adapter ({ADAPTER_META}) nor a PEFT adapter "
                                "(adapter_config.json)")
    config = json.loads(config_path.read_text())
    check_inheritable(config, directory)
    trained_on = config.get("base_model_name_or_path")
    known = [alias for alias in aliases if alias]
    if trained_on and not _same_model_name(trained_on, known):
        raise ValueError(f"adapter {directory} was trained on source model {trained_on!r}, not on this source "
                         f"model ({', '.join(known)}); if it is the same model under another name, set "
                         "base_model_name_or_path in its adapter_config.json to one of these")
    modules = dict(model.named_modules())
    for key, tensor in load_lora_state(directory).items():
        kind = "lora_A" if ".lora_A." in key else "lora_B" if ".lora_B." in key else None
        if kind is None:
            continue
        name = key.split(f".{kind}.")[0].removeprefix("base_model.model.")
        weight = getattr(modules.get(name), "weight", None)
        if weight is None:
            raise ValueError(f"adapter {directory} has a LoRA on {name!r}, which this source model "
                             f"({', '.join(known)}) does not have: it was made for another model")
        expected = weight.shape[1] if kind == "lora_A" else weight.shape[0]
        got = tensor.shape[1] if kind == "lora_A" else tensor.shape[0]
        if got != expected:
            raise ValueError(f"adapter {directory} was made for another model ({trained_on or 'unnamed'}): its "
                             f"LoRA on {name} has {got} {'input' if kind == 'lora_A' else 'output'} features, "
                             f"this source model ({', '.join(known)}) has {expected}")
    return {"source_name": trained_on, "labels": None}
