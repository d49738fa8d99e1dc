"""cpet.stats: the Wilson interval of an accuracy (the paired intervals are tested in
tests/test_experiments_intervals.py, through the experiment scripts' re-export)."""

import pytest

from cpet.stats import wilson_interval


def test_wilson_interval_matches_its_formula_and_stays_in_zero_one():
    # 80 of 100: centre (0.8 + 1.96^2/200) / (1 + 1.96^2/100), the usual published 0.711..0.867
    low, high = wilson_interval(80, 100)
    assert low == pytest.approx(0.7112, abs=1e-4) and high == pytest.approx(0.8666, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and 0.0 < wilson_interval(0, 10)[1] < 0.35  # never below 0, not a point
    assert wilson_interval(10, 10)[1] == 1.0 and 0.65 < wilson_interval(10, 10)[0] < 1.0
    small, large = wilson_interval(8, 10), wilson_interval(800, 1000)
    assert small[1] - small[0] > 3 * (large[1] - large[0])  # narrower with more examples (about sqrt(100) = 10x)
    for bad in ((5, 0), (-1, 10), (11, 10)):
        with pytest.raises(ValueError, match="need 0 <= correct <= total"):
            wilson_interval(*bad)
