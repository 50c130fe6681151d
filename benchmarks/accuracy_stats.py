"""Statistics of the accuracy study: means, Student-t confidence intervals and paired differences.

Standard library only (no scipy here): the t quantile is found by bisection on the t distribution's
CDF, written with the regularised incomplete beta function (continued fraction, Numerical Recipes
``betacf``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (``p`` in (0.5, 1)), by bisection to 1e-10."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


@dataclass
class Interval:
    """Mean of ``n`` values with a two-sided ``level`` Student-t confidence interval."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    level: float

    def fmt(self, digits: int = 1) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and t interval of ``values`` (the interval is the mean itself for fewer than 2 values)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(n, mean, float("nan"), mean, mean, level)
    sd = statistics.stdev(values)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half, level)


@dataclass
class Paired:
    """A - B over paired seeds: the mean difference with its t interval, and the sign counts."""

    a: str
    b: str
    diff: Interval
    wins: int
    ties: int
    losses: int

    @property
    def verdict(self) -> str:
        if self.diff.n < 2:
            return "n < 2"
        if self.diff.low > 0:
            return f"{self.a} better"
        if self.diff.high < 0:
            return f"{self.b} better"
        return "not separable"

    def to_dict(self) -> dict:
        return {
            "a": self.a,
            "b": self.b,
            "diff": self.diff.to_dict(),
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "verdict": self.verdict,
        }


def paired(a: str, b: str, xs: dict[int, float], ys: dict[int, float], level: float = 0.95) -> Paired:
    """Seed-paired difference ``xs[s] - ys[s]`` over the seeds both have."""
    seeds = sorted(set(xs) & set(ys))
    if not seeds:
        raise ValueError(f"{a} and {b} share no seed")
    d = [xs[s] - ys[s] for s in seeds]
    return Paired(
        a,
        b,
        mean_ci(d, level),
        sum(x > 0 for x in d),
        sum(x == 0 for x in d),
        sum(x < 0 for x in d),
    )
