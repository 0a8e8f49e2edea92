"""A routing cut into sequences (``split_sequences``) against plain loops, and the [B, T, k] form."""

from __future__ import annotations

import random

import pytest
import torch

import moelab
import moelab.analysis as A
from moelab.analysis.cache import hit_rate_curve, simulate_cache
from moelab.analysis.sequences import PAD, ragged_summary, split_sequences
from moelab.core.routing import Routing


def coo_routing(rows: list[list[int]], E: int, **kw) -> Routing:
    """Token t on the experts rows[t], in that entry order, each weight 1 / |S_t|."""
    tok = [t for t, r in enumerate(rows) for _ in r]
    exp = [e for r in rows for e in r]
    w = [1.0 / len(r) for r in rows for _ in r]
    return Routing(
        torch.tensor(tok, dtype=torch.long),
        torch.tensor(exp, dtype=torch.long),
        torch.tensor(w),
        num_tokens=len(rows),
        num_experts=E,
        **kw,
    )


def test_top_k_routing_keeps_the_router_order():
    idx = torch.tensor([[3, 1], [0, 2], [2, 0], [1, 3], [0, 1]])
    r = Routing.from_topk(idx, torch.full(idx.shape, 0.5), 4)
    seqs = split_sequences(r, [2, 3])
    assert [s.tolist() for s in seqs] == [idx[:2].tolist(), idx[2:].tolist()]


def test_uniform_k_without_top_k_gives_ascending_ids():
    # shuffled entries (as expert choice or a capacity router with nothing dropped would give)
    rng = random.Random(0)
    rows = [rng.sample(range(6), 2) for _ in range(10)]
    entries = [(t, e) for t, r in enumerate(rows) for e in r]
    rng.shuffle(entries)
    r = Routing(
        torch.tensor([t for t, _ in entries]),
        torch.tensor([e for _, e in entries]),
        torch.ones(len(entries)),
        num_tokens=10,
        num_experts=6,
    )
    seqs = split_sequences(r, [4, 6])
    assert torch.cat(seqs).tolist() == [sorted(row) for row in rows]


def test_ragged_routing_is_padded_in_entry_order():
    rows = [[2], [], [0, 3, 1], [1, 0], []]
    r = coo_routing(rows, 4)
    seqs = split_sequences(r, [3, 2])
    want = [row + [PAD] * (3 - len(row)) for row in rows]
    assert torch.cat(seqs).tolist() == want
    info = ragged_summary(r)
    assert info["experts_per_token_min"] == 0 and info["experts_per_token_max"] == 3
    assert info["experts_per_token_mean"] == pytest.approx(6 / 5)
    assert info["tokens_without_expert"] == pytest.approx(2 / 5) and info["nominal_k"] == 1
    assert info["capacity_dropped"] is None  # no request counts recorded
    assert ragged_summary(coo_routing([[0, 1], [2, 3]], 4)) is None


def test_empty_routing_and_bad_lengths():
    empty = coo_routing([[], [], []], 4)
    assert split_sequences(empty, [3]) is None
    r = coo_routing([[0], [1], [2]], 4)
    with pytest.raises(ValueError, match="sum to 2, the routing has T=3"):
        split_sequences(r, [1, 1])
    with pytest.raises(TypeError, match=r"lengths must be a list .*\[S\] \* B"):
        split_sequences(r, torch.tensor([3]))
    with pytest.raises(ValueError, match="ints >= 0"):
        split_sequences(r, [4, -1])
    with pytest.raises(TypeError, match="moelab.Routing"):
        split_sequences(torch.zeros(3, 2), [3])


def test_batch_form_is_per_sequence_and_a_routing_is_refused_with_the_fix():
    torch.manual_seed(0)
    layer = moelab.MoE(16, num_experts=8, top_k=2)
    with moelab.trace(layer) as tr:
        layer(torch.randn(3, 24, 16))
    r = tr.routing(tr.layers[0])
    batch = r.topk_index().view(3, 24, 2)
    seqs = A.split_sequences(r, [24] * 3)
    assert all(torch.equal(a, b) for a, b in zip(seqs, batch, strict=True))
    # [B, T, k] pools per-sequence windows: the same as the list of sequences
    assert A.srp(batch, 8, 8) == pytest.approx(A.srp_sequences(seqs, 8, 8))
    assert hit_rate_curve(batch, 8)["lru"] == pytest.approx(hit_rate_curve(seqs, 8)["lru"])
    for fn in (
        lambda: A.srp(r, 8, 8),
        lambda: A.sch(r, 8, 8, 2),
        lambda: hit_rate_curve(r, 8),
        lambda: simulate_cache(r, 8, 2),
    ):
        with pytest.raises(TypeError, match=r"got a Routing: pass routing.topk_index\(\).view\(B, S, k\)"):
            fn()
