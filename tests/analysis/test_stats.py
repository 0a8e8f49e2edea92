"""Bootstrap intervals (``moelab.analysis.stats``) against sorted replicates computed by hand."""

from __future__ import annotations

import pytest

from moelab.analysis import stats
from moelab.analysis.stats import bootstrap_ci, interval_from_replicates, resample_weights


def test_paper_defaults():
    assert stats.NUM_BOOTSTRAP == 1000 and stats.CI_ALPHA == 0.05


def test_bootstrap_basic_interval_by_hand():
    samples = [1.0, 2.0, 4.0, 8.0, 16.0]
    mean = lambda xs: sum(xs) / len(xs)
    ci = bootstrap_ci(mean, samples, n_boot=40, alpha=0.1, seed=7)
    idx = stats.bootstrap_indices(5, 40, 7)
    reps = sorted(mean([samples[i] for i in row]) for row in idx.tolist())
    lo_i = round(40 * 0.1 / 2)  # 2
    hi_i = 40 - lo_i  # 38
    theta = mean(samples)
    assert ci.estimate == pytest.approx(theta)
    assert ci.low == pytest.approx(2 * theta - reps[hi_i])
    assert ci.high == pytest.approx(2 * theta - reps[lo_i])
    pct = bootstrap_ci(mean, samples, n_boot=40, alpha=0.1, seed=7, method="percentile")
    assert (pct.low, pct.high) == pytest.approx((reps[lo_i], reps[hi_i]))
    assert ci.to_dict()["method"] == "basic" and ci.to_dict()["n_boot"] == 40


def test_resample_weights_count_the_draws():
    idx = stats.bootstrap_indices(6, 30, 2)
    w = resample_weights(6, 30, 2)
    for row, counts in zip(idx.tolist(), w.tolist(), strict=True):
        assert counts == [row.count(i) for i in range(6)]


def test_interval_clamps_the_upper_order_statistic():
    # n_boot = 1: lo = round(alpha / 2) = 0, hi = min(1 - 0, 0) = 0
    import torch

    lo, hi = interval_from_replicates(torch.tensor(2.0), torch.tensor([[3.0]]).squeeze(1), 0.05, "basic")
    assert (float(lo), float(hi)) == (1.0, 1.0)


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(len, [1, 2], n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(len, [1, 2], alpha=1.5)
    with pytest.raises(ValueError, match="method"):
        bootstrap_ci(len, [1, 2], method="bca")
    with pytest.raises(ValueError, match="samples"):
        bootstrap_ci(len, [])
