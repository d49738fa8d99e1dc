"""Quantization with bitsandbytes (int8, nf4, fp4) through transformers' ``BitsAndBytesConfig``.

The in-memory model is written to a temporary safetensors directory and read back with a
``quantization_config``: that is transformers' own bnb path, so the result serializes with
``save_pretrained`` and reloads with plain ``from_pretrained`` (quantization state included), on CPU
(bitsandbytes >= 0.48) and CUDA. Gradients flow through the quantized layers to their inputs, which is
what LoRA and recovery modules need; the quantized weights themselves are frozen.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

from ..config import QuantizeConfig, QuantMethod
from .index_maps import IndexMaps
from .stages import StageContext, register_stage


def validate(model: nn.Module, config: QuantizeConfig, custom_layout: str | None = None) -> None:
    """Every check that can fail, before any expensive work.

    ``custom_layout``: what the stages before this one made that transformers cannot rebuild from
    ``config.json`` (:attr:`cpet.compress.stages.StageContext.custom_layout`), or None.
    """
    if custom_layout:
        raise ValueError(f"a base with {custom_layout} cannot be quantized: bitsandbytes quantization reloads the "
                         "model with transformers, which builds it from config.json alone (one width for all "
                         "layers); keep the stages before QuantizeConfig to a plain transformers checkpoint")
    if any(type(m).__module__.startswith("bitsandbytes") for m in model.modules()):
        raise ValueError("the model is already quantized; a compression pipeline takes one QuantizeConfig")
    for name in config.modules or ():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"QuantizeConfig.modules names {name!r}, which is not a module of this model") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"QuantizeConfig.modules names {name!r}, a {type(module).__name__}: bitsandbytes "
                             "quantizes only nn.Linear layers")


def bnb_config(model: nn.Module, config: QuantizeConfig):
    from transformers import BitsAndBytesConfig

    skip = list(config.skip_modules)
    if config.modules is not None:  # quantize only the named linears: skip every other one
        wanted = set(config.modules)
        skip += [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wanted]
    if config.method == QuantMethod.INT8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.method.value,
                              bnb_4bit_use_double_quant=config.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype),
                              llm_int8_skip_modules=skip)


def quantize(model: nn.Module, config: QuantizeConfig) -> nn.Module:
    """A bitsandbytes-quantized copy of ``model`` (same device), in eval mode."""
    from transformers import AutoModelForCausalLM

    validate(model, config)
    device = next(model.parameters()).device
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="cpet-quantize-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=bnb_config(model, config), dtype=torch.float32, device_map=device_map)
    return keep_4bit_layout(quantized).eval()


def keep_4bit_layout(model: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights on ``model`` (in place; returns it).

    Why we go around bitsandbytes here: since 0.50, on CPUs with AVX512-BF16, ``Linear4bit.forward``
    repacks its weight in place into a bf16 inference layout on the first no-grad eval call. CPET
    alternates evaluation and training on the same frozen base, and after the repack (a) backward through
    the layer fails ("a view of a leaf Variable ... in-place operation"), (b) logits differ from the
    canonical nf4/fp4 kernel (bf16 scales), and (c) layers whose input width is not a multiple of the
    quantization block size (64) crash. Keeping the canonical layout makes results the same on every CPU.
    Call it on a 4-bit model loaded with plain ``from_pretrained`` to get the same logits as CPET.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


class QuantizeStage:
    """:class:`~cpet.compress.stages.Stage` for :class:`~cpet.config.QuantizeConfig` (rank 900, once).

    Moves no row or column (no index maps); transformers reloads its bitsandbytes weights from
    ``config.json``'s ``quantization_config``, so rebuilding only keeps CPET's 4-bit layout.
    """

    def validate(self, model: nn.Module, config: QuantizeConfig, context: StageContext, previous) -> None:
        validate(model, config, context.custom_layout)

    def apply(self, model: nn.Module, config: QuantizeConfig, context: StageContext):
        validate(model, config, context.custom_layout)  # what the previous stages actually made
        return quantize(model, config), None

    def rebuild(self, model: nn.Module, config: QuantizeConfig, index_maps: IndexMaps) -> nn.Module:
        return keep_4bit_layout(model)


QUANTIZE_RANK = 900
register_stage(QuantizeConfig, QuantizeStage(), rank=QUANTIZE_RANK, repeatable=False,
               order_note="stages that select or move weights need them in full precision")
