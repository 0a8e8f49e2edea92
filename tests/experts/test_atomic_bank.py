"""``AtomicBank``: single-neuron experts, gathered per assignment, against plain loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import moelab.experts.atomic  # noqa: F401  (registers bank "atomic")
from moelab import MoE, Routing, registry
from moelab.core import check_bank, example_bank
from moelab.experts.atomic import AtomicBank
from moelab.ops.executors import get_executor


def random_routing(t: int, e: int, k: int, seed: int, dtype=torch.float64) -> Routing:
    g = torch.Generator().manual_seed(seed)
    index = (
        torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k).long()
    )
    weight = torch.rand(t, k, generator=g, dtype=dtype)
    return Routing.from_topk(index, weight.requires_grad_(True), e)


def loop(x_TD: Tensor, routing: Routing, bank: AtomicBank, act) -> Tensor:
    """``y[t] += w * act(sum_d x[t, d] u[e, d]) * v[e]``, one assignment at a time, written out."""
    rows = [x_TD.new_zeros(bank.d_out) for _ in range(routing.num_tokens)]
    for t, e, w in zip(
        routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True
    ):
        h = sum(x_TD[t, d] * bank.u[e, d] for d in range(bank.d_in))
        rows[t] = rows[t] + w * act(h) * bank.v[e]
    return torch.stack(rows) if rows else x_TD.new_zeros(0, bank.d_out)


ACTS = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "silu": torch.nn.functional.silu}


@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("executor", ["reference", "sorted"])
def test_equals_per_assignment_loop_forward_and_backward(activation, executor):
    torch.manual_seed(0)
    bank = AtomicBank(12, 5, d_out=3, activation=activation).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    routing = random_routing(6, 12, 3, seed=1)
    y = get_executor(executor)(x, routing, bank)
    ref = loop(x, routing, bank, ACTS[activation])
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, bank.u, bank.v, routing.weight], g)
    ref_grads = torch.autograd.grad(ref, [x, bank.u, bank.v, routing.weight], g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_reference_and_sorted_executors_agree_with_repeated_experts():
    """Several tokens on the same experts (the sorted groups have more than one row)."""
    torch.manual_seed(2)
    bank = AtomicBank(4, 8).double()
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    routing = random_routing(20, 4, 2, seed=3)
    outs = {}
    for name in ("reference", "sorted"):
        y = get_executor(name)(x, routing, bank)
        outs[name] = (y, *torch.autograd.grad(y.square().sum(), [x, bank.u, bank.v, routing.weight]))
    for a, b in zip(outs["reference"], outs["sorted"], strict=True):
        torch.testing.assert_close(a, b)


def test_expert_forward_is_the_formula():
    bank = AtomicBank(3, 4, d_out=2)
    x = torch.randn(5, 4)
    expected = torch.nn.functional.gelu(x @ bank.u[1]).unsqueeze(-1) * bank.v[1].unsqueeze(0)
    torch.testing.assert_close(bank.expert_forward(1, x), expected)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_a_million_experts_forward_backward_without_E_sized_temporaries():
    e, t, k, d = 2**20, 512, 4, 8
    torch.manual_seed(0)
    bank = AtomicBank(e, d)
    x = torch.randn(t, d, requires_grad=True)
    routing = Routing.from_topk(
        torch.randint(0, e, (t, k)), torch.rand(t, k, requires_grad=True), e, validate=False
    )
    order = routing.by_expert()  # the routing's own [E] counts are built here, outside the check
    x_sorted = x.index_select(0, order.token_index)
    with ShapeRecorder() as rec:
        y = bank.forward_sorted(x_sorted, order)
        y.square().sum().backward()
    assert y.shape == (t * k, d) and torch.isfinite(y).all()
    # Every tensor with a dimension of size E is parameter-shaped: the gradients of u and v.
    with_e = [s for s in rec.shapes if e in s]
    assert with_e and all(s == (e, d) for s in with_e), with_e
    assert len(with_e) <= 6  # a handful of gradient buffers, not one per assignment
    assert max(math.prod(s) for s in rec.shapes if e not in s) <= t * k * d  # [N, d] at most
    touched = torch.unique(order.expert_index)
    assert bank.u.grad[touched].abs().sum() > 0 and x.grad.abs().sum() > 0
    untouched = torch.ones(e, dtype=torch.bool)
    untouched[touched] = False
    assert bank.u.grad[untouched].abs().sum() == 0 and bank.v.grad[untouched].abs().sum() == 0


@pytest.mark.parametrize("t", [0, 1, 7])
def test_in_a_lone_moe_forward_and_backward(t):
    torch.manual_seed(3)
    moe = MoE(16, num_experts=64, top_k=4, experts=AtomicBank(64, 16), backend="sorted")
    x = torch.randn(t, 16, requires_grad=True)
    y = moe(x)
    assert y.shape == (t, 16) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad.shape == (t, 16)
    if t:
        assert moe.experts.u.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_registered_as_bank_atomic():
    entry = registry.get("bank", "atomic")
    assert entry.obj is AtomicBank
    bank = check_bank(example_bank("atomic", 5, 4, 6))
    assert isinstance(bank, AtomicBank) and (bank.num_experts, bank.d_in, bank.d_out) == (5, 4, 6)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"num_experts": 0, "d_in": 4}, ValueError, "num_experts must be >= 1"),
        ({"num_experts": 4, "d_in": 4.0}, TypeError, "d_in must be an int"),
        ({"num_experts": 4, "d_in": 4, "d_out": 0}, ValueError, "d_out must be >= 1"),
        ({"num_experts": 4, "d_in": 4, "activation": "swiglu"}, ValueError, "not gated"),
        ({"num_experts": 4, "d_in": 4, "activation": "tanh"}, ValueError, "activation must be one of"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        AtomicBank(**kwargs)


def test_forward_sorted_checks_rows():
    bank = AtomicBank(4, 3)
    routing = Routing.from_topk(torch.tensor([[0], [1]]), torch.ones(2, 1), 4)
    with pytest.raises(ValueError, match=r"x_sorted_ND must be \[N, d_in\] = \[2, 3\]"):
        bank.forward_sorted(torch.zeros(2, 5), routing.by_expert())
