"""``category`` (Composition of Experts, PAPERS.md item 25): the classifier against scikit-learn, the
budgeted map against brute force, the fallback, and the paper's CPU check (two-step routing vs
per-prompt argmax labels learned by the same classifier)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from moelab.gateway.embed import HashingEmbedder
from moelab.gateway.policies.category import (
    CategoryRouter,
    choose_map,
    entropy,
    fit_logistic,
    predict_logistic,
)
from moelab.gateway.policy import ModelInfo, RouteRequest
from moelab.gateway.table import RoutingTable

MODELS = ["steady", "risky", "dear"]
COST = [1.0, 1.0, 3.0]


def synthetic(n: int, seed: int) -> RoutingTable:
    """4 categories of disjoint vocabularies. On categories 0-1 "steady" scores 0.7 every time and
    "risky" 1 with probability 0.6, else 0 (mean 0.6): risky is the per-prompt argmax more often,
    steady is better on average. On categories 2-3 the roles swap. "dear" scores 0.5 everywhere."""
    rng = np.random.default_rng(seed)
    vocab = [[f"{stem}{i}" for i in range(25)] for stem in ("alv", "bex", "cor", "dut")]
    cat = rng.integers(0, 4, n)
    prompts = [" ".join(rng.choice(vocab[c], 8)) for c in cat]
    coin = (rng.random(n) < 0.6).astype(float)
    steady = np.where(cat < 2, 0.7, coin)
    risky = np.where(cat < 2, coin, 0.7)
    quality = np.stack([steady, risky, np.full(n, 0.5)], axis=1)
    return RoutingTable(
        "synthetic", prompts, MODELS, quality, COST, np.arange(n), task=[f"c{c}" for c in cat]
    )


def test_softmax_regression_matches_sklearn():
    sk = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) / 2
    y = (x @ rng.normal(size=(6, 3)) + rng.normal(size=(300, 3))).argmax(1)
    l2 = 1e-2
    w, b = fit_logistic(x, np.eye(3)[y], l2=l2, steps=2000)
    ref = sk.LogisticRegression(C=1 / (l2 * len(x)), tol=1e-12, max_iter=5000).fit(x, y)
    np.testing.assert_allclose(predict_logistic(x, w, b), ref.predict_proba(x), atol=1e-4)
    # sigmoid link: one independent binary regression per column
    t = (rng.random((300, 2)) < 1 / (1 + np.exp(-x[:, :2] * 3))).astype(float)
    w, b = fit_logistic(x, t, link="sigmoid", l2=l2, steps=2000)
    for j in range(2):
        ref = sk.LogisticRegression(C=1 / (l2 * len(x)), tol=1e-12, max_iter=5000).fit(x, t[:, j])
        np.testing.assert_allclose(
            predict_logistic(x, w, b, "sigmoid")[:, j], ref.predict_proba(x)[:, 1], atol=1e-4
        )


def test_entropy_is_the_plain_sum():
    p = np.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    assert entropy(p)[0] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert entropy(p)[1] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_budgeted_map_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_cat, n_mod = 4, 3
    value, weight, cost = rng.random((n_cat, n_mod)), rng.dirichlet(np.ones(n_cat)), rng.random(n_mod) * 2
    for budget in (None, cost.min() + 0.01, float(np.median(cost)), cost.max()):
        pick, v, c = choose_map(value, weight, cost, budget)
        best = -np.inf
        for combo in itertools.product(range(n_mod), repeat=n_cat):
            cc = sum(weight[k] * cost[m] for k, m in enumerate(combo))
            vv = sum(weight[k] * value[k, m] for k, m in enumerate(combo))
            if budget is None or cc <= budget + 1e-12:
                best = max(best, vv)
        assert v == pytest.approx(best, abs=1e-12)
        assert v == pytest.approx(sum(weight[k] * value[k, m] for k, m in enumerate(pick)))
        assert budget is None or c <= budget + 1e-12
    with pytest.raises(ValueError, match="budget"):
        choose_map(value, weight, cost, cost.min() / 2)


def test_two_step_beats_per_prompt_argmax_labels():
    train, test = synthetic(600, 1), synthetic(400, 2)
    router = CategoryRouter("hashing", min_confidence=0.0).fit(train)
    cols = [test.column(m) for m in router.predict(test.prompts)]
    two_step = test.quality[np.arange(len(test)), cols].mean()
    # the same classifier trained on each prompt's argmax model (ties at random) as its label
    rng = np.random.default_rng(0)
    label = np.array([rng.choice(np.flatnonzero(r == r.max())) for r in train.quality])
    emb = HashingEmbedder().embed(train.prompts)
    w, b = fit_logistic(emb, np.eye(3)[label], l2=router.l2, steps=router.steps)
    direct = predict_logistic(HashingEmbedder().embed(test.prompts), w, b).argmax(1)
    per_prompt = test.quality[np.arange(len(test)), direct].mean()
    assert router.val_report["classifier_accuracy"] > 0.95
    assert two_step > per_prompt + 0.05, (two_step, per_prompt)  # about 0.70 vs 0.60


def test_budget_is_respected_on_the_validation_rows():
    train = synthetic(500, 3)
    train.quality[:, 2] = 0.95  # "dear" is now the best everywhere
    for budget in (1.0, 1.5, 2.2, None):
        router = CategoryRouter("hashing", budget=budget, min_confidence=0.3).fit(train)
        chosen = router.predict([train.prompts[i] for i in router.val_rows])
        mean_cost = np.mean([COST[MODELS.index(m)] for m in chosen])
        assert mean_cost == pytest.approx(router.val_report["cost"])
        if budget is None:
            assert set(chosen) == {"dear"}
        else:
            assert mean_cost <= budget + 1e-9
    with pytest.raises(ValueError, match="budget"):
        CategoryRouter("hashing", budget=0.5).fit(train)


def test_low_confidence_falls_back_to_the_generalist():
    train = synthetic(400, 4)
    router = CategoryRouter("hashing", generalist="dear", min_confidence=0.6).fit(train)
    mixed = "alv1 alv2 bex1 bex2 cor1 cor2 dut1 dut2"  # one word pair from every category
    p = router.probabilities([mixed])[0]
    assert p.max() < 0.6
    d = router.route(RouteRequest(mixed, [ModelInfo(m) for m in MODELS]))
    assert d.model == "dear" and d.info["fallback"] and d.score == pytest.approx(p.max())
    clear = train.prompts[0]
    d = router.route(RouteRequest(clear, [ModelInfo(m) for m in MODELS]))
    assert not d.info["fallback"] and d.model in ("steady", "risky")
    # "router-category-<t>": the request's threshold is this request's min_confidence
    forced = router.route(RouteRequest(clear, [ModelInfo(m) for m in MODELS], threshold=1.0))
    assert forced.model == "dear" and forced.info["fallback"]
    with pytest.raises(ValueError, match="min_confidence"):
        router.route(RouteRequest(clear, [ModelInfo(m) for m in MODELS], threshold=1.5))
    # the entropy rule alone
    by_entropy = CategoryRouter("hashing", generalist="dear", min_confidence=0.0, max_entropy=0.5).fit(train)
    assert (
        entropy(p[None])[0] > 0.5
        and by_entropy.route(RouteRequest(mixed, [ModelInfo("dear")])).model == "dear"
    )
    # the default generalist is the model with the best mean validation quality
    default = CategoryRouter("hashing").fit(train)
    val_q = train.quality[default.val_rows].mean(axis=0)
    assert default.generalist == MODELS[int(np.argmax(val_q))]


def test_missing_mapped_model_and_state_round_trip():
    train = synthetic(300, 5)
    router = CategoryRouter("hashing", min_confidence=0.0).fit(train)
    prompt = train.prompts[0]
    mapped = router.route(RouteRequest(prompt, [ModelInfo(m) for m in MODELS])).model
    rest = [ModelInfo(m) for m in MODELS if m != mapped]
    k = router.categories.index(router.route(RouteRequest(prompt, rest)).info["category"])
    want = max(rest, key=lambda m: router.category_quality[k, MODELS.index(m.name)]).name
    assert router.route(RouteRequest(prompt, rest)).model == want
    again = CategoryRouter("hashing")
    again.load_state_dict(json.loads(json.dumps(router.state_dict())))
    assert again.predict(train.prompts[:50]) == router.predict(train.prompts[:50])


def test_bad_input_is_named():
    for kw, msg in [
        ({"budget": -1}, "budget"), ({"min_confidence": 2}, "min_confidence"), ({"max_entropy": -1}, "max_entropy"),
        ({"val_fraction": 1.0}, "val_fraction"), ({"steps": 0}, "steps"), ({"cost_weight": "x"}, "cost_weight"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            CategoryRouter("hashing", **kw)
    table = synthetic(50, 6)
    with pytest.raises(ValueError, match="generalist must be one of"):
        CategoryRouter("hashing", generalist="gpt-9").fit(table)
    with pytest.raises(ValueError, match="labels must be"):
        CategoryRouter("hashing").fit(table, labels=["x"])
    no_task = RoutingTable("t", table.prompts, MODELS, table.quality, COST, table.ids)
    with pytest.raises(ValueError, match="no task column"):
        CategoryRouter("hashing").fit(no_task)


@pytest.mark.heavy  # the numbers on the docs page, on the whole LLMRouter table
def test_llmrouter_test_split(capsys):
    datasets = pytest.importorskip("moelab.gateway.datasets")
    table = datasets.load_table("llmrouter")
    train, test = table.where_split("train"), table.where_split("test")
    oracle, random_router = test.quality.max(axis=1).mean(), test.quality.mean()
    rows = {}
    for name, kw in {"category": {}, "category, budget 1.2": {"budget": 1.2}}.items():
        router = CategoryRouter("hashing", **kw).fit(train)
        cols = [test.column(m) for m in router.predict(test.prompts)]
        rows[name] = (
            test.quality[np.arange(len(test)), cols].mean(),
            test.cost[cols].mean(),
            router.val_report,
        )
    with capsys.disabled():
        for name, (q, c, rep) in rows.items():
            print(f"\nllmrouter test: {name}: quality {q:.3f}, cost {c:.3f}; validation {rep}")
    for q, _, _ in rows.values():
        assert random_router < q < oracle
    assert rows["category, budget 1.2"][2]["cost"] <= 1.2
