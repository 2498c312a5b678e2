"""The one verdict rule of vitkit's studies (stated in docs/method.md).

A claim is a contrast between groups of runs (one number per seed each): ``A - B`` ("A beats B"), or
``(A1 - B1) - (A2 - B2)`` ("A's lead grows as ...") and so on, with weights that sum to zero. Its 95 %
interval is Welch's: the estimate ``sum w_i mean_i`` with standard error ``sqrt(sum w_i^2 s_i^2 / n_i)`` and
Welch-Satterthwaite degrees of freedom. The claim's expectation then decides:

* ``above`` (the contrast is positive): **holds** when the whole interval is above 0, **fails** when it is
  below 0, else **cannot tell at N seeds**;
* ``below``: the mirror image;
* ``within`` (the groups "barely differ", up to ``margin``): **holds** when the interval lies inside
  ``(-margin, +margin)``, **fails** when it lies wholly outside it, else **cannot tell**.

With fewer than 2 runs in a group there is no interval: "cannot tell at N seeds". No scipy: the t quantile is
computed here from the regularized incomplete beta function.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
EXPECTATIONS = ("above", "below", "within")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (bisection on :func:`t_cdf`; exact enough for 4 significant digits and more)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    df: float
    seeds: int  # the smallest group's number of runs

    def show(self, digits: int = 2) -> str:
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def contrast_interval(groups: Mapping[str, Sequence[float]], weights: Mapping[str, float],
                      confidence: float = CONFIDENCE) -> Interval | None:
    """Welch interval of ``sum w_g mean_g`` over the named groups; None when a group has < 2 runs."""
    missing = [g for g in weights if g not in groups]
    if missing:
        raise KeyError(f"contrast names {missing}, not among the groups {sorted(groups)}")
    est, var, df_den = 0.0, 0.0, 0.0
    for g, w in weights.items():
        xs = [float(x) for x in groups[g]]
        if len(xs) < 2:
            return None
        n, s2 = len(xs), statistics.variance(xs)
        est += w * statistics.fmean(xs)
        part = w * w * s2 / n
        var += part
        df_den += part * part / (n - 1)
    seeds = min(len(groups[g]) for g in weights)
    if var == 0.0:
        return Interval(est, est, est, math.inf, seeds)
    df = var * var / df_den
    half = t_quantile(0.5 + confidence / 2.0, df) * math.sqrt(var)
    return Interval(est, est - half, est + half, df, seeds)


def decide(interval: Interval | None, expect: str, margin: float | None = None, seeds: int | None = None) -> str:
    """'holds', 'fails' or 'cannot tell at N seeds' for an expectation about the contrast (see the module)."""
    if expect not in EXPECTATIONS:
        raise ValueError(f"expect must be one of {EXPECTATIONS}, got {expect!r}")
    if expect == "within" and (margin is None or margin <= 0):
        raise ValueError("expect 'within' needs a positive margin")
    if interval is None:
        return f"cannot tell at {seeds or 1} seed{'s' if (seeds or 1) > 1 else ''}"
    lo, hi = interval.low, interval.high
    if expect == "above":
        outcome = "holds" if lo > 0 else "fails" if hi < 0 else None
    elif expect == "below":
        outcome = "holds" if hi < 0 else "fails" if lo > 0 else None
    else:
        outcome = "holds" if -margin < lo and hi < margin else "fails" if lo >= margin or hi <= -margin else None
    return outcome or f"cannot tell at {interval.seeds} seeds"
