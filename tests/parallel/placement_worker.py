"""Run under torchrun by test_placement_dispatch.py: the ``llep`` dispatcher (and EPLB replicas) equal
the single-process layer.

Usage: torchrun --nproc_per_node P placement_worker.py OUT_DIR

Every rank builds the same full bank and every rank's tokens (one seed), computes the single-process
reference on all ranks' tokens concatenated, then runs its expert-parallel part on its own tokens and
compares (fp32, within 1e-5): the output, the input gradient, the routing-weight gradient and its
experts' weight gradients. Each rank writes the names of the checks it passed to OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torchrun import run_checks

import moelab
from moelab.core.routing import Routing, cat_routings
from moelab.ops import get_executor
from moelab.ops.all_to_all import AllToAllDispatcher
from moelab.parallel.eplb import eplb_plan
from moelab.parallel.eplb_dispatch import (
    EPLBDispatcher,
    gather_logical_experts,
    shard_experts_eplb,
    sync_replica_grads,
)
from moelab.parallel.expert_slicing import ExpertSlicingDispatcher, hidden_slice, shard_experts_sliced
from moelab.parallel.hierarchical import HierarchicalAllToAll
from moelab.parallel.llep import llep_assign
from moelab.parallel.llep_dispatch import LLEPDispatcher
from moelab.parallel.sharding import expert_block, shard_experts, slice_bank

E, D, HIDDEN = 8, 8, 8
TOKENS = (40, 24, 32, 16)  # per rank
TOL = dict(rtol=1e-5, atol=1e-5)


def close(got, want, what, tol=TOL):
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


F64 = dict(rtol=1e-9, atol=1e-9)


def grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def skewed_routings(t_list, g, hot):
    """Top-2 token-major routings; ``hot`` (a probability) of the first choices go to expert 1."""
    parts = []
    for t in t_list:
        first = torch.where(torch.rand(t, generator=g) < hot, 1, torch.randint(0, E, (t,), generator=g))
        second = (first + 1 + torch.randint(0, E - 1, (t,), generator=g)) % E
        ex = torch.stack([first, second], 1).reshape(-1)
        tok = torch.arange(t).repeat_interleave(2)
        parts.append(Routing(tok, ex, torch.rand(2 * t, generator=g), t, E, top_k=2))
    return parts


def run_against_reference(rank, p, disp, parts, executor, seed):
    """The dispatcher on this rank's routing vs moe_reference on the concatenation; returns the
    plan-relevant pieces for further checks."""
    g = torch.Generator().manual_seed(seed)
    t_list = [r.num_tokens for r in parts]
    torch.manual_seed(1)
    full_bank = moelab.ExpertBank(E, D, HIDDEN, "swiglu", d_out=D + 4)
    x_all = torch.randn(sum(t_list), D, generator=g)
    gy_all = torch.randn(sum(t_list), D + 4, generator=g)
    start = sum(t_list[:rank])
    rows = slice(start, start + t_list[rank])
    s, e = expert_block(E, p, rank)

    xr = x_all.clone().requires_grad_(True)
    ws = [r.weight.clone().requires_grad_(True) for r in parts]
    routing = cat_routings(
        [Routing(r.token_index, r.expert_index, w, r.num_tokens, E) for r, w in zip(parts, ws, strict=True)]
    )
    bank_ref = copy.deepcopy(full_bank)
    y_ref = moelab.ops.moe_reference(xr, routing, bank_ref)
    (y_ref * gy_all).sum().backward()

    bank = slice_bank(full_bank, s, e)
    x = x_all[rows].clone().requires_grad_(True)
    mine = parts[rank]
    w = mine.weight.clone().requires_grad_(True)
    y = disp(x, Routing(mine.token_index, mine.expert_index, w, mine.num_tokens, E, top_k=2), bank, executor)
    close(y, y_ref[rows].detach(), "output")
    (y * gy_all[rows]).sum().backward()
    close(grad(x), xr.grad[rows], "grad x")
    close(grad(w), grad(ws[rank]), "grad routing weight")
    for (n, pa), pr in zip(bank.named_parameters(), bank_ref.parameters(), strict=True):
        close(grad(pa), grad(pr)[s:e], f"grad {n}")
    return routing


def check_llep_spills(rank, p, done):
    """Skewed routing: LLEP spills the hot expert; output and gradients exact; the destinations
    equal ``llep_assign`` on the concatenated routing; each rank computes its planned load; weight
    bytes equal the shipped experts' rows (forward) and their gradients (backward). With
    ``sorted``, rank 1 has no tokens of its own (it still computes spilled work)."""
    for name in ("reference", "sorted"):
        g = torch.Generator().manual_seed(21)
        t_list = (
            list(TOKENS[:p])
            if name == "reference"
            else [0 if r == 1 else t for r, t in enumerate(TOKENS[:p])]
        )
        parts = skewed_routings(t_list, g, hot=0.8)
        disp = LLEPDispatcher(min_chunk=1)
        routing = run_against_reference(rank, p, disp, parts, get_executor(name), seed=22)
        plan = disp.last_plan
        assert not plan.plain_ep and plan.shipped, plan
        want = llep_assign(plan, routing)
        start = sum(r.num_assignments for r in parts[:rank])
        got = disp.last_destination
        assert torch.equal(got, want[start : start + parts[rank].num_assignments]), (got, want)
        assert disp.last_rows_computed == plan.rank_load[rank], (disp.last_rows_computed, plan.rank_load)
        assert max(plan.rank_load) < max(plan.native_rank_load())  # the straggler got lighter
        row_bytes = (2 * HIDDEN * D + (D + 4) * HIDDEN) * 4
        out = sum(1 for _, s, _ in plan.shipped if s == rank)
        inc = sum(1 for _, _, d in plan.shipped if d == rank)
        assert disp.traffic.sent["weights"] == out * row_bytes
        assert disp.traffic.received["weights"] == inc * row_bytes
        assert disp.traffic.sent["weights_backward"] == inc * row_bytes
        assert disp.weight_bytes == (out + inc) * row_bytes
        done.append(f"llep-spill-{name}")


def check_llep_fallback(rank, p, done):
    """Balanced routing: max/mean < lambda, plain EP: same bytes as ``ep``, no weights shipped."""
    g = torch.Generator().manual_seed(31)
    t = 24
    parts = []
    for _ in range(p):  # every expert exactly 2 * t * p / E times in all: perfectly balanced
        ex = torch.arange(2 * t) % E
        parts.append(
            Routing(torch.arange(t).repeat_interleave(2), ex, torch.rand(2 * t, generator=g), t, E, top_k=2)
        )
    disp = LLEPDispatcher(min_chunk=1)
    run_against_reference(rank, p, disp, parts, get_executor("sorted"), seed=32)
    assert disp.last_plan.plain_ep and disp.weight_bytes == 0
    ep = AllToAllDispatcher()
    run_against_reference(rank, p, ep, parts, get_executor("sorted"), seed=32)
    for ph in ("dispatch", "combine", "dispatch_backward", "combine_backward"):
        assert disp.traffic.sent[ph] == ep.traffic.sent[ph], ph
        assert disp.traffic.received[ph] == ep.traffic.received[ph], ph
    done.append("llep-fallback")


def check_llep_layer(rank, p, done):
    """A ``moelab.MoE`` sharded with ``shard_experts`` and the ``llep`` dispatcher: same as the full
    layer (router skewed by a bias on one expert so LLEP spills)."""
    torch.manual_seed(3)
    full = moelab.MoE(D, num_experts=E, top_k=2, hidden=HIDDEN, router="topk", aux_losses={})
    with torch.no_grad():
        full.router.weight[2, 0] += 2.0  # with x[:, 0] shifted by 1.5 below: expert 2 is hot
    ep = shard_experts(copy.deepcopy(full))
    ep.dispatcher = LLEPDispatcher(min_chunk=1)
    g = torch.Generator().manual_seed(41)
    t_list = list(TOKENS[:p])
    x_all = torch.randn(sum(t_list), D, generator=g)
    x_all[:, 0] += 1.5
    gy_all = torch.randn(sum(t_list), D, generator=g)
    start = sum(t_list[:rank])
    rows = slice(start, start + t_list[rank])
    xr = x_all.clone().requires_grad_(True)
    y_ref = full(xr)
    (y_ref * gy_all).sum().backward()
    x = x_all[rows].clone().requires_grad_(True)
    y = ep(x)
    close(y, y_ref[rows].detach(), "layer output")
    (y * gy_all[rows]).sum().backward()
    assert not ep.dispatcher.last_plan.plain_ep
    close(grad(x), xr.grad[rows], "layer grad x")
    for (n, pa), pr in zip(ep.router.named_parameters(), full.router.parameters(), strict=True):
        gs = grad(pa).clone()
        dist.all_reduce(gs)
        close(gs, grad(pr), f"layer router grad {n}")
    s, e = expert_block(E, p, rank)
    for (n, pa), pr in zip(ep.experts.named_parameters(), full.experts.parameters(), strict=True):
        close(grad(pa), grad(pr)[s:e], f"layer expert grad {n}")
    done.append("llep-layer")


def check_eplb_layer(rank, p, done):
    """A ``moelab.MoE`` on EPLB replicas (R = E + P, a hot expert replicated), in float64 so two SGD
    steps compare within 1e-9 (in fp32, summation-order noise reaches ~5e-5 on these values): output,
    input and router gradients equal the full layer; after ``sync_replica_grads`` every replica holds its
    logical expert's gradient; two SGD steps on the experts keep replicas equal to the full layer's experts."""
    torch.manual_seed(3)
    full = moelab.MoE(D, num_experts=E, top_k=2, hidden=HIDDEN, router="topk", aux_losses={}).double()
    with torch.no_grad():
        full.router.weight[2, 0] += 2.0
    load = torch.ones(E)
    load[2] = 10.0  # the planner replicates expert 2
    plan = eplb_plan(load, E + p, p)
    assert int(plan.logcnt[0, 2]) > 1
    ep = shard_experts_eplb(copy.deepcopy(full), plan)
    assert isinstance(ep.dispatcher, EPLBDispatcher)
    mine = ep.dispatcher.slots_of_rank(rank)
    opt = torch.optim.SGD(ep.experts.parameters(), lr=0.5)  # the experts: what replication touches
    opt_full = torch.optim.SGD(full.experts.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(51)
    t_list = list(TOKENS[:p])
    start = sum(t_list[:rank])
    rows = slice(start, start + t_list[rank])
    used = torch.zeros(plan.num_replicas)
    for step in range(2):
        x_all = torch.randn(sum(t_list), D, generator=g, dtype=torch.float64)
        x_all[:, 0] += 1.5
        gy_all = torch.randn(sum(t_list), D, generator=g, dtype=torch.float64)
        xr = x_all.clone().requires_grad_(True)
        y_ref = full(xr)
        (y_ref * gy_all).sum().backward()
        x = x_all[rows].clone().requires_grad_(True)
        y = ep(x)
        close(y, y_ref[rows].detach(), f"eplb step {step}: output", F64)
        (y * gy_all[rows]).sum().backward()
        used += torch.bincount(ep.dispatcher.last_slots, minlength=plan.num_replicas)
        close(grad(x), xr.grad[rows], "eplb grad x", F64)
        gr = ep.router.weight.grad.clone()
        dist.all_reduce(gr)
        # 6e-8 apart in float64 under plain ep as well (not EPLB's doing): the fp32 tolerance
        close(gr, full.router.weight.grad, "eplb router grad")
        sync_replica_grads(ep)
        for (n, pa), pr in zip(ep.experts.named_parameters(), full.experts.parameters(), strict=True):
            close(pa.grad, pr.grad[mine], f"eplb replica grad {n}", F64)
        opt.step()
        opt_full.step()
        ep.zero_grad()
        full.zero_grad()
        for (n, pa), pr in zip(ep.experts.named_parameters(), full.experts.parameters(), strict=True):
            close(pa.detach(), pr.detach()[mine], f"eplb replica after step {step}: {n}", F64)
    dist.all_reduce(used)
    for slot in plan.log2phy[0, 2, : int(plan.logcnt[0, 2])].tolist():
        assert used[slot] > 0, "a replica of the hot expert received nothing"
    gather_logical_experts(ep)
    for k, v in ep.state_dict().items():
        close(v, full.state_dict()[k], f"gathered {k}", F64)
    done.append("eplb-layer")


def check_expert_slicing(rank, p, done):
    """More ranks than experts: E = P / 2 experts, each split in 2 hidden slices (4 ranks: 2
    experts). Output, input, summed router gradients and every slice's gradient equal the full
    layer's (fp32, 1e-5)."""
    e_count = p // 2
    torch.manual_seed(4)
    full = moelab.MoE(
        D, num_experts=e_count, top_k=min(2, e_count), hidden=HIDDEN, router="topk", aux_losses={}
    )
    ep = shard_experts_sliced(copy.deepcopy(full))
    assert isinstance(ep.dispatcher, ExpertSlicingDispatcher) and ep.experts.hidden == HIDDEN // 2
    g = torch.Generator().manual_seed(61)
    t_list = list(TOKENS[:p])
    x_all = torch.randn(sum(t_list), D, generator=g)
    gy_all = torch.randn(sum(t_list), D, generator=g)
    start = sum(t_list[:rank])
    rows = slice(start, start + t_list[rank])
    xr = x_all.clone().requires_grad_(True)
    y_ref = full(xr)
    (y_ref * gy_all).sum().backward()
    x = x_all[rows].clone().requires_grad_(True)
    y = ep(x)
    close(y, y_ref[rows].detach(), "sliced output")
    (y * gy_all[rows]).sum().backward()
    close(grad(x), xr.grad[rows], "sliced grad x")
    gr = ep.router.weight.grad.clone()
    dist.all_reduce(gr)
    close(gr, full.router.weight.grad, "sliced router grad")
    grads = moelab.ExpertBank.from_parameters(
        torch.nn.Parameter(full.experts.w_in.grad), torch.nn.Parameter(full.experts.down_proj.grad)
    )
    want = hidden_slice(grads, rank // 2, rank % 2, 2)
    close(ep.experts.w_in.grad, want.w_in.detach(), "sliced grad w_in")
    close(ep.experts.down_proj.grad, want.down_proj.detach(), "sliced grad down_proj")
    done.append("expert-slicing")


def check_hierarchical(rank, p, done):
    """Groups of G (every divisor of P): the two-hop exchange equals the flat ``all_to_all_single``;
    bytes and peers per hop match the split matrix."""
    g = torch.Generator().manual_seed(71)
    c = torch.randint(0, 5, (p, p), generator=g)  # c[src, dst]: rows src sends to dst
    c[0, p - 1] = 0  # an empty block
    send = c[rank].tolist()
    x = torch.arange(sum(send) * 3, dtype=torch.float32).view(-1, 3) + 1000 * rank
    want = x.new_empty(int(c[:, rank].sum()), 3)
    dist.all_to_all_single(want, x, c[:, rank].tolist(), send)
    for size in [d for d in range(1, p + 1) if p % d == 0]:
        a2a = HierarchicalAllToAll(size)
        got = a2a(x, send)
        assert torch.equal(got, want), (size, got, want)
        grp, i = divmod(rank, size)
        row = 3 * 4
        intra = sum(int(c[rank, d]) for d in range(p) if d % size != i)
        assert a2a.traffic.sent["intra"] == intra * row
        held = [(s, d) for s in range(grp * size, (grp + 1) * size) for d in range(p) if d % size == i]
        assert a2a.traffic.sent["inter"] == sum(int(c[s, d]) for s, d in held if d // size != grp) * row
        assert a2a.traffic.peers["intra"] <= size - 1 and a2a.traffic.peers["inter"] <= p // size - 1
    done.append("hierarchical-a2a")


def main() -> None:
    run_checks(
        [
            check_llep_spills,
            check_llep_fallback,
            check_llep_layer,
            check_eplb_layer,
            check_expert_slicing,
            check_hierarchical,
        ]
    )


if __name__ == "__main__":
    main()
