"""Quantization with bitsandbytes (int8, nf4, fp4).

Two paths, one result per linear (a bitsandbytes ``Linear8bitLt`` / ``Linear4bit``):

- **transformers' own path** for bases that transformers can build from ``config.json``: the in-memory model is
  written to a temporary safetensors directory and read back with a ``BitsAndBytesConfig``, so the result
  serializes with ``save_pretrained`` and reloads with plain ``from_pretrained`` (quantization state included),
  on CPU (bitsandbytes >= 0.48) and CUDA;
- **in place** for bases transformers cannot build (per-layer widths, MoEfied FFNs: ``context.custom_layout``):
  each target ``nn.Linear`` inside the decoder layers (expert slices included, routers not) is replaced by a
  bitsandbytes layer quantized from its weight. Such a base reloads with CPET's loader, which puts empty
  bitsandbytes layers in place (:meth:`QuantizeStage.rebuild`) and reads the 4-bit weights with their
  quantization state (:meth:`QuantizeStage.load_weights`): transformers cannot, having no ``quantization_config``
  for modules it does not know.

Gradients flow through the quantized layers to their inputs, which is what LoRA and recovery modules need;
the quantized weights themselves are frozen.
"""

from __future__ import annotations

import re
import tempfile

import torch
from torch import nn

from ..config import QuantizeConfig, QuantMethod
from .index_maps import IndexMaps
from .stages import StageContext, register_stage


def is_bnb_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes layer (``Linear4bit``, ``Linear8bitLt``, ...), judged by its class's
    module so that bitsandbytes need not be importable to ask."""
    return type(module).__module__.startswith("bitsandbytes")


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a bitsandbytes layer, holds a 4-bit parameter, or is one of CPET's
    quantized token embeddings / tied heads (:mod:`.quantized_embeddings`)."""
    # the quantized embeddings count too: a tied model whose embedding alone was quantized has no bitsandbytes
    # layer, and compressing it again went through (an int8 table came back from save_pretrained as float weights)
    from .quantized_embeddings import QUANTIZED_EMBEDDING_TYPES

    return any(is_bnb_layer(m) or hasattr(m, "quant_state") or isinstance(m, QUANTIZED_EMBEDDING_TYPES)
               for m in model.modules())


def validate(model: nn.Module, config: QuantizeConfig) -> None:
    """Every check that can fail, before any expensive work."""
    if is_quantized(model):  # first: an already quantized embedding is no plain nn.Embedding either
        raise ValueError("the input model is already quantized: compress takes the full-precision original "
                         "(load it again without quantization)")
    if config.embeddings:
        from .quantized_embeddings import check_embeddings

        check_embeddings(model, config.method.value)
    from ..models import family_of
    from ..moe.experts import ExpertBank

    layers = family_of(model).layers + "."
    for name in config.modules or ():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"QuantizeConfig.modules names {name!r}, which is not a module of this model") from None
        if not isinstance(module, (nn.Linear, ExpertBank)):  # a MoEfied FFN linear: its expert slices
            raise ValueError(f"QuantizeConfig.modules names {name!r}, a {type(module).__name__}: bitsandbytes "
                             "quantizes only nn.Linear layers")
        skipped_by = [fragment for fragment in config.skip_modules if fragment in name]
        if skipped_by or not name.startswith(layers):  # it would silently stay in full precision
            why = (f"skip_modules fragment {skipped_by[0]!r} leaves it in full precision" if skipped_by
                   else f"it is outside the decoder layers ({layers}*), which are what CPET quantizes")
            raise ValueError(f"QuantizeConfig.modules names {name!r}, but {why}; name linears of the layers (the "
                             "token embedding and LM head: embeddings=True)")
    if not config.embeddings and not in_place_targets(model, config):  # a stage and a base_id that change nothing
        chosen = (f"modules={list(config.modules)}" if config.modules is not None
                  else f"skip_modules={list(config.skip_modules)}")
        raise ValueError(f"QuantizeConfig selects no linear to quantize ({chosen} leaves none of the decoder "
                         "layers'): name at least one, or leave the quantize stage out")


def bnb_config(model: nn.Module, config: QuantizeConfig):
    from transformers import BitsAndBytesConfig

    # transformers matches each skip entry as a regex from the start of a module name or as a name suffix,
    # while skip_modules are substrings (as the in-place path reads them): pass every linear the in-place path
    # would leave alone by its full name, regex-escaped, and not the fragments themselves (as regexes they would
    # skip other linears than the in-place path does, e.g. 'model.layers.*.mlp', and a fragment that is no
    # valid regex failed after every earlier stage had run), so that both paths quantize the same linears.
    # That includes the LM head: transformers protects it by default only while no skip list is given, and a
    # 4-bit head tied to the embedding breaks the model's first forward
    targets = set(in_place_targets(model, config))
    skip = [re.escape(n) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets]
    if config.method == QuantMethod.INT8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.method.value,
                              bnb_4bit_use_double_quant=config.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype),
                              llm_int8_skip_modules=skip)


def quantize(model: nn.Module, config: QuantizeConfig) -> nn.Module:
    """A bitsandbytes-quantized copy of ``model`` (same device, same dtype for what stays unquantized), in eval
    mode."""
    from transformers import AutoModelForCausalLM

    validate(model, config)
    device = next(model.parameters()).device
    device_map = {"": device.index or 0} if device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="cpet-quantize-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=bnb_config(model, config), dtype=model.dtype, device_map=device_map)
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


# ---------------------------------------------------------------------------------------------- in place

