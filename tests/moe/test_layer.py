"""Expert choice (top-k, dynamic-k) and the router's start from cluster centres."""

from __future__ import annotations

import pytest
import torch

from cpet.moe import Router, choose_experts


def test_top_k_chooses_exactly_the_k_largest():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 1.0, 2.0, 3.0]])
    chosen = choose_experts(scores, top_k=2, tau=None)
    assert chosen.tolist() == [[False, True, True, False], [True, False, False, True]]


def test_dynamic_k_with_tau_one_chooses_every_expert_and_smaller_tau_fewer():
    scores = torch.rand(50, 8, generator=torch.Generator().manual_seed(0))
    scores[:, 3] = 0.0  # an expert predicted at zero is still chosen at tau = 1
    assert choose_experts(scores, top_k=None, tau=1.0).all()
    counts_half = choose_experts(scores, top_k=None, tau=0.5).sum(1)
    counts_small = choose_experts(scores, top_k=None, tau=0.1).sum(1)
    assert (counts_half < 8).all() and (counts_small <= counts_half).all() and (counts_small >= 1).all()
    assert counts_small.float().mean() < counts_half.float().mean()


def test_dynamic_k_takes_the_fewest_largest_experts_reaching_the_share():
    scores = torch.tensor([[6.0, 3.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [-2.0, 5.0, 5.0, 0.0]])
    chosen = choose_experts(scores, top_k=None, tau=0.6)
    # 6/10 reaches 0.6 with one expert; four equal experts need three; negatives count as zero: 5/10 then 10/10
    assert chosen.tolist() == [[True, False, False, False], [True, True, True, False], [False, True, True, False]]
    capped = choose_experts(scores, top_k=2, tau=0.6)
    assert capped.sum(1).tolist() == [1, 2, 2]


def test_router_starts_from_the_cluster_centres():
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    router = Router(16, 4, width=8)
    router.init_from_centres(centres)
    x = torch.randn(5, 16)
    assert torch.allclose(router(x), torch.relu(x @ centres.T), atol=1e-6)


def _block(num_experts=4, hidden=8, width=16):
    from torch import nn

    from cpet.moe import ExpertBank, MoEFFN

    torch.manual_seed(0)
    gate, up = nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False)
    down = nn.Linear(width, hidden)
    return MoEFFN(ExpertBank.from_linear(gate, num_experts, "rows"), ExpertBank.from_linear(up, num_experts, "rows"),
                  ExpertBank.from_linear(down, num_experts, "cols"), nn.SiLU(), Router(hidden, num_experts, 8),
                  top_k=2, tau=None, names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})


def test_a_choice_of_another_shape_than_tokens_by_experts_is_refused_not_misread():
    """``chosen`` overrides the router as ``[T, E]``; one shaped like the input (``[batch, seq, E]``) was read as
    (token, expert) pairs from its first two dimensions, and one with too few experts left the rest out: both
    gave a wrong output without a word."""
    block = _block()
    x = torch.randn(2, 3, 8)
    every = torch.ones(6, 4, dtype=torch.bool)
    with torch.no_grad():
        reference = block(x, chosen=every)
        for bad in (every.reshape(2, 3, 4), every[:, :3], every[:5]):
            with pytest.raises(ValueError, match=r"chosen must be \[tokens, experts\] = \[6, 4\]"):
                block(x, chosen=bad)
        assert torch.equal(block(x, chosen=every), reference)
