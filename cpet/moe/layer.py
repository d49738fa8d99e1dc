"""The MoEfied FFN: a router picks experts per token, and only the chosen experts are computed.

For a gated FFN ``down(act(gate(x)) * up(x))`` (a plain one: ``down(act(up(x)))``) whose intermediate neurons
were permuted so that expert ``e`` owns neurons ``e*m .. (e+1)*m - 1``, the output is exactly the sum of the
experts' outputs; choosing every expert reproduces the dense FFN (float rounding aside). The router is a small
MLP ``hidden -> width -> E`` trained to predict each expert's output norm ``||W_down[:, e] h_e(x)||`` (this
works for SiLU/GELU-gated FFNs, where the sign-based targets of classic ReLU MoEfication do not).

Expert choice per token: **top-k** (the k largest predicted norms) or **dynamic-k** (the fewest experts whose
predicted norms reach a share ``tau`` of their sum; ``tau >= 1`` chooses all, up to ``top_k`` when that caps
it). Compute is grouped by expert:
each expert's slices run on exactly the tokens routed to it (gathered with ``index_select``), and the down bank
scatters the results back (:class:`~cpet.moe.experts.ExpertBank`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import padding_mask
from .experts import ExpertBank, Routed, bank_of


class Router(nn.Module):
    """``x [T, hidden] -> predicted expert output norms [T, E]`` through one hidden ReLU layer, in fp32 whatever
    the model's dtype (it is trained in fp32; a bf16 rebuild on reload rounded its weights and changed the experts
    of about a quarter of a tiny model's tokens)."""

    def __init__(self, hidden_size: int, num_experts: int, width: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, width, dtype=torch.float32)
        self.out = nn.Linear(width, num_experts, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(x.to(self.proj.weight.dtype))))

    def init_from_centres(self, centres: torch.Tensor) -> None:
        """First layer's first E units from the cluster centres ``[E, hidden]``; the output starts reading them
        one to one (unit e -> expert e), other units start at zero weight out."""
        num_experts = centres.shape[0]
        with torch.no_grad():
            self.proj.weight[:num_experts].copy_(centres)
            self.proj.bias[:num_experts].zero_()
            self.out.weight.zero_()
            self.out.weight[:, :num_experts].copy_(torch.eye(num_experts))
            self.out.bias.zero_()


def choose_experts(scores: torch.Tensor, top_k: int | None, tau: float | None) -> torch.Tensor:
    """Boolean ``[T, E]`` of chosen experts from predicted norms ``scores`` ``[T, E]``.

    ``tau`` set: dynamic-k, the fewest experts (largest first) whose clamped-at-zero scores reach ``tau`` of the
    token's total, at least one, capped at ``top_k`` when that is set too; ``tau >= 1`` chooses all (up to that cap).
    Otherwise the ``top_k`` largest.
    """
    num_tokens, num_experts = scores.shape
    if tau is None:
        k = min(int(top_k), num_experts)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        return chosen.scatter_(1, scores.topk(k, dim=1).indices, True)
    if tau >= 1.0:
        counts = torch.full((num_tokens,), num_experts, device=scores.device)
    else:
        ordered, _ = scores.clamp(min=0).sort(dim=1, descending=True)
        cumulative = ordered.cumsum(dim=1)
        reached = cumulative >= tau * cumulative[:, -1:]
        counts = reached.float().argmax(dim=1) + 1  # first position that reaches the share
    if top_k is not None:
        counts = counts.clamp(max=int(top_k))
    rank = scores.argsort(dim=1, descending=True).argsort(dim=1)  # 0 = largest
    return rank < counts.unsqueeze(1)


