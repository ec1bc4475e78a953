"""landscape.stats against hand computations: mean, sample std, Student-t intervals, paired
differences, Kendall's tau (counted by hand, exact p-value by enumerating permutations)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from landscape import stats


def test_describe_by_hand():
    s = stats.describe([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4
    assert s.mean == 2.5
    # sample variance: sum of squared deviations (2.25 + 0.25 + 0.25 + 2.25) / (n - 1)
    assert s.std == pytest.approx(math.sqrt(5 / 3), abs=1e-15)
    # t_{0.975, 3} = 3.182446305 (tables); half-width t * std / sqrt(n)
    assert s.ci95 == pytest.approx(3.182446305284263 * math.sqrt(5 / 3) / 2, rel=1e-12)
    lo, hi = scipy_stats.t.interval(0.95, 3, loc=2.5, scale=scipy_stats.sem([1, 2, 3, 4]))
    assert s.ci95 == pytest.approx((hi - lo) / 2, rel=1e-12)


def test_describe_few_values_and_nan():
    one = stats.describe([7.0])
    assert (one.n, one.mean) == (1, 7.0) and math.isnan(one.std) and math.isnan(one.ci95)
    none = stats.describe([])
    assert none.n == 0 and math.isnan(none.mean)
    # a NaN is never dropped silently: the mean says so
    assert math.isnan(stats.describe([1.0, math.nan]).mean)


def test_paired_differences_by_hand():
    a = [90.0, 91.5, 89.0]
    b = [88.0, 90.0, 89.5]
    d = stats.paired(a, b)
    diffs = [2.0, 1.5, -0.5]
    assert d.n == 3 and d.mean == pytest.approx(1.0, abs=1e-15)
    var = sum((x - 1.0) ** 2 for x in diffs) / 2
    assert d.std == pytest.approx(math.sqrt(var), rel=1e-14)
    # paired t-test: t = mean / (std / sqrt(n)), two-sided p from the t distribution
    t = 1.0 / (math.sqrt(var) / math.sqrt(3))
    assert stats.paired_p(a, b) == pytest.approx(2 * scipy_stats.t.sf(t, 2), rel=1e-12)
    assert math.isnan(stats.paired_p([1.0], [2.0]))
    with pytest.raises(ValueError):
        stats.paired([1.0, 2.0], [1.0])


def _tau_by_hand(x, y):
    pairs = list(itertools.combinations(range(len(x)), 2))
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs)
    return s / len(pairs)


def test_kendall_tau_and_exact_p_by_enumeration():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    y = [2.0, 1.0, 4.0, 3.0, 6.0, 5.0]  # no ties: tau-b is (C - D) / (n choose 2)
    tau, p = stats.kendall(x, y)
    assert tau == pytest.approx(_tau_by_hand(x, y), abs=1e-15)
    assert tau == pytest.approx(9 / 15, abs=1e-15)  # 12 concordant, 3 discordant pairs
    # exact two-sided p: share of the 720 orderings with |tau| at least as large
    taus = [_tau_by_hand(x, perm) for perm in itertools.permutations(y)]
    exact = np.mean([abs(t) >= abs(tau) - 1e-12 for t in taus])
    assert p == pytest.approx(exact, rel=1e-9)
    ref = scipy_stats.kendalltau(x, y)
    assert (tau, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)


def test_kendall_with_ties_matches_scipy_and_degenerate_cases():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, 30).astype(float)
    y = x + rng.normal(0, 1.0, 30)
    ref = scipy_stats.kendalltau(x, y)
    assert stats.kendall(x, y) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
    assert all(math.isnan(v) for v in stats.kendall([1.0], [2.0]))
    assert all(math.isnan(v) for v in stats.kendall([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        stats.kendall([1.0, 2.0], [1.0])
