"""Paired 95% intervals for the accuracy difference of two table rows, over tasks and seeds.

Two sources of noise sit behind a difference of test accuracies measured on a few seeds:

- **the test set**: another draw of test examples would give another difference. Estimated by resampling the
  test examples (or their dependent units: a Brown document, an email thread, a product review), one
  resample per task shared by all its seeds and by both rows (paired), the seeds held fixed;
- **training**: another seed gives another adapter. Estimated from the spread of the per-seed differences of
  each task (all its seeds scored the same test set), as the standard error of their mean.

The interval adds the two variances and scales the total by a Student t quantile whose degrees of freedom
come from the seed term (Welch-Satterthwaite; the test-set term is taken as exactly known). With two or three
seeds the seed term is known only roughly, and a normal or percentile interval over so few seeds covers the
truth far less than 95% of the time when training noise dominates (a percentile bootstrap over three seeds is
about +-1.6 standard errors where t with 2 degrees of freedom asks for 4.3); the t quantile corrects that.
A task with one seed adds no training term: its interval covers the test-set noise of that one run only.

numpy only: scipy is not among the project's dependencies, so the t quantile is computed here.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Sequence

import numpy as np


def task_weighted_mean(values: Sequence[float], tasks: Sequence) -> float:
    """Mean of ``values`` (one per (task, seed) pair, ``tasks[j]`` naming pair j's task) with every task weighing
    the same: each task's values are averaged first, then the tasks."""
    per_task = defaultdict(list)
    for value, task in zip(values, tasks, strict=True):
        per_task[task].append(value)
    return float(statistics.mean(statistics.mean(v) for v in per_task.values()))


def _t_density(x: np.ndarray, df: float) -> np.ndarray:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))


def _t_cdf_above_half(x: float, df: float, intervals: int = 4000) -> float:
    """P(T <= x) for x >= 0: 1/2 plus the density integrated from 0 to x (Simpson's rule; smooth integrand)."""
    grid = np.linspace(0.0, x, intervals + 1)
    values = _t_density(grid, df)
    weights = np.ones(intervals + 1)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return 0.5 + float(values @ weights) * (x / intervals) / 3.0


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0.5 <= p < 1) of Student's t with ``df`` > 0 degrees of freedom (``inf``: the normal
    quantile), to about 1e-9, by bisection on the numerically integrated distribution function."""
    if not 0.5 <= p < 1.0:
        raise ValueError(f"p must be in [0.5, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(df) or df > 1e7:
        return statistics.NormalDist().inv_cdf(p)
    low, high = 0.0, 1.0
    while _t_cdf_above_half(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_cdf_above_half(middle, df) < p else (low, middle)
    return (low + high) / 2


def paired_bootstrap(pairs_a: list[str], pairs_b: list[str], tasks: list[str] | None = None,
                     replicates: int = 2000, seed: int = 0, clusters: dict | None = None) -> tuple[float, float, float]:
    """Mean accuracy difference A − B over tasks (of its seeds' pairs), with a paired 95% interval that counts
    test-set and training noise (see the module docstring).

    Each element of ``pairs_a`` / ``pairs_b`` is one (task, seed) pair's per-example correctness string
    (``"1"`` correct, ``"0"`` wrong) on the same test examples in the same order; ``tasks[j]`` names pair j's
    task (default: every pair its own task). The point estimate averages each task's seeds first, then the
    tasks, so that every task weighs the same whatever its number of finished seeds.

    Test-set term: ``replicates`` bootstrap resamples (generator seeded by ``seed``: the same cells give the same
    interval) draw, per task, one resample of its test examples with replacement, shared by its seeds and by A
    and B; the variance of the resulting estimate over replicates. Drawing examples independently per seed would
    count one test set once per seed and narrow the interval by up to the square root of the seed count.
    ``clusters[task]`` (a unit per test example, e.g. its source document): that task's examples are resampled a
    unit at a time, since examples of one unit are not independent.

    Training term: per task with S >= 2 seeds, the sample variance of its S per-seed differences over S, summed
    over tasks and divided by the squared task count (tasks are fixed, not resampled: they are what the table
    reports on). The half-width is ``t(0.975, df) * sqrt(test-set variance + training variance)``, df by
    Welch-Satterthwaite from the tasks' S - 1 (infinite without a training term: the normal quantile).

    Returns ``(delta, low, high)`` in accuracy units.
    """
    if len(pairs_a) != len(pairs_b):
        raise ValueError(f"{len(pairs_a)} A pairs against {len(pairs_b)} B pairs")
    tasks = list(range(len(pairs_a))) if tasks is None else list(tasks)
    if len(tasks) != len(pairs_a):
        raise ValueError(f"{len(tasks)} task names for {len(pairs_a)} pairs")
    rng = np.random.default_rng(seed)
    task_count = len(set(tasks))
    resampled = np.zeros(replicates)  # the estimate under each resample of the test sets, seeds fixed
    training_terms = []  # per task with seeds to compare: (its variance contribution to the estimate, df)
    for task in dict.fromkeys(tasks):
        members = [j for j, t in enumerate(tasks) if t == task]
        sizes = {len(pairs_a[j]) for j in members} | {len(pairs_b[j]) for j in members}
        if len(sizes) != 1:
            raise ValueError(f"paired cells of task {task!r} scored different test sets ({sorted(sizes)} examples)")
        # diffs[s, i]: A's correctness minus B's on test example i under the task's s-th seed
        diffs = np.stack([np.frombuffer(pairs_a[j].encode(), dtype=np.uint8).astype(np.int8)
                          - np.frombuffer(pairs_b[j].encode(), dtype=np.uint8).astype(np.int8) for j in members])
        units = (clusters or {}).get(task)
        if units is not None:
            if len(units) != diffs.shape[1]:
                raise ValueError(f"{len(units)} clusters for the {diffs.shape[1]} test examples of task {task!r}")
            groups = [np.flatnonzero(np.asarray(units) == unit) for unit in dict.fromkeys(units)]
            draws = rng.integers(0, len(groups), size=(replicates, len(groups)))
            examples = [np.concatenate([groups[g] for g in draw]) for draw in draws]
        else:
            examples = rng.integers(0, diffs.shape[1], size=(replicates, diffs.shape[1]))
        resampled += np.array([diffs[:, idx].mean() for idx in examples]) / task_count
        seeds = len(members)
        if seeds >= 2:
            per_seed = diffs.mean(axis=1)
            training_terms.append((float(per_seed.var(ddof=1)) / seeds / task_count ** 2, seeds - 1))
    point = task_weighted_mean([a.count("1") / len(a) - b.count("1") / len(b) for a, b in zip(pairs_a, pairs_b)],
                               tasks)
    test_variance = float(resampled.var(ddof=1)) if replicates > 1 else 0.0
    training_variance = sum(term for term, _ in training_terms)
    total = test_variance + training_variance
    if total == 0.0:
        return point, point, point
    df = math.inf if training_variance == 0.0 else \
        total ** 2 / sum(term ** 2 / dof for term, dof in training_terms if term > 0)
    half = student_t_quantile(0.975, df) * math.sqrt(total)
    return point, point - half, point + half


__all__ = ["paired_bootstrap", "student_t_quantile", "task_weighted_mean"]
