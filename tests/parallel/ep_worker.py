"""Run under torchrun by test_ep.py: the ``ep`` dispatcher equals the single-process layer.

Usage: torchrun --nproc_per_node P ep_worker.py OUT_DIR

Every rank builds the same full (unsharded) layer and every rank's tokens (one seed), computes the
single-process reference on all ranks' tokens concatenated, then runs its expert-parallel copy on
its own tokens only and compares: the output, the input gradient, the router / routing-weight
gradient summed over ranks, and its experts' weight gradients (fp32, within 1e-5). Rank 1 has no
tokens. Each rank writes the names of the checks it passed to OUT_DIR/rank{r}.json.
"""

from __future__ import annotations

import copy
import gc

import torch
import torch.distributed as dist
from torchrun import run_checks

import moelab
from moelab.core.routing import Routing, cat_routings
from moelab.models import MoELM, MoELMConfig
from moelab.ops import get_executor
from moelab.ops.all_to_all import AllToAllDispatcher
from moelab.parallel.sharding import (
    clip_grad_norm_,
    expert_block,
    expert_parameter_names,
    gather_experts,
    gathered_state_dict,
    shard_experts,
    slice_bank,
)

E, D, HIDDEN = 8, 8, 8
TOKENS = (6, 0, 7, 3)  # per rank; rank 1 has T = 0
TOL = dict(rtol=1e-5, atol=1e-5)
EXECUTORS = ("reference", "sorted")


def close(got, want, what):
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


def grad(p):
    """``p.grad``, or zeros where nothing reached ``p`` (an expert that received no row)."""
    return torch.zeros_like(p) if p.grad is None else p.grad


