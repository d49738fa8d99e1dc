"""Expert banks: one FFN linear split into per-expert ``nn.Linear`` slices that run only where routed.

A MoEfied FFN keeps its three linears under their usual names (``gate_proj``, ``up_proj``, ``down_proj``), but
each is an :class:`ExpertBank` holding E equal slices, so everything that finds linears by module-map role
(LoRA targets, recovery, inheritance, the sparsity tools) still finds one module per role with whole-FFN
shapes, while the forward pass computes only the chosen experts:

- ``gate`` / ``up`` are split by **rows** (output features): expert ``e`` owns rows ``e*m .. (e+1)*m - 1`` of
  the (permuted) ``[I, h]`` weight; :meth:`ExpertBank.expert` maps ``[n, h] -> [n, m]``.
- ``down`` is split by **columns** (input features): :meth:`ExpertBank.combine` takes every expert's
  ``[n_e, m]`` activations with the token rows they belong to and returns the summed ``[T, h]`` output.

Low-rank side paths (a peft LoRA around the bank, recovery bypasses attached to it) keep whole-FFN factors
``A [r, d_in]``, ``B [d_out, r]``; each expert reads its slice: row banks use ``B[rows_e]``, the down bank
accumulates ``A[:, cols_e] h_e`` per token over the chosen experts before ``act`` and ``B`` (so a nonlinear
bypass sees exactly what it would see on the dense FFN with the unchosen neurons at zero).

Each expert is a plain ``nn.Linear`` so that quantization replaces it like any other linear.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ROWS, COLS = "rows", "cols"


class Routed(NamedTuple):
    """One expert's share of a batch: ``tokens`` ``[n_e]`` int64 row indices into the flattened batch and the
    expert's input (row banks) or activations (the down bank) for those rows, ``[n_e, width]``."""

    expert: int
    tokens: torch.Tensor
    values: torch.Tensor


