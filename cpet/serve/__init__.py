"""Serving many task adapters on one compressed base: the adapter registry and the mixed-batch engine."""

from .engine import Engine
from .registry import AdapterError, AdapterRegistry, LoadedAdapter, UnknownAdapterError

__all__ = ["Engine", "AdapterRegistry", "LoadedAdapter", "AdapterError", "UnknownAdapterError"]
