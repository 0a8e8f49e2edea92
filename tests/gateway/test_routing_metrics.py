"""RouteLLM's and RouterBench's router metrics against independent references: the numbers the
data README computed from the packaged tables, hand-worked sweeps, and brute force."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.gateway import metrics as M
from moelab.gateway.datasets import load_table


@pytest.fixture(scope="module")
def gsm8k():
    return load_table("routellm_gsm8k")


@pytest.fixture(scope="module")
def mmlu():
    return load_table("routellm_mmlu")


def test_packaged_tables_match_the_readme(gsm8k, mmlu):
    # data README, "Reference numbers computed from these files" (decontaminated rows)
    mt = load_table("routellm_mtbench")
    assert (len(gsm8k), len(mmlu), len(mt)) == (1307, 14037, 72)
    assert len(load_table("routellm_gsm8k", decontaminate=False)) == 1319
    assert np.round(100 * gsm8k.quality.mean(0), 2).tolist() == [63.73, 85.77]
    assert np.round(100 * mmlu.quality.mean(0), 2).tolist() == [68.09, 80.59]
    assert np.round(mt.quality.mean(0), 3).tolist() == [8.281, 9.212]
    llm = load_table("llmrouter")
    test, train = llm.where_split("test"), llm.where_split("train")
    assert (len(train), len(test)) == (5160, 450)
    assert round(test.quality.mean(0).max(), 3) == 0.605
    assert test.models[int(test.quality.mean(0).argmax())] == "llama-3.1-nemotron-51b-instruct"
    assert round(M.oracle_multi(test.quality, test.cost)[0], 3) == 0.770
    assert round(M.oracle_multi(train.quality, train.cost)[0], 3) == 0.827


def test_oracle_apgr_matches_the_readme(gsm8k, mmlu):
    for table, want, any_correct in ((gsm8k, 1.13, 0.9296), (mmlu, 1.29, 0.8587)):
        w, s = table.quality[:, 0], table.quality[:, 1]
        curve = M.oracle_curve(w, s)
        assert round(M.apgr(curve, w.mean(), s.mean()), 2) == want
        assert curve.y[-1] == pytest.approx(any_correct, abs=5e-5)  # f = 1: every fixable prompt fixed
    # MT-Bench oracle at f = 1: the per-question maximum (README: 9.316 decontaminated)
    mt = load_table("routellm_mtbench")
    c = M.oracle_curve_scores(mt.quality[:, 0], mt.quality[:, 1])
    assert round(c.y[-1], 3) == 9.316 == round(mt.quality.max(1).mean(), 3)


def test_random_router_apgr_and_cpt(gsm8k, mmlu):
    for table in (gsm8k, mmlu):
        w, s = table.quality[:, 0], table.quality[:, 1]
        rng = np.random.default_rng(1)
        curves = [M.router_sweep(rng.uniform(size=len(w)), w, s) for _ in range(200)]
        apgrs = [M.apgr(c, w.mean(), s.mean()) for c in curves]
        assert np.mean(apgrs) == pytest.approx(0.5, abs=0.01)
        avg = M.random_sweep(w, s, iters=50, seed=2)
        for p in M.CPT_LEVELS:
            c = M.cpt(avg, w.mean(), s.mean(), p)
            assert c.value == pytest.approx(100 * p, abs=3.0), (table.name, p, c)


def test_sweep_by_hand():
    # 12 scores 0..11: the 10-quantile edges sit at 1.1 k (linear interpolation), between scores
    scores = np.arange(12.0)
    weak = np.zeros(12)
    strong = np.ones(12)
    curve = M.router_sweep(scores, weak, strong)
    assert np.allclose(sorted(curve.thresholds), 1.1 * np.arange(11))
    # at edge 1.1 k, the scores >= 1.1 k go strong: 12 at k = 0, then 10, 9, ..., 2; the last edge
    # (11) uses > 11: none
    want_x = 100 * np.array([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12]) / 12
    assert np.allclose(curve.x, want_x)
    assert np.allclose(curve.y, want_x / 100)  # strong always right, weak always wrong
    # duplicate edges are dropped (pd.qcut(duplicates="drop")): 6 ties at 0
    dup = M.sweep_thresholds(np.array([0, 0, 0, 0, 0, 0, 1, 2, 3, 4.0]))
    assert dup.tolist() == sorted(set(dup.tolist())) and dup[0] == 0 and dup[-1] == 4


def test_apgr_is_the_integral_of_pgr():
    x = np.array([0, 10, 25, 60, 100.0])
    y = np.array([0.6, 0.7, 0.72, 0.8, 0.85])
    curve = M.Curve(x, y, np.full(5, np.nan))
    w, s = 0.6, 0.85
    pg = (y - w) / (s - w)
    integral = sum((x[i + 1] - x[i]) / 100 * (pg[i] + pg[i + 1]) / 2 for i in range(4))
    assert M.apgr(curve, w, s) == pytest.approx(integral, abs=1e-12)
    assert M.pgr(0.725, w, s) == pytest.approx(0.5)


def test_cpt_monotone_equals_np_interp_and_non_monotone_is_undefined():
    x = np.array([0, 20, 40, 60, 80, 100.0])
    rising = M.Curve(x, np.array([0.5, 0.6, 0.65, 0.8, 0.85, 0.9]), np.full(6, np.nan))
    for p in M.CPT_LEVELS:
        c = M.cpt(rising, 0.5, 0.9, p)
        assert c.value == pytest.approx(np.interp(0.5 + 0.4 * p, rising.y, rising.x)) and c.reason is None
    # a curve that rises past the 50% level (0.7), falls back below it and rises again
    wavy = M.Curve(x, np.array([0.5, 0.75, 0.6, 0.65, 0.85, 0.9]), np.full(6, np.nan))
    c = M.cpt(wavy, 0.5, 0.9, 0.5)
    assert c.value is None and "non-monotone" in c.reason and "3 times" in c.reason
    assert c.first_reached == pytest.approx(16.0)  # 0.5 -> 0.75 over 0..20 meets 0.7 at 16
    assert np.isfinite(c.np_interp)  # RouteLLM's np.interp would have printed a number
    assert "undefined" in str(c)
    # the 80% level (0.82) is met once, on the final rise: defined even though the curve wiggles below
    c80 = M.cpt(wavy, 0.5, 0.9, 0.8)
    assert c80.value == pytest.approx(60 + 20 * (0.82 - 0.65) / (0.85 - 0.65))
    flat = M.Curve(x, np.array([0.5, 0.7, 0.7, 0.8, 0.85, 0.9]), np.full(6, np.nan))
    assert M.cpt(flat, 0.5, 0.9, 0.5).value is None
    with pytest.raises(ValueError, match="p must be in"):
        M.cpt(rising, 0.5, 0.9, 1.5)


def _frontier_brute(costs, quals, grid):
    """max quality attainable with spend <= c, mixing any two points (or one)."""
    best = np.zeros_like(grid)
    for i in range(len(costs)):
        for j in range(len(costs)):
            lam = np.linspace(0, 1, 401)
            mc = lam * costs[i] + (1 - lam) * costs[j]
            mq = lam * quals[i] + (1 - lam) * quals[j]
            for c_, q_ in zip(mc, mq, strict=True):
                best = np.where(grid >= c_ - 1e-12, np.maximum(best, q_), best)
    return best


def test_aiq_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(3):
        costs = rng.uniform(0.1, 2.0, 7)
        quals = rng.uniform(0.2, 0.9, 7)
        lo, hi = 0.0, 2.5
        grid = np.linspace(lo, hi, 2001)
        brute = _frontier_brute(costs, quals, grid)
        want = np.sum(np.diff(grid) * (brute[1:] + brute[:-1]) / 2) / (hi - lo)
        assert M.aiq(costs, quals, (lo, hi)) == pytest.approx(want, abs=2e-3), trial
    # hand-made: (1, 0.5), (2, 0.9), (3, 0.6): hull rises 1 -> 2, flat to 3; range [1, 3]
    assert M.aiq([1, 2, 3], [0.5, 0.9, 0.6]) == pytest.approx(((0.5 + 0.9) / 2 + 0.9) / 2)
    with pytest.raises(ValueError, match="cost_range"):
        M.aiq([1.0], [0.5])


def test_bad_inputs():
    with pytest.raises(ValueError, match="same length"):
        M.router_sweep([0.1, 0.2], [0, 1], [1, 1, 0])
    with pytest.raises(ValueError, match="scores must have one entry per prompt"):
        M.router_sweep([0.1], [0, 1], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        M.oracle_curve([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="num_results"):
        M.sweep_thresholds(np.ones(3), 0)
    with pytest.raises(ValueError, match="name must be one of"):
        load_table("gsm8k")
