"""SRP / SCH against plain loops written from the rules of ljcleo/moe-lrc, and the bootstrap."""

from __future__ import annotations

import math
import random

import pytest
import torch
from ragged_traces import padded, ragged_rows

from moelab.analysis import lrc, sequences
from moelab.analysis.lrc import (
    SEGMENT_LENGTHS,
    sch,
    sch_ci,
    sch_curve,
    srp,
    srp_ci,
    srp_sequences,
)
from moelab.analysis.stats import bootstrap_ci


# ------------------------------------------------------------------------------------ references
def srp_brute(seqs: list[list[list[int]]], E: int, L: int) -> float:
    """Every window, every threshold, summed over windows and experts, then the best F1."""
    M = [0] * (L + 1)
    P = [0] * (L + 1)
    A = 0
    for seq in seqs:
        for s in range(len(seq) - L + 1):
            c = [0] * E
            for t in range(s, s + L):
                for e in seq[t]:
                    c[e] += 1
            A += sum(c)
            for tau in range(L + 1):
                M[tau] += sum(x for x in c if x >= tau)
                P[tau] += L * sum(1 for x in c if x >= tau)
    return max(2 * M[t] / max(P[t] + A, 1) for t in range(L + 1))


def sch_brute(seq: list[list[int]], E: int, L: int) -> list[float]:
    """A Mattson stack kept as a Python list, priority (uses in [t, t+L), last use).

    Rows may differ in length (a ragged routing; an empty row requests nothing): the rate is
    hits / sum_t |S_t|, which is hits / (T k) for a plain top-k trace.
    """
    T, requests = len(seq), sum(len(r) for r in seq)
    count = [0] * E
    for t in range(min(L, T)):
        for e in seq[t]:
            count[e] += 1
    last = [0] * E
    clock = 0
    stack: list[int] = []
    depth_hits = [0] * E
    for t, row in enumerate(seq):
        start = list(stack)
        fresh = len(start)
        for e in row:
            if e in start:
                depth_hits[start.index(e)] += 1
            else:
                depth_hits[fresh] += 1
                fresh += 1
        for e in row:
            d = stack.index(e) if e in stack else len(stack)
            if d == len(stack):
                stack.append(-1)
            if d > 0:
                carry = stack[0]
                for j in range(1, d):
                    if (count[stack[j]], last[stack[j]]) < (count[carry], last[carry]):
                        stack[j], carry = carry, stack[j]
                stack[d] = carry
            stack[0] = e
            clock += 1
            count[e] -= 1
            last[e] = clock
        if t + L < T:
            for e in seq[t + L]:
                count[e] += 1
    out, acc = [], 0
    for h in depth_hits:
        acc += h
        out.append(acc / requests if requests else float("nan"))
    return out


def random_trace(rng: random.Random, T: int, E: int, k: int, sticky: float = 0.5) -> list[list[int]]:
    rows: list[list[int]] = []
    for _ in range(T):
        if rows and rng.random() < sticky:
            rows.append(list(rows[-1]))
        else:
            rows.append(rng.sample(range(E), k))
    return rows


# ------------------------------------------------------------------------------------ SRP
def test_srp_is_one_when_every_window_uses_the_same_experts():
    seq = torch.tensor([[2, 5]] * 40)
    for L in (1, 4, 16):
        assert srp(seq, 8, L) == pytest.approx(1.0)
    # several sequences, each constant on its own experts: pooled SRP is still 1
    batch = torch.stack(
        [torch.tensor([[0, 1]] * 20), torch.tensor([[3, 7]] * 20), torch.tensor([[4, 2]] * 20)]
    )
    assert srp(batch, 8, 4) == pytest.approx(1.0)


def test_srp_hand_computed():
    # windows of [0,0,1,0] with L=2: counts (2,0,0) (1,1,0) (1,1,0); A = 6
    # tau=0: 2*6/(18+6) = 0.5; tau=1: 2*6/(10+6) = 0.75; tau=2: 2*2/(2+6) = 0.5
    seq = torch.tensor([[0], [0], [1], [0]])
    assert srp(seq, 3, 2) == pytest.approx(0.75)


def test_srp_matches_brute_force_on_random_traces():
    rng = random.Random(0)
    for _ in range(25):
        E = rng.randint(2, 10)
        k = rng.randint(1, min(4, E))
        L = rng.choice([1, 2, 4, 7, 16])
        seqs = [random_trace(rng, rng.randint(L, 40), E, k, rng.random()) for _ in range(rng.randint(1, 3))]
        got = srp_sequences([torch.tensor(s) for s in seqs], E, L)
        assert got == pytest.approx(srp_brute(seqs, E, L), abs=1e-12)


