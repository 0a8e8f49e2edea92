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
    routing_stats,
    top1_experts,
    trace_metrics,
)
from moelab.core import stats as core_stats
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
    s = routing_stats(r)
    assert load_stats(r.tokens_per_expert()) == {k: s[k] for k in load_stats(r.tokens_per_expert())}
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
    assert routing_stats(r)["drop_rate"] == pytest.approx(0.5)


def test_routing_statistics_are_the_core_definitions():
    # one definition of the routing statistics: analysis re-exports moelab.core.stats
    assert load_stats is core_stats.load_stats
    assert router_entropy is core_stats.router_entropy
    assert routing_stats is core_stats.routing_stats


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
        routing_stats(torch.zeros(3))


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


# ------------------------------------------------------------------------ COO paths, ragged input
def ragged_coo(rng: random.Random, T: int, E: int, kmax: int, duplicates: bool = False):
    """A routing whose tokens have 0..kmax experts in random entry order, random weights, and
    (optionally) repeated (token, expert) entries. Returns it with its entries as a list."""
    entries = []
    for t in range(T):
        for e in rng.sample(range(E), rng.randint(0, kmax)):
            entries.append((t, e, rng.choice([0.25, 0.5, rng.random()])))
            if duplicates and rng.random() < 0.3:
                entries.append((t, e, rng.random()))
    rng.shuffle(entries)
    r = Routing(
        torch.tensor([t for t, _, _ in entries], dtype=torch.long),
        torch.tensor([e for _, e, _ in entries], dtype=torch.long),
        torch.tensor([w for _, _, w in entries], dtype=torch.float64),
        num_tokens=T,
        num_experts=E,
    )
    return r, entries


def test_top1_from_entries_matches_a_plain_loop():
    rng = random.Random(3)
    for _ in range(20):
        r, entries = ragged_coo(rng, 30, 6, 4, duplicates=True)
        summed: dict[tuple[int, int], float] = {}
        for t, e, w in entries:
            summed[(t, e)] = summed.get((t, e), 0.0) + w
        want = []
        for t in range(30):
            mine = sorted((e, w) for (tt, e), w in summed.items() if tt == t)
            best = max((w for _, w in mine), default=None)
            want.append(-1 if best is None else min(e for e, w in mine if w == best))
        assert top1_experts(r).tolist() == want


def test_coactivation_of_ragged_routing_matches_a_plain_loop():
    rng = random.Random(4)
    r, entries = ragged_coo(rng, 40, 5, 5, duplicates=True)
    sets = [{e for t, e, _ in entries if t == tt} for tt in range(40)]
    c = coactivation(r)
    for i in range(5):
        for j in range(5):
            assert c[i, j] == sum(1 for s in sets if i in s and j in s)
    assert coactivation(r, normalize="tokens")[1, 2] == pytest.approx(float(c[1, 2]) / 40)


def test_set_mutual_information_of_ragged_routings_matches_a_plain_loop():
    rng = random.Random(5)
    T, Ea, Eb = 60, 5, 7
    ra, ea = ragged_coo(rng, T, Ea, 3)
    rb, eb = ragged_coo(rng, T, Eb, 4)
    sa = [{e for t, e, _ in ea if t == tt} for tt in range(T)]
    sb = [{e for t, e, _ in eb if t == tt} for tt in range(T)]
    joint: dict[tuple[int, int], float] = {}
    for a, b in zip(sa, sb, strict=True):
        for i in a:
            for j in b:
                joint[(i, j)] = joint.get((i, j), 0.0) + 1.0 / (len(a) * len(b))
    total = sum(joint.values())
    px: dict[int, float] = {}
    py: dict[int, float] = {}
    for (i, j), v in joint.items():
        px[i] = px.get(i, 0.0) + v / total
        py[j] = py.get(j, 0.0) + v / total
    want = sum(v / total * math.log((v / total) / (px[i] * py[j])) for (i, j), v in joint.items())
    got = routing_mutual_information(ra, rb, "set")
    assert got["mi"] == pytest.approx(want, abs=1e-12)
    assert got["h_x"] == pytest.approx(-sum(p * math.log(p) for p in px.values()))
