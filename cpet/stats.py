"""95% intervals for accuracies and for paired accuracy differences (two adapters, or two rows of the experiment
grid's tables, over tasks and seeds).

Two sources of noise sit behind a difference of test accuracies measured on a few seeds:

- **the test set**: another draw of test examples would give another difference. Estimated by resampling the
  test examples (or their dependent units: a Brown document, an email thread, a product review), one
  resample per task shared by all its seeds and by both rows (paired), the seeds held fixed;
- **training**: another seed gives another adapter. Estimated from the spread of the per-seed differences of
  each task (all its seeds scored the same test set), less the part of that spread that the seed x example
  interaction makes, which the test-set term already holds (counting it twice made intervals up to a third too
  wide where it dominates), as the standard error of their mean.

Each term gets its own Student t quantile (Welch-Satterthwaite degrees of freedom over the tasks: G - 1 for a
test set of G units, S - 1 for S seeds) and the two half-widths add in quadrature. With two or three seeds the
training term is known only roughly: a normal or percentile interval over so few seeds covers the truth far
less than 95% of the time when training noise dominates (a percentile bootstrap over three seeds is about
+-1.6 standard errors where t with 2 degrees of freedom asks for 4.3). On simulated grids
(``scripts/interval_coverage.py``, docs/interval_coverage.md) the intervals cover the true difference in
94-99% of cases with three seeds, whether training or test-set noise dominates, and 94-97% where some tasks
have one seed; with two seeds (1 degree of freedom) they are very wide and, when training noise dominates,
still cover only about 86%. A task with one seed borrows the per-seed variance of the tasks that have several;
with one seed everywhere the interval covers the test-set noise of those runs only.

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


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of ``correct`` out of ``total`` examples (treated as independent:
    the test-set noise of one run). Better than the normal interval near 0 and 1 and for small ``total``."""
    if total < 1 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total >= 1, got {correct} of {total}")
    z = statistics.NormalDist().inv_cdf(0.975)
    share = correct / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total))
    # at 0 or all correct the bound is exactly 0 or 1 (centre and half-width are equal there; rounding is not)
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def _differences(pairs_a: list[str], pairs_b: list[str], members: list[int], task) -> np.ndarray:
    """``[S, n]`` int8: A's correctness minus B's per test example, one row per seed of ``task``."""
    sizes = {len(pairs_a[j]) for j in members} | {len(pairs_b[j]) for j in members}
    if len(sizes) != 1:
        raise ValueError(f"paired cells of task {task!r} scored different test sets ({sorted(sizes)} examples)")
    if sizes == {0}:
        raise ValueError(f"the correctness strings of task {task!r} are empty: no test example to compare on")
    rows = []
    for j in members:
        marks = [np.frombuffer(text.encode(), dtype=np.uint8) for text in (pairs_a[j], pairs_b[j])]
        if any(((m != ord("0")) & (m != ord("1"))).any() for m in marks):
            raise ValueError(f"a correctness string of task {task!r} holds characters other than '0' and '1'")
        rows.append(marks[0].astype(np.int8) - marks[1].astype(np.int8))
    return np.stack(rows)


def _unit_index(units, count: int, task) -> np.ndarray | None:
    """``[n]`` unit number (0..G-1, in order of first appearance) of each test example; None: every example its
    own unit."""
    if units is None:
        return None
    if len(units) != count:
        raise ValueError(f"{len(units)} clusters for the {count} test examples of task {task!r}")
    number = {unit: k for k, unit in enumerate(dict.fromkeys(units))}
    return np.array([number[unit] for unit in units])


def _test_set_term(diffs: np.ndarray, unit_index: np.ndarray | None, rng, replicates: int) -> tuple[float, int]:
    """Variance of the seed-averaged difference over resamples of the test units (seeds fixed), corrected by
    G / (G - 1) for the bootstrap's shrinkage over G units, and its degrees of freedom G - 1.

    One unit (one test example, or every example in one document) leaves no spread between units to estimate
    the variance from (0 degrees of freedom): it is unknown, ``inf``, not 0 (every resample of a single unit is
    the same, which read as an interval of zero width: certainty from one document)."""
    count = diffs.shape[1]
    if unit_index is None:
        units = count
        draws = rng.integers(0, count, size=(replicates, count))
        estimates = np.array([diffs[:, idx].mean() for idx in draws])
    else:
        units = int(unit_index.max()) + 1
        groups = [np.flatnonzero(unit_index == k) for k in range(units)]
        draws = rng.integers(0, units, size=(replicates, units))
        estimates = np.array([diffs[:, np.concatenate([groups[g] for g in draw])].mean() for draw in draws])
    if units < 2:
        return math.inf, 1
    return float(estimates.var(ddof=1)) * units / (units - 1), units - 1


def _interaction_variance(diffs: np.ndarray, unit_index: np.ndarray | None) -> float:
    """The part of the per-seed differences' variance that the seed x example interaction makes: its expected
    share of their sample variance, estimated from two-way residuals over test units (a unit's seed effect scaled
    by its size). ``diffs`` ``[S, n]``, S >= 2; 0 with fewer than two units."""
    seeds, count = diffs.shape
    per_seed = diffs.mean(axis=1)
    if unit_index is None:
        totals, sizes = diffs.astype(np.float64), np.ones(count)
    else:
        units = int(unit_index.max()) + 1
        totals = np.stack([np.bincount(unit_index, weights=row, minlength=units) for row in diffs])
        sizes = np.bincount(unit_index, minlength=units).astype(np.float64)
    units = totals.shape[1]
    if units < 2:
        return 0.0
    residuals = totals - totals.mean(axis=0) - np.outer(per_seed - per_seed.mean(), sizes)
    squares = (residuals ** 2).sum(axis=0) / (seeds - 1)  # Q_g, per unit
    weights = sizes / count
    if weights.max() < 0.5:
        # E[Q_g] = v_g (1 - 2 w_g) + w_g^2 V for unit interaction variances v_g summing to V, unit weights w_g:
        # solved for V, unbiased for units of any sizes (equal sizes: sum(Q) * G / (G - 1))
        inflate = 1.0 / (1.0 - 2.0 * weights)
        total = float((inflate * squares).sum() / (1.0 + (weights ** 2 * inflate).sum()))
    else:  # one unit holds half the examples or more: the equal-size estimate (it under-subtracts: wider)
        total = float(squares.sum()) * units / (units - 1)
    return total / count ** 2


def _seed_variance(diffs: np.ndarray, unit_index: np.ndarray | None) -> float:
    """Between-seed variance of the per-seed differences that training causes: their sample variance less the
    part that the seed x example interaction adds (:func:`_interaction_variance`), which the test-set term already
    counts, clamped at 0. Needs >= 2 seeds."""
    return max(0.0, float(diffs.mean(axis=1).var(ddof=1)) - _interaction_variance(diffs, unit_index))


def _half_width(terms: list[tuple[float, float]]) -> float:
    """95% half-width of a sum of variance terms ``(variance, df)``: t(0.975, Welch-Satterthwaite df) times the
    square root of their sum (0 for no variance, ``inf`` where a term is unknown)."""
    total = sum(variance for variance, _ in terms)
    if total <= 0.0:
        return 0.0
    if math.isinf(total):
        return math.inf
    df = total ** 2 / sum(variance ** 2 / dof for variance, dof in terms if variance > 0)
    return student_t_quantile(0.975, df) * math.sqrt(total)


