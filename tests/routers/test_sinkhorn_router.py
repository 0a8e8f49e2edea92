"""Sinkhorn balancing (``sinkhorn``) and Selective Sinkhorn Routing (``ssr``) against independent
references: the marginals of the plan, Megatron's multiplicative Sinkhorn written plainly, brute
force on tiny problems, and SSR with p = 0 against the plain softmax top-k router."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.functional import sinkhorn
from moelab.routers.sinkhorn import SelectiveSinkhornRouter, SinkhornRouter, sinkhorn_topk


def megatron_sinkhorn(cost: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Megatron-LM's multiplicative Sinkhorn on exp(cost), written plainly (rows 1/T, columns 1/E)."""
    k = torch.exp(cost.double())
    t, e = k.shape
    d0, d1 = torch.ones(t, dtype=k.dtype), torch.ones(e, dtype=k.dtype)
    err = 1e9
    for _ in range(100_000):
        if err <= tol:
            break
        d0 = (1.0 / t) / ((d1 * k).sum(1) + 1e-8)
        d1_new = (1.0 / e) / ((d0[:, None] * k).sum(0) + 1e-8)
        err = (d1_new - d1).abs().mean().item()
        d1 = d1_new
    return d1 * k * d0[:, None]


@pytest.mark.parametrize("t,e,xi", [(1, 1, 1.0), (7, 3, 1.0), (64, 8, 0.5), (33, 16, 0.05), (512, 4, 2.0)])
def test_plan_marginals_hold(t, e, xi):
    torch.manual_seed(t + e)
    cost = torch.randn(t, e) * 2
    plan = sinkhorn(cost, xi=xi, tol=1e-6, max_iter=5000)
    assert plan.shape == (t, e) and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(1), torch.ones(t), atol=1e-5, rtol=0)  # each token: mass 1
    torch.testing.assert_close(plan.sum(0), torch.full((e,), t / e), atol=1e-4 * t, rtol=1e-5)  # balanced


def test_plan_matches_megatron_up_to_row_scale_and_picks_the_same_experts():
    torch.manual_seed(0)
    cost = torch.randn(40, 8)
    ours = sinkhorn(cost, xi=1.0, tol=1e-8, max_iter=10_000).double()
    ref = megatron_sinkhorn(cost, tol=1e-12)
    # Megatron's rows sum to 1/T and columns to 1/E: the same plan scaled by 1/T
    torch.testing.assert_close(ours / cost.shape[0], ref, atol=1e-7, rtol=1e-5)
    assert torch.equal(ours.topk(2, dim=1).indices, ref.topk(2, dim=1).indices)


def test_plan_maximises_the_regularised_objective():
    """Brute force on a 2 x 2 problem: with both marginals fixed the plan has one free entry; the
    objective <Pi, C> + xi H(Pi) is largest at Sinkhorn's plan."""
    cost, xi = torch.tensor([[1.0, -0.5], [0.3, 0.8]]), 0.7
    plan = sinkhorn(cost, xi=xi, tol=1e-9, max_iter=10_000).double()

    def objective(a: float) -> float:
        p = torch.tensor([[a, 1 - a], [1 - a, a]], dtype=torch.float64)  # rows 1, columns 1
        return float((p * cost.double()).sum() - xi * (p * p.log()).sum())

    grid = torch.linspace(1e-4, 1 - 1e-4, 20001)
    best = grid[int(torch.tensor([objective(float(a)) for a in grid]).argmax())]
    assert float(plan[0, 0]) == pytest.approx(float(best), abs=1e-3)


def test_plan_is_differentiable_and_empty_input_is_empty():
    cost = torch.randn(6, 3, requires_grad=True)
    sinkhorn(cost).square().sum().backward()
    assert cost.grad is not None and torch.isfinite(cost.grad).all()
    assert sinkhorn(torch.zeros(0, 4)).shape == (0, 4)
    with pytest.raises(ValueError, match="cost_TE"):
        sinkhorn(torch.zeros(3))
    with pytest.raises(ValueError, match="xi"):
        sinkhorn(torch.zeros(3, 2), xi=0.0)


