"""Intervals over seeds and verdicts (moelab.analysis.intervals), against independent references:
published t-table values, the t density integrated numerically, and coverage measured on synthetic
seeds drawn with a known mean gap."""

from __future__ import annotations

import math
import random

import pytest

from moelab.analysis.intervals import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    TIE,
    Interval,
    combine,
    difference_label,
    judge,
    paired_interval,
    standard_error,
    student_t_cdf,
    student_t_ppf,
    t_interval,
)

# two-sided 95% critical values t_{0.975, df} from standard tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 30: 2.042, 100: 1.984}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_the_table(df, expected):
    assert student_t_ppf(0.975, df) == pytest.approx(expected, abs=6e-4)
    assert student_t_ppf(0.025, df) == pytest.approx(-expected, abs=6e-4)


def _t_density(x: float, df: float) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x * x / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("df", [1, 2, 3, 7.5, 40])
@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 1.1, 5.0])
def test_t_cdf_equals_the_integrated_density(df, t):
    # Simpson's rule from 0 to t, plus the half below 0 (the density is symmetric)
    n = 4000
    h = t / n
    s = _t_density(0, df) + _t_density(t, df)
    s += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, n))
    assert student_t_cdf(t, df) == pytest.approx(0.5 + s * h / 3, abs=1e-7)


def test_t_interval_is_the_textbook_formula():
    vals = [1.0, 2.5, 1.7, 3.1]
    n, mean = len(vals), sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    iv = t_interval(vals)
    half = 3.182446305284263 * sd / math.sqrt(n)
    assert (iv.mean, iv.sd, iv.n) == (pytest.approx(mean), pytest.approx(sd), 4)
    assert iv.low == pytest.approx(mean - half) and iv.high == pytest.approx(mean + half)
    assert standard_error(vals) == pytest.approx(sd / math.sqrt(n))


def test_one_value_has_no_interval():
    iv = t_interval([1.5])
    assert iv.mean == 1.5 and not iv.defined and iv.contains(123.0)
    assert judge(iv, "lower") == INCONCLUSIVE
    assert math.isnan(standard_error([1.5]))


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_paired_interval_covers_the_true_gap_at_its_nominal_rate(n_seeds):
    """Seeds of two arms: a shared seed effect (init, data order) plus each arm's own noise, with a
    known gap between the arms' means. Over many draws the 95% paired interval must hold the true
    gap about 95% of the time (binomial standard error at 4000 draws: 0.0034)."""
    rng = random.Random(1234 + n_seeds)
    gap, draws, covered = 0.03, 4000, 0
    for _ in range(draws):
        shared = [rng.gauss(0.0, 0.05) for _ in range(n_seeds)]
        a = [1.60 + gap + s + rng.gauss(0.0, 0.01) for s in shared]
        b = [1.60 + s + rng.gauss(0.0, 0.01) for s in shared]
        iv = paired_interval(a, b)
        covered += iv.low <= gap <= iv.high
    assert covered / draws == pytest.approx(0.95, abs=0.012)


def test_pairing_removes_the_shared_seed_effect():
    rng = random.Random(7)
    shared = [rng.gauss(0.0, 0.2) for _ in range(5)]
    a = [2.0 + s + 0.001 * i for i, s in enumerate(shared)]
    b = [1.9 + s for s in shared]
    unpaired = max(t_interval(a).half_width, t_interval(b).half_width)
    paired = paired_interval(a, b)
    assert paired.half_width < unpaired / 50
    assert difference_label(paired, lower_is_better=True) == "worse"


def test_difference_labels():
    win = Interval(-0.05, -0.08, -0.02, 3, 0.01)
    loss = Interval(0.05, 0.02, 0.08, 3, 0.01)
    tie = Interval(0.01, -0.02, 0.04, 3, 0.01)
    assert difference_label(win, lower_is_better=True) == "better"
    assert difference_label(loss, lower_is_better=True) == "worse"
    assert difference_label(win, lower_is_better=False) == "worse"
    assert difference_label(tie, lower_is_better=True) == TIE
    assert difference_label(win) == "lower" and difference_label(loss) == "higher"


@pytest.mark.parametrize(
    "low,high,claim,threshold,margin,expected",
    [
        # clear win, clear loss, tie for the claim "d < 0" (A lower than B)
        (-0.08, -0.02, "lower", 0.0, 0.0, HOLDS),
        (0.02, 0.08, "lower", 0.0, 0.0, DOES_NOT_HOLD),
        (-0.02, 0.03, "lower", 0.0, 0.0, INCONCLUSIVE),
        # superiority by a margin of 0.02: the interval must clear -0.02 to hold, +0.02 to fail
        (-0.05, -0.03, "lower", 0.0, 0.02, HOLDS),
        (-0.03, -0.01, "lower", 0.0, 0.02, INCONCLUSIVE),
        (0.01, 0.03, "lower", 0.0, 0.02, INCONCLUSIVE),
        (0.03, 0.05, "lower", 0.0, 0.02, DOES_NOT_HOLD),
        # non-inferiority within 0.02: "d < +0.02"
        (-0.01, 0.015, "lower", 0.02, 0.0, HOLDS),
        (0.01, 0.03, "lower", 0.02, 0.0, INCONCLUSIVE),
        (0.03, 0.06, "lower", 0.02, 0.0, DOES_NOT_HOLD),
        # "higher" mirrors "lower"
        (0.02, 0.08, "higher", 0.0, 0.01, HOLDS),
        (-0.08, -0.02, "higher", 0.0, 0.01, DOES_NOT_HOLD),
        (0.005, 0.05, "higher", 0.0, 0.01, INCONCLUSIVE),
    ],
)
def test_verdict_rule(low, high, claim, threshold, margin, expected):
    iv = Interval((low + high) / 2, low, high, 3, 0.01)
    assert judge(iv, claim, threshold, margin) == expected


def test_combine():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, DOES_NOT_HOLD, HOLDS]) == DOES_NOT_HOLD
    with pytest.raises(ValueError, match="verdicts"):
        combine([])
    with pytest.raises(ValueError, match="verdicts"):
        combine(["maybe"])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="paired values must have equal lengths"):
        paired_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="values must be finite"):
        t_interval([1.0, float("nan")])
    with pytest.raises(TypeError, match="values must be a sequence"):
        t_interval(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.5)
    with pytest.raises(ValueError, match="claim must be"):
        judge(Interval(0, -1, 1, 3, 1), "smaller")
    with pytest.raises(ValueError, match="q must be"):
        student_t_ppf(1.0, 3)