def paired_bootstrap(pairs_a: list[str], pairs_b: list[str], tasks: list[str] | None = None,
                     replicates: int = 2000, seed: int = 0, clusters: dict | None = None) -> tuple[float, float, float]:
    """Mean accuracy difference A − B over tasks (of its seeds' pairs), with a paired 95% interval that counts
    test-set and training noise (see the module docstring).

    Each element of ``pairs_a`` / ``pairs_b`` is one (task, seed) pair's per-example correctness string
    (``"1"`` correct, ``"0"`` wrong) on the same test examples in the same order; ``tasks[j]`` names pair j's
    task (default: every pair its own task). The point estimate averages each task's seeds first, then the
    tasks, so that every task weighs the same whatever its number of finished seeds.

    Test-set term, per task: ``replicates`` (>= 2) bootstrap resamples (generator seeded by ``seed``: the same
    cells give the same interval) of its test examples with replacement, shared by its seeds and by A and B; the
    variance of the seed-averaged difference over them, times G / (G - 1) for G resampled units, with G - 1
    degrees of freedom. Drawing examples independently per seed would count one test set once per seed and narrow
    the interval by up to the square root of the seed count. ``clusters[task]`` (a unit per test example, e.g. its
    source document): that task's examples are resampled a unit at a time, since examples of one unit are not
    independent.

    Training term, per task with S >= 2 seeds: the between-seed variance of its per-seed differences, less the
    seed x example interaction that the test-set term already counts (:func:`_seed_variance`), over S, with S - 1
    degrees of freedom. A task with one seed borrows the pooled per-seed variance of the tasks that have several
    (their degrees of freedom summed); with one seed everywhere there is no training term, and the interval covers
    the test-set noise of those runs only (the table says so).

    Tasks are fixed, not resampled (they are what the table reports on): each term is divided by the squared
    task count. The half-width is ``hypot(t(0.975, df_test) * sd_test, t(0.975, df_training) * sd_training)``,
    each df by Welch-Satterthwaite over its terms.

    A task whose test examples are one unit (one example, or all in one document) gives its test-set variance
    nothing to be estimated from (0 degrees of freedom): the interval is then every possible difference,
    ``[-1, 1]``. Every interval is cut to ``[-1, 1]``, where a mean difference of accuracies lies.

    Returns ``(delta, low, high)`` in accuracy units.
    """
    if len(pairs_a) != len(pairs_b):
        raise ValueError(f"{len(pairs_a)} A pairs against {len(pairs_b)} B pairs")
    tasks = list(range(len(pairs_a))) if tasks is None else list(tasks)
    if len(tasks) != len(pairs_a):
        raise ValueError(f"{len(tasks)} task names for {len(pairs_a)} pairs")
    if replicates < 2:
        raise ValueError(f"replicates must be >= 2 to estimate the test-set variance, got {replicates}")
    if not pairs_a:
        raise ValueError("no (task, seed) pairs to compare")
    rng = np.random.default_rng(seed)
    scale = 1.0 / len(set(tasks)) ** 2  # the estimate averages the tasks: each task's variance enters over T^2
    test_terms: list[tuple[float, float]] = []  # (variance contribution to the estimate, degrees of freedom)
    training_terms: list[tuple[float, float]] = []
    seed_variances: list[tuple[float, int]] = []  # per task with >= 2 seeds: (per-seed variance, S - 1)
    single_seed_tasks = 0
    for task in dict.fromkeys(tasks):
        members = [j for j, t in enumerate(tasks) if t == task]
        diffs = _differences(pairs_a, pairs_b, members, task)
        unit_index = _unit_index((clusters or {}).get(task), diffs.shape[1], task)
        variance, dof = _test_set_term(diffs, unit_index, rng, replicates)
        test_terms.append((variance * scale, dof))
        if len(members) >= 2:
            per_seed = _seed_variance(diffs, unit_index)
            seed_variances.append((per_seed, len(members) - 1))
            training_terms.append((per_seed / len(members) * scale, len(members) - 1))
        else:
            single_seed_tasks += 1
    if single_seed_tasks and seed_variances:
        # the one-seed tasks borrow the pooled per-seed variance, sum(v_j dof_j) / sum(dof_j), each over 1 seed; it
        # comes from the donors' seeds alone, so each donor's share joins the donor's own term (same df) instead
        # of counting as independent estimates (which would inflate the Welch df)
        pooled_dof = sum(dof for _, dof in seed_variances)
        training_terms = [(variance + per_seed * dof / pooled_dof * single_seed_tasks * scale, dof)
                          for (variance, dof), (per_seed, _) in zip(training_terms, seed_variances)]
    point = task_weighted_mean([a.count("1") / len(a) - b.count("1") / len(b) for a, b in zip(pairs_a, pairs_b)],
                               tasks)
    half = math.hypot(_half_width(test_terms), _half_width(training_terms))
    return point, max(point - half, -1.0), min(point + half, 1.0)


__all__ = ["paired_bootstrap", "student_t_quantile", "task_weighted_mean", "wilson_interval"]
