"""LLEP's planner (moelab.parallel.llep): invariants, plain-EP fallback, hand-worked examples, and
plans of the official code (SalesforceAIResearch/LeastLoadedEP ``compute_llep_lpt_plan``, commit
11730c8) on fixed loads, hard-coded here."""

from __future__ import annotations

import random

import pytest
import torch

from moelab import registry
from moelab.core.routing import Routing
from moelab.parallel.llep import LLEPPlan, contiguous_placement, llep_assign, llep_plan

NEVER_PLAIN = 1e-9  # lambda below any imbalance: always plan


def _zipf_loads(rng: random.Random, num_experts: int, total: int, s: float) -> list[int]:
    w = [1.0 / (i + 1) ** s for i in range(num_experts)]
    rng.shuffle(w)
    loads = [0] * num_experts
    for e in rng.choices(range(num_experts), weights=w, k=total):
        loads[e] += 1
    return loads


def check_invariants(plan: LLEPPlan, loads: list[int], m: int) -> None:
    # Every token of every expert is assigned exactly once.
    for e, chunks in enumerate(plan.chunks):
        assert sum(n for _, n in chunks) == loads[e]
        assert all(n > 0 for _, n in chunks)
        # Chunks on helpers are >= m unless they are the expert's last (the remainder) or forced.
        helper = [n for r, n in chunks[:-1] if r != plan.native[e]]
        if not plan.forced:
            assert all(n >= m for n in helper)
    # Rank loads are the sums of the chunks, and they sum to the total.
    rank_load = [0] * plan.num_ranks
    for chunks in plan.chunks:
        for r, n in chunks:
            rank_load[r] += n
    assert rank_load == list(plan.rank_load)
    assert sum(plan.rank_load) == sum(loads)
    # Weights travel exactly to the helpers that compute an expert's chunks.
    want = sorted(
        {(e, plan.native[e], r) for e, cs in enumerate(plan.chunks) for r, _ in cs if r != plan.native[e]}
    )
    assert list(plan.shipped) == want
    # Without force-assignment nobody exceeds the budget, and the budget is <= alpha * mean.
    if not plan.plain_ep and not plan.forced:
        assert max(plan.rank_load) <= plan.capacity


def test_registered():
    assert registry.get("placement", "llep").obj is llep_plan


def test_hand_worked_spill_to_least_loaded():
    # One hot expert per rank: cap = 1300 // 4 = 325; expert 0 keeps 325 and fills ranks 1..3.
    plan = llep_plan([1000, 100, 100, 100], 4, capacity_factor=1.0, min_chunk=1)
    assert not plan.plain_ep and plan.capacity == 325 and plan.imbalance == pytest.approx(1000 / 325)
    assert plan.chunks == (((0, 325), (1, 225), (2, 225), (3, 225)), ((1, 100),), ((2, 100),), ((3, 100),))
    assert plan.rank_load == (325, 325, 325, 325) and not plan.forced
    assert plan.shipped == ((0, 0, 1), (0, 0, 2), (0, 0, 3))


def test_hand_worked_min_chunk_forces():
    # m = 300 > every helper's room (225): no helper takes a chunk, so the rest is forced onto
    # the least-loaded helper (rank 1; ties by rank id). Rank 1 is then over budget, so its own
    # expert 1 spills whole to rank 2 (a remainder may be smaller than m).
    plan = llep_plan([1000, 100, 100, 100], 4, capacity_factor=1.0, min_chunk=300)
    assert plan.chunks[0] == ((0, 325), (1, 675)) and plan.forced
    assert plan.chunks[1] == ((2, 100),)
    assert plan.rank_load == (325, 675, 200, 100)


def test_hand_worked_native_already_full():
    # P = 2, E = 6: rank 0 holds 900 of 900. cap = int(1.1 * 450) = 495. Expert 0 is visited while
    # rank 0's pending natives (600) exceed cap - 300: it spills entirely to rank 1; expert 1
    # half-spills; expert 2 stays home.
    plan = llep_plan([300, 300, 300, 0, 0, 0], 2, min_chunk=1)
    assert plan.capacity == 495
    assert plan.chunks == (((1, 300),), ((0, 195), (1, 105)), ((0, 300),), (), (), ())
    assert plan.rank_load == (495, 405)


@pytest.mark.parametrize(
    "loads, num_ranks, alpha, m, chunks, rank_load",
    [
        (
            [5000, 300, 2500, 40, 900, 1200, 60, 7000],
            4,
            1.1,
            1024,
            {7: [(3, 4615), (2, 2385)], 0: [(0, 4375), (1, 625)], 2: [(1, 2500)], 5: [(2, 1200)],
             4: [(2, 900)], 1: [(0, 300)], 6: [(3, 60)], 3: [(1, 40)]},
            [4675, 3165, 4485, 4675],
        ),
        (
            [4000, 3500, 100, 50, 20, 10, 0, 5],
            8,
            1.0,
            512,
            {0: [(0, 960), (6, 960), (7, 955), (5, 950), (4, 175)],
             1: [(1, 960), (3, 910), (2, 860), (4, 765), (0, 5)],
             2: [(2, 100)], 3: [(3, 50)], 4: [(4, 20)], 5: [(5, 10)], 7: [(7, 5)]},
            [965, 960, 960, 960, 960, 960, 960, 960],
        ),
        (
            [9000, 8000, 100, 200, 300, 400],
            3,
            1.05,
            1024,
            {0: [(1, 6000), (2, 3000)], 1: [(0, 6300), (2, 1700)], 5: [(2, 400)], 4: [(2, 300)],
             3: [(1, 200)], 2: [(1, 100)]},
            [6300, 6300, 5400],
        ),
    ],
)  # fmt: skip
def test_matches_official_code(loads, num_ranks, alpha, m, chunks, rank_load):
    """Plans of the official ``compute_llep_lpt_plan`` (run outside the repo), chunk by chunk."""
    plan = llep_plan(loads, num_ranks, imbalance_threshold=NEVER_PLAIN, capacity_factor=alpha, min_chunk=m)
    assert [list(c) for c in plan.chunks] == [chunks.get(e, []) for e in range(len(loads))]
    assert list(plan.rank_load) == rank_load
    check_invariants(plan, loads, m)


