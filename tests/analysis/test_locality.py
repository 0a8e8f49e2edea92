"""``moelab.analysis.locality``: one point per layer, against hand-computed routings."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.analysis.cache import first_tokens, simulate_cache
from moelab.analysis.locality import KEYS, layer_locality
from moelab.analysis.lrc import sch_curve, srp_sequences
from moelab.core import Routing


def constant_routing(T: int, experts=(0, 1), E: int = 8) -> Routing:
    idx = torch.tensor([list(experts)] * T)
    return Routing.from_topk(idx, torch.full(idx.shape, 0.5), E)


def test_constant_routing_by_hand():
    # Two sequences of 32 tokens, every token on experts {0, 1}: one set covers every window
    # (SRP 1), SCH counts first uses as hits when the cache has room (1 at m = k), and a cold
    # cache of 2k = 4 misses only the two first uses per sequence: (64 - 2) / 64 per sequence.
    res = layer_locality(constant_routing(64), [32, 32])
    assert res["srp"] == pytest.approx(1.0)
    assert res["sch_k"] == pytest.approx(1.0) and res["sch_2k"] == pytest.approx(1.0)
    for p in ("lru", "lfu", "belady", "lookahead"):
        assert res[p] == pytest.approx(62 / 64)
    assert (res["k"], res["cache_size"], res["segment_length"]) == (2, 4, 16)


def test_matches_the_curves_on_a_trained_looking_routing():
    torch.manual_seed(0)
    layer = moelab.MoE(16, num_experts=8, top_k=2, router="topk")
    with moelab.trace(layer) as tr:
        layer(torch.randn(6, 24, 16))
    r = tr.routing(tr.layers[0])
    res = layer_locality(r, [24] * 6, max_cache_tokens=50)
    seqs = list(torch.split(r.topk_index(), [24] * 6))
    assert res["srp"] == pytest.approx(srp_sequences(seqs, 8, 16))
    curve = sch_curve(seqs, 8, 16)
    assert (res["sch_k"], res["sch_2k"]) == pytest.approx((float(curve[1]), float(curve[3])))
    # the caches read the first 50 tokens: two whole sequences and 2 tokens of the third
    fed = first_tokens(seqs, 50)
    assert [int(s.shape[0]) for s in fed] == [24, 24, 2]
    hits = sum(simulate_cache(s, 8, 4, "lru").hits for s in fed)
    assert res["lru"] == pytest.approx(hits / (50 * 2))


def test_k_override_and_undefined_cases():
    # capacity drops leave 1..2 experts per token; the router's k keeps the cache at 2k = 4
    idx = torch.tensor([[0, 1], [2, 3]] * 8)
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[::3, 1] = False
    tok = torch.arange(16).unsqueeze(1).expand(16, 2)[keep]
    r = Routing(tok, idx[keep], torch.full((int(keep.sum()),), 0.5), num_tokens=16, num_experts=8)
    assert layer_locality(r, [16], k=2)["cache_size"] == 4
    # sequences shorter than L: SRP is undefined, the rest is not
    short = layer_locality(constant_routing(8), [8])
    assert math.isnan(short["srp"]) and short["sch_k"] == pytest.approx(1.0)
    # no token reached an expert: everything is NaN
    empty = Routing(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), num_tokens=4,
        num_experts=8,
    )  # fmt: skip
    out = layer_locality(empty, [4])
    assert all(math.isnan(out[key]) for key in KEYS)
