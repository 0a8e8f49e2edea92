"""Load, entropy, co-activation and mutual information against plain counts."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

import moelab
from moelab.analysis.metrics import (
    coactivation,
    expert_load,
    load_matrix,
    load_stats,
    mutual_information_from_joint,
    router_entropy,
    routing_mutual_information,
    top1_experts,
    trace_metrics,
)
from moelab.core.routing import Routing


def topk_routing(
    idx: list[list[int]], E: int, weights: list[list[float]] | None = None, probs=None
) -> Routing:
    t = torch.tensor(idx)
    w = torch.tensor(weights) if weights is not None else torch.full(t.shape, 1.0 / t.shape[1])
    return Routing.from_topk(t, w, E, probs=probs)


def mi_brute(pairs: list[tuple[int, int]]) -> float:
    n = len(pairs)
    pxy = Counter(pairs)
    px = Counter(a for a, _ in pairs)
    py = Counter(b for _, b in pairs)
    return sum(c / n * math.log((c / n) / (px[a] / n * py[b] / n)) for (a, b), c in pxy.items())


def test_load_stats_hand_computed():
    # E=4: expert 0 gets 3 assignments, 1 gets 1, 2 gets 2, 3 none
    r = topk_routing([[0, 1], [0, 2], [0, 2]], 4)
    assert expert_load(r).tolist() == pytest.approx([0.5, 1 / 6, 1 / 3, 0.0])
    s = load_stats(r)
    mean = 6 / 4
    std = math.sqrt(((3 - mean) ** 2 + (1 - mean) ** 2 + (2 - mean) ** 2 + mean**2) / 4)
    assert s["max_over_mean"] == pytest.approx(3 / mean)
    assert s["cv"] == pytest.approx(std / mean)
    assert s["dead_experts"] == 1
    assert s["drop_rate"] == 0.0
    assert s["tokens"] == 3 and s["assignments"] == 6


def test_drop_rate_from_requested():
    r = Routing(
        token_index=torch.tensor([0, 1]),
        expert_index=torch.tensor([0, 1]),
        weight=torch.ones(2),
        num_tokens=3,
        num_experts=2,
        requested=torch.tensor([2, 2]),
    )
    assert load_stats(r)["drop_rate"] == pytest.approx(0.5)


def test_router_entropy_plain_formula():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    r = topk_routing([[0, 1], [2, 3], [0, 1]], 4, probs=probs)
    want = (math.log(2) + math.log(4) + 0.0) / 3 / math.log(4)
    assert router_entropy(r) == pytest.approx(want)
    assert math.isnan(router_entropy(topk_routing([[0, 1]], 4)))


def test_coactivation_brute_force():
    rng = random.Random(0)
    idx = [rng.sample(range(6), 3) for _ in range(30)]
    c = coactivation(topk_routing(idx, 6))
    for i in range(6):
        for j in range(6):
            assert c[i, j] == sum(1 for row in idx if i in row and j in row)
    cond = coactivation(topk_routing(idx, 6), normalize="row")
    assert cond[2, 4] == pytest.approx(c[2, 4] / c[2, 2])
    with pytest.raises(ValueError, match="normalize"):
        coactivation(topk_routing(idx, 6), normalize="col")


def test_top1_uses_the_largest_weight():
    r = topk_routing([[3, 1], [0, 2]], 4, weights=[[0.2, 0.8], [0.6, 0.4]])
    assert top1_experts(r).tolist() == [1, 0]


def test_top1_mutual_information_brute_force():
    rng = random.Random(1)
    T, E = 200, 5
    a = [rng.sample(range(E), 2) for _ in range(T)]
    # the next layer's top-1 depends on the previous one's half of the time
    b = [[row[0], (row[0] + 1) % E] if rng.random() < 0.5 else rng.sample(range(E), 2) for row in a]
    wa = [[0.7, 0.3]] * T
    ra, rb = topk_routing(a, E, wa), topk_routing(b, E, wa)
    res = routing_mutual_information(ra, rb, "top1")
    want = mi_brute([(x[0], y[0]) for x, y in zip(a, b, strict=True)])
    assert res["mi"] == pytest.approx(want, abs=1e-12)
    hx = -sum(c / T * math.log(c / T) for c in Counter(x[0] for x in a).values())
    hy = -sum(c / T * math.log(c / T) for c in Counter(y[0] for y in b).values())
    assert res["nmi"] == pytest.approx(want / math.sqrt(hx * hy))
    # a layer with itself: I(X; X) = H(X), NMI = 1
    self_mi = routing_mutual_information(ra, ra, "top1")
    assert self_mi["mi"] == pytest.approx(hx) and self_mi["nmi"] == pytest.approx(1.0)


def test_set_mutual_information_brute_force():
    rng = random.Random(2)
    T, E = 120, 4
    a = [rng.sample(range(E), 2) for _ in range(T)]
    b = [rng.sample(range(E), 2) if rng.random() < 0.5 else list(row) for row in a]
    # each token contributes 1/(|A||B|) to every (i in A, j in B): expand to equally weighted pairs
    pairs = [(i, j) for x, y in zip(a, b, strict=True) for i in x for j in y]
    got = routing_mutual_information(topk_routing(a, E), topk_routing(b, E), "set")["mi"]
    assert got == pytest.approx(mi_brute(pairs), abs=1e-12)


def test_mutual_information_of_independent_joint_is_zero():
    joint = torch.outer(torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.4]))
    assert mutual_information_from_joint(joint) == pytest.approx(0.0, abs=1e-12)


def test_mi_errors():
    with pytest.raises(ValueError, match="same tokens"):
        routing_mutual_information(topk_routing([[0]], 2), topk_routing([[0], [1]], 2))
    with pytest.raises(ValueError, match="mode"):
        routing_mutual_information(topk_routing([[0]], 2), topk_routing([[0]], 2), "pairs")
    with pytest.raises(TypeError, match="moelab.Routing"):
        load_stats(torch.zeros(3))


def test_trace_metrics_agree_with_trace_summary():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        moelab.MoE(16, num_experts=4, top_k=2), moelab.MoE(16, num_experts=4, top_k=2)
    )
    with moelab.trace(model) as tr:
        model(torch.randn(2, 12, 16))
    rows = trace_metrics(tr)
    summary = tr.summary()
    assert [r["layer"] for r in rows] == tr.layers
    for r, s in zip(rows, summary, strict=True):
        assert r["max_over_mean"] == pytest.approx(s["max_over_mean"])
        assert r["cv"] == pytest.approx(s["cv"])
        assert r["entropy"] == pytest.approx(s["entropy"], abs=1e-6)
    assert math.isnan(rows[0]["mi_top1"]) and not math.isnan(rows[1]["mi_top1"])
    assert load_matrix(tr).shape == (2, 4)
