"""The adapter registry: task adapters resolved once into typed, checked, in-memory low-rank factors.

An adapter directory (a CPET adapter with ``cpet.json``, or a plain PEFT LoRA directory for the same base) is
read once into a :class:`LoadedAdapter`: its LoRA factors per module (``A [r, in]``, ``B [out, r]``, scale), its
per-task recovery bypasses when it has them, whether it was trained with the pipeline's shared recovery, and
its template / verbalizer for classification. Loading checks everything before accepting: a safe name, the
files, readable safetensors, the ``base_id`` (CPET adapters), every module present in the base with matching
shapes, no DoRA. The registry keeps at most ``capacity`` adapters, evicting the least recently used one that
is not pinned.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")


class AdapterError(ValueError):
    """An adapter the registry refuses; the message says what was wrong."""


class UnknownAdapterError(KeyError):
    """No adapter of that name is loaded; ``known`` lists the loaded ones."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name, self.known = name, known

    def __str__(self) -> str:
        return f"unknown adapter {self.name!r}; loaded: {self.known}"


@dataclass(frozen=True)
class LowRank:
    """``act(x A^T) B^T * scale`` with ``A [r, in]``, ``B [out, r]`` (``act`` identity for LoRA, GELU for CA-LoRA
    per-task recovery)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    gelu: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low = x.to(self.A.dtype) @ self.A.T
        if self.gelu:
            low = torch.nn.functional.gelu(low)
        return (low @ self.B.T) * self.scale


@dataclass
class LoadedAdapter:
    """One adapter, ready to serve.

    Attributes:
        lora: module name (relative to the causal LM) -> its LoRA.
        per_task: module name -> per-task recovery bypass (empty without per-task recovery).
        shared: whether the adapter was trained with the pipeline's shared recovery (its ``cpet.json``).
        meta: ``cpet.json`` (empty for a plain PEFT adapter).
    """

    name: str
    directory: Path
    lora: dict[str, LowRank]
    per_task: dict[str, LowRank] = field(default_factory=dict)
    shared: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((lr.A.shape[0] for lr in self.lora.values()), default=0)

    @property
    def nbytes(self) -> int:
        parts = [*self.lora.values(), *self.per_task.values()]
        return sum(p.A.numel() * p.A.element_size() + p.B.numel() * p.B.element_size() for p in parts)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise AdapterError(f"{path.parent} has no {path.name} (CPET reads safetensors adapters only)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not a readable safetensors file ({exc}): re-save the adapter") from None


def _scale(config: dict, module: str, rank: int) -> float:
    """peft's scale for ``module``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), patterns honoured."""
    from peft.utils.other import get_pattern_key

    alpha_pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(alpha_pattern), module)
    alpha = alpha_pattern.get(key, config.get("lora_alpha", rank))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_adapter(name: str, directory: Path, module_shapes: dict[str, tuple[int, int]]) -> LoadedAdapter:
    """Read and check an adapter directory against the base's ``module_shapes`` ``{name: (in, out)}``."""
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise AdapterError(f"{directory} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path} is not valid JSON ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{directory} is a {config.get('peft_type')} adapter; only LoRA adapters are served")
    if config.get("use_dora"):
        raise AdapterError(f"{directory} is a DoRA adapter (a magnitude vector per module): only LoRA is served")
    tensors = _read_safetensors(directory / "adapter_model.safetensors")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{directory}: tensor {key!r} is not a LoRA factor (only LoRA A/B are served)")
        factors.setdefault(match[1], {})[match[2]] = tensor.float()
    lora = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{directory}: module {module} has only lora_{''.join(pair)}")
        shape = module_shapes.get(module)
        if shape is None:
            raise AdapterError(f"{directory}: module {module} is not a linear of this base")
        A, B = pair["A"], pair["B"]
        if A.shape[1] != shape[0] or B.shape[0] != shape[1] or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{directory}: module {module} has LoRA shapes A {tuple(A.shape)}, B "
                               f"{tuple(B.shape)}; the base linear is {shape[0]} -> {shape[1]}: an adapter of "
                               "another base")
        lora[module] = LowRank(A, B, _scale(config, module, A.shape[0]))
    if not lora:
        raise AdapterError(f"{directory} holds no LoRA factors")
    return LoadedAdapter(name, directory, lora)


