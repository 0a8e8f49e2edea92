"""``FiLMBank``: MoFME's feature-modulated experts against the equation written as plain loops."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import moelab.experts.film  # noqa: F401  (registers bank "film")
from moelab import MoE, Routing, registry
from moelab.core import check_bank, example_bank
from moelab.experts.film import FiLMBank
from moelab.ops.executors import get_executor

FORMS = ("full", "low_rank", "diagonal")


def random_routing(t: int, e: int, k: int, seed: int) -> Routing:
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k).long()
    weight = torch.rand(t, k, generator=g, dtype=torch.float64)
    return Routing.from_topk(index, weight.requires_grad_(True), e)


def dense_maps(bank: FiLMBank, e: int) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """Γ_e and Β_e as nested lists of scalars, built from the raw parameters entry by entry."""
    d = bank.d_in
    if bank.modulation == "full":
        return (
            [[bank.weight[e, j, i] for i in range(d)] for j in range(d)],
            [[bank.weight[e, d + j, i] for i in range(d)] for j in range(d)],
        )
    if bank.modulation == "low_rank":
        r = bank.rank
        return (
            [[sum(bank.gamma_up[e, j, q] * bank.down[e, q, i] for q in range(r)) for i in range(d)] for j in range(d)],
            [[sum(bank.beta_up[e, j, q] * bank.down[e, r + q, i] for q in range(r)) for i in range(d)] for j in range(d)],
        )
    zero = bank.scale.new_zeros(())
    return (
        [[bank.scale[e, j] if i == j else zero for i in range(d)] for j in range(d)],
        [[bank.scale[e, d + j] if i == j else zero for i in range(d)] for j in range(d)],
    )


def loop(y_TD: Tensor, routing: Routing, bank: FiLMBank) -> Tensor:
    """``out[t] += w * ((Γ_e y + γ_e) ⊙ y + Β_e y + β_e)`` one assignment and one feature at a time."""
    d = bank.d_in
    rows = [[y_TD.new_zeros(()) for _ in range(d)] for _ in range(routing.num_tokens)]
    for t, e, w in zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True):
        gamma_w, beta_w = dense_maps(bank, e)
        for j in range(d):
            g = sum(gamma_w[j][i] * y_TD[t, i] for i in range(d)) + bank.bias[e, j]
            b = sum(beta_w[j][i] * y_TD[t, i] for i in range(d)) + bank.bias[e, d + j]
            rows[t][j] = rows[t][j] + w * (g * y_TD[t, j] + b)
    if not rows:
        return y_TD.new_zeros(0, d)
    return torch.stack([torch.stack(r) for r in rows])


def bank_params(bank: FiLMBank) -> list[Tensor]:
    return [p for _, p in sorted(bank.named_parameters())]


@pytest.mark.parametrize("modulation", FORMS)
@pytest.mark.parametrize("executor", ["reference", "sorted"])
def test_equals_per_assignment_loop_forward_and_backward(modulation, executor):
    torch.manual_seed(0)
    bank = FiLMBank(5, 4, modulation, rank=2 if modulation == "low_rank" else None).double()
    y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    routing = random_routing(6, 5, 2, seed=1)
    out = get_executor(executor)(y, routing, bank)
    ref = loop(y, routing, bank)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    wrt = [y, routing.weight, *bank_params(bank)]
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("modulation", FORMS)
def test_expert_forward_is_the_equation(modulation):
    torch.manual_seed(1)
    bank = FiLMBank(3, 5, modulation).double()
    y = torch.randn(4, 5, dtype=torch.float64)
    gamma_w, beta_w = (torch.stack([torch.stack(r) for r in m]) for m in dense_maps(bank, 2))
    d = bank.d_in
    expected = (y @ gamma_w.T + bank.bias[2, :d]) * y + y @ beta_w.T + bank.bias[2, d:]
    torch.testing.assert_close(bank.expert_forward(2, y), expected)


def test_sorted_groups_of_many_rows_agree_with_the_reference_in_float32():
    """Many tokens per expert (grouped GEMMs over real groups), fp32 (the native grouped_mm path)."""
    torch.manual_seed(2)
    for modulation in FORMS:
        bank = FiLMBank(4, 16, modulation)
        y = torch.randn(40, 16, requires_grad=True)
        routing = random_routing(40, 4, 2, seed=3)
        routing.weight = routing.weight.float().detach().requires_grad_(True)
        outs = {}
        for name in ("reference", "sorted"):
            out = get_executor(name)(y, routing, bank)
            outs[name] = (out, *torch.autograd.grad(out.square().sum(), [y, routing.weight, *bank_params(bank)]))
        for a, b in zip(outs["reference"], outs["sorted"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t", [0, 1, 7])
def test_in_a_lone_moe_forward_and_backward(t):
    torch.manual_seed(3)
    moe = MoE(8, num_experts=4, top_k=2, experts=FiLMBank(4, 8))
    x = torch.randn(t, 8, requires_grad=True)
    y = moe(x)
    assert y.shape == (t, 8) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad.shape == (t, 8)
    if t:
        assert moe.experts.weight.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_parameter_counts_per_form():
    d, e = 16, 3
    assert FiLMBank(e, d).parameters_per_expert() == 2 * d * d + 2 * d
    assert FiLMBank(e, d, "low_rank", rank=4).parameters_per_expert() == 4 * d * 4 + 2 * d
    assert FiLMBank(e, d, "low_rank").rank == 2  # default d // 8
    assert FiLMBank(e, d, "diagonal").parameters_per_expert() == 4 * d
    assert sum(p.numel() for p in FiLMBank(e, d).parameters()) == e * (2 * d * d + 2 * d)


def test_init_is_nn_linear_default():
    torch.manual_seed(4)
    full = FiLMBank(2, 64)
    assert full.weight.abs().max() <= 1 / 8 and full.weight.abs().max() > 0.1  # U(+-1/sqrt(64))
    diag = FiLMBank(2, 64, "diagonal")
    assert diag.scale.abs().max() <= 1 and diag.scale.abs().max() > 0.9  # one-input linears: U(+-1)


def test_registered_as_bank_film():
    assert registry.get("bank", "film").obj is FiLMBank
    bank = check_bank(example_bank("film", 5, 4, 4))
    assert isinstance(bank, FiLMBank) and (bank.num_experts, bank.d_in, bank.d_out) == (5, 4, 4)
    with pytest.raises(ValueError, match="d_out must equal d_in"):
        example_bank("film", 5, 4, 6)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"num_experts": 0, "d_model": 4}, ValueError, "num_experts must be >= 1"),
        ({"num_experts": 2, "d_model": 4.0}, TypeError, "d_model must be an int"),
        ({"num_experts": 2, "d_model": 4, "modulation": "affine"}, ValueError, "modulation must be one of"),
        ({"num_experts": 2, "d_model": 4, "rank": 2}, ValueError, "rank is only for"),
        ({"num_experts": 2, "d_model": 4, "modulation": "low_rank", "rank": 0}, ValueError, "rank must be >= 1"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        FiLMBank(**kwargs)


def test_forward_sorted_checks_rows():
    bank = FiLMBank(4, 3)
    routing = Routing.from_topk(torch.tensor([[0], [1]]), torch.ones(2, 1), 4)
    with pytest.raises(ValueError, match=r"y_sorted_ND must be \[N, d\] = \[2, 3\]"):
        bank.forward_sorted(torch.zeros(2, 5), routing.by_expert())
