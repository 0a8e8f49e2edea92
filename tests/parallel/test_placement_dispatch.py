"""Dispatchers ``llep`` and ``eplb``: the exchange bookkeeping against ``llep_assign`` (brute force), a
world of one against the ``local`` layer, errors; and under torchrun with 2 and 4 gloo processes,
equality with the single-process layer (placement_worker.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrun import run_workers

import moelab
from moelab.core.routing import Routing, cat_routings
from moelab.ops import get_dispatcher, get_executor
from moelab.parallel.eplb import eplb_plan
from moelab.parallel.eplb_dispatch import (
    EPLBDispatcher,
    gather_logical_experts,
    shard_experts_eplb,
    sync_replica_grads,
)
from moelab.parallel.expert_slicing import hidden_slice, shard_experts_sliced, slices_per_expert
from moelab.parallel.llep import llep_assign, llep_plan
from moelab.parallel.llep_dispatch import (
    LLEPDispatcher,
    bank_with_rows,
    flat_expert_rows,
    llep_exchange_counts,
    llep_slots,
    unflatten_expert_rows,
)
from moelab.parallel.sharding import gather_experts, shard_experts

HERE = Path(__file__).parent
WORKER_CHECKS = [
    "llep-spill-reference",
    "llep-spill-sorted",
    "llep-fallback",
    "llep-layer",
    "eplb-layer",
    "expert-slicing",
    "hierarchical-a2a",
]


def random_routings(p: int, e: int, g: torch.Generator, hot: int = 0) -> list[Routing]:
    parts = []
    for _ in range(p):
        t = int(torch.randint(0, 20, (1,), generator=g))
        ex = torch.where(
            torch.rand(2 * t, generator=g) < 0.6, hot, torch.randint(0, e, (2 * t,), generator=g)
        )
        parts.append(Routing(torch.arange(t).repeat_interleave(2), ex, torch.rand(2 * t, generator=g), t, e))
    return parts


@pytest.mark.parametrize("p,e,seed", [(2, 4, 0), (4, 8, 1), (4, 4, 2), (3, 6, 3)])
def test_exchange_counts_equal_llep_assign_on_the_concatenation(p, e, seed):
    g = torch.Generator().manual_seed(seed)
    parts = random_routings(p, e, g)
    counts_PE = torch.stack([r.tokens_per_expert() for r in parts])
    plan = llep_plan(counts_PE.sum(0), p, min_chunk=1)
    n_QER = llep_exchange_counts(plan, counts_PE)
    dest = llep_assign(plan, cat_routings(parts))
    start = 0
    for q, r in enumerate(parts):  # brute force: count each source's assignments by (expert, rank)
        d = dest[start : start + r.num_assignments]
        start += r.num_assignments
        want = torch.zeros(e, p, dtype=torch.long)
        want.index_put_((r.expert_index, d), torch.ones_like(d), accumulate=True)
        assert torch.equal(n_QER[q], want)
    assert n_QER.sum((0, 1)).tolist() == list(plan.rank_load)


def test_exchange_counts_reject_a_plan_for_other_counts():
    plan = llep_plan([4, 0], 2)
    with pytest.raises(ValueError, match="plan.loads"):
        llep_exchange_counts(plan, torch.tensor([[1, 0], [1, 0]]))


def test_slots_are_natives_then_shipped_experts_by_id():
    plan = llep_plan([100, 0, 0, 0, 0, 0, 90, 0], 4, min_chunk=1)
    slots, slot_of = llep_slots(plan, 2)
    for r in range(4):
        assert slots[r][:2] == [2 * r, 2 * r + 1]
        assert slots[r][2:] == sorted(e for e, _, d in plan.shipped if d == r)
        for s, e in enumerate(slots[r]):
            assert slot_of[e, r] == s
    assert plan.shipped and (slot_of >= 0).sum() == 8 + len(plan.shipped)


def test_bank_with_rows_computes_with_the_given_rows_and_passes_gradients():
    torch.manual_seed(0)
    bank = moelab.ExpertBank(3, 4, 5, "swiglu", d_out=6)
    rows_LF, layout = flat_expert_rows(bank)
    assert rows_LF.shape == (3, 2 * 5 * 4 + 6 * 5)
    extra = rows_LF[[2, 0]]  # two copies appended: a bank of 5 experts
    ext = bank_with_rows(bank, unflatten_expert_rows(torch.cat([rows_LF, extra]), layout), 5)
    assert ext.num_experts == 5 and bank.num_experts == 3 and ext.gate_up_proj.shape[0] == 5
    x = torch.randn(2, 4)
    torch.testing.assert_close(ext.expert_forward(3, x), bank.expert_forward(2, x))
    ext.expert_forward(4, x).sum().backward()
    assert bank.gate_up_proj.grad[0].abs().sum() > 0 and bank.gate_up_proj.grad[1:].abs().sum() == 0
    with pytest.raises(ValueError, match="no direct parameter"):
        bank_with_rows(bank, {"nope": torch.zeros(1)}, 3)


def test_flat_rows_need_expert_major_parameters_of_one_dtype():
    class Odd(nn.Module):
        num_experts = 2

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2, 3))
            self.scale = nn.Parameter(torch.zeros(3))

    with pytest.raises(TypeError, match="expert-major parameters"):
        flat_expert_rows(Odd())
    bank = moelab.ExpertBank(2, 4, 4)
    bank.down_proj.data = bank.down_proj.data.double()
    with pytest.raises(TypeError, match="one dtype"):
        flat_expert_rows(bank)


def layer_and_input(seed: int = 0):
    torch.manual_seed(seed)
    layer = moelab.MoE(8, num_experts=4, top_k=2, hidden=8, router="topk", aux_losses={})
    with torch.no_grad():
        layer.router.weight[1, 0] += 2.0
    x = torch.randn(12, 8)
    x[:, 0] += 1.5
    return layer, x


@pytest.mark.parametrize("make", ["llep", "eplb"])
def test_world_of_one_equals_the_local_layer(make):
    full, x = layer_and_input()
    ep = copy.deepcopy(full)
    if make == "llep":
        shard_experts(ep)
        ep.dispatcher = LLEPDispatcher(min_chunk=1)
    else:
        load = torch.tensor([1.0, 5.0, 1.0, 1.0])
        shard_experts_eplb(ep, eplb_plan(load, 6, 1))
        assert ep.experts.num_experts == 6
    xr, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    full(xr).square().sum().backward()
    ep(xe).square().sum().backward()
    torch.testing.assert_close(xe.grad, xr.grad)
    if make == "llep":
        assert ep.dispatcher.last_plan.plain_ep and ep.dispatcher.weight_bytes == 0
        for a, b in zip(ep.parameters(), full.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)
    else:
        sync_replica_grads(ep)
        logical = ep.dispatcher.slots_of_rank(0)
        torch.testing.assert_close(ep.experts.down_proj.grad, full.experts.down_proj.grad[logical])
        with pytest.raises(ValueError, match="does not hold contiguous expert blocks"):
            gather_experts(ep)
        gather_logical_experts(ep)
        for k, v in full.state_dict().items():
            torch.testing.assert_close(ep.state_dict()[k], v)


def test_dispatchers_are_registered_and_copyable():
    d = get_dispatcher("llep")
    assert isinstance(d, LLEPDispatcher) and d.min_chunk == 1024
    d2 = copy.deepcopy(LLEPDispatcher(capacity_factor=1.2, min_chunk=8))
    assert (d2.capacity_factor, d2.min_chunk) == (1.2, 8)
    plan = eplb_plan(torch.ones(4), 4, 1)
    e = copy.deepcopy(EPLBDispatcher(plan))
    assert e.plan is plan and "R=4" in repr(e)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="min_chunk"):
        LLEPDispatcher(min_chunk=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        LLEPDispatcher(capacity_factor=0.5)
    with pytest.raises(TypeError, match="plan must be an EPLBPlan"):
        EPLBDispatcher("plan")
    plan = eplb_plan(torch.ones(2, 4), 4, 1)
    with pytest.raises(ValueError, match="layer must be an int"):
        EPLBDispatcher(plan, layer=2)
    layer, x = layer_and_input()
    with pytest.raises(ValueError, match="the plan has 2 layers"):
        shard_experts_eplb(copy.deepcopy(layer), plan)
    with pytest.raises(ValueError, match="the plan is for 2 ranks"):
        shard_experts_eplb(copy.deepcopy(layer), eplb_plan(torch.ones(4), 4, 2))
    ep = shard_experts_eplb(copy.deepcopy(layer), eplb_plan(torch.ones(4), 4, 1))
    bad = Routing(torch.arange(12), torch.zeros(12, dtype=torch.long), torch.ones(12), 12, 3)
    with pytest.raises(ValueError, match="routing has 3 experts"):
        ep.dispatcher(x, bad, ep.experts, get_executor("sorted"))
    with pytest.raises(ValueError, match="found no EPLB-sharded"):
        sync_replica_grads(layer)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_hidden_slices_sum_to_the_expert(activation):
    torch.manual_seed(0)
    bank = moelab.ExpertBank(3, 4, 6, activation, d_out=5)
    x = torch.randn(7, 4)
    for e in range(3):
        parts = [hidden_slice(bank, e, s, 3) for s in range(3)]
        assert all(p.num_experts == 1 and p.hidden == 2 for p in parts)
        total = sum(p.expert_forward(0, x) for p in parts)
        torch.testing.assert_close(total, bank.expert_forward(e, x))


def test_expert_slicing_errors_are_named():
    assert slices_per_expert(2, 4) == 2
    with pytest.raises(ValueError, match="multiple of num_experts"):
        slices_per_expert(3, 4)
    bank = moelab.ExpertBank(2, 4, 6)
    with pytest.raises(ValueError, match="divisible by the slice count 4"):
        hidden_slice(bank, 0, 0, 4)
    with pytest.raises(ValueError, match="expert must lie"):
        hidden_slice(bank, 2, 0, 2)
    layer, _ = layer_and_input()
    with pytest.raises(ValueError, match="multiple of num_experts"):
        shard_experts_sliced(layer)  # 4 experts, a world of one


# ---------------------------------------------------------------------- torchrun, 2 and 4 gloo ranks
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_torchrun_llep_and_eplb_equal_single_process_layer(tmp_path, nproc):
    for res in run_workers(HERE / "placement_worker.py", tmp_path, nproc):
        assert res["world_size"] == nproc and res["checks"] == WORKER_CHECKS