def test_plain_ep_below_lambda():
    loads = [1000, 1100, 900, 1200, 1000, 950, 1050, 1000]  # max/mean ~ 1.02 over 4 ranks
    plan = llep_plan(loads, 4)
    assert plan.plain_ep and plan.imbalance < 1.3 and not plan.shipped
    assert plan.chunks == tuple(((e // 2, n),) for e, n in enumerate(loads))
    assert list(plan.rank_load) == plan.native_rank_load()
    # The same loads, lambda lowered below the imbalance: planned.
    assert not llep_plan(loads, 4, imbalance_threshold=1.01).plain_ep


@pytest.mark.parametrize("seed", range(6))
def test_invariants_and_max_load_on_zipf(seed):
    rng = random.Random(seed)
    num_ranks = rng.choice([4, 8, 16])
    num_experts = num_ranks * rng.choice([1, 2, 4])
    total = rng.choice([20_000, 60_000])
    s = rng.choice([1.0, 1.5, 2.0])
    loads = _zipf_loads(rng, num_experts, total, s)
    m = rng.choice([1, 256, 1024])
    plan = llep_plan(loads, num_ranks, imbalance_threshold=NEVER_PLAIN, min_chunk=m)
    check_invariants(plan, loads, m)
    mean = total / num_ranks
    if not plan.forced:
        assert max(plan.rank_load) <= 1.1 * mean
    # Never worse than plain EP.
    assert max(plan.rank_load) <= max(plan.native_rank_load())


def test_llep_assign_splits_in_token_order():
    # 6 tokens, top-2 over E = 4 experts on P = 2 ranks; expert 0 gets 5 of the 12 assignments.
    experts = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0], [0, 2], [3, 1]])
    routing = Routing(
        token_index=torch.arange(6).repeat_interleave(2),
        expert_index=experts.flatten(),
        weight=torch.full((12,), 0.5),
        num_tokens=6,
        num_experts=4,
        top_k=2,
    )
    loads = routing.tokens_per_expert().tolist()
    assert loads == [5, 3, 2, 2]
    plan = llep_plan(loads, 2, imbalance_threshold=NEVER_PLAIN, capacity_factor=1.0, min_chunk=1)
    ranks = llep_assign(plan, routing)
    # Naive reference: walk the assignments in order, count per expert, find the chunk.
    seen = [0] * 4
    for j, e in enumerate(routing.expert_index.tolist()):
        pos, want = seen[e], None
        for r, n in plan.chunks[e]:
            if pos < n:
                want = r
                break
            pos -= n
        seen[e] += 1
        assert ranks[j].item() == want
    per_rank = torch.bincount(ranks, minlength=2).tolist()
    assert per_rank == list(plan.rank_load)


def test_llep_assign_rejects_other_routing():
    routing = Routing(torch.arange(4), torch.tensor([0, 1, 1, 1]), torch.ones(4), num_tokens=4, num_experts=2)
    plan = llep_plan([2, 2], 2)
    with pytest.raises(ValueError, match="plan.loads"):
        llep_assign(plan, routing)


def test_bad_input():
    with pytest.raises(ValueError, match="num_ranks"):
        llep_plan([1, 2], 0)
    with pytest.raises(ValueError, match="divisible"):
        llep_plan([1, 2, 3], 2)
    with pytest.raises(ValueError, match="loads must be >= 0"):
        llep_plan([1, -2], 2)
    with pytest.raises(ValueError, match="capacity_factor"):
        llep_plan([1, 2], 2, capacity_factor=0.9)
    with pytest.raises(ValueError, match="min_chunk"):
        llep_plan([1, 2], 2, min_chunk=0)
    with pytest.raises(ValueError, match="native"):
        llep_plan([1, 2, 3], 2, native=[0, 1])
    with pytest.raises(ValueError, match="whole token counts"):
        llep_plan(torch.tensor([1.5, 2.0]), 2)
    # An explicit native placement where E is not a multiple of P.
    plan = llep_plan([100, 5, 5], 2, native=[0, 0, 1], imbalance_threshold=NEVER_PLAIN, min_chunk=1)
    assert sum(plan.rank_load) == 110
    assert contiguous_placement(4, 2) == [0, 0, 1, 1]


def test_reproduction_rows_and_verdict():
    from moelab.repro.scaleout import LLEP_REPRO, SCALEOUT, run_llep

    assert SCALEOUT == [LLEP_REPRO] and LLEP_REPRO.method == "llep"
    small = {"llep": {"num_experts": 64, "tokens_per_rank": 512}}
    per_seed = [run_llep(seed=s, train=small) for s in range(3)]
    for rows in per_seed:
        assert set(rows) == set(LLEP_REPRO.arms)
        assert rows["llep"]["max_over_mean"] < rows["plain_ep"]["max_over_mean"]
    assert LLEP_REPRO.judge(per_seed)["verdict"] == "holds"
    assert "LLEP" in LLEP_REPRO.describe(per_seed[0])
    # A plan far above alpha does not hold.
    bad = [{**r, "llep": {**r["llep"], "max_over_mean": 1.6 + 0.01 * i}} for i, r in enumerate(per_seed)]
    assert LLEP_REPRO.judge(bad)["verdict"] == "does not hold"
