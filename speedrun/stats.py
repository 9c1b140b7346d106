"""The statistics of a record claim and of an experiment's arms: mean, sample standard deviation, and a one-sided
Welch t-test. Standard library only: the Student-t tail comes from the regularized incomplete beta function."""

from __future__ import annotations

import math
from dataclasses import dataclass


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (None for fewer than 2 values)."""
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    # Lentz's method for the continued fraction of I_x(a, b); converges fast for x < (a + 1) / (a + b + 2)
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    # the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps the fraction in its fast region
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, dof: float) -> float:
    """P(T > t) for Student's t with `dof` degrees of freedom (dof > 0, not necessarily an integer)."""
    if math.isnan(t) or not dof > 0:
        raise ValueError(f"student_t_sf needs a number t and dof > 0 (t={t}, dof={dof})")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if math.isinf(dof):  # the normal limit
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * regularized_incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return tail if t > 0 else 1.0 - tail


@dataclass
class WelchResult:
    t: float
    dof: float
    p: float
    diff: float  # (prev_mean - margin) - new_mean: how far below the bar the new mean is

    def text(self) -> str:
        return f"t={self.t:.3f} dof={self.dof:.2f} p={self.p:.3g}"


def welch_test(new: list[float], prev: list[float], margin: float) -> WelchResult:
    """One-sided Welch t-test of H0: mean(new) >= mean(prev) - margin against H1: mean(new) < mean(prev) - margin.
    A sample with fewer than 2 values contributes no variance (and no degrees of freedom)."""
    if not new or not prev:
        raise ValueError("both samples need at least one value")
    new_mean, new_std = mean_std(new)
    prev_mean, prev_std = mean_std(prev)
    terms = [(std * std / len(xs), len(xs) - 1) for xs, std in ((new, new_std), (prev, prev_std)) if std is not None]
    var = sum(v for v, _ in terms)
    diff = (prev_mean - margin) - new_mean
    if var == 0.0:  # no spread at all: the sign of the difference decides
        return WelchResult(math.copysign(math.inf, diff) if diff else 0.0, math.nan, 0.0 if diff > 0 else 1.0, diff)
    dof = var * var / sum(v * v / k for v, k in terms)
    t = diff / math.sqrt(var)
    return WelchResult(t, dof, student_t_sf(t, dof), diff)
