"""Compression stage configs: small dataclasses, validated on construction, JSON round trip.

Stages are identified in JSON by a ``"stage"`` key (``"prune"``, ``"quantize"``): each config type names it
in a ``stage`` class attribute and is registered under it (:func:`register_stage_config`, done for every stage
by :func:`cpet.compress.register_stage`), so a manifest can be read back into the same config objects with
:func:`stage_config_from_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from typing import ClassVar

STAGE_CONFIGS: dict[str, type] = {}  # "stage" name -> config dataclass; filled by register_stage_config


def register_stage_config(cls: type) -> type:
    """Make dataclass ``cls`` readable from JSON under its ``stage`` class attribute; returns ``cls``.

    Raises:
        TypeError: ``cls`` is not a dataclass or names no ``stage``.
        ValueError: another type already holds that name.
    """
    name = getattr(cls, "stage", None)
    if not is_dataclass(cls) or not isinstance(name, str) or not name:
        raise TypeError(f"{cls!r}: a stage config is a dataclass naming its stage in a `stage: ClassVar[str]`")
    known = STAGE_CONFIGS.setdefault(name, cls)
    if known is not cls:
        raise ValueError(f"stage name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    return cls


class QuantMethod(str, Enum):
    """bitsandbytes storage formats."""

    INT8 = "int8"  # LLM.int8() with outlier decomposition
    NF4 = "nf4"    # 4-bit NormalFloat (QLoRA)
    FP4 = "fp4"    # 4-bit float


class Importance(str, Enum):
    """How structured-pruning candidates are ranked (higher = keep)."""

    MAGNITUDE = "magnitude"    # sum of |W| over the coupled group
    TAYLOR = "taylor"          # sum of |W * dL/dW| over the group, LM loss on calibration batches
    ACTIVATION = "activation"  # Wanda: sum of |W| * ||X|| (input-feature norms on calibration batches)


class HeadMode(str, Enum):
    """GQA-aware head pruning."""

    QUERY = "query"        # drop the same number of query heads inside every KV group
    KV_GROUP = "kv_group"  # drop whole KV groups (a KV head with all its query heads)


# the cpet compress flag that sets each ratio, named in errors for command-line users
_RATIO_FLAGS = {"ffn_ratio": "--prune-ffn", "head_ratio": "--prune-heads"}


def as_number(name: str, value, kind: type):
    """``value`` as ``kind`` (``float`` or ``int``), so that equal settings written differently (``0`` and
    ``0.0``, ``2`` and ``2.0``) are one config with one ``base_id``; a non-number, or a fractional int, is
    refused naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    # isfinite first: int(inf) raised an OverflowError and int(nan) a ValueError naming no field
    if kind is int and not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return kind(value)


def _layer_index(key) -> int:
    """A ``layer_schedule`` key as a layer index: a whole number, or its text (JSON writes keys as strings).
    ``int()`` alone made 1.5 and True layer 1, another layer than the one written, without a word."""
    if isinstance(key, str):
        try:
            return int(key)
        except ValueError:
            raise ValueError(f"layer_schedule layer must be a whole number, got {key!r}") from None
    return as_number("layer_schedule layer", key, int)


def _names(field: str, value) -> tuple[str, ...]:
    """A sequence of module names as a tuple; one bare string is refused (``tuple("lm_head")`` is its letters, each
    then a fragment that matched nearly every module) and so is anything but text in it."""
    if isinstance(value, str):
        raise ValueError(f"{field} takes a list of module names, got the string {value!r}: write ({value!r},)")
    names = tuple(value)
    odd = [name for name in names if not isinstance(name, str) or not name]
    if odd:
        raise ValueError(f"{field} takes module names (non-empty text), got {odd[0]!r}")
    return names


