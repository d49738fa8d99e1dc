"""Balanced k-means: equal experts, every neuron once, similar neurons together, deterministic."""

from __future__ import annotations

import pytest
import torch

from cpet.moe import balanced_assign, balanced_kmeans, expert_order


def test_balanced_kmeans_gives_equal_clusters_and_finds_planted_groups():
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 32, generator=generator), dim=1)
    truth = torch.arange(64) % 4
    vectors = directions[truth] + 0.05 * torch.randn(64, 32, generator=generator)
    assignment, centres = balanced_kmeans(vectors, 4, seed=0)
    assert torch.bincount(assignment, minlength=4).tolist() == [16, 16, 16, 16]
    for cluster in range(4):  # each found cluster is one planted group
        assert len(set(truth[assignment == cluster].tolist())) == 1
    assert torch.allclose(centres.norm(dim=1), torch.ones(4), atol=1e-5)
    again, _ = balanced_kmeans(vectors, 4, seed=0)
    assert torch.equal(assignment, again)


def test_capacity_is_respected_even_when_every_item_prefers_one_cluster():
    similarity = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    assert balanced_assign(similarity, capacity=2).tolist() == [0, 0, 1, 1]


def test_expert_order_lists_each_expert_contiguously():
    assignment = torch.tensor([1, 0, 1, 0, 2, 2])
    assert expert_order(assignment, 3).tolist() == [1, 3, 0, 2, 4, 5]


def test_widths_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match="do not split into 4 equal experts"):
        balanced_kmeans(torch.randn(10, 3), 4)