def summed(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def manual_routing(t_list, g):
    """Ragged COO routings (duplicates, tokens with no expert, top_k None) that never pick rank 1's
    experts nor expert E-1: empty experts, and a rank that receives nothing."""
    p = dist.get_world_size()
    s1, e1 = expert_block(E, p, 1)
    allowed = torch.tensor([e for e in range(E - 1) if not s1 <= e < e1])
    parts = []
    for t in t_list:
        n = 2 * t
        tok = torch.randint(0, max(t, 1), (n,), generator=g)
        ex = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
        w = torch.rand(n, generator=g)
        parts.append(Routing(tok, ex, w, t, E))
    return parts


def traffic_expected(parts, rank, p, d_in, d_out, elem=4):
    """Rows rank ``rank`` sends to / receives from other ranks, from the global routing."""
    e_local = E // p
    sent = sum(int((r.expert_index // e_local != rank).sum()) for r in [parts[rank]])
    recv = sum(int((r.expert_index // e_local == rank).sum()) for q, r in enumerate(parts) if q != rank)
    counts = (p - 1) * e_local * 8
    return {
        "counts": (counts, counts),
        "dispatch": (sent * d_in * elem, recv * d_in * elem),
        "combine": (recv * d_out * elem, sent * d_out * elem),
        "dispatch_backward": (recv * d_in * elem, sent * d_in * elem),
        "combine_backward": (sent * d_out * elem, recv * d_out * elem),
    }


def check_dispatcher_direct(rank, p, done):
    """The dispatcher alone on a hand-made routing: empty experts, a rank receiving nothing."""
    g = torch.Generator().manual_seed(11)
    t_list = list(TOKENS[:p])
    torch.manual_seed(1)  # every rank builds the same global bank
    full_bank = moelab.ExpertBank(E, D, HIDDEN, "swiglu", d_out=D + 4)
    x_all = torch.randn(sum(t_list), D, generator=g)
    parts = manual_routing(t_list, g)
    gy_all = torch.randn(sum(t_list), D + 4, generator=g)
    start = sum(t_list[:rank])
    rows = slice(start, start + t_list[rank])
    s, e = expert_block(E, p, rank)
    for name in EXECUTORS:
        ex = get_executor(name)
        # reference: one process, all tokens, the full bank
        xr = x_all.clone().requires_grad_(True)
        ws = [r.weight.clone().requires_grad_(True) for r in parts]
        routing = cat_routings(
            [
                Routing(r.token_index, r.expert_index, w, r.num_tokens, E)
                for r, w in zip(parts, ws, strict=True)
            ]
        )
        bank_ref = copy.deepcopy(full_bank)
        y_ref = moelab.ops.moe_reference(xr, routing, bank_ref)
        (y_ref * gy_all).sum().backward()
        # expert parallel: this rank's tokens and routing, its block of experts
        disp = AllToAllDispatcher()
        bank = slice_bank(full_bank, s, e)
        x = x_all[rows].clone().requires_grad_(True)
        mine = parts[rank]
        w = mine.weight.clone().requires_grad_(True)
        y = disp(x, Routing(mine.token_index, mine.expert_index, w, mine.num_tokens, E), bank, ex)
        close(y, y_ref[rows].detach(), f"{name}: output")
        expected = traffic_expected(parts, rank, p, D, D + 4)
        for ph in ("counts", "dispatch", "combine"):
            assert (disp.traffic.sent[ph], disp.traffic.received[ph]) == expected[ph], (
                ph,
                disp.traffic,
                expected,
            )
        (y * gy_all[rows]).sum().backward()
        for ph, want in expected.items():
            assert (disp.traffic.sent[ph], disp.traffic.received[ph]) == want, (ph, disp.traffic, want)
        assert disp.bytes_sent == sum(v[0] for v in expected.values())
        disp.reset_traffic()
        assert disp.bytes_sent == disp.bytes_received == 0
        close(grad(x), xr.grad[rows], f"{name}: grad x")
        close(grad(w), grad(ws[rank]), f"{name}: grad routing weight")
        for (n, pa), pr in zip(bank.named_parameters(), bank_ref.parameters(), strict=True):
            close(grad(pa), grad(pr)[s:e], f"{name}: grad {n}")
        recv = expected["dispatch"][1]
        if rank == 1:
            assert recv == 0 and t_list[rank] == 0  # receives nothing and has no tokens
        done.append(f"direct-{name}")
    done.append("empty-experts")


def build_layer(capacity_factor):
    torch.manual_seed(3)
    return moelab.MoE(
        D,
        num_experts=E,
        top_k=2,
        hidden=HIDDEN,
        router="topk",
        router_kwargs={"capacity_factor": capacity_factor},
        aux_losses={},
    )


def check_layer(rank, p, capacity_factor, backend, done):
    """``moelab.MoE`` sharded with ``shard_experts``: output and every gradient equal the full layer."""
    g = torch.Generator().manual_seed(5)
    t_list = list(TOKENS[:p])
    x_all = torch.randn(sum(t_list), D, generator=g)
    gy_all = torch.randn(sum(t_list), D, generator=g)
    start = sum(t_list[:rank])
    rows = slice(start, start + t_list[rank])

    full = build_layer(capacity_factor)
    full.backend = backend
    ep = shard_experts(copy.deepcopy(full))
    s, e = expert_block(E, p, rank)

    xr = x_all.clone().requires_grad_(True)
    chunks = xr.split(t_list)
    if capacity_factor is None:
        y_ref = full(xr)  # literally the single-process layer on the concatenated tokens
    else:
        # capacity is per routed batch: each rank's router drops within its own tokens, so the
        # reference routes each rank's chunk and runs the experts on all tokens at once.
        routing = cat_routings([full.router(c) for c in chunks])
        y_ref = full.run_experts(xr, routing)
    (y_ref * gy_all).sum().backward()

    x = x_all[rows].clone().requires_grad_(True)
    y, routing_mine = ep.forward_routed(x)
    close(y, y_ref[rows].detach(), f"layer cf={capacity_factor} {backend}: output")
    (y * gy_all[rows]).sum().backward()
    close(grad(x), xr.grad[rows], f"layer cf={capacity_factor} {backend}: grad x")
    for (n, pa), pr in zip(ep.router.named_parameters(), full.router.parameters(), strict=True):
        close(summed(grad(pa)), grad(pr), f"layer: router grad {n} summed over ranks")
    for (n, pa), pr in zip(ep.experts.named_parameters(), full.experts.parameters(), strict=True):
        close(grad(pa), grad(pr)[s:e], f"layer: expert grad {n}")
    if capacity_factor is not None:
        dropped = summed(torch.tensor(float(routing_mine.drop_rate() > 0)))
        assert dropped > 0, "the capacity factor dropped nothing: the test would not cover drops"
    done.append(f"layer-cf{capacity_factor}-{backend}")


def check_moelm(rank, p, done):
    """A ``MoELM`` sharded in place: logits equal the full model's; ``gather_experts`` restores it."""
    cfg = MoELMConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, num_experts=E, top_k=2, aux_losses={}
    )
    torch.manual_seed(7)
    full = MoELM(cfg)
    ep = shard_experts(copy.deepcopy(full))
    assert all(isinstance(m.dispatcher, AllToAllDispatcher) for _, m in ep.moe_layers())
    ids = torch.randint(0, 32, (p, 8), generator=torch.Generator().manual_seed(9))
    want = full(ids).logits[rank : rank + 1]
    got = ep(ids[rank : rank + 1]).logits
    close(got, want.detach(), "MoELM logits")
    gather_experts(ep)
    ref = full.state_dict()
    for k, v in ep.state_dict().items():
        assert torch.equal(v, ref[k]), k
    done.append("moelm")


def check_ep_with_data_parallel(rank, p, done):
    """The training wiring ``moelab train --ep`` needs: EP on its own process group, DDP on the
    replicated weights only (expert parameters ignored), expert gradients divided by P, one global
    gradient norm for clipping. Two SGD steps equal one process on the concatenated batch."""
    cfg = MoELMConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, num_experts=E, top_k=2, aux_losses={}
    )
    torch.manual_seed(7)
    full = MoELM(cfg)
    ep_group = dist.new_group(list(range(p)))  # all-to-alls apart from DDP's all-reduces
    model = shard_experts(copy.deepcopy(full), ep_group)
    experts = set(expert_parameter_names(model))
    ddp = torch.nn.parallel.DistributedDataParallel
    ddp._set_params_and_buffers_to_ignore_for_model(model, sorted(experts))
    wrapped = ddp(model, broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt_full = torch.optim.SGD(full.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(13)
    for _ in range(2):
        ids = torch.randint(0, 32, (2 * p, 8), generator=g)  # the global batch; rank r takes 2 rows
        full(ids, labels=ids).loss.backward()
        norm_full = torch.nn.utils.clip_grad_norm_(full.parameters(), 0.3)
        opt_full.step()
        opt_full.zero_grad()
        wrapped(ids[2 * rank : 2 * rank + 2], labels=ids[2 * rank : 2 * rank + 2]).loss.backward()
        for name, prm in model.named_parameters():
            if name in experts and prm.grad is not None:
                prm.grad /= p  # it summed every rank's mean loss; DDP averages the others
        norm = clip_grad_norm_(model, 0.3)
        close(norm, norm_full, "global grad norm")
        assert norm_full > 0.3  # the clip is active
        opt.step()
        opt.zero_grad()
    state, want = gathered_state_dict(model), full.state_dict()
    assert state.keys() == want.keys()
    for k in want:
        close(state[k], want[k], f"after 2 steps: {k}")
    # drop the DDP wrapper while the group lives, then let gloo finish (moelab.train.distributed.release_ddp)
    del wrapped
    gc.collect()
    dist.barrier()
    dist.destroy_process_group(ep_group)
    done.append("ep+ddp")


def main() -> None:
    run_checks(
        [
            check_dispatcher_direct,
            *(lambda r, p, done, b=b: check_layer(r, p, None, b, done) for b in EXECUTORS),
            lambda r, p, done: check_layer(r, p, 0.75, "sorted", done),
            check_moelm,
            check_ep_with_data_parallel,
        ]
    )


if __name__ == "__main__":
    main()
