"""Balanced k-means: split an FFN's neurons into E experts of exactly equal size.

MoEfication (Zhang et al., 2022) groups neurons that fire together; two views of "together" are offered:

- ``weights``: the neuron's input weight vector (row of ``gate``, or of ``up`` for a non-gated FFN), normalised
  to unit length: neurons reading similar directions of the hidden state land in one expert;
- ``coactivation``: the neuron's magnitudes over calibration tokens, normalised: neurons active on the same
  tokens land in one expert (the statistic classic MoEfication builds its co-activation graph from).

Equal sizes come from a capacity-constrained assignment step: every (neuron, centre) pair is visited from the
most to the least similar and a neuron joins the first centre that still has room. The centres are then the
normalised means of their members. Deterministic for a given seed.
"""

from __future__ import annotations

import torch


def balanced_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of ``N`` items to one of ``E`` clusters, at most ``capacity`` per cluster, greedily by
    similarity ``[N, E]`` (highest first). Returns ``[N]`` cluster ids. Needs ``N <= E * capacity``."""
    num_items, num_clusters = similarity.shape
    if num_items > num_clusters * capacity:
        raise ValueError(f"{num_items} items do not fit {num_clusters} clusters of {capacity}")
    order = similarity.flatten().argsort(descending=True)
    assignment = torch.full((num_items,), -1, dtype=torch.int64)
    room = torch.full((num_clusters,), capacity, dtype=torch.int64)
    placed = 0
    for flat in order.tolist():
        item, cluster = divmod(flat, num_clusters)
        if assignment[item] >= 0 or room[cluster] == 0:
            continue
        assignment[item] = cluster
        room[cluster] -= 1
        placed += 1
        if placed == num_items:
            break
    return assignment


def balanced_kmeans(vectors: torch.Tensor, num_clusters: int, *, iterations: int = 20, seed: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means with equal cluster sizes.

    Args:
        vectors: ``[N, d]``, ``N`` divisible by ``num_clusters``; normalised to unit length here.
    Returns:
        ``(assignment [N] int64, centres [E, d])``: every cluster holds exactly ``N / E`` items; centres are
        unit vectors (the normalised mean of their members).
    """
    num_items = vectors.shape[0]
    if num_items % num_clusters:
        raise ValueError(f"{num_items} neurons do not split into {num_clusters} equal experts")
    capacity = num_items // num_clusters
    points = torch.nn.functional.normalize(vectors.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centres = points[torch.randperm(num_items, generator=generator)[:num_clusters]].clone()
    assignment = None
    for _ in range(iterations):
        new = balanced_assign(points @ centres.T, capacity)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        centres = torch.nn.functional.normalize(sums, dim=1)
    return assignment, centres


def expert_order(assignment: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """The neuron permutation ``[N]`` that lists expert 0's neurons first (ascending), then expert 1's, ..."""
    return torch.cat([(assignment == c).nonzero(as_tuple=True)[0] for c in range(num_clusters)])


__all__ = ["balanced_assign", "balanced_kmeans", "expert_order"]
