"""cpet.stats: the Wilson interval of an accuracy (the paired intervals are tested in
tests/test_experiments_intervals.py, through the experiment scripts' re-export)."""

import pytest

from cpet.stats import paired_bootstrap, wilson_interval


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


def test_a_test_set_of_one_unit_gives_no_certainty_and_intervals_stay_within_minus_one_and_one():
    """One test example, or every example in one document: no spread between units says how another test set would
    come out (0 degrees of freedom), so the interval is every possible difference, not the point estimate (every
    bootstrap resample of a single unit is that unit: it read as zero width)."""
    assert paired_bootstrap(["1"], ["0"]) == (1.0, -1.0, 1.0)
    assert paired_bootstrap(["1100"], ["0000"], tasks=["t"], clusters={"t": ["doc"] * 4}) == (0.5, -1.0, 1.0)
    # two examples (1 degree of freedom: t = 12.7) gave -5.7 .. 6.7 for a difference of accuracies
    delta, low, high = paired_bootstrap(["10", "10"], ["00", "00"], tasks=["t", "t"])
    assert delta == 0.5 and (low, high) == (-1.0, 1.0)
    # five documents: an interval of their own, cut at 1 above
    delta, low, high = paired_bootstrap(["1" * 10 + "0" * 10], ["0" * 20], tasks=["t"],
                                        clusters={"t": [doc for doc in "abcde" for _ in range(4)]})
    assert delta == 0.5 and -1.0 < low < 0.0 and high == 1.0


@pytest.mark.parametrize("a, b, message", [([], [], "no \\(task, seed\\) pairs"),
                                           ([""], [""], "correctness strings of task 0 are empty")])
def test_nothing_to_compare_is_refused_by_name(a, b, message):
    with pytest.raises(ValueError, match=message):  # a ZeroDivisionError before
        paired_bootstrap(a, b)
