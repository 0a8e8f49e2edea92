"""EPLB's planner (moelab.parallel.eplb): invariants, a brute-force packing check, and outputs of
the official ``rebalance_experts`` (deepseek-ai/EPLB ``eplb.py``, commit d52c72d) on fixed loads,
hard-coded here."""

from __future__ import annotations

import itertools

import pytest
import torch

from moelab import registry
from moelab.core.routing import Routing
from moelab.parallel.eplb import EPLBPlan, balanced_packing, eplb_assign, eplb_plan, replicate_experts

# The README's example load (2 layers, 12 experts).
README_LOAD = torch.tensor(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
)
SKEWED_LOAD = torch.tensor([[7, 300, 12, 45, 80, 5, 210, 33, 1, 64, 128, 90, 17, 250, 3, 41]])

# (load, num_replicas, num_groups, num_nodes, num_gpus) -> the official phy2log, logcnt, log2phy.
REFERENCE = [
    (
        README_LOAD, 16, 4, 2, 8,  # hierarchical: 4 groups on 2 nodes
        [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]],
        [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]],
        [[[12, -1], [15, 13], [11, -1], [6, -1], [7, 5], [0, 2], [1, -1], [3, -1], [4, -1], [9, -1], [8, 10],
          [14, -1]],
         [[13, -1], [15, 11], [8, -1], [14, -1], [9, -1], [10, 12], [2, 4], [0, -1], [6, 3], [7, -1], [1, -1],
          [5, -1]]],
    ),
    (
        README_LOAD, 24, 4, 3, 6,  # 4 groups do not split over 3 nodes: the global policy
        [[9, 0, 2, 6, 5, 10, 11, 3, 5, 10, 11, 3, 5, 0, 1, 7, 4, 10, 1, 8, 4, 10, 1, 8],
         [3, 7, 5, 4, 6, 1, 5, 0, 6, 7, 2, 10, 6, 7, 5, 9, 8, 8, 5, 11, 8, 1, 2, 9]],
        [[2, 3, 1, 2, 2, 3, 1, 1, 2, 1, 4, 2], [1, 2, 2, 1, 1, 4, 3, 3, 3, 2, 1, 1]],
        [[[13, 1, -1, -1], [14, 18, 22, -1], [2, -1, -1, -1], [7, 11, -1, -1], [16, 20, -1, -1], [8, 12, 4, -1],
          [3, -1, -1, -1], [15, -1, -1, -1], [19, 23, -1, -1], [0, -1, -1, -1], [9, 17, 5, 21], [6, 10, -1, -1]],
         [[7, -1, -1, -1], [21, 5, -1, -1], [22, 10, -1, -1], [0, -1, -1, -1], [3, -1, -1, -1], [2, 6, 18, 14],
          [4, 12, 8, -1], [13, 1, 9, -1], [20, 17, 16, -1], [23, 15, -1, -1], [11, -1, -1, -1],
          [19, -1, -1, -1]]],
    ),
    (
        README_LOAD, 16, 1, 1, 4,  # global
        [[10, 8, 3, 7, 10, 1, 1, 4, 0, 5, 4, 2, 11, 5, 9, 6], [1, 9, 3, 11, 2, 8, 8, 10, 5, 6, 7, 0, 5, 6, 7, 4]],
        [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1]],
        [[[8, -1], [5, 6], [11, -1], [2, -1], [10, 7], [13, 9], [15, -1], [3, -1], [1, -1], [14, -1], [0, 4],
          [12, -1]],
         [[11, -1], [0, -1], [4, -1], [2, -1], [15, -1], [8, 12], [9, 13], [10, 14], [5, 6], [1, -1], [7, -1],
          [3, -1]]],
    ),
    (
        SKEWED_LOAD, 24, 1, 1, 8,
        [[11, 3, 15, 13, 9, 2, 13, 10, 0, 13, 10, 5, 4, 6, 14, 1, 1, 8, 1, 6, 7, 1, 6, 12]],
        [[1, 4, 1, 1, 1, 1, 3, 1, 1, 1, 2, 1, 1, 3, 1, 1]],
        [[[8, -1, -1, -1], [15, 16, 21, 18], [5, -1, -1, -1], [1, -1, -1, -1], [12, -1, -1, -1], [11, -1, -1, -1],
          [19, 22, 13, -1], [20, -1, -1, -1], [17, -1, -1, -1], [4, -1, -1, -1], [7, 10, -1, -1], [0, -1, -1, -1],
          [23, -1, -1, -1], [9, 6, 3, -1], [14, -1, -1, -1], [2, -1, -1, -1]]],
    ),
]  # fmt: skip


def check_invariants(plan: EPLBPlan, num_experts: int, num_replicas: int, num_gpus: int) -> None:
    num_layers = plan.phy2log.shape[0]
    assert tuple(plan.phy2log.shape) == (num_layers, num_replicas)
    assert (plan.logcnt >= 1).all()
    assert (plan.logcnt.sum(-1) == num_replicas).all()
    for layer in range(num_layers):
        # logcnt counts phy2log's slots; log2phy lists exactly those slots, in replica order.
        assert torch.equal(torch.bincount(plan.phy2log[layer], minlength=num_experts), plan.logcnt[layer])
        for e in range(num_experts):
            slots = plan.log2phy[layer, e]
            c = int(plan.logcnt[layer, e])
            assert (slots[c:] == -1).all()
            assert (plan.phy2log[layer, slots[:c]] == e).all()
            assert plan.replica_rank[layer, slots[:c]].tolist() == list(range(c))
    # Every GPU holds the same number of slots by construction (R / G contiguous slots).
    assert plan.slots_per_gpu * num_gpus == num_replicas


