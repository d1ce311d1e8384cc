"""Statistics over seeds on hand-made numbers: intervals, paired differences, p-values, formatting."""

import math

import pytest

from experiments import stats


def test_estimate_of_one_to_five():
    # mean 3, sample std sqrt(2.5); t(0.975, df=4) = 2.7764451, half width 2.7764451 * sqrt(2.5) / sqrt(5).
    e = stats.estimate([1, 2, 3, 4, 5])
    assert (e.n, e.mean) == (5, 3.0) and e.std == pytest.approx(math.sqrt(2.5))
    assert e.half_width == pytest.approx(2.7764451 * math.sqrt(0.5), rel=1e-7)
    assert (e.low, e.high) == pytest.approx((3 - 1.9632432, 3 + 1.9632432), rel=1e-7)
    assert stats.format_estimate(e) == "3.00 ± 1.96"


def test_one_value_has_no_spread_and_no_interval():
    e = stats.estimate([91.5])
    assert (e.n, e.mean, e.std, e.low, e.high, e.half_width) == (1, 91.5, None, None, None, None)
    assert stats.format_estimate(e) == "91.50"
    with pytest.raises(ValueError, match="no values"):
        stats.estimate([])


def test_paired_difference_uses_the_common_seeds_only():
    # Differences over seeds 7, 9, 17: 2, 1, 3 -> mean 2, std 1, t = 2 * sqrt(3) on 2 degrees of freedom,
    # whose two-sided tail is 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14).
    a = {7: 92.0, 9: 90.0, 17: 91.0}
    b = {7: 90.0, 9: 89.0, 17: 88.0, 21: 50.0}
    d = stats.paired_difference(a, b)
    assert d.seeds == (7, 9, 17) and d.difference.mean == 2.0 and d.difference.std == pytest.approx(1.0)
    assert d.p_value == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-9)
    # t(0.975, df=2) = 4.3026527: the interval [2 - 2.4841377, 2 + 2.4841377] holds 0, so p > 0.05.
    assert (d.difference.low, d.difference.high) == pytest.approx((-0.4841377, 4.4841377), rel=1e-6)
    assert not d.significant() and d.significant(alpha=0.1)
    assert stats.format_difference(d) == "+2.00 [-0.48, +4.48] p=0.074 n.s."


def test_a_consistent_difference_is_significant():
    a = {1: 10.0, 2: 11.0, 3: 12.5, 4: 10.5, 5: 11.2}
    b = {seed: value - 3.0 + 0.1 * seed for seed, value in a.items()}  # differences 2.9, 2.8, 2.7, 2.6, 2.5
    d = stats.paired_difference(a, b)
    assert d.difference.mean == pytest.approx(2.7) and d.significant()
    from scipy import stats as scipy_stats
    assert d.p_value == pytest.approx(scipy_stats.ttest_rel(list(a.values()), list(b.values())).pvalue)
    assert not stats.format_difference(d).endswith("n.s.")


def test_identical_or_constant_differences_and_single_pairs():
    same = stats.paired_difference({1: 5.0, 2: 6.0}, {1: 5.0, 2: 6.0})
    assert same.p_value == 1.0 and not same.significant()
    shifted = stats.paired_difference({1: 5.0, 2: 6.0}, {1: 4.0, 2: 5.0})
    assert shifted.p_value == 0.0 and shifted.significant() and shifted.difference.half_width == 0.0
    single = stats.paired_difference({1: 5.0}, {1: 4.0, 2: 3.0})
    assert single.p_value is None and not single.significant()
    assert stats.format_difference(single) == "+1.00 n.s."
    with pytest.raises(ValueError, match="no seed in common"):
        stats.paired_difference({1: 1.0}, {2: 1.0})
