"""Statistics over a study's seeds: mean, sample std and Student-t confidence intervals,
paired differences, Kendall rank correlation (numpy and scipy only).

A study reports every quantity over its ``n`` seeds as ``mean ± std`` with ``std`` the
sample standard deviation (``ddof=1``) and the half-width of the 95% confidence interval
of the mean, ``ci95 = t_{0.975, n-1} * std / sqrt(n)`` (Student t, ``n - 1`` degrees of
freedom). With fewer than two values the spread is unknown: ``std`` and ``ci95`` are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy

__all__ = ["Summary", "describe", "kendall", "paired", "paired_p"]


@dataclass(frozen=True)
class Summary:
    """``n`` values: their mean, sample std (ddof=1) and 95% CI half-width (Student t)."""

    n: int
    mean: float
    std: float
    ci95: float


def describe(values: Sequence[float] | np.ndarray) -> Summary:
    """:class:`Summary` of ``values`` taken as given (a NaN among them gives a NaN mean:
    a missing value is never dropped silently). ``mean`` is NaN for no values; ``std`` and
    ``ci95`` are NaN for fewer than two."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan)
    std = float(x.std(ddof=1))
    ci95 = float(_scipy.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return Summary(n, mean, std, ci95)


def paired(a: Sequence[float], b: Sequence[float]) -> Summary:
    """:func:`describe` of the paired differences ``a[i] - b[i]`` (the same seed in both)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired: {x.shape} values against {y.shape}")
    return describe(x - y)


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``mean(a - b) = 0``
    (``scipy.stats.ttest_rel``); NaN for fewer than two pairs or identical differences."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = x - y
    if len(d) < 2 or not np.isfinite(d).all() or np.all(d == d[0]):
        return math.nan
    return float(_scipy.ttest_rel(x, y).pvalue)


def kendall(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Kendall's tau-b rank correlation of ``x`` and ``y`` and its two-sided p-value
    (``scipy.stats.kendalltau``), as Jiang et al. (2020, "Fantastic generalization measures
    and where to find them") and Andriushchenko et al. (2023, "A modern look at the
    relationship between sharpness and generalization") rank measures against
    generalization. NaN for fewer than two pairs or a constant input."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"kendall: {a.shape} values against {b.shape}")
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan, math.nan
    result = _scipy.kendalltau(a, b)
    return float(result.statistic), float(result.pvalue)
