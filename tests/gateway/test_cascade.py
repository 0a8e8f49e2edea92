"""``cascade`` (survey item 26, AutoMix-style): E[C] against a Monte-Carlo simulation, the offline
simulation against a plain loop, accept/escalate behaviour, and LLMRouter's table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelab.gateway.policies.cascade import CascadeRouter, answer_rejected, cost_order, expected_cascade_cost
from moelab.gateway.policy import ModelInfo, RouteRequest
from moelab.gateway.table import RoutingTable

MODELS = ["big", "small"]
COST = [10.0, 1.0]


def synthetic(n: int, seed: int) -> RoutingTable:
    """Domain "easy" (vocabulary ezy*): both models right. Domain "hard" (hrd*): only "big"."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n) < 0.4
    prompts = [" ".join(rng.choice([f"{'hrd' if h else 'ezy'}{i}" for i in range(20)], 8)) for h in hard]
    quality = np.stack([np.ones(n), (~hard).astype(float)], axis=1)
    return RoutingTable("synthetic", prompts, MODELS, quality, COST, np.arange(n))


def test_expected_cost_formula_matches_monte_carlo():
    rng = np.random.default_rng(0)
    cost, accept = np.array([1.0, 3.0, 7.0, 20.0]), np.array([0.3, 0.5, 0.6, 0.9])
    draws = 200_000
    u = rng.random((draws, 4))
    paid = np.zeros(draws)
    live = np.ones(draws, dtype=bool)
    for k in range(4):  # call stage k for every run still going, stop where it accepts
        paid[live] += cost[k]
        live &= u[:, k] >= accept[k]
    se = paid.std() / np.sqrt(draws)
    assert abs(expected_cascade_cost(cost, accept) - paid.mean()) < 4 * se
    # two stages by hand, and a batch of rows
    assert expected_cascade_cost(np.array([2.0, 5.0]), np.array([0.25, 0.0])) == pytest.approx(2 + 0.75 * 5)
    batch = expected_cascade_cost(cost, np.stack([accept, np.ones(4), np.zeros(4)]))
    np.testing.assert_allclose(batch, [expected_cascade_cost(cost, accept), 1.0, cost.sum()])
    with pytest.raises(ValueError, match="accept"):
        expected_cascade_cost(cost, np.array([0.5, 2.0, 0.1, 0.1]))


def test_simulate_equals_a_plain_loop_and_escalates_hard_prompts():
    train, test = synthetic(300, 1), synthetic(200, 2)
    router = CascadeRouter("hashing").fit(train)
    assert router.order == ["small", "big"]
    for t in (0.3, 0.5, 0.8):
        res = router.simulate(test, threshold=t)
        p = router.p_correct(test.prompts)
        q, c = [], []
        for n in range(len(test)):
            if p[n, 1] >= t:  # small accepted
                q.append(test.quality[n, 1])
                c.append(1.0)
            else:
                q.append(test.quality[n, 0])
                c.append(11.0)
        assert res["quality"] == pytest.approx(np.mean(q)) and res["cost"] == pytest.approx(np.mean(c))
        assert res["expected_cost"] == pytest.approx(res["cost"])  # stage rates measured on the same rows
    res = router.simulate(test)
    assert res["quality"] > 0.97 and res["cost"] < 0.5 * (1 + 10)  # hard ones escalate, easy ones stop
    router.prescreen = True
    pre = router.simulate(test)
    assert pre["quality"] == pytest.approx(res["quality"]) and pre["cost"] < res["cost"]


