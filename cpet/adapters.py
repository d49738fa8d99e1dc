"""Task adapters: peft LoRA on a frozen base, saved as standard PEFT directories plus ``cpet.json``.

``cpet.json`` records what the adapter needs to be used correctly: the ``base_id`` of the base it was
trained on, the source model's fingerprint, the task, its labels, prompt template and verbalizer, the
recovery modules it was trained with, and its metrics. Loaders refuse an adapter made for another base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from torch import nn

from .models import target_module_suffixes

ADAPTER_META = "cpet.json"


def add_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float,
             target_roles: Sequence[str] | None = None, adapter_name: str = "default"):
    """Wrap a frozen causal LM with a fresh peft LoRA adapter on the given module-map roles.

    ``target_roles`` None means every mapped linear. Returns the ``PeftModel``; only the LoRA tensors (and modules registered as trainable afterwards)
    require grad. peft's default init is used: A Kaiming-uniform, B zero (the adapter starts as a no-op).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=target_module_suffixes(
                            model, None if target_roles is None else tuple(target_roles)))
    return get_peft_model(model, config, adapter_name=adapter_name)


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
