"""peft LoRA on expert banks: one whole-FFN adapter per gate / up / down, read by slices per expert.

peft wraps the linears it targets; an :class:`~cpet.moe.experts.ExpertBank` is not an ``nn.Linear``, so it is
registered as a custom module (``LoraConfig._register_custom_module``, peft's documented hook for layer types
it does not know) with :class:`ExpertBankLora` as its LoRA layer. The adapter tensors keep peft's names and
whole-FFN shapes (``lora_A [r, d_in]``, ``lora_B [d_out, r]``), so an adapter on a MoEfied base saves, loads and
inherits like any other; the MoEfied FFN calls :meth:`ExpertBankLora.expert` / :meth:`ExpertBankLora.combine`
and each expert reads its slice of the factors.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from .experts import ExpertBank, LowRankPath, Routed


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class ExpertBankLora(nn.Module, LoraLayer):
    """LoRA around an :class:`ExpertBank` (constructed by peft's custom-module dispatch)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        if config.use_dora:
            raise ValueError("DoRA is not supported on MoEfied FFNs (its magnitude vector spans every expert): use "
                             "a plain LoRA (use_dora=False)")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # an ExpertBank has no weight of its own, so peft would find no device or dtype and leave the adapter on the
        # CPU in fp32 while the bank is on CUDA: its first expert slice answers for it (a bitsandbytes slice with
        # its compute dtype, as peft reads a quantized linear)
        return super()._get_base_layer_device_and_dtype(base_layer.experts[0])

    @property
    def bank(self) -> ExpertBank:
        return self.get_base_layer()

    def _refuse_mixed_batches(self) -> None:
        """peft runs a mixed-adapter batch (``model(..., adapter_names=[...])``) by a forward pre-hook that hands
        each LoRA layer's ``forward`` the rows' adapter names; the MoEfied FFN calls :meth:`expert` and
        :meth:`combine` instead, so the names would never arrive and every row would get the active adapter on its
        FFN (and its own on attention). Refused rather than run wrong. peft removes its hooks after the forward
        but not when the forward raises (no ``finally``): the hooks stay, and this refusal with them, so the model
        never runs a mixed batch half-way afterwards either."""
        for hook in self._forward_pre_hooks.values():
            if "adapter_names" in (getattr(hook, "keywords", None) or {}):
                raise ValueError("peft's mixed-adapter batches (adapter_names=...) are not supported on a MoEfied "
                                 "base: its FFN would give every row the active adapter. Serve mixed batches with "
                                 "CPET's engine (`cpet serve`, cpet.serve.Engine), or run one adapter per batch. "
                                 "peft leaves its adapter_names hooks in place when a forward raises, so this model "
                                 "refuses every call from now on: load it again")

    def _paths(self) -> list[LowRankPath]:
        self._refuse_mixed_batches()
        if self.disable_adapters or self.merged:
            return []
        return [LowRankPath(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], _identity,
                            self.lora_dropout[name])
                for name in self.active_adapters if name in self.lora_A]

    def expert(self, expert: int, x: torch.Tensor, extra: Sequence[LowRankPath] = (),
               tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.bank.expert(expert, x, (*self._paths(), *extra), tokens=tokens)

    def combine(self, parts: Sequence[Routed], num_tokens: int, extra: Sequence[LowRankPath] = (),
                dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.bank.combine(parts, num_tokens, (*self._paths(), *extra), dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The dense bank plus every active adapter (for callers that treat the bank as one linear)."""
        result = self.bank(x)
        for path in self._paths():
            low = F.linear(path.dropout(x).to(path.A.dtype), path.A)
            result = result + (F.linear(low, path.B) * path.scale).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError("LoRA cannot be merged into a MoEfied FFN's expert banks (quantized experts and "
                         "per-expert slices); keep the adapter unmerged")

    def unmerge(self) -> None:
        return None

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_bank_lora(lora_config) -> None:
    """Tell peft how to put LoRA on expert banks (a no-op for models without any)."""
    lora_config._register_custom_module({ExpertBank: ExpertBankLora})


def has_expert_banks(model: nn.Module) -> bool:
    return any(isinstance(m, ExpertBank) for m in model.modules())


def peft_config_for(model: nn.Module, directory) -> object | None:
    """The saved ``LoraConfig`` of ``directory`` with banks registered when ``model`` has any, else None (peft
    then reads the config itself)."""
    if not has_expert_banks(model):
        return None
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(directory))
    register_bank_lora(config)
    return config


__all__ = ["ExpertBankLora", "register_bank_lora", "has_expert_banks", "peft_config_for"]