def test_srp_of_one_sequence_equals_srp_sequences():
    rng = random.Random(1)
    seq = random_trace(rng, 50, 6, 2)
    assert srp(torch.tensor(seq), 6, 4) == pytest.approx(srp_brute([seq], 6, 4))


def test_srp_errors():
    seq = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="segment_length"):
        srp(seq, 4, 0)
    with pytest.raises(ValueError, match="longer than every sequence"):
        srp(seq, 4, 3)
    with pytest.raises(ValueError, match=r"lie in \[0, num_experts=2\)"):
        srp(seq, 2, 1)
    with pytest.raises(ValueError, match="distinct"):
        srp(torch.tensor([[1, 1]]), 4, 1)
    with pytest.raises(TypeError, match="integer"):
        srp(seq.float(), 4, 1)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        srp(torch.tensor([0, 1]), 4, 1)
    with pytest.raises(ValueError, match="num_experts"):
        srp(seq, 0, 1)


# ------------------------------------------------------------------------------------ SCH
def test_sch_hand_computed():
    # k=1, E=3, tokens 0,1,2,0, L=4. After token 2 the stack is [2, 0, 1]: expert 0 (one more use
    # ahead) outranks the more recent expert 1 (none ahead), so token 3 hits at depth 1.
    # depths: 0 (new, 0 seen before), 1 (new), 2 (new), 1  ->  hit rates 1/4, 3/4, 4/4
    seq = torch.tensor([[0], [1], [2], [0]])
    assert sch_curve(seq, 3, 4).tolist() == pytest.approx([0.25, 0.75, 1.0])
    assert sch(seq, 3, 4, 2) == pytest.approx(0.75)
    # with L=1 only the current token counts: recency decides, expert 0 sits at depth 2
    assert sch_curve(seq, 3, 1).tolist() == pytest.approx([0.25, 0.5, 1.0])


def test_sch_matches_brute_force_on_random_traces():
    rng = random.Random(2)
    for _ in range(30):
        E = rng.randint(2, 10)
        k = rng.randint(1, min(4, E))
        L = rng.choice([1, 2, 4, 16, 64])
        seq = random_trace(rng, rng.randint(1, 50), E, k, rng.random())
        got = sch_curve(torch.tensor(seq), E, L)
        assert got.tolist() == pytest.approx(sch_brute(seq, E, L), abs=1e-12)


def test_sch_batched_sequences_equal_one_by_one():
    rng = random.Random(3)
    seqs = [random_trace(rng, 30, 8, 2) for _ in range(4)] + [random_trace(rng, 17, 8, 2)]
    curves = lrc.sch_curves([torch.tensor(s) for s in seqs], 8, 4)
    for i, s in enumerate(seqs):
        assert curves[i].tolist() == pytest.approx(sch_brute(s, 8, 4), abs=1e-12)
    assert sch_curve([torch.tensor(s) for s in seqs], 8, 4).tolist() == pytest.approx(curves.mean(0).tolist())


def test_sch_full_cache_hits_everything_and_curve_is_monotone():
    rng = random.Random(4)
    seq = torch.tensor(random_trace(rng, 60, 6, 2))
    curve = sch_curve(seq, 6, 16)
    assert float(curve[-1]) == pytest.approx(1.0)
    assert bool((curve[1:] >= curve[:-1]).all())


