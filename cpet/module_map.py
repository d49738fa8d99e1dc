"""Module maps read from a model's structure: :func:`derive_family` builds the architecture on the meta
device and finds its decoder layers, their attention block (q/k/v/o) and FFN (gate/up/down or fc1/fc2),
checks every shape against the config and that a pruned config rebuilds the same structure, or refuses with
an :class:`UnsupportedArchitectureError` that names the module that did not fit.

:func:`cpet.models.family_of` calls it for model types outside the fixed table (:data:`cpet.models.FAMILIES`).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import replace

import torch
from torch import nn

from .models import (ATTENTION_ROLES, FFN_ROLES, FamilySpec, UnsupportedArchitectureError, submodule,
                     supported_model_types)

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
                                 submodule(layers[0], _join(mlp, linears["up"])).out_features)
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
        module = submodule(layer, path)
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
    attrs = set(spec.linears.values())
    if len(attrs) < len(spec.linears):  # e.g. attention and FFN outputs both `wo`: one name, two index maps
        shared = sorted({a for a in attrs if list(spec.linears.values()).count(a) > 1})
        raise _refuse(config, f"two roles share the attribute name {', '.join(shared)}, so LoRA targets and "
                              "inheritance could not tell them apart")
    mapped = {f"{spec.layers}.{i}.{_join(spec.attention if r in ATTENTION_ROLES else spec.mlp, a)}"
              for i in range(num_layers) for r, a in spec.linears.items()}
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
        layer = submodule(probe, spec.layers)[0]
        ffn = {r: submodule(layer, _join(spec.mlp, a)) for r, a in spec.linears.items() if r in FFN_ROLES}
        widths = [m.in_features if r == "down" else m.out_features for r, m in ffn.items()]
    if not widths or any(w != width for w in widths):
        raise _refuse(config, f"config.{spec.intermediate_attr} does not set the width of {spec.layers}.0."
                              f"{_join(spec.mlp, spec.linears['up'])}, so a pruned FFN could not be reloaded")


def _heads_prunable(config, model_class, spec: FamilySpec, layer: nn.Module) -> bool:
    """Whether heads can be cut: the attention holds nothing head-indexed but q/k/v/o and per-head-dim
    norms, and the config with fewer query heads and an explicit ``head_dim`` builds matching shapes."""
    heads, kv, head_dim = _heads(config)
    attention = submodule(layer, spec.attention)
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
    probe_attention = submodule(submodule(probe, spec.layers)[0], spec.attention)
    linears = {r: getattr(probe_attention, a) for r, a in spec.linears.items() if r in ATTENTION_ROLES}
    kv_after = changes.get("num_key_value_heads", kv)
    # anything else whose shape follows the head count is head-indexed (attention sinks, per-head gates): pruning
    # would cut q/o and leave it whole. A (num_heads,) tensor passes the (head_dim,) test above when the two
    # counts are equal, so shapes are compared with the fewer-heads probe, buffers included
    def other_shapes(module: nn.Module) -> dict[str, tuple]:
        tensors = [*module.named_parameters(), *module.named_buffers()]
        return {n: tuple(t.shape) for n, t in tensors if n not in inside}

    if other_shapes(attention) != other_shapes(probe_attention):
        return False
    return (linears["q"].out_features == linears["o"].in_features == fewer * head_dim
            and linears["k"].out_features == linears["v"].out_features == kv_after * head_dim)