def test_route_and_accept():
    router = CascadeRouter("hashing").fit(synthetic(300, 3))
    easy, hard = "ezy1 ezy2 ezy3 ezy4 ezy5 ezy6", "hrd1 hrd2 hrd3 hrd4 hrd5 hrd6"
    models = [ModelInfo(m) for m in MODELS]
    d = router.route(RouteRequest(easy, models))
    assert d.model == "small" and d.cascade == ["small", "big"] and d.score > 0.5
    assert router.accept(RouteRequest(easy, models), "small", "The answer is 42.")[0]
    assert not router.accept(RouteRequest(hard, models), "small", "The answer is 42.")[0]
    ok, p = router.accept(RouteRequest(easy, models), "small", "  ")
    assert not ok and p > 0.5  # empty answers are escalated whatever P says
    assert not router.accept(RouteRequest(easy, models), "small", "I'm sorry, but I cannot help with that.")[
        0
    ]
    # a threshold in the request overrides the policy's
    assert not router.accept(RouteRequest(easy, models, threshold=1.0), "small", "42")[0]
    assert router.route(RouteRequest(hard, [ModelInfo("big")])).cascade == ["big"]
    pre = CascadeRouter("hashing", prescreen=True).fit(synthetic(300, 3))
    assert pre.route(RouteRequest(hard, models)).cascade == ["big"]
    with pytest.raises(ValueError, match="fitted models"):
        router.accept(RouteRequest(easy, models), "gpt-9", "42")


def test_answer_check_and_cost_order():
    assert answer_rejected("") == "empty"
    assert answer_rejected("As an AI, I don't know.").startswith("refusal")
    assert answer_rejected("I\u2019m not sure, maybe 4") == "refusal: i'm not sure"
    assert answer_rejected("Paris is the capital of France.") is None
    with pytest.raises(TypeError, match="answer"):
        answer_rejected(None)
    models, cost, quality = (
        ["a", "b", "c", "d"],
        np.array([1.0, 2.0, 2.0, 5.0]),
        np.array([0.5, 0.4, 0.6, 0.55]),
    )
    assert cost_order(models, cost, quality, pareto=False) == ["a", "c", "b", "d"]
    assert cost_order(models, cost, quality) == ["a", "c"]  # b and d are dearer and no better
    table = RoutingTable(
        "t", [f"w{i} x" for i in range(8)], models, np.tile(quality, (8, 1)), cost, np.arange(8)
    )
    router = CascadeRouter("hashing").fit(table)
    assert router.order == ["a", "c"]
    # a request with only models left out of the order still gets a cascade (cheapest first)
    assert router.route(RouteRequest("w1 x", [ModelInfo("d"), ModelInfo("b")])).cascade == ["b", "d"]
    assert router.route(RouteRequest("w1 x", [ModelInfo("d"), ModelInfo("c")])).cascade == ["c"]


def test_state_round_trip_and_bad_input():
    router = CascadeRouter("hashing", order=["small", "big"]).fit(synthetic(200, 4))
    again = CascadeRouter("hashing")
    again.load_state_dict(json.loads(json.dumps(router.state_dict())))
    test = synthetic(50, 5)
    assert again.simulate(test) == router.simulate(test)
    with pytest.raises(ValueError, match="threshold"):
        CascadeRouter("hashing", threshold=1.5)
    with pytest.raises(TypeError, match="order"):
        CascadeRouter("hashing", order="small")
    with pytest.raises(ValueError, match="not in the table"):
        CascadeRouter("hashing", order=["small", "huge"]).fit(synthetic(20, 6))
    with pytest.raises(ValueError, match="not fitted"):
        CascadeRouter("hashing").route(RouteRequest("x", [ModelInfo("small")]))


@pytest.mark.heavy  # the numbers on the docs page, on the whole LLMRouter table
def test_llmrouter_test_split(capsys):
    datasets = pytest.importorskip("moelab.gateway.datasets")
    table = datasets.load_table("llmrouter")
    train, test = table.where_split("train"), table.where_split("test")
    router = CascadeRouter("hashing").fit(train)
    res = {t: router.simulate(test, threshold=t) for t in (0.3, 0.5, 0.7, 0.8)}
    with capsys.disabled():
        print(f"\nllmrouter test: cascade order {router.order}")
        for t, r in res.items():
            print(
                f"  threshold {t}: quality {r['quality']:.3f}, cost {r['cost']:.3f}, E[C] {r['expected_cost']:.3f}"
            )
    for r in res.values():
        assert r["expected_cost"] == pytest.approx(r["cost"])
        assert test.quality.mean() < r["quality"] < test.quality.max(axis=1).mean()
    assert res[0.3]["cost"] < res[0.8]["cost"]  # a higher threshold escalates more
