"""Expert cache simulators: hand-computed traces, brute-force optimum, and policy orderings."""

from __future__ import annotations

import itertools
import random
from functools import lru_cache

import pytest
import torch
from ragged_traces import padded, ragged_rows

from moelab.analysis.cache import (
    belady,
    default_cache_sizes,
    hit_rate_curve,
    lfu,
    lookahead,
    lru,
    next_use_table,
    simulate_cache,
)


def optimal_hits(rows: tuple[tuple[int, ...], ...], m: int) -> int:
    """The most hits any eviction choice can reach (exhaustive search; tiny traces only)."""

    @lru_cache(None)
    def go(t: int, cache: frozenset) -> int:
        if t == len(rows):
            return 0
        req = set(rows[t])
        hits = len(req & cache)
        need = len(cache | req) - m
        if need <= 0:
            return hits + go(t + 1, frozenset(cache | req))
        cands = sorted(cache - req)
        return hits + max(
            go(t + 1, frozenset((cache - set(v)) | req)) for v in itertools.combinations(cands, need)
        )

    return go(0, frozenset())


def lru_reference(rows: list[list[int]], m: int) -> int:
    """LRU with the most recently used expert at the end of a list; the token's experts pinned."""
    order: list[int] = []
    hits = 0
    for req in rows:
        hits += sum(1 for e in req if e in order)
        for e in req:
            if e not in order and len(order) >= m:
                victim = next(x for x in order if x not in req)
                order.remove(victim)
            if e in order:
                order.remove(e)
            order.append(e)
    return hits


def rand_rows(rng: random.Random, T: int, E: int, k: int) -> list[list[int]]:
    return [rng.sample(range(E), k) for _ in range(T)]


CYCLE = torch.tensor([[0], [1], [2], [0], [1], [2]])


def test_hand_computed_cycle():
    # E=3, k=1, cache of 2, tokens 0 1 2 0 1 2.
    assert simulate_cache(CYCLE, 3, 2, "lru").hits == 0  # LRU always evicts the next one needed
    assert simulate_cache(CYCLE, 3, 2, "lfu").hits == 0
    # Belady: at token 2 evict 1 (next use 4, farther than 0's 3); at token 4 evict 0 (never again)
    assert simulate_cache(CYCLE, 3, 2, "belady").hits == 2
    assert belady(CYCLE, 3, 2) == pytest.approx(2 / 6)
    # a one-token window already sees token 3's need for expert 0
    assert lookahead(CYCLE, 3, 2, window=1) == pytest.approx(2 / 6)
    assert lru(CYCLE, 3, 3) == pytest.approx(3 / 6)  # everything fits: only the 3 cold misses
    assert lfu(CYCLE, 3, 3) == pytest.approx(3 / 6)


def test_lfu_prefers_frequent_experts():
    # expert 0 is used often; LRU evicts it after two other experts, LFU keeps it
    rows = torch.tensor([[0], [0], [0], [1], [2], [0], [1], [2], [0]])
    assert simulate_cache(rows, 3, 2, "lfu").hits > simulate_cache(rows, 3, 2, "lru").hits


def test_lru_matches_reference_on_random_traces():
    rng = random.Random(0)
    for _ in range(40):
        E = rng.randint(2, 8)
        k = rng.randint(1, min(3, E))
        rows = rand_rows(rng, rng.randint(1, 40), E, k)
        for m in range(k, E + 1):
            assert simulate_cache(torch.tensor(rows), E, m, "lru").hits == lru_reference(rows, m)


def test_belady_is_optimal_on_small_random_traces():
    rng = random.Random(1)
    for _ in range(60):
        E = rng.randint(2, 6)
        k = rng.randint(1, min(2, E))
        rows = rand_rows(rng, rng.randint(1, 10), E, k)
        for m in range(k, E + 1):
            got = simulate_cache(torch.tensor(rows), E, m, "belady").hits
            assert got == optimal_hits(tuple(tuple(r) for r in rows), m)


def test_belady_and_lookahead_at_least_lru_on_random_traces():
    rng = random.Random(2)
    for _ in range(60):
        E = rng.randint(3, 12)
        k = rng.randint(1, min(3, E))
        rows = torch.tensor(rand_rows(rng, rng.randint(5, 80), E, k))
        for m in range(k, E + 1):
            base = simulate_cache(rows, E, m, "lru").hits
            assert simulate_cache(rows, E, m, "belady").hits >= base
            for w in (1, 4, 16):
                assert simulate_cache(rows, E, m, "lookahead", w).hits >= base


def test_lookahead_limits():
    rng = random.Random(3)
    rows = torch.tensor(rand_rows(rng, 50, 8, 2))
    for m in (2, 4, 6):
        assert simulate_cache(rows, 8, m, "lookahead", 0).hits == simulate_cache(rows, 8, m, "lru").hits
        assert simulate_cache(rows, 8, m, "lookahead", 50).hits == simulate_cache(rows, 8, m, "belady").hits


def test_next_use_table_brute_force():
    rng = random.Random(4)
    rows = rand_rows(rng, 20, 6, 2)
    table = next_use_table(torch.tensor(rows), 6).tolist()
    for t in range(20):
        for e in range(6):
            later = [u for u in range(t + 1, 20) if e in rows[u]]
            assert table[t][e] == (later[0] if later else 20)