def read_recovery(directory: Path, module_shapes: dict[str, tuple[int, int]]) -> dict[str, LowRank]:
    """A saved :class:`~cpet.recovery.RecoverySet` (``recovery.json`` + safetensors) as plain factors."""
    from ..recovery import RECOVERY_FILE, RECOVERY_META

    meta = json.loads((directory / RECOVERY_META).read_text())
    tensors = _read_safetensors(directory / RECOVERY_FILE)
    config = meta["config"]
    scale = config["alpha"] / config["rank"]
    out = {}
    for module in meta["targets"]:
        key = module.replace(".", "__")
        A, B = tensors[f"bypasses.{key}.A.weight"].float(), tensors[f"bypasses.{key}.B.weight"].float()
        if module not in module_shapes or A.shape[1] != module_shapes[module][0]:
            raise AdapterError(f"recovery in {directory} does not fit this base (module {module})")
        out[module] = LowRank(A, B, scale, gelu=config["activation"] == "gelu")
    return out


class AdapterRegistry:
    """Loaded adapters by name, at most ``capacity`` (LRU eviction of unpinned ones), thread-safe.

    Args:
        module_shapes: ``{module name: (in_features, out_features)}`` of the base's mapped linears.
        base_id: the base's id; CPET adapters made for another base are refused.
        root: if set, every adapter directory must lie inside it (names and paths cannot leave it).
        has_shared_recovery: whether the server holds the base's shared recovery (adapters trained with it
            are refused otherwise).
    """

    def __init__(self, module_shapes: dict[str, tuple[int, int]], base_id: str, *, capacity: int = 64,
                 root: str | Path | None = None, has_shared_recovery: bool = False):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.module_shapes, self.base_id, self.capacity = module_shapes, base_id, capacity
        self.root = Path(root).resolve() if root is not None else None
        self.has_shared_recovery = has_shared_recovery
        self._adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()

    def _directory(self, directory: str | Path) -> Path:
        path = Path(directory).resolve()
        if self.root is not None and not path.is_relative_to(self.root):
            raise AdapterError(f"adapter path {directory} is outside the adapter root {self.root}")
        if not path.is_dir():
            raise AdapterError(f"adapter directory {directory} does not exist")
        return path

    def load(self, name: str, directory: str | Path, *, pin: bool = False) -> LoadedAdapter:
        """Read, check and register ``directory`` under ``name`` (replacing an adapter of that name)."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} is not allowed: 1-64 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit")
        path = self._directory(directory)
        adapter = read_adapter(name, path, self.module_shapes)
        meta_path = path / "cpet.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("base_id") != self.base_id:
                raise AdapterError(f"adapter {name} was tuned on base {str(meta.get('base_id'))[:12]}, not on this "
                                   f"base {self.base_id[:12]}")
            adapter.meta = meta
            recovery = meta.get("recovery", "none")
            adapter.shared = recovery in ("shared", "both")
            if adapter.shared and not self.has_shared_recovery:
                raise AdapterError(f"adapter {name} was trained with shared recovery, which this server has not "
                                   "loaded (start it from a pipeline with recovery/)")
            if recovery in ("per_task", "both"):
                adapter.per_task = read_recovery(path / "per_task_recovery", self.module_shapes)
        with self._lock:
            self._adapters.pop(name, None)
            self._adapters[name] = adapter
            if pin:
                self._pinned.add(name)
            self._evict()
        return adapter

    def _evict(self) -> None:
        while len(self._adapters) > self.capacity:
            victim = next((n for n in self._adapters if n not in self._pinned), None)
            if victim is None:
                raise AdapterError(f"all {len(self._adapters)} loaded adapters are pinned; capacity is "
                                   f"{self.capacity}: unpin or unload one first")
            del self._adapters[victim]

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise UnknownAdapterError(name, list(self._adapters))
            del self._adapters[name]
            self._pinned.discard(name)

    def get(self, name: str) -> LoadedAdapter:
        """The adapter (marked most recently used). Raises :class:`UnknownAdapterError`."""
        with self._lock:
            if name not in self._adapters:
                raise UnknownAdapterError(name, list(self._adapters))
            self._adapters.move_to_end(name)
            return self._adapters[name]

    def names(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def pinned(self, name: str) -> bool:
        return name in self._pinned

    def __len__(self) -> int:
        return len(self._adapters)


def module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of every mapped linear of a causal LM (the modules adapters may target)."""
    from ..models import iter_layer_linears, unwrap

    return {name: (layer[role].in_features, layer[role].out_features)
            for layer in iter_layer_linears(unwrap(model)) for role, name in layer.names.items()}


__all__ = ["AdapterRegistry", "LoadedAdapter", "LowRank", "AdapterError", "UnknownAdapterError", "read_adapter",
           "read_recovery", "module_shapes"]
