"""Intervals over seeds, paired differences and verdicts: what makes a comparison of routers
trustworthy (``moelab compare --seeds``, ``moelab repro``).

A comparison trains every arm on every seed with the same initial weights and the same data
order per seed, so arm ``A`` and baseline ``B`` form pairs ``(a_s, b_s)``. The method is the
**t-interval over seeds of the paired differences** ``d_s = a_s - b_s``::

    mean(d) +- t_{1 - alpha/2, n - 1} * sd(d) / sqrt(n)          (sd with n - 1)

It is exact when the ``d_s`` are normal and independent (seeds are independent draws of the
training noise: init, data order, floating-point order), and it is honest at 3 seeds, where a
bootstrap over seeds has only 10 distinct resamples and covers far below its nominal rate.
Pairing removes what the arms share on a seed (the init, the batches), so the interval of a
difference is narrower than the two arms' own intervals suggest.

The val windows are the same for every run, so window-to-window noise is not part of ``d_s``'s
spread; it is reported beside it (``standard_error`` of the window losses, and of their paired
differences) to show it is small next to the differences.

Verdicts: a difference whose interval holds 0 is a **tie**; a claim ``d < c`` (or ``d > c``)
**holds** when the whole interval is on the claimed side of ``c``, **does not hold** when the
whole interval is on the other side, and is **inconclusive** otherwise (also with one seed, which
has no interval). Pure Python (``math`` only): the Student-t quantile is computed here from the
regularised incomplete beta function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95  # the nominal coverage of every interval (our choice; the usual one)
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
VERDICTS = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)
TIE = "tie"


# --------------------------------------------------------------------------------------------------
# Student's t
# --------------------------------------------------------------------------------------------------
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, the regularised incomplete beta function, for ``0 <= x <= 1``."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (``0 < q < 1``)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if q < 0.5:
        return -student_t_ppf(1.0 - q, df)
    if q == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < q:  # bracket, then bisect (the cdf is monotone)
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------------
# intervals
# --------------------------------------------------------------------------------------------------
def _finite(values: Sequence[float], name: str) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out = [float(v) for v in values]
    if any(not math.isfinite(v) for v in out):
        raise ValueError(f"{name} must be finite numbers, got {out}")
    return out


def standard_error(values: Sequence[float]) -> float:
    """``sd / sqrt(n)`` of ``values`` (sample sd, ``n - 1``); NaN for fewer than two values."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n < 2:
        return float("nan")
    mean = sum(vals) / n
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1) / n)


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its ``confidence`` t-interval ``[low, high]`` (NaN when
    ``n < 2``: one value has no spread to measure)."""

    mean: float
    low: float
    high: float
    n: int
    sd: float
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def contains(self, value: float) -> bool:
        """``value`` lies in the interval (True for an undefined interval: nothing is excluded)."""
        return not self.defined or self.low <= value <= self.high

    def to_dict(self) -> dict[str, float | int]:
        return {
            "mean": self.mean,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "sd": self.sd,
            "confidence": self.confidence,
        }


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` with its t-interval: ``mean +- t_{(1+confidence)/2, n-1} sd / sqrt(n)``.

    Args:
        values: ``n`` independent measurements (e.g. one per seed).
        confidence: nominal coverage, in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    vals = _finite(values, "values")
    n = len(vals)
    if n == 0:
        raise ValueError("values must hold at least one number")
    mean = sum(vals) / n
    if n < 2:
        return Interval(mean, float("nan"), float("nan"), n, float("nan"), confidence)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = student_t_ppf(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, confidence)


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a_i - b_i``; ``a`` and ``b`` are measured on the same units (seeds, windows), in order."""
    av, bv = _finite(a, "a"), _finite(b, "b")
    if len(av) != len(bv):
        raise ValueError(f"paired values must have equal lengths, got {len(av)} and {len(bv)}")
    return [x - y for x, y in zip(av, bv, strict=True)]


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The t-interval of the paired differences ``a_i - b_i`` (module docstring)."""
    return t_interval(paired_differences(a, b), confidence)


# --------------------------------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------------------------------
def difference_label(diff: Interval, lower_is_better: bool | None = None) -> str:
    """How to read a paired difference ``arm - baseline``: ``tie`` when its interval holds 0 (or
    there is no interval), else ``better`` / ``worse`` for a metric with a direction
    (``lower_is_better``), ``lower`` / ``higher`` for one without."""
    if diff.contains(0.0):
        return TIE
    lower = diff.high < 0.0
    if lower_is_better is None:
        return "lower" if lower else "higher"
    return "better" if lower == lower_is_better else "worse"


def judge(diff: Interval, claim: str, threshold: float = 0.0, margin: float = 0.0) -> str:
    """The verdict on a claim about a quantity ``d`` measured with interval ``diff``.

    ``claim="lower"`` claims ``d < threshold``: it **holds** when the whole interval is below
    ``threshold - margin``, **does not hold** when the whole interval is above ``threshold +
    margin``, and is **inconclusive** otherwise (also without an interval, i.e. one seed).
    ``"higher"`` mirrors it. ``margin`` is the band of no practical consequence around the
    threshold that the interval must clear either way: a superiority claim ("lower loss") is
    ``threshold=0, margin=m``; a non-inferiority claim ("no worse than, within m") is
    ``threshold=m, margin=0``.
    """
    if claim not in ("lower", "higher"):
        raise ValueError(f"claim must be 'lower' or 'higher', got {claim!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not diff.defined:
        return INCONCLUSIVE
    below, above = diff.high < threshold - margin, diff.low > threshold + margin
    if below:
        return HOLDS if claim == "lower" else DOES_NOT_HOLD
    if above:
        return HOLDS if claim == "higher" else DOES_NOT_HOLD
    return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """A claim made of several parts: ``does not hold`` if any part does not hold, ``holds`` if
    every part holds, ``inconclusive`` otherwise."""
    bad = [v for v in verdicts if v not in VERDICTS]
    if bad or not verdicts:
        raise ValueError(f"verdicts must be a non-empty sequence of {VERDICTS}, got {list(verdicts)}")
    if DOES_NOT_HOLD in verdicts:
        return DOES_NOT_HOLD
    return HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE
