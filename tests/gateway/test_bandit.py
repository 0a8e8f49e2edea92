"""The ``bandit`` request router: Beta and Elo updates against the formulas written plainly,
Thompson sampling converging on Bernoulli arms, the hybrid score, and JSON state round trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moelab.gateway.policies.bandit import BanditRouter, elo_expected, elo_update
from moelab.gateway.policy import Feedback, ModelInfo, RouteRequest, build_policy


def request(*names: str, costs: tuple[float, ...] | None = None) -> RouteRequest:
    costs = costs or (0.0,) * len(names)
    return RouteRequest("hi", [ModelInfo(n, cost_in=c) for n, c in zip(names, costs, strict=True)])


def test_beta_posterior_is_prior_plus_rewards():
    rewards = [1.0, 0.0, 0.25, 1.0, 0.5]
    b = BanditRouter(prior=(2.0, 3.0))
    for r in rewards:
        b.feedback(Feedback("m", r))
    assert b.alpha["m"] == pytest.approx(2.0 + sum(rewards))
    assert b.beta["m"] == pytest.approx(3.0 + sum(1 - r for r in rewards))
    assert b.posterior_mean("m") == pytest.approx((2 + 2.75) / (5 + 5))


def test_elo_expected_and_update_equal_the_formula():
    # P(i beats j) = 1 / (1 + 10^((Rj - Ri)/400)), written out for 1600 vs 1400
    assert elo_expected(1600, 1400) == pytest.approx(1 / (1 + 10 ** (-200 / 400)))
    assert elo_expected(1500, 1500) == 0.5
    b = BanditRouter(mode="elo", k=32)
    b.feedback(Feedback("a", 1.0, loser="b"))  # equal ratings: winner +K/2, loser -K/2
    assert (b.rating["a"], b.rating["b"]) == (pytest.approx(1516.0), pytest.approx(1484.0))
    ra, rb = b.rating["a"], b.rating["b"]
    b.feedback(Feedback("b", 1.0, loser="a"))  # the upset moves more: K * (1 - E_b)
    e_b = 1 / (1 + 10 ** ((ra - rb) / 400))
    assert b.rating["b"] == pytest.approx(rb + 32 * (1 - e_b))
    assert b.rating["a"] == pytest.approx(ra + 32 * (0 - (1 - e_b)))
    assert b.rating["a"] + b.rating["b"] == pytest.approx(3000.0)  # Elo is zero-sum
    # a tie between equals changes nothing; reward 0.5 with a loser is a tie
    assert elo_update(1500, 1500, 32, 0.5) == (1500.0, 1500.0)
    assert b.comparisons == {"a": 2, "b": 2}


def test_self_feedback_moves_a_tenth_of_k():
    b = BanditRouter(mode="elo", k=32, self_feedback=0.1)
    b.feedback(Feedback("a", 1.0))
    b.feedback(Feedback("c", 0.0))
    b.feedback(Feedback("d", 0.5))
    assert b.rating == {"a": 1503.2, "c": 1496.8, "d": 1500.0}


def test_elo_mode_routes_to_the_top_rating():
    b = BanditRouter(mode="elo")
    assert b.route(request("x", "y", "z")).model == "x"  # ties: config order
    b.feedback(Feedback("z", 1.0, loser="x"))
    d = b.route(request("x", "y", "z"))
    assert d.model == "z"
    # score: the Bradley-Terry share 10^(R/400) / sum
    r = [b.rating.get(n, 1500.0) for n in "xyz"]
    assert d.score == pytest.approx(10 ** (r[2] / 400) / sum(10 ** (v / 400) for v in r))


def test_thompson_converges_to_the_best_arm():
    p = {"a": 0.3, "b": 0.5, "c": 0.7}
    b = BanditRouter(mode="thompson", seed=1)
    env = np.random.default_rng(123)
    regret, picks = [], []
    for _ in range(2000):
        m = b.route(request(*p)).model
        b.feedback(Feedback(m, float(env.random() < p[m])))
        picks.append(m)
        regret.append(max(p.values()) - p[m])
    cum = np.cumsum(regret)
    assert np.mean([m == "c" for m in picks[-500:]]) > 0.9
    # sublinear regret: doubling the horizon adds far less than doubling the regret
    assert cum[-1] < 1.5 * cum[999]
    uniform = np.mean([max(p.values()) - v for v in p.values()]) * 2000  # a uniform router's: 0.2 T
    assert cum[-1] < 0.25 * uniform


def test_hybrid_score_is_the_weighted_sum():
    b = BanditRouter(mode="hybrid", hybrid_weights={"elo": 0.5, "thompson": 0.0, "cost": 0.5})
    # equal ratings, no Thompson weight: the cheapest model wins
    assert b.route(request("a", "b", "c", costs=(3.0, 1.0, 2.0))).model == "b"
    b.feedback(Feedback("a", 1.0, loser="b"))
    ra, rb, rc = b.rating["a"], b.rating["b"], 1500.0
    e = lambda i, j: 1 / (1 + 10 ** ((j - i) / 400))  # noqa: E731
    elo_part = {
        "a": (e(ra, rb) + e(ra, rc)) / 2,
        "b": (e(rb, ra) + e(rb, rc)) / 2,
        "c": (e(rc, ra) + e(rc, rb)) / 2,
    }
    cost_part = {"a": 1 - (3 - 1) / 2, "b": 1.0, "c": 1 - (2 - 1) / 2}
    want = {m: 0.5 * elo_part[m] + 0.5 * cost_part[m] for m in "abc"}
    d = b.route(request("a", "b", "c", costs=(3.0, 1.0, 2.0)))
    assert d.model == max(want, key=want.get)
    assert d.score == pytest.approx(max(want.values()))


def test_state_round_trips_through_json_including_the_rng():
    a = BanditRouter(mode="hybrid", seed=7)
    for i in range(30):
        a.feedback(Feedback("xyz"[i % 3], (i % 4) / 3, loser="xyz"[(i + 1) % 3] if i % 2 else None))
    a.route(request("x", "y", "z"))
    state = json.loads(json.dumps(a.state_dict()))
    b = BanditRouter(mode="hybrid", seed=999)
    b.load_state_dict(state)
    seq_a = [a.route(request("x", "y", "z")).model for _ in range(25)]
    seq_b = [b.route(request("x", "y", "z")).model for _ in range(25)]
    assert seq_a == seq_b
    assert (a.alpha, a.beta, a.rating) == (b.alpha, b.beta, b.rating)


def test_workers_sharing_state_equal_one_process():
    """Two workers doing load -> feedback -> save on one store end where one bandit ends."""
    fbs = [
        Feedback("xy"[i % 2], [1.0, 0.0, 0.5][i % 3], loser="yx"[i % 2] if i % 3 == 0 else None)
        for i in range(12)
    ]
    single = BanditRouter(mode="elo")
    for fb in fbs:
        single.feedback(fb)
    store: dict = {}
    workers = [BanditRouter(mode="elo"), BanditRouter(mode="elo")]
    for i, fb in enumerate(fbs):
        w = workers[i % 2]
        w.load_state_dict(json.loads(json.dumps(store)))
        w.feedback(fb)
        store = w.state_dict()
    assert store["models"] == single.state_dict()["models"]


def test_built_by_name_and_bad_input():
    assert isinstance(build_policy("bandit", mode="elo", k=16), BanditRouter)
    with pytest.raises(ValueError, match="mode"):
        BanditRouter(mode="ucb")
    with pytest.raises(ValueError, match="prior"):
        BanditRouter(prior=(0.0, 1.0))
    with pytest.raises(ValueError, match="hybrid_weights"):
        BanditRouter(hybrid_weights={"elo": 1.0})
    b = BanditRouter()
    with pytest.raises(ValueError, match="reward"):
        b.feedback(Feedback("a", 1.5))
    with pytest.raises(ValueError, match="reward"):
        b.feedback(Feedback("a", math.nan))
    with pytest.raises(ValueError, match="loser"):
        b.feedback(Feedback("a", 1.0, loser="a"))
    with pytest.raises(ValueError, match="keys"):
        b.load_state_dict({"models": {}})
    with pytest.raises(ValueError, match="empty"):
        b.route(RouteRequest("hi", []))