class MoEFFN(nn.Module):
    """A MoEfied FFN block, replacing the family's MLP module under the same name.

    Args:
        gate, up, down: expert banks (``gate`` None for a non-gated FFN); attribute names follow the family
            (``gate_attr`` etc.) so that the module map finds them where the dense linears were.
        act: the FFN's activation.
        router: the :class:`Router`.
        top_k, tau: expert choice (see :func:`choose_experts`).

    Attributes:
        chosen_experts, routed_tokens: running counts of expert choices and tokens (for the share of experts
            used); :meth:`reset_counts` zeroes them. Positions that the model's ``attention_mask`` marks as padding
            are routed and computed like the rest but not counted, once :func:`count_attended_tokens_only` has
            hooked the model (the MoEfy stage does, on compress and on load).
    """

    def __init__(self, gate: ExpertBank | None, up: ExpertBank, down: ExpertBank, act: nn.Module, router: Router,
                 *, top_k: int | None, tau: float | None, names: dict[str, str]):
        super().__init__()
        self._names = dict(names)  # role -> attribute name (gate_proj, up_proj, down_proj)
        for role, bank in (("gate", gate), ("up", up), ("down", down)):
            if bank is not None:
                self.add_module(names[role], bank)
        self.act_fn = act
        self.router = router
        self.top_k, self.tau = top_k, tau
        self.attention_mask: torch.Tensor | None = None  # [batch, positions] bool of the running model forward
        self.reset_counts()

    def bank(self, role: str) -> nn.Module | None:
        """The bank of ``role`` as the model holds it now (a peft LoRA wrapper around it, if any)."""
        name = self._names.get(role)
        return getattr(self, name) if name is not None else None

    @property
    def num_experts(self) -> int:
        return self.router.out.out_features

    def reset_counts(self) -> None:
        self.chosen_experts, self.routed_tokens = 0, 0

    def expert_share(self) -> float:
        """Share of experts chosen per token: measured over the tokens routed since :meth:`reset_counts`, else
        what top-k implies (dynamic-k without tokens yet: all, its upper bound)."""
        if self.routed_tokens:
            return self.chosen_experts / (self.routed_tokens * self.num_experts)
        return (self.top_k if self.tau is None else self.top_k or self.num_experts) / self.num_experts

    def choose(self, tokens: torch.Tensor) -> torch.Tensor:
        """Chosen experts ``[T, E]`` (bool) for ``tokens`` ``[T, hidden]``."""
        with torch.no_grad():
            return choose_experts(self.router(tokens.detach()), self.top_k, self.tau)

    def forward(self, x: torch.Tensor, chosen: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., hidden] -> [..., hidden]``; ``chosen`` ``[T, E]`` overrides the router (oracle, tests)."""
        shape = x.shape
        if x.numel() == 0:  # no token to route (an empty batch): nothing is computed
            return torch.zeros_like(x)
        tokens = x.reshape(-1, shape[-1])
        if chosen is None:
            chosen = self.choose(tokens)
        elif tuple(chosen.shape) != (tokens.shape[0], self.num_experts):
            # read as (token, expert) pairs below: a [batch, seq, E] choice or one short of experts gave a wrong
            # output without a word
            raise ValueError(f"chosen must be [tokens, experts] = [{tokens.shape[0]}, {self.num_experts}] for an "
                             f"input of shape {list(shape)}, got {list(chosen.shape)}")
        attended = self._attended_rows(shape)
        counted = chosen if attended is None else chosen[attended.to(chosen.device)]  # padding left out
        self.chosen_experts += int(counted.sum())
        self.routed_tokens += counted.shape[0]
        # Group (token, expert) pairs by expert with one sort, then gather each expert's tokens on their own: a
        # handful of tensor ops per expert whatever the number of tokens, and no joined copy of all gathers
        # (on CPU, copying is a large part of a MoE layer's time; see docs/moefication.md).
        pairs = chosen.nonzero()                                   # [P, 2] (token, expert), by token
        by_expert = pairs[:, 1].argsort(stable=True)
        counts = torch.bincount(pairs[:, 1], minlength=chosen.shape[1]).tolist()
        token_rows = pairs[by_expert, 0].split(counts)
        parts = []
        for e, count in enumerate(counts):
            if count == 0:
                continue
            hidden = self.expert_hidden(e, tokens.index_select(0, token_rows[e]), token_rows[e])
            parts.append(Routed(e, token_rows[e], hidden))
        return self.bank("down").combine(parts, tokens.shape[0], dtype=x.dtype).reshape(*shape[:-1], -1)

    def _attended_rows(self, shape: torch.Size) -> torch.Tensor | None:
        """``[T]`` bool of the flattened tokens that are text (not padding) for an input of ``shape``
        ``[batch, seq, hidden]``, from the model's mask ``[batch, past + seq]``; None (count all) without a mask
        or where the shapes do not line up (the block called on its own)."""
        mask = self.attention_mask
        if mask is None or len(shape) != 3 or mask.shape[0] != shape[0] or mask.shape[1] < shape[1]:
            return None
        return mask[:, mask.shape[1] - shape[1]:].reshape(-1)

    def expert_hidden(self, expert: int, x: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``expert``'s intermediate activations ``act(gate_e(x)) * up_e(x)`` (``act(up_e(x))`` without a
        gate) for its inputs ``x`` ``[n, hidden]`` -> ``[n, m]``; ``tokens``: their rows in the batch."""
        gate, up = self.bank("gate"), self.bank("up")
        hidden = up.expert(expert, x, tokens=tokens)
        if gate is None:
            return self.act_fn(hidden)
        return self.act_fn(gate.expert(expert, x, tokens=tokens)) * hidden

    def expert_norms(self, x: torch.Tensor) -> torch.Tensor:
        """True per-expert output norms ``[T, E]`` of the dense computation (router targets, oracle choice)."""
        tokens = x.reshape(-1, x.shape[-1])
        bank = bank_of(self.bank("down"))
        return torch.stack([bank.experts[e](self.expert_hidden(e, tokens)).float().norm(dim=-1)
                            for e in range(self.num_experts)], dim=1)

    def extra_repr(self) -> str:
        choice = f"tau={self.tau}" if self.tau is not None else f"top_k={self.top_k}"
        return f"experts={self.num_experts}, {choice}"


def _hand_over_attention_mask(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on the causal LM: each MoEFFN below it reads the batch's ``attention_mask`` (2-D, else
    none) when it counts its tokens. A function of the module it is called on, so copies of the model keep a
    working hook."""
    mask = padding_mask(kwargs)
    for block in model.modules():
        if isinstance(block, MoEFFN):
            block.attention_mask = mask


def _drop_attention_mask(model: nn.Module, args: tuple, kwargs: dict, output) -> None:
    """Forward hook: the mask belongs to the forward that just ended (a block called on its own counts all)."""
    _hand_over_attention_mask(model, (), {})


def count_attended_tokens_only(model: nn.Module) -> None:
    """Hook ``model`` (the causal LM, whose forward takes ``attention_mask``) so that its MoEfied FFNs leave
    padding out of their expert-choice counts (the share of experts used, FLOPs per token). Idempotent."""
    if _hand_over_attention_mask not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_hand_over_attention_mask, with_kwargs=True)
        model.register_forward_hook(_drop_attention_mask, with_kwargs=True)


__all__ = ["MoEFFN", "Router", "choose_experts", "count_attended_tokens_only"]