def _check_ratio(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        flag = f" (CLI: {_RATIO_FLAGS[name]})" if name in _RATIO_FLAGS else ""
        raise ValueError(f"{name} must be in [0, 1), got {value}{flag}: the share of channels pruned")


@register_stage_config
@dataclass(frozen=True)
class QuantizeConfig:
    """Quantize linear layers with bitsandbytes.

    Attributes:
        method: ``int8``, ``nf4`` or ``fp4``.
        double_quant: 4-bit only: quantize the quantization constants too (saves ~0.4 bit/parameter).
        compute_dtype: dtype of the 4-bit matmul (``float32`` on CPU; ``bfloat16`` on GPUs).
        skip_modules: module-name fragments left in full precision (embeddings and ``lm_head`` by default).
        modules: if set, quantize only these linears of the decoder layers (full names; an ``nn.Linear``, or a
            MoEfied FFN linear, whose expert slices are then quantized); one a ``skip_modules`` fragment matches
            is refused.
        embeddings: also quantize the token embedding and the LM head with ``method`` (one tensor for both where
            the model ties them); such a base reloads with CPET's loader only.
    """

    method: QuantMethod = QuantMethod.NF4
    double_quant: bool = True
    compute_dtype: str = "float32"
    skip_modules: tuple[str, ...] = ("lm_head", "embed_tokens", "embed_positions")
    modules: tuple[str, ...] | None = None
    embeddings: bool = False

    stage: ClassVar[str] = "quantize"
    added_fields: ClassVar[tuple[str, ...]] = ("embeddings",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", QuantMethod(self.method))
        object.__setattr__(self, "skip_modules", _names("skip_modules", self.skip_modules))
        if self.modules is not None:
            object.__setattr__(self, "modules", _names("modules", self.modules))
        if self.compute_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {self.compute_dtype!r}")


@register_stage_config
@dataclass(frozen=True)
class PruneConfig:
    """Structured pruning of FFN channels and attention heads with torch-pruning.

    Attributes:
        ffn_ratio: share of FFN intermediate channels removed in every layer, in [0, 1).
        head_ratio: share of attention heads removed in every layer, in [0, 1) (must fit the GQA groups).
        importance: ``magnitude``, ``taylor`` or ``activation`` (the last two need calibration batches).
        head_mode: ``query`` (drop query heads inside each KV group) or ``kv_group`` (drop whole groups).
        layer_schedule: optional per-layer FFN ratios ``{layer: ratio}`` overriding ``ffn_ratio``; the
            result has non-uniform widths and loads with ``CompressedBase.load`` only.
        round_to: kept FFN widths are rounded down to a multiple of this (hardware-friendly shapes), but
            never below one multiple; one that would keep a layer's whole width is refused.
    """

    ffn_ratio: float = 0.0
    head_ratio: float = 0.0
    importance: Importance = Importance.TAYLOR
    head_mode: HeadMode = HeadMode.QUERY
    layer_schedule: dict[int, float] | None = None
    round_to: int = 1

    stage: ClassVar[str] = "prune"

    def __post_init__(self) -> None:
        object.__setattr__(self, "importance", Importance(self.importance))
        object.__setattr__(self, "head_mode", HeadMode(self.head_mode))
        # ratios as floats: ``0`` and ``0.0`` are one configuration, and must hash to one base_id (JSON writes
        # them differently); the CLI and the defaults already give floats, so no existing base_id changes
        object.__setattr__(self, "ffn_ratio", as_number("ffn_ratio", self.ffn_ratio, float))
        object.__setattr__(self, "head_ratio", as_number("head_ratio", self.head_ratio, float))
        object.__setattr__(self, "round_to", as_number("round_to", self.round_to, int))
        _check_ratio("ffn_ratio", self.ffn_ratio)
        _check_ratio("head_ratio", self.head_ratio)
        if self.layer_schedule is not None:
            schedule = {}
            for key, ratio in self.layer_schedule.items():
                layer = _layer_index(key)
                if layer in schedule:  # "1" and 1: the later ratio silently replaced the earlier one
                    raise ValueError(f"layer_schedule names layer {layer} twice ({schedule[layer]} and {ratio})")
                # as_number: float(None) raised a TypeError, past the ValueError every caller reports
                schedule[layer] = as_number(f"layer_schedule[{layer}]", ratio, float)
                _check_ratio(f"layer_schedule[{layer}]", schedule[layer])
            object.__setattr__(self, "layer_schedule", schedule)
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if self.ffn_ratio == 0 and self.head_ratio == 0 and not any((self.layer_schedule or {}).values()):
            raise ValueError("PruneConfig prunes nothing: set ffn_ratio, head_ratio or a layer_schedule with a "
                             "ratio above 0")

    @property
    def needs_calibration(self) -> bool:
        return self.importance in (Importance.TAYLOR, Importance.ACTIVATION)


def stage_config_to_dict(config) -> dict:
    """JSON-ready dict with a ``"stage"`` key; enums become their strings.

    Fields a config lists in ``added_fields`` (added after bases were first saved with it) are written only
    when they differ from their default, so that the dict (and the ``base_id`` hashed from it) of an unchanged
    configuration stays what it was.
    """
    out = {"stage": config.stage}
    added = getattr(type(config), "added_fields", ())
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in added and value == f.default:
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = {str(k): v for k, v in value.items()}
        out[f.name] = value
    return out


def stage_config_from_dict(data: dict):
    """Inverse of :func:`stage_config_to_dict`."""
    data = dict(data)
    stage = data.pop("stage", None)
    if stage not in STAGE_CONFIGS:
        raise ValueError(f"unknown compression stage {stage!r}; known: {', '.join(STAGE_CONFIGS)}")
    cls = STAGE_CONFIGS[stage]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}")
    return cls(**data)  # configs normalise JSON forms themselves (lists to tuples, strings to enums)


__all__ = ["QuantMethod", "Importance", "HeadMode", "QuantizeConfig", "PruneConfig", "stage_config_to_dict",
           "stage_config_from_dict", "register_stage_config", "STAGE_CONFIGS"]
