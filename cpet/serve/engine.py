"""The serving engine: one compressed base, many task adapters, mixed in one batch.

Every mapped linear of the base carries one forward hook. A batch runs the base once (each base linear once
per layer per step, whatever the adapters in it); the hook then adds, row by row, what that row's adapter
adds to the linear: its LoRA and its per-task recovery, computed for each distinct adapter on the rows that
use it (a segmented matmul: rows grouped by adapter), and the base's shared recovery, computed once for the
whole batch and added only to the rows whose adapter was trained with it. Rows without an adapter get the
bare base. :meth:`Engine.reference_logits` computes the same thing the plain way (one adapter at a time, the
model assembled as CPET evaluates it) for tests.

MoEfied bases are not served yet: their expert banks are called per expert, not through ``forward``, so the
hooks would not see them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..models import iter_layer_linears
from .registry import AdapterRegistry, LoadedAdapter, LowRank, module_shapes, read_recovery


@dataclass
class _Batch:
    """The adapter of each row of the batch being computed (None: the bare base)."""

    rows: list[LoadedAdapter | None]

    def groups(self) -> list[tuple[LoadedAdapter, torch.Tensor]]:
        """``[(adapter, row indices)]`` for each distinct adapter in the batch, in first-row order."""
        seen: dict[int, tuple[LoadedAdapter, list[int]]] = {}
        for i, adapter in enumerate(self.rows):
            if adapter is not None:
                seen.setdefault(id(adapter), (adapter, []))[1].append(i)
        return [(adapter, torch.tensor(rows)) for adapter, rows in seen.values()]


class Engine:
    """A compressed base with hooks that apply per-row adapters (see the module docstring).

    Args:
        model: the compressed causal LM (frozen, eval mode); its linears get the hooks.
        base_id: the base's id (adapters are checked against it).
        shared_recovery: directory of the base's shared recovery set, or None.
        capacity, root: the registry's (see :class:`~cpet.serve.registry.AdapterRegistry`).
    """

    def __init__(self, model: nn.Module, base_id: str, tokenizer=None, *, shared_recovery: str | Path | None = None,
                 capacity: int = 64, root: str | Path | None = None):
        from ..compress.moefy import moe_blocks

        if moe_blocks(model):
            raise ValueError("MoEfied bases are not served yet: their expert banks run per expert, outside the "
                             "hooks that add each row's adapter")
        self.model, self.base_id, self.tokenizer = model.eval(), base_id, tokenizer
        shapes = module_shapes(model)
        self.shared = read_recovery(Path(shared_recovery), shapes) if shared_recovery is not None else {}
        self.registry = AdapterRegistry(shapes, base_id, capacity=capacity, root=root,
                                        has_shared_recovery=bool(self.shared))
        self._batch: _Batch | None = None
        self._lock = threading.Lock()  # one batch through the hooks at a time
        self.base_calls = 0  # base-linear forward calls (checks: one per linear per step, whatever the adapters)
        for layer in iter_layer_linears(model):
            for role, name in layer.names.items():
                layer[role].register_forward_hook(self._hook(name))

    @classmethod
    def from_pipeline(cls, directory: str | Path, **kwargs) -> "Engine":
        """The engine of a pipeline directory: its compressed base and, when present, its shared recovery."""
        from ..compress import CompressedBase

        directory = Path(directory)
        base = CompressedBase.load(directory / "base")
        recovery = directory / "recovery"
        return cls(base.model, base.base_id, base.tokenizer,
                   shared_recovery=recovery if (recovery / "recovery.json").exists() else None, **kwargs)

    # ------------------------------------------------------------------ the per-row deltas
    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.base_calls += 1
            batch = self._batch
            if batch is None:
                return output
            x = inputs[0]
            delta = torch.zeros_like(output)
            shared = self.shared.get(name)
            if shared is not None:
                users = torch.tensor([a is not None and a.shared for a in batch.rows], device=x.device)
                if users.any():  # once for the whole batch, kept on the rows that were trained with it
                    delta += shared(x).to(output.dtype) * users.view(-1, *[1] * (x.dim() - 1))
            for adapter, rows in batch.groups():
                rows = rows.to(x.device)
                parts: list[LowRank] = [p for p in (adapter.lora.get(name), adapter.per_task.get(name)) if p]
                if parts:
                    picked = x.index_select(0, rows)
                    delta.index_add_(0, rows, sum(p(picked) for p in parts).to(output.dtype))
            return output + delta

        return hook

    @torch.no_grad()
    def forward(self, adapters: Sequence[str | None], **model_inputs):
        """One model call on a batch whose row ``i`` uses adapter ``adapters[i]`` (None: the bare base)."""
        rows = [self.registry.get(name) if name is not None else None for name in adapters]
        with self._lock:
            self._batch = _Batch(rows)
            try:
                return self.model(**model_inputs)
            finally:
                self._batch = None

    # ------------------------------------------------------------------ reference (plain, one adapter at a time)
    @torch.no_grad()
    def reference_logits(self, adapters: Sequence[str | None], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Row by row with each adapter applied alone through the same factors, no batching: the semantics the
        fast path must equal (and, for CPET adapters, what ``CPET.model_for(...)`` computes)."""
        outs = []
        for i, name in enumerate(adapters):
            mask = attention_mask[i:i + 1] if attention_mask is not None else None
            outs.append(self.forward([name], input_ids=input_ids[i:i + 1], attention_mask=mask).logits)
        return torch.cat(outs)


__all__ = ["Engine"]
