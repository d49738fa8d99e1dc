"""The adapter registry: task adapters by name, each resolved once into checked low-rank factors.

Reading and checking an adapter directory is :func:`cpet.assembly.load_factors` (the same step evaluation and
export use): a CPET adapter with ``cpet.json`` or a plain PEFT LoRA directory for the same base, its
``base_id``, every module present in the base with matching shapes, readable safetensors, no DoRA. The
registry adds what serving needs on top: safe names, an optional root that adapter paths may not leave, and
at most ``capacity`` adapters: loading one more evicts the least recently used one that is not pinned (never the
adapter being loaded); when every other one is pinned the load is refused and nothing changes. A running
request holds its adapter, so evicting or unloading one never fails the requests that use it.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..assembly import (AdapterError, AdapterSource, LoadedAdapter, LowRank, load_factors, module_shapes,
                        read_recovery)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_served_name(name) -> str:
    """``name`` if it may name a served adapter (it becomes a request's ``model``); AdapterError otherwise."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise AdapterError(f"the name {name!r} is not allowed for an adapter: 1-64 letters, digits, '.', '_' or "
                           "'-', starting with a letter or digit")
    return name


class UnknownAdapterError(KeyError):
    """No adapter of that name is loaded; ``known`` lists the loaded ones."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name, self.known = name, known

    def __str__(self) -> str:
        return f"unknown adapter {self.name!r}; loaded: {self.known}"


class AdapterRegistry:
    """Loaded adapters by name, at most ``capacity`` (LRU eviction of unpinned ones), thread-safe.

    Args:
        module_shapes: ``{module name: (in_features, out_features)}`` of the base's mapped linears.
        base_id: the base's id; CPET adapters made for another base are refused.
        root: if set, every adapter directory must lie inside it (names and paths cannot leave it).
        has_shared_recovery: whether the server holds the base's shared recovery (adapters trained with it
            are refused otherwise).
        shared_recovery_sha256: the SHA-256 of that recovery's weights (adapters trained with another are refused).
        device: where loaded factors are kept (the base's device: the expert-bank path multiplies by them as
            they are); None keeps them where they were read, on the CPU.
        reordered: the base's modules with neurons in another order than the source model's
            (:func:`~cpet.assembly.reordered_modules`): plain PEFT adapters on them are refused.
    """

    def __init__(self, module_shapes: dict[str, tuple[int, int]], base_id: str, *, capacity: int = 64,
                 root: str | Path | None = None, has_shared_recovery: bool = False,
                 shared_recovery_sha256: str | None = None, device: torch.device | str | None = None,
                 reordered: frozenset[str] = frozenset()):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.module_shapes, self.base_id, self.capacity = module_shapes, base_id, capacity
        self.root = Path(root).resolve() if root is not None else None
        self.has_shared_recovery = has_shared_recovery
        self.shared_recovery_sha256 = shared_recovery_sha256
        self.device = device
        self.reordered = reordered
        self._adapters: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()

    def _directory(self, directory: str | Path) -> Path:
        path = Path(directory).resolve()
        if self.root is not None and not path.is_relative_to(self.root):
            raise AdapterError(f"adapter path {directory} is outside the adapter root {self.root}")
        if path.exists() and not path.is_dir():
            raise AdapterError(f"adapter path {directory} is a file, not a directory: give the adapter's directory "
                               "(the one holding adapter_config.json)")
        if not path.is_dir():
            raise AdapterError(f"adapter directory {directory} does not exist")
        if self.root is not None:  # its files too: a link inside the directory could read from anywhere
            outside = next((f for f in path.rglob("*") if not f.resolve().is_relative_to(self.root)), None)
            if outside is not None:
                raise AdapterError(f"adapter path {directory} holds {outside.relative_to(path)}, a link to "
                                   f"{outside.resolve()} outside the adapter root {self.root}")
        return path

    def load(self, name: str, directory: AdapterSource | str | Path, *, pin: bool = False) -> LoadedAdapter:
        """Read, check and register ``directory`` (or the source already read from it) under ``name``, replacing
        an unpinned adapter of that name (a pinned one is refused: unload it first)."""
        check_served_name(name)
        source = directory if isinstance(directory, AdapterSource) else None
        path = self._directory(source.directory if source is not None else directory)
        with self._lock:
            if name in self._pinned:  # replacing it would swap the operator's adapter for another, pin and all
                raise AdapterError(f"{name} is pinned (given when the server started): unload it first to load "
                                   "another adapter under its name")
            self._victims(name)  # one that could never fit is refused before its files are read
        adapter = load_factors(name, source or AdapterSource(path), self.module_shapes, base_id=self.base_id,
                               shared_available=self.has_shared_recovery,
                               shared_sha256=self.shared_recovery_sha256, reordered=self.reordered)
        adapter = adapter.owned(self.device)  # copied off the file's memory map, onto the base's device
        with self._lock:
            self._make_room(name)  # before inserting: the new adapter is never the one evicted
            self._adapters.pop(name, None)
            self._adapters[name] = adapter
            if pin:
                self._pinned.add(name)
        return adapter

    def _make_room(self, name: str) -> None:
        """Evict least recently used unpinned adapters (never ``name``, which is being loaded) until ``name`` fits;
        nothing changes if it cannot fit."""
        for victim in self._victims(name):
            del self._adapters[victim]

    def _victims(self, name: str) -> list[str]:
        """The least recently used unpinned adapters that loading ``name`` would evict (AdapterError if it cannot
        fit: too many of the others are pinned)."""
        others = [n for n in self._adapters if n != name]
        excess = len(others) + 1 - self.capacity
        if excess <= 0:
            return []
        victims = [n for n in others if n not in self._pinned][:excess]  # oldest first: LRU order
        if len(victims) < excess:
            pinned = sum(n in self._pinned for n in others)
            raise AdapterError(f"cannot load {name}: capacity is {self.capacity} and {pinned} of the {len(others)} "
                               "other loaded adapters are pinned (never evicted): unload one first, or serve with a "
                               "larger capacity (`cpet serve --max-adapters`)")
        return victims

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


__all__ = ["AdapterRegistry", "LoadedAdapter", "LowRank", "AdapterError", "UnknownAdapterError", "read_recovery",
           "module_shapes"]
