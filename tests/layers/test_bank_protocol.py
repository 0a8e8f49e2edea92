"""The bank protocol through ``MoE`` and ``Routing``: banks that are not MLPs, ``d_in != d_out``, and a
pool of 2^20 experts routed without anything of size T x E."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import moelab
from moelab import MoE, Routing
from moelab.core import ExpertOrder, Router, RoutingContext
from moelab.losses import load_balance

EXECUTORS = ("reference", "sorted", "fast")


def naive(x_TD: Tensor, routing: Routing, bank) -> Tensor:
    """One assignment at a time: ``y[t] += w * expert_e(x[t])``."""
    rows = [x_TD.new_zeros(bank.d_out) for _ in range(routing.num_tokens)]
    for t, e, w in zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True):
        rows[t] = rows[t] + w * bank.expert_forward(e, x_TD[t : t + 1])[0]
    return torch.stack(rows)


@pytest.mark.parametrize("backend", EXECUTORS)
def test_mlp_bank_with_d_out_different_from_d_in(backend):
    """A 16 -> 48 projection replaced by an MoE (as a LoRA bank on a 768 -> 3072 projection needs)."""
    torch.manual_seed(0)
    moe = MoE(16, num_experts=4, top_k=2, hidden=12, d_out=48, shared_experts=1, backend=backend).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    y, routing = moe.forward_routed(x)
    assert y.shape == (2, 5, 48)
    expected = naive(x.reshape(-1, 16), routing, moe.experts) + moe.shared_experts(x.reshape(-1, 16))
    torch.testing.assert_close(y.reshape(-1, 48), expected)
    y.square().sum().backward()
    ref = MoE(16, num_experts=4, top_k=2, hidden=12, d_out=48, shared_experts=1, backend="reference").double()
    ref.load_state_dict(moe.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (name, p), q in zip(moe.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


class LowRankBank(nn.Module):
    """A bank that is not an ``ExpertBank``: expert e is ``x -> B_e A_e x`` (rank r), ``d_in -> d_out``."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_out = num_experts, d_in, d_out
        self.A = nn.Parameter(torch.randn(num_experts, rank, d_in) / math.sqrt(d_in))
        self.B = nn.Parameter(torch.randn(num_experts, d_out, rank) / math.sqrt(rank))

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        return x @ self.A[e].t() @ self.B[e].t()

    def forward_sorted(self, x_sorted: Tensor, order: ExpertOrder) -> Tensor:
        e = order.expert_index
        return torch.einsum("nr,nor->no", torch.einsum("nd,nrd->nr", x_sorted, self.A[e]), self.B[e])


def test_any_module_following_the_protocol_is_a_bank():
    bank = LowRankBank(4, 8, 6)
    moe = MoE(8, num_experts=4, top_k=2, experts=bank)
    assert moe.d_out == 6 and moe.extra_repr().startswith("d_model=8, d_out=6")
    # auto skips "fast" (it runs only MLP banks) and picks "sorted".
    assert moelab.ops.resolve_executor("auto", torch.device("cpu"), bank).name == "sorted"
    x = torch.randn(10, 8)
    y, routing = moe.forward_routed(x)
    torch.testing.assert_close(y, naive(x, routing, bank))
    with pytest.raises(TypeError, match=r"experts must be a bank .*missing: .*forward_sorted"):
        MoE(8, num_experts=4, experts=nn.Linear(8, 8))
    with pytest.raises(ValueError, match="executor 'fast' cannot run a LowRankBank"):
        MoE(8, num_experts=4, experts=bank, backend="fast")(x)


# --------------------------------------------------------------------------------------------------
# A pool of 2^20 experts
# --------------------------------------------------------------------------------------------------
N_SIDE = 1024  # E = N_SIDE^2 = 2^20


class NeuronPool(nn.Module):
    """2^20 single-neuron experts ``x -> v_e * gelu(u_e . x)``, weights gathered per assignment."""

    def __init__(self, num_experts: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_out = num_experts, d_in, d_out
        self.u = nn.Parameter(torch.randn(num_experts, d_in) / math.sqrt(d_in))
        self.v = nn.Parameter(torch.randn(num_experts, d_out) / math.sqrt(d_out))

    def expert_forward(self, e: int, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(x @ self.u[e]).unsqueeze(-1) * self.v[e]

    def forward_sorted(self, x_sorted: Tensor, order: ExpertOrder) -> Tensor:
        e = order.expert_index
        return torch.nn.functional.gelu((x_sorted * self.u[e]).sum(-1, keepdim=True)) * self.v[e]


class TwoKeyRouter(Router):
    """Product keys, plainly: the best key of each half gives expert ``i * n + j``; k = 2 takes the
    two best first-half keys with the best second-half key. Never forms [T, E] scores."""

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2) -> None:
        super().__init__(d_model, num_experts)
        self.keys_a = nn.Parameter(torch.randn(N_SIDE, d_model))
        self.keys_b = nn.Parameter(torch.randn(N_SIDE, d_model))

    def route(self, x_TD, ctx):
        sa, ia = (x_TD @ self.keys_a.t()).topk(2, -1)
        sb, ib = (x_TD @ self.keys_b.t()).topk(1, -1)
        scores = sa + sb  # [T, 2]
        index = ia * N_SIDE + ib
        return Routing.from_topk(index, scores.softmax(-1), self.num_experts, validate=False)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates (numel)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_pool_of_2_20_experts_routes_sorts_runs_and_traces_without_T_x_E():
    e, t, d = N_SIDE * N_SIDE, 4096, 8
    torch.manual_seed(0)
    moe = MoE(d, num_experts=e, top_k=2, router=TwoKeyRouter(d, e), experts=NeuronPool(e, d, d), backend="sorted")
    x = torch.randn(t, d)
    params = max(p.numel() for p in moe.parameters())  # u, v: [E, d], parameter-sized
    with LargestTensor() as mode, moelab.trace(moe) as tr:
        y, routing = moe.forward_routed(x, RoutingContext())
        y.square().mean().backward()
        order = routing.by_expert()
        summary = tr.summary()[0]
        checked = Routing(routing.token_index, routing.expert_index, routing.weight.detach(), t, e)  # validates
    # Nothing larger than the pool's own parameters [E, d]: 512x below T x E.
    assert mode.largest <= max(params, e) and 512 * mode.largest <= t * e
    assert order.counts.shape == (e,) and int(order.counts.sum()) == 2 * t and checked.num_assignments == 2 * t
    assert summary["tokens"] == t and summary["assignments"] == 2 * t and math.isnan(summary["entropy"])
    assert moe.router.keys_a.grad is not None and moe.experts.u.grad.abs().sum() > 0
    # A few tokens against the per-assignment loop (the reference executor loops over present experts).
    few = slice(0, 16)
    sub = Routing.from_topk(
        routing.expert_index.view(t, 2)[few], routing.weight.view(t, 2)[few].detach(), e
    )
    torch.testing.assert_close(moe.run_experts(x[few], sub), naive(x[few], sub, moe.experts))
    # What needs a dense [T, E] view refuses clearly instead of allocating 2^32 elements.
    with pytest.raises(ValueError, match=r"Routing.dense\(\) needs a dense \[T, E\]"):
        routing.dense()
    with pytest.raises(ValueError, match="load_balance needs routing.probs"):
        load_balance(routing)