def in_place_targets(model: nn.Module, config: QuantizeConfig) -> list[str]:
    """Names of the linears the in-place path quantizes: every ``nn.Linear`` inside the decoder layers (expert
    slices included), except routers, ``skip_modules`` fragments, and, with ``modules`` set, any not named (a
    named MoEfied FFN linear stands for its expert slices)."""
    from ..models import decoder_layers, family_of

    prefix = family_of(model).layers
    names = []
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            full = f"{prefix}.{index}.{name}"
            if not isinstance(module, nn.Linear) or ".router." in f".{name}.":
                continue
            if any(fragment in full for fragment in config.skip_modules):
                continue
            if config.modules is not None and not any(full == wanted or full.startswith(wanted + ".experts.")
                                                      for wanted in config.modules):
                continue
            names.append(full)
    return names


def _bnb_layer(linear: nn.Linear, config: QuantizeConfig, weight: torch.Tensor | None) -> nn.Module:
    """A bitsandbytes layer of ``linear``'s shape, quantized from ``weight`` (None: from zeros, a shell whose
    weights the loader replaces)."""
    import bitsandbytes as bnb

    device = linear.weight.device
    data = (weight if weight is not None else torch.zeros(linear.out_features, linear.in_features)).detach()
    data = data.float().cpu().clone()
    bias = linear.bias is not None
    if config.method == QuantMethod.INT8:
        # threshold 6.0: transformers' BitsAndBytesConfig default (LLM.int8() outlier decomposition)
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0)
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                  compute_dtype=getattr(torch, config.compute_dtype), quant_type=config.method.value,
                                  compress_statistics=config.double_quant)
        layer.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_type=config.method.value,
                                         compress_statistics=config.double_quant)
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)  # its dtype, as the model's
    return keep_4bit_layout(layer.to(device))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_in_place(model: nn.Module, config: QuantizeConfig, progress: bool = False) -> nn.Module:
    """Replace every :func:`in_place_targets` linear of ``model`` by its bitsandbytes layer; returns ``model``."""
    from tqdm.auto import tqdm

    for name in tqdm(in_place_targets(model, config), desc="quantize", disable=not progress):
        linear = model.get_submodule(name)
        _replace(model, name, _bnb_layer(linear, config, linear.weight))
    return model.eval()


def load_prequantized(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Give every bitsandbytes 4-bit layer of ``model`` its saved weight and quantization state, consuming those
    keys of ``state``; returns the weight names filled. (``Linear4bit`` cannot read them through
    ``load_state_dict``; int8 layers can, as shells quantized from zeros, so they are left to it.)"""
    import bitsandbytes as bnb

    filled = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        prefix = f"{name}.weight"
        if prefix not in state:
            continue
        stats = {key[len(prefix) + 1:]: state.pop(key) for key in [k for k in state if k.startswith(prefix + ".")]}
        module.weight = bnb.nn.Params4bit.from_prequantized(data=state.pop(prefix), quantized_stats=stats,
                                                            requires_grad=False, device=module.weight.device)
        keep_4bit_layout(module)
        filled.append(prefix)
    return filled


class QuantizeStage:
    """:class:`~cpet.compress.stages.Stage` for :class:`~cpet.config.QuantizeConfig` (rank 900, once).

    Moves no row or column (no index maps). Bases transformers can build go through its bitsandbytes path and
    reload from ``config.json``'s ``quantization_config`` (rebuilding only keeps CPET's 4-bit layout); others
    are quantized in place and rebuilt with empty bitsandbytes layers that :meth:`load_weights` fills.
    """

    def validate(self, model: nn.Module, config: QuantizeConfig, context: StageContext, previous) -> None:
        validate(model, config)
        if config.embeddings:  # transformers' bitsandbytes path never quantizes embeddings: in place, CPET's loader
            context.custom_layout = context.custom_layout or EMBEDDINGS_LAYOUT

    def apply(self, model: nn.Module, config: QuantizeConfig, context: StageContext):
        if config.embeddings:
            context.custom_layout = context.custom_layout or EMBEDDINGS_LAYOUT
        if not context.custom_layout:
            return quantize(model, config), None
        validate(model, config)  # what the previous stages actually made
        model = quantize_in_place(model, config, context.progress)
        if config.embeddings:
            from .quantized_embeddings import quantize_embeddings

            quantize_embeddings(model, config)
        return model, None

    def rebuild(self, model: nn.Module, config: QuantizeConfig, index_maps: IndexMaps) -> nn.Module:
        if is_quantized(model):  # transformers loaded it with its quantization_config
            return keep_4bit_layout(model)
        for name in in_place_targets(model, config):  # a custom layout: shells, filled by load_weights
            _replace(model, name, _bnb_layer(model.get_submodule(name), config, None))
        if config.embeddings:
            from .quantized_embeddings import quantize_embeddings

            quantize_embeddings(model, config, from_weights=False)
        return model

    def load_weights(self, model: nn.Module, config: QuantizeConfig, state: dict[str, torch.Tensor]) -> list[str]:
        filled = load_prequantized(model, state)
        if config.embeddings:
            from .quantized_embeddings import load_quantized_embeddings

            filled += load_quantized_embeddings(model, state)
        return filled


EMBEDDINGS_LAYOUT = "quantized token embeddings"
QUANTIZE_RANK = 900
register_stage(QuantizeConfig, QuantizeStage(), rank=QUANTIZE_RANK, repeatable=False,
               order_note="stages that select or move weights need them in full precision")
