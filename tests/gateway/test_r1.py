"""The ``r1`` request router (Router-R1): the protocol parser, the driver loop, the reward against
the spec written plainly (PAPERS.md item 23), the cost scaling, and REINFORCE shifting choices to
cheaper models as ``cost_coe`` rises."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from moelab.gateway.policies.r1 import (
    CostScaler,
    Endpoint,
    R1Router,
    exact_match,
    f1_score,
    parse_trajectory,
    r1_reward,
    run_protocol,
    toy_models,
    toy_task,
)
from moelab.gateway.policy import ModelInfo, RouteRequest, build_policy
from moelab.gateway.table import RoutingTable

T, S, INFO, A = (
    "<think>x</think>",
    "<search>{}</search>",
    "<information>{}</information>",
    "<answer>{}</answer>",
)


def test_parser_accepts_the_protocol():
    one = parse_trajectory(T + A.format("Paris"))
    assert one.valid and one.answer == "Paris" and one.searches == []
    text = "\n".join([T, S.format("gpt-4o: capital of France?"), INFO.format("Paris"),
                      T, S.format("llama-3 : and of Italy?"), INFO.format("Rome"), T, A.format(" Paris, Rome ")])  # fmt: skip
    two = parse_trajectory(text)
    assert two.valid, two.error
    assert two.searches == [("gpt-4o", "capital of France?"), ("llama-3", "and of Italy?")]
    assert two.informations == ["Paris", "Rome"] and two.answer == "Paris, Rome"


@pytest.mark.parametrize(
    "text, why",
    [
        (A.format("Paris"), "expected"),  # no think first
        (T + "so the answer is " + A.format("Paris"), "outside"),
        (T + A.format("Paris") + " trailing", "outside"),
        (T + "<answer>Paris", "not closed"),
        (T + "</search>" + A.format("x"), "without"),
        ("<think>a <search>m: q</search></think>" + A.format("x"), "inside"),
        (T + S.format("no colon here") + INFO.format("i") + T + A.format("x"), "Model: query"),
        (T + S.format("m: q") + T + A.format("x"), "expected"),  # a search needs its information
        (T + S.format("m: q") + INFO.format("i"), "no <answer>"),
        ((T + S.format("m: q") + INFO.format("i")) * 5 + T + A.format("x"), "max_turns"),
        (T + A.format("x") + A.format("y"), "expected"),
        ("", "no <answer>"),
    ],
)
def test_parser_rejects_malformed_output_and_the_reward_is_minus_one(text, why):
    t = parse_trajectory(text)
    assert not t.valid and why in t.error
    assert r1_reward(t.valid, 1.0, 1.0, 0.3) == -1.0


def spec_reward(valid, outcome, c, cost_coe):
    """PAPERS.md item 23, written out: -1 bad format; 0 if outcome 0; else (outcome + format)(1 - coe) + coe c."""
    fmt = 0 if valid else -1
    if fmt == -1:
        return -1
    if outcome == 0:
        return 0
    return (outcome + fmt) * (1 - cost_coe) + cost_coe * c


@pytest.mark.parametrize("valid", [True, False])
@pytest.mark.parametrize("outcome", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("c", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("coe", [0.0, 0.5, 0.9])
def test_reward_matches_the_spec(valid, outcome, c, coe):
    assert r1_reward(valid, outcome, c, coe) == pytest.approx(spec_reward(valid, outcome, c, coe))


def test_em_and_f1():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("Eiffel", ["eiffel tower", "Eiffel"]) == 1.0
    assert exact_match("tower", "eiffel tower") == 0.0
    # precision 2/3, recall 1 -> 2 * (2/3) / (5/3) = 0.8
    assert f1_score("eiffel tower paris", "the Eiffel Tower") == pytest.approx(0.8)
    assert f1_score("london", "paris") == 0.0


def percentile(xs, q):
    """Linear-interpolation percentile (numpy's default), by hand."""
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def test_cost_scaling_over_a_window_of_1000():
    rng = np.random.default_rng(0)
    early = rng.uniform(0, 1000, size=700).tolist()
    late = rng.uniform(0, 100, size=800).tolist()
    scaler = CostScaler()
    scaler(early)
    scaler(late[:-5])
    batch = late[-5:]
    got = scaler(batch)
    window = [x**0.5 for x in (early + late)[-1000:]]  # sqrt costs, the last 1000 only
    lo, hi = percentile(window, 5), percentile(window, 95)
    want = [1 - min(max((x**0.5 - lo) / (hi - lo), 0), 1) for x in batch]
    assert got == pytest.approx(want)
    flat = CostScaler()
    assert flat([4.0] * 10).tolist() == [1.0] * 10  # no spread: at p5 -> c = 1
    assert flat([9.0]).tolist() == [0.0]  # above all of the window's p95 == p5 -> c = 0


def scripted(*turns):
    it = iter(turns)
    return lambda context: next(it)


def test_driver_calls_models_and_inserts_information():
    models = {
        "cheap": Endpoint(lambda q: "Rome is the capital", 1.0),
        "big": Endpoint(lambda q: f"echo {q}", 10.0),
    }
    policy = scripted(
        T
        + S.format("cheap: capital of Italy?")
        + "<information>hallucinated</information>",  # cut at </search>
        T + S.format("big: sure?"),
        T + A.format("Rome"),
    )
    r = run_protocol("Q?", policy, models)
    assert r.trajectory.valid, r.trajectory.error
    assert r.trajectory.informations == ["Rome is the capital", "echo sure?"]
    assert [c[0] for c in r.calls] == ["cheap", "big"]
    assert r.cost == pytest.approx(1.0 * 4 + 10.0 * 2)  # price x completion tokens (words)
    assert "hallucinated" not in r.text
    unknown = run_protocol("Q?", scripted(T + S.format("gpt-9: hi"), T + A.format("?")), models)
    assert "unknown model 'gpt-9'" in unknown.trajectory.informations[0] and unknown.calls == []


def test_driver_stops_after_max_turns():
    calls = []
    models = {"m": Endpoint(lambda q: calls.append(q) or "no", 1.0)}
    r = run_protocol("Q?", lambda ctx: T + S.format("m: again"), models, max_turns=4)
    assert len(calls) == 5 and not r.trajectory.valid  # 4 allowed + the extra turn, then no answer
    assert r1_reward(r.trajectory.valid, 0.0, 1.0, 0.0) == -1.0


def test_reinforce_shifts_choices_to_cheaper_models_as_cost_coe_rises():
    t0 = time.perf_counter()
    train = [(q, g) for q, g, _ in toy_task(400, seed=1)]
    test = toy_task(200, seed=2)
    mean_cost = {}
    for coe in (0.0, 0.5):
        models, _ = toy_models(seed=0)
        router = R1Router(cost_coe=coe, seed=0)
        rewards = router.train_protocol(train, models)
        assert np.mean(rewards[-20:]) > np.mean(rewards[:20])  # it learns
        cands = [ModelInfo(m) for m in models]
        chosen = [router.route(RouteRequest(q, cands)).model for q, _, _ in test]
        mean_cost[coe] = np.mean([models[m].price for m in chosen])
        if coe == 0.0:
            assert set(chosen) == {"large"}  # quality only: the most accurate model
    assert mean_cost[0.5] < 0.5 * mean_cost[0.0]
    assert time.perf_counter() - t0 < 5.0


def test_fit_on_a_routing_table_and_state():
    rng = np.random.default_rng(0)
    n = 400
    prompts = [f"question {i}" for i in range(n)]
    quality = np.stack([rng.random(n) < 0.7, np.ones(n)], axis=1).astype(
        float
    )  # cheap 70% right, dear always
    table = RoutingTable("toy", prompts, ["cheap", "dear"], quality, np.array([1.0, 100.0]), np.arange(n))
    cands = [ModelInfo("cheap"), ModelInfo("dear"), ModelInfo("other")]
    assert R1Router(cost_coe=0.0).fit(table).route(RouteRequest("q 1", cands)).model == "dear"
    cheap = R1Router(cost_coe=0.8).fit(table)
    d = cheap.route(RouteRequest("q 1", cands))
    # expected rewards 0.7 * (0.2 + 0.8 * 1) = 0.7 for cheap vs 1 * (0.2 + 0.8 * 0) = 0.2 for dear
    assert d.model == "cheap" and d.score > 0.5
    assert cheap.route(RouteRequest("q", [ModelInfo("dear")])).model == "dear"  # masked to the candidates
    clone = build_policy("r1")
    clone.load_state_dict(json.loads(json.dumps(cheap.state_dict())))
    assert clone.route(RouteRequest("q 1", cands)).score == pytest.approx(d.score)
    rollout = clone.run(
        "What is 2 + 3?", {"cheap": Endpoint(lambda q: "5", 1.0), "dear": Endpoint(lambda q: "5", 9.0)}
    )
    assert rollout.trajectory.valid and rollout.trajectory.answer == "5" and rollout.calls[0][0] == "cheap"


def test_bad_input():
    with pytest.raises(ValueError, match="cost_coe"):
        R1Router(cost_coe=2.0)
    with pytest.raises(ValueError, match="no trained policy"):
        R1Router().route(RouteRequest("q", [ModelInfo("a")]))
    with pytest.raises(TypeError, match="RoutingTable"):
        R1Router().fit([1, 2])
    with pytest.raises(ValueError, match="weights"):
        R1Router().load_state_dict({"models": ["a"], "weights": [[0.0]]})
    with pytest.raises(ValueError, match="price"):
        Endpoint(lambda q: q, -1.0)
    with pytest.raises(ValueError, match="window"):
        CostScaler(window=0)