def test_sinkhorn_router_selects_by_plan_in_training_and_by_scores_at_eval():
    torch.manual_seed(1)
    r = SinkhornRouter(16, 4, top_k=2)
    x = torch.randn(50, 16)
    x[:, :] += 3 * r.weight[0]  # every token prefers expert 0: the plan must spread them
    logits = x @ r.weight.t()
    probs = torch.softmax(logits, -1)
    r.train()
    out = r(x)
    plan = sinkhorn(logits.detach(), xi=1.0)
    index = plan.topk(2, dim=1).indices
    assert torch.equal(out.topk_index().view(50, 2), index)
    torch.testing.assert_close(out.weight.view(50, 2), probs.gather(1, index))  # raw scores, not the plan
    train_load = torch.bincount(index.flatten(), minlength=4)
    r.eval()
    out = r(x)
    eval_index = probs.topk(2, dim=1).indices
    assert torch.equal(out.topk_index().view(50, 2), eval_index)
    # the plan balanced the load that the raw scores pile onto one expert
    assert train_load.max() < torch.bincount(eval_index.flatten(), minlength=4).max()
    # k = 1 gates are the sigmoid of the logit (Megatron)
    r1 = SinkhornRouter(16, 4, top_k=1).eval()
    out = r1(x)
    torch.testing.assert_close(
        out.weight, torch.sigmoid(x @ r1.weight.t()).gather(1, out.topk_index().view(-1, 1)).flatten()
    )


def test_ssr_with_p_zero_equals_softmax_topk():
    torch.manual_seed(2)
    ssr = SelectiveSinkhornRouter(16, 8, top_k=2, p=0.0).train()
    base = moelab.build_router("topk", d_model=16, num_experts=8, top_k=2, normalize=True).train()
    base.weight.data.copy_(ssr.weight.data)
    x = torch.randn(30, 16)
    state = torch.get_rng_state()
    a, b = ssr(x), base(x)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.token_index, b.token_index)
    torch.testing.assert_close(a.weight, b.weight)
    assert torch.equal(torch.get_rng_state(), state)  # p = 0 draws nothing
    assert ssr.sinkhorn_steps == 0


def test_ssr_with_p_one_routes_by_the_renormalised_plan_and_never_at_eval():
    torch.manual_seed(3)
    ssr = SelectiveSinkhornRouter(8, 4, top_k=2, p=1.0, xi=0.5, cost="softmax").train()
    x = torch.randn(20, 8)
    out = ssr(x)
    probs = torch.softmax(x @ ssr.weight.t(), -1)
    _, weight, index = sinkhorn_topk(probs.detach(), 2, xi=0.5)
    assert torch.equal(out.topk_index().view(20, 2), index)
    torch.testing.assert_close(out.weight.view(20, 2), weight)
    torch.testing.assert_close(out.weight.view(20, 2).sum(1), torch.ones(20))
    assert ssr.sinkhorn_steps == 1
    ssr.eval()
    out = ssr(x)
    assert torch.equal(out.topk_index().view(20, 2), probs.topk(2, dim=1).indices)
    assert ssr.sinkhorn_steps == 1


def test_ssr_uses_sinkhorn_on_about_a_fraction_p_of_training_forwards():
    torch.manual_seed(4)
    ssr = SelectiveSinkhornRouter(8, 4, p=0.2).train()
    x = torch.randn(5, 8)
    n = 2000
    for _ in range(n):
        ssr(x)
    sd = math.sqrt(0.2 * 0.8 / n)
    assert abs(ssr.sinkhorn_steps / n - 0.2) < 4 * sd


@pytest.mark.parametrize("name", ["sinkhorn", "ssr"])
def test_routers_train_in_moe_with_gradients(name):
    torch.manual_seed(5)
    moe = moelab.MoE(
        d_model=16, num_experts=4, top_k=2, router=name, router_kwargs={"p": 1.0} if name == "ssr" else {}
    )
    x = torch.randn(2, 9, 16)
    y = moe(x)
    y.square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    if name == "sinkhorn":  # the gates are the raw scores: the router learns from the task
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name,kwargs,arg",
    [
        ("ssr", {"p": 1.5}, "p"),
        ("ssr", {"cost": "quadratic"}, "cost"),
        ("ssr", {"xi": -1.0}, "xi"),
        ("sinkhorn", {"max_iter": 0}, "max_iter"),
        ("sinkhorn", {"tol": 0.0}, "tol"),
    ],
)
def test_bad_parameters_name_the_argument(name, kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        moelab.build_router(name, d_model=8, num_experts=4, **kwargs)