def test_registered():
    assert registry.get("placement", "eplb").obj is eplb_plan


@pytest.mark.parametrize("case", range(len(REFERENCE)))
def test_matches_reference(case):
    load, num_replicas, groups, nodes, gpus, phy2log, logcnt, log2phy = REFERENCE[case]
    plan = eplb_plan(load, num_replicas, gpus, num_groups=groups, num_nodes=nodes)
    check_invariants(plan, load.shape[1], num_replicas, gpus)
    assert plan.phy2log.tolist() == phy2log
    assert plan.logcnt.tolist() == logcnt
    # Which replica of an expert is "replica 0" depends on how a sort breaks ties between
    # replicas of equal load (the reference's sort is not stable, ours is): compare the sets.
    assert torch.equal(plan.log2phy.sort(-1).values, torch.tensor(log2phy).sort(-1).values)


def test_replicate_minimises_max_per_replica_load():
    # Brute force over every way to give 4 extra replicas to 4 experts.
    load = torch.tensor([[100.0, 37.0, 64.0, 5.0]])
    _, _, cnt = replicate_experts(load, 8)
    best = min(
        max(load[0, e].item() / (1 + extra.count(e)) for e in range(4))
        for extra in itertools.combinations_with_replacement(range(4), 4)
    )
    assert (load / cnt).max().item() == pytest.approx(best)


def test_balanced_packing_beats_naive_and_is_near_brute_force():
    torch.manual_seed(0)
    for _ in range(5):
        w = torch.randint(1, 100, (1, 8)).double()
        pack, slot = balanced_packing(w, 4)
        assert (torch.bincount(pack[0], minlength=4) == 2).all()
        greedy = max(w[0][pack[0] == p].sum().item() for p in range(4))
        naive = w[0].view(4, 2).sum(-1).max().item()  # items in id order, two per pack
        # Brute force over all pairings: the optimum.
        best = float("inf")
        items = list(range(8))

        def pairings(rest):
            if not rest:
                yield []
                return
            a = rest[0]
            for b in rest[1:]:
                for p in pairings([x for x in rest[1:] if x != b]):
                    yield [(a, b), *p]

        for p in pairings(items):
            best = min(best, max(w[0, a].item() + w[0, b].item() for a, b in p))
        assert best <= greedy <= 4 / 3 * best + 1e-9  # LPT-style greedy's classic bound
        assert naive >= best


def test_balanced_gpu_load_beats_plain_ep_on_skew():
    gen = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, 65).double() ** 1.2
    load = torch.stack(
        [
            torch.bincount(
                torch.multinomial(zipf[torch.randperm(64, generator=gen)], 50_000, True, generator=gen),
                minlength=64,
            )
            for _ in range(3)
        ]
    )
    plan = eplb_plan(load, 64 + 8, 8)
    check_invariants(plan, 64, 72, 8)
    plain = load.double().view(3, 8, 8).sum(-1)  # 8 contiguous experts per GPU, no replicas
    assert (plan.gpu_load().max(-1).values < plain.max(-1).values).all()
    # Hierarchical (8 groups on 2 nodes) keeps the same invariants.
    check_invariants(eplb_plan(load, 72, 8, num_groups=8, num_nodes=2), 64, 72, 8)


def test_eplb_assign_splits_evenly_over_replicas():
    load = torch.tensor([[9, 1, 1, 1]])
    plan = eplb_plan(load, 8, 4)  # expert 0 takes all 4 extra replicas (9/5 > 1)
    experts = torch.tensor([0] * 9 + [1, 2, 3])
    routing = Routing(torch.arange(12), experts, torch.ones(12), num_tokens=12, num_experts=4)
    slots = eplb_assign(plan, routing)
    assert (plan.phy2log[0, slots] == experts).all()
    c = int(plan.logcnt[0, 0])
    per_replica = torch.bincount(slots[:9], minlength=8)[plan.log2phy[0, 0, :c]]
    assert per_replica.sum() == 9 and per_replica.max() - per_replica.min() <= 1
    # Contiguous in token order: replica r's tokens come before replica r + 1's.
    ranks = plan.replica_rank[0, slots[:9]]
    assert (ranks[1:] >= ranks[:-1]).all()
    gpus = plan.gpu_of_slot()[slots]
    assert gpus.max() < 4


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        eplb_plan(README_LOAD, 15, 4)
    with pytest.raises(ValueError, match="num_replicas must be >="):
        eplb_plan(README_LOAD, 8, 4)
    with pytest.raises(ValueError, match=">= 0"):
        eplb_plan(-README_LOAD, 16, 4)
    with pytest.raises(TypeError, match="load_LE"):
        eplb_plan([[1, 2]], 2, 1)
    with pytest.raises(ValueError, match="num_gpus"):
        eplb_plan(README_LOAD, 16, 0)
    plan = eplb_plan(README_LOAD, 16, 4)
    with pytest.raises(ValueError, match="layer"):
        eplb_assign(plan, Routing(torch.arange(2), torch.tensor([0, 1]), torch.ones(2), 2, 12), layer=2)


def test_eplb_assign_fewer_tokens_than_replicas():
    plan = eplb_plan(torch.tensor([[100, 1, 1, 1, 1, 1, 1, 1]]), 16, 4)  # expert 0: 9 replicas
    routing = Routing(
        torch.arange(5), torch.tensor([0, 0, 0, 3, 5]), torch.ones(5), num_tokens=5, num_experts=8
    )
    slots = eplb_assign(plan, routing)
    assert (plan.phy2log[0, slots] == routing.expert_index).all()
    assert plan.replica_rank[0, slots[:3]].tolist() == [0, 1, 2]  # one token per replica, in order
