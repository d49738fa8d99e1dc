"""The tables' paired intervals: :mod:`cpet.stats` (in the package, so that ``cpet eval`` compares adapters with
the same method); re-exported here for the experiment scripts."""

from cpet.stats import (  # noqa: F401
    _interaction_variance, _seed_variance, paired_bootstrap, student_t_quantile, task_weighted_mean)
