"""Statistics over seeds: mean, sample standard deviation (n - 1), Student's t confidence interval.

Exact t quantiles for integer degrees of freedom: bisection on the t distribution's CDF, which
has a finite closed form for integer df, so no SciPy is needed for the one quantile a report uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def t_two_sided_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1 (closed form, Abramowitz-Stegun 26.7).

    With theta = atan(t / sqrt(df)): odd df sums odd powers of cos(theta) on top of theta, even df
    sums even powers; both series are finite, so the value is exact up to float rounding.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            if k > 1:
                term *= c * c * (2 * k - 2) / (2 * k - 1)
            total += term
        return (2.0 / math.pi) * (theta + s * total)
    total, term = 1.0, 1.0
    for k in range(1, df // 2):
        term *= c * c * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| <= t) = `confidence` (e.g. 0.95 -> 12.706 for df 1, 2.776 for df 4)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while t_two_sided_coverage(hi, df) < confidence:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_two_sided_coverage(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class SeedStats:
    """Mean, spread and confidence interval of one number over n seeds."""

    n: int
    mean: float
    std: float | None
    """sample standard deviation (n - 1); None for n = 1"""
    ci_low: float | None
    ci_high: float | None
    """two-sided t interval for the mean; None for n = 1"""
    confidence: float = 0.95

    def text(self, digits: int = 1, scale: float = 1.0) -> str:
        """`mean ± std [lo, hi]`, or `mean (n=1)`; values multiplied by `scale` (100 for %)."""
        mean = f"{self.mean * scale:.{digits}f}"
        if self.std is None or self.ci_low is None or self.ci_high is None:
            return f"{mean} (n=1)"
        return (
            f"{mean} ± {self.std * scale:.{digits}f} "
            f"[{self.ci_low * scale:.{digits}f}, {self.ci_high * scale:.{digits}f}]"
        )


def seed_stats(values: Sequence[float], confidence: float = 0.95) -> SeedStats | None:
    """Statistics of `values` (one per seed): None when there are none."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return SeedStats(1, mean, None, None, None, confidence)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return SeedStats(n, mean, std, mean - half, mean + half, confidence)


# ---------------------------------------------------------------- one run