def test_sch_errors():
    seq = torch.tensor([[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="cache_size"):
        sch(seq, 4, 2, 0)
    with pytest.raises(ValueError, match="cache_size"):
        sch(seq, 4, 2, 5)
    with pytest.raises(ValueError, match="segment_length"):
        sch(seq, 4, -1, 2)


# ------------------------------------------------------------------------------------ intervals
def test_paper_segment_lengths():
    assert SEGMENT_LENGTHS == (4, 16, 64, 256)


def test_bootstrap_interval_contains_point_estimate():
    rng = random.Random(5)
    seqs = [torch.tensor(random_trace(rng, 64, 8, 2, 0.6)) for _ in range(16)]
    for L in (4, 16):
        ci = srp_ci(seqs, 8, L, n_boot=300, seed=1)
        assert ci.low <= ci.estimate <= ci.high
        assert ci.low < ci.high
        for c in sch_ci(seqs, 8, L, n_boot=300, seed=1)[:-1]:
            assert c.low <= c.estimate <= c.high


def test_fast_srp_ci_equals_generic_bootstrap():
    rng = random.Random(6)
    seqs = [torch.tensor(random_trace(rng, 32, 8, 2)) for _ in range(10)]
    fast = srp_ci(seqs, 8, 4, n_boot=60, seed=3)
    slow = bootstrap_ci(lambda s: srp_sequences(s, 8, 4), seqs, n_boot=60, seed=3)
    assert (fast.estimate, fast.low, fast.high) == pytest.approx(
        (slow.estimate, slow.low, slow.high), abs=1e-12
    )
    fast_sch = sch_ci(seqs, 8, 4, n_boot=60, seed=3)[3]
    slow_sch = bootstrap_ci(lambda s: float(sch_curve(s, 8, 4)[3]), seqs, n_boot=60, seed=3)
    assert (fast_sch.estimate, fast_sch.low, fast_sch.high) == pytest.approx(
        (slow_sch.estimate, slow_sch.low, slow_sch.high), abs=1e-12
    )


# ------------------------------------------------------------------------------------ ragged
def test_srp_on_ragged_traces_matches_brute_force():
    # srp_brute reads each token's own set, so it is the rule for ragged routings as it stands
    rng = random.Random(7)
    for _ in range(25):
        E = rng.randint(2, 10)
        kmax = rng.randint(1, min(4, E))
        L = rng.choice([1, 2, 4, 7])
        seqs = [ragged_rows(rng, rng.randint(L, 40), E, kmax, rng.random()) for _ in range(rng.randint(1, 3))]
        if not any(any(r) for r in seqs):
            continue
        width = kmax + rng.randint(0, 2)  # extra all-padding columns change nothing
        got = srp_sequences([padded(rng, s, width) for s in seqs], E, L)
        assert got == pytest.approx(srp_brute(seqs, E, L), abs=1e-12)


def test_sch_on_ragged_traces_matches_brute_force():
    rng = random.Random(8)
    for _ in range(30):
        E = rng.randint(2, 10)
        kmax = rng.randint(1, min(4, E))
        L = rng.choice([1, 2, 4, 16, 64])
        seq = ragged_rows(rng, rng.randint(1, 50), E, kmax, rng.random())
        if not any(seq):
            continue
        got = sch_curve(padded(rng, seq, kmax + rng.randint(0, 1)), E, L)
        assert got.tolist() == pytest.approx(sch_brute(seq, E, L), abs=1e-12)


def test_ragged_batches_equal_one_by_one_and_skip_empty_sequences():
    rng = random.Random(9)
    seqs = [ragged_rows(rng, 25, 6, 3) for _ in range(3)] + [[[] for _ in range(25)]]
    tensors = [padded(rng, s, 3) for s in seqs]
    curves = lrc.sch_curves(tensors, 6, 4)
    for i, s in enumerate(seqs[:3]):
        assert curves[i].tolist() == pytest.approx(sch_brute(s, 6, 4), abs=1e-12)
    assert bool(curves[3].isnan().all())  # no request: 0/0
    # the mean and the bootstrap leave the request-less sequence out
    assert sch_curve(tensors, 6, 4).tolist() == pytest.approx(curves[:3].mean(0).tolist())
    cis = sch_ci(tensors, 6, 4, n_boot=50, seed=0)
    assert [c.estimate for c in cis] == pytest.approx(curves[:3].mean(0).tolist())
    # narrower sequences of a list are padded to the widest
    narrow = [torch.tensor([[0], [1], [0], [2]]), torch.tensor([[0, 1], [1, -1], [2, 0], [-1, -1]])]
    assert lrc.sch_curves(narrow, 3, 2)[0].tolist() == pytest.approx(sch_brute([[0], [1], [0], [2]], 3, 2))


def test_padding_checks_and_undefined_cases():
    with pytest.raises(ValueError, match="distinct"):
        srp(torch.tensor([[1, 1, -1]]), 4, 1)
    with pytest.raises(ValueError, match="lie in"):
        srp(torch.tensor([[0, -2]]), 4, 1)  # only -1 is padding
    all_pad = torch.full((8, 2), -1)
    with pytest.raises(ValueError, match="SRP is undefined"):
        srp(all_pad, 4, 2)
    with pytest.raises(ValueError, match="SCH is undefined"):
        sch_ci([all_pad], 4, 2, n_boot=10)
    assert math.isnan(sch(all_pad, 4, 2, 2))
    assert sequences.is_ragged(torch.tensor([[0, -1]])) and not sequences.is_ragged(torch.tensor([[0, 1]]))
    assert sequences.experts_per_token(torch.tensor([[0, -1], [-1, -1], [2, 3]])).tolist() == [1, 0, 2]