class LowRankPath(NamedTuple):
    """A low-rank side path read by slices: ``act(x A^T) B^T * scale``.

    ``A`` ``[r, d_in]`` and ``B`` ``[d_out, r]`` are whole-FFN factors; ``dropout`` applies to the input
    (identity for recovery); ``enabled`` is read on every call.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    act: Callable[[torch.Tensor], torch.Tensor]
    dropout: Callable[[torch.Tensor], torch.Tensor]


class _SidePathHandle:
    """Removes a side path from its bank (the analogue of a hook handle)."""

    def __init__(self, bank: "ExpertBank", key: int):
        self._bank, self._key = bank, key

    def remove(self) -> None:
        self._bank._side_paths.pop(self._key, None)


class _RoutedHandle(_SidePathHandle):
    def remove(self) -> None:
        self._bank._routed_paths.pop(self._key, None)


class ExpertBank(nn.Module):
    """E equal slices of one FFN linear, each an ``nn.Linear`` of its own.

    Args:
        experts: the slices, in expert order. Row banks: each ``[m, d_in]`` (bias kept per slice). Column
            banks: each ``[d_out, m]`` without bias; the linear's bias, if any, is ``bias`` (added once).
        split: ``"rows"`` (gate / up) or ``"cols"`` (down).
        bias: column banks only: the ``[d_out]`` bias of the whole linear, or None.

    Attributes:
        in_features, out_features: the whole linear's shape (what peft and recovery size their factors by).
        expert_width: m, the neurons per expert.
    """

    def __init__(self, experts: Sequence[nn.Linear], split: str, bias: torch.Tensor | None = None):
        super().__init__()
        if split not in (ROWS, COLS):
            raise ValueError(f"an expert bank splits 'rows' or 'cols', got {split!r}")
        self.experts = nn.ModuleList(experts)
        self.split = split
        first = self.experts[0]
        self.expert_width = first.out_features if split == ROWS else first.in_features
        if split == ROWS:
            self.in_features, self.out_features = first.in_features, self.expert_width * len(self.experts)
        else:
            self.in_features, self.out_features = self.expert_width * len(self.experts), first.out_features
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._side_paths: dict[int, Callable[[], LowRankPath | None]] = {}
        self._routed_paths: dict[int, Callable] = {}
        self._next_key = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_experts: int, split: str) -> "ExpertBank":
        """Split a dense ``linear`` (already in expert order) into ``num_experts`` contiguous slices."""
        size = linear.out_features if split == ROWS else linear.in_features
        if size % num_experts:
            raise ValueError(f"{size} features do not split into {num_experts} equal experts")
        width = size // num_experts
        weight = linear.weight.detach()
        experts = []
        for e in range(num_experts):
            part = slice(e * width, (e + 1) * width)
            if split == ROWS:
                expert = nn.Linear(linear.in_features, width, bias=linear.bias is not None,
                                   device=weight.device, dtype=weight.dtype)
                expert.weight.data.copy_(weight[part])
                if linear.bias is not None:
                    expert.bias.data.copy_(linear.bias.detach()[part])
            else:
                expert = nn.Linear(width, linear.out_features, bias=False, device=weight.device, dtype=weight.dtype)
                expert.weight.data.copy_(weight[:, part])
            experts.append(expert)
        bias = linear.bias if split == COLS else None
        return cls(experts, split, bias)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_slice(self, expert: int) -> slice:
        """The whole-FFN features (rows or columns, by ``split``) that ``expert`` owns."""
        return slice(expert * self.expert_width, (expert + 1) * self.expert_width)

    # ------------------------------------------------------------------ side paths (recovery)
    def add_side_path(self, path: Callable[[], LowRankPath | None]) -> _SidePathHandle:
        """Register ``path`` (called on every forward; returns the factors, or None to add nothing)."""
        key = self._next_key
        self._next_key += 1
        self._side_paths[key] = path
        return _SidePathHandle(self, key)

    def add_routed_path(self, path: Callable) -> _SidePathHandle:
        """Register a path that sees which tokens it runs on (per-row deltas, as a server with one adapter per
        batch row needs): row banks call ``path(expert, x_e, tokens_e)`` and the down bank ``path(parts,
        num_tokens)``; each returns the delta to add (``[n_e, m]`` / ``[num_tokens, d_out]``) or None."""
        key = self._next_key
        self._next_key += 1
        self._routed_paths[key] = path
        return _RoutedHandle(self, key)

    def active_side_paths(self) -> list[LowRankPath]:
        return [p for p in (path() for path in self._side_paths.values()) if p is not None]

    # ------------------------------------------------------------------ compute
    def expert(self, expert: int, x: torch.Tensor, extra: Sequence[LowRankPath] = (),
               tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Row banks: expert ``expert``'s output ``[n, m]`` for its tokens ``x`` ``[n, d_in]`` (``tokens``: their
        rows in the flattened batch, for routed paths)."""
        if self.split != ROWS:
            raise TypeError("expert() is for row banks (gate / up); the down bank combines experts")
        out = self.experts[expert](x)
        rows = self.expert_slice(expert)
        for path in (*self.active_side_paths(), *extra):
            low = path.act(F.linear(path.dropout(x).to(path.A.dtype), path.A))
            out = out + (F.linear(low, path.B[rows]) * path.scale).to(out.dtype)
        if tokens is not None:
            for routed in self._routed_paths.values():
                delta = routed(expert, x, tokens)
                if delta is not None:
                    out = out + delta.to(out.dtype)
        return out

    def combine(self, parts: Sequence[Routed], num_tokens: int, extra: Sequence[LowRankPath] = (),
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """Column bank: ``sum_e down_e(h_e)`` scattered back to ``[num_tokens, d_out]`` (+ bias, side paths).

        ``dtype`` is the output's (the FFN input's); by default that of the experts' outputs. Where no expert
        was chosen at all (an oracle or a test choosing none) there are none to read it from, and the output
        came back fp32 in a bf16 model."""
        if self.split != COLS:
            raise TypeError("combine() is for the column bank (down); row banks compute one expert at a time")
        if dtype is None:
            dtype = parts[0].values.dtype if parts else (self.bias.dtype if self.bias is not None else torch.float32)
        device = parts[0].values.device if parts else self.experts[0].weight.device
        # summed in at least fp32, cast once at the end: a bf16 sum of E expert outputs would round E times where
        # the dense linear rounds once
        total = torch.promote_types(dtype, torch.float32)
        out = torch.zeros(num_tokens, self.out_features, dtype=total, device=device)
        for part in parts:  # one scatter per expert: joining the outputs first would copy them once more
            out.index_add_(0, part.tokens, self.experts[part.expert](part.values).to(total))
        if self.bias is not None:
            out = out + self.bias.to(total)
        for path in (*self.active_side_paths(), *extra):
            low = torch.zeros(num_tokens, path.A.shape[0], dtype=path.A.dtype, device=out.device)
            for part in parts:
                cols = self.expert_slice(part.expert)
                low.index_add_(0, part.tokens, F.linear(path.dropout(part.values).to(path.A.dtype), path.A[:, cols]))
            out = out + (F.linear(path.act(low), path.B) * path.scale).to(total)
        for routed in self._routed_paths.values():
            delta = routed(parts, num_tokens)
            if delta is not None:
                out = out + delta.to(total)
        return out.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense linear (every expert on every token): ``[..., in_features] -> [..., out_features]``.

        Not what a MoEfied FFN runs (it calls :meth:`expert` / :meth:`combine` on routed tokens); here for
        tools and checks that treat the bank as the linear it came from.
        """
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        if self.split == ROWS:
            out = torch.cat([self.expert(e, tokens) for e in range(self.num_experts)], dim=-1)
        else:
            every = torch.arange(tokens.shape[0], device=tokens.device)
            out = self.combine([Routed(e, every, tokens[:, self.expert_slice(e)]) for e in range(self.num_experts)],
                               tokens.shape[0])
        return out.reshape(*shape[:-1], out.shape[-1])

    def dense_weight(self) -> torch.Tensor:
        """The whole ``[out, in]`` fp32 weight, dequantizing quantized experts."""
        from ..recovery import dequantized_weight

        parts = [dequantized_weight(expert) for expert in self.experts]
        return torch.cat(parts, dim=0 if self.split == ROWS else 1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
                f"split={self.split}")


def bank_of(module: nn.Module) -> ExpertBank | None:
    """The bank inside ``module`` (itself or its peft ``base_layer``), or None."""
    inner = getattr(module, "base_layer", module)
    return inner if isinstance(inner, ExpertBank) else None


__all__ = ["ExpertBank", "Routed", "LowRankPath", "bank_of", "ROWS", "COLS"]