def test_hit_rate_curve_shape_and_monotone():
    rng = random.Random(5)
    seqs = [torch.tensor(rand_rows(rng, 40, 8, 2)) for _ in range(3)]
    curve = hit_rate_curve(seqs, 8)
    assert curve["cache_size"] == [2.0, 4.0, 6.0, 8.0]
    for p in ("lru", "belady", "lookahead"):  # stack algorithms: a bigger cache never hurts
        assert all(b >= a for a, b in zip(curve[p], curve[p][1:], strict=False))
    # pooled over sequences: hits / requests
    hits = sum(simulate_cache(s, 8, 4, "lru").hits for s in seqs)
    assert curve["lru"][1] == pytest.approx(hits / (3 * 40 * 2))
    assert default_cache_sizes(3, 8) == [3, 6, 8]


def test_cache_errors():
    rows = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="cache_size"):
        simulate_cache(rows, 4, 1, "lru")  # smaller than k: a token's experts cannot all be resident
    with pytest.raises(ValueError, match="policy"):
        simulate_cache(rows, 4, 2, "fifo")
    with pytest.raises(ValueError, match="lookahead"):
        simulate_cache(rows, 4, 2, "lookahead", -1)


def test_batches_are_sequences_each_starting_cold():
    # [B, T, k]: every sequence starts with an empty cache; hits and requests add up
    rng = random.Random(11)
    batch = torch.tensor([[rng.sample(range(6), 2) for _ in range(12)] for _ in range(3)])
    for policy in ("lru", "lfu", "belady", "lookahead"):
        parts = [simulate_cache(s, 6, 3, policy) for s in batch]
        got = simulate_cache(batch, 6, 3, policy)
        assert (got.hits, got.requests) == (sum(r.hits for r in parts), sum(r.requests for r in parts))
    lru_hits = sum(simulate_cache(s, 6, 3, "lru").hits for s in batch)
    assert lru(batch, 6, 3) == pytest.approx(lru_hits / (3 * 12 * 2))


# ------------------------------------------------------------------------------------ ragged
def test_ragged_lru_matches_reference_and_belady_is_optimal():
    rng = random.Random(6)
    for _ in range(40):
        E = rng.randint(2, 6)
        kmax = rng.randint(1, min(3, E))
        rows = ragged_rows(rng, rng.randint(1, 10), E, kmax)
        idx = padded(rng, rows, kmax + rng.randint(0, 1))
        lo = max(1, max(len(r) for r in rows))
        for m in range(lo, E + 1):
            lru_res = simulate_cache(idx, E, m, "lru")
            assert lru_res.requests == sum(len(r) for r in rows)
            assert lru_res.hits == lru_reference(rows, m)
            assert simulate_cache(idx, E, m, "belady").hits == optimal_hits(tuple(tuple(r) for r in rows), m)


def test_ragged_belady_and_lookahead_at_least_lru():
    rng = random.Random(7)
    for _ in range(40):
        E = rng.randint(3, 12)
        kmax = rng.randint(1, min(4, E))
        rows = ragged_rows(rng, rng.randint(5, 60), E, kmax)
        idx = padded(rng, rows, kmax)
        for m in range(max(1, max(len(r) for r in rows)), E + 1):
            base = simulate_cache(idx, E, m, "lru").hits
            assert simulate_cache(idx, E, m, "belady").hits >= base
            for w in (1, 4):
                assert simulate_cache(idx, E, m, "lookahead", w).hits >= base


def test_ragged_next_use_and_lookahead_window_count_tokens():
    # expert 0 at tokens 0 and 3; tokens 1-2 request nothing but still are tokens
    idx = torch.tensor([[0, -1], [-1, -1], [-1, -1], [1, 0], [2, -1], [1, -1]])
    table = next_use_table(idx, 3)
    assert table[0].tolist() == [3, 3, 4] and table[1].tolist() == [3, 3, 4]
    # cache of 2, requests 0 | - | - | 1 0 | 2 | 1: LRU hits only token 3's 0 and then evicts 1 at
    # token 4 (0 was requested after it), so token 5 misses; Belady evicts 0 (never used again)
    # and hits; a one-token lookahead already sees token 5's need for 1.
    assert simulate_cache(idx, 3, 2, "lru").hits == 1
    assert simulate_cache(idx, 3, 2, "belady").hits == 2
    assert simulate_cache(idx, 3, 2, "lookahead", 1).hits == 2
    assert simulate_cache(idx, 3, 2, "lru").requests == 5


def test_ragged_cache_sizes_and_curve():
    from moelab.analysis.cache import nominal_k, ragged_cache_sizes

    per_tok = torch.tensor([2, 2, 1, 3, 2, 0])
    assert nominal_k(per_tok) == 2
    assert ragged_cache_sizes(per_tok, 8) == [3, 4, 6, 8]  # max |S_t| first, then multiples of 2
    assert ragged_cache_sizes(torch.tensor([2, 2]), 8) == default_cache_sizes(2, 8)
    rng = random.Random(8)
    rows = [ragged_rows(rng, 30, 8, 3) for _ in range(2)]
    seqs = [padded(rng, r, 3) for r in rows]
    curve = hit_rate_curve(seqs, 8)
    per = torch.tensor([len(x) for r in rows for x in r])
    assert curve["cache_size"] == [float(m) for m in ragged_cache_sizes(per, 8)]
    m = int(curve["cache_size"][0])
    hits = sum(lru_reference(r, m) for r in rows)
    assert curve["lru"][0] == pytest.approx(hits / int(per.sum()))
    with pytest.raises(ValueError, match=r"max_t \|S_t\| = 3"):
        simulate_cache(torch.tensor([[0, 1, 2], [3, -1, -1]]), 4, 2, "lru")
