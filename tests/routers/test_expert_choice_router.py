"""Expert-choice routing (Zhou et al. 2022) against a per-expert loop."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.routers import ExpertChoiceRouter, expert_choice
from moelab.routers.expert_choice import expert_choice_capacity


def naive_expert_choice(probs, cap):
    """For each expert, its column of S sorted descending, first ``cap`` tokens."""
    t, e = probs.shape
    out = []
    for j in range(e):
        col = [(float(probs[i, j]), i) for i in range(t)]
        best = sorted(col, key=lambda v: -v[0])[:cap]
        out.append([(i, j, p) for p, i in best])
    return out


@pytest.mark.parametrize(
    "t,e,c", [(16, 4, 2.0), (10, 8, 1.0), (5, 3, 3.0), (7, 7, 0.5), (1, 4, 2.0), (3, 2, 8.0)]
)
def test_each_expert_takes_its_top_c_tokens(t, e, c):
    r = ExpertChoiceRouter(6, e, capacity_factor=c)
    x = torch.randn(t, 6)
    routing = r(x)
    cap = min(t, math.ceil(t * c / e))
    probs = torch.softmax(x @ r.weight.detach().t(), dim=-1)  # softmax over experts
    torch.testing.assert_close(routing.probs, probs)
    ref = naive_expert_choice(probs, cap)
    assert routing.num_assignments == e * cap
    got = list(
        zip(routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist(), strict=True)
    )
    for j in range(e):
        mine = got[j * cap : (j + 1) * cap]  # expert-major, best first
        assert [(i, jj) for i, jj, _ in mine] == [(i, jj) for i, jj, _ in ref[j]]
        for (_, _, w), (_, _, p) in zip(mine, ref[j], strict=True):
            assert w == pytest.approx(p, rel=1e-6)
    # Balanced by construction; no capacity drop bookkeeping.
    assert routing.tokens_per_expert().tolist() == [cap] * e
    assert routing.requested is None and routing.top_k is None
    routing.check()


def test_capacity_formula_and_top_k_alias():
    assert expert_choice_capacity(16, 4, 2.0) == 8
    assert expert_choice_capacity(10, 4, 1.0) == 3  # ceil(2.5)
    assert expert_choice_capacity(5, 2, 8.0) == 5  # never more than T
    assert expert_choice_capacity(0, 4, 2.0) == 0
    assert ExpertChoiceRouter(8, 4).capacity_factor == 2.0  # paper default c = 2
    assert ExpertChoiceRouter(8, 4, top_k=3).capacity_factor == 3.0
    assert ExpertChoiceRouter(8, 4, top_k=3, capacity_factor=1.5).capacity_factor == 1.5
    r = moelab.build_router("expert_choice", d_model=8, num_experts=4, top_k=1)
    assert r(torch.randn(12, 8)).num_assignments == 12  # on average one expert per token


def test_expert_choice_function_shapes():
    probs = torch.softmax(torch.randn(6, 3), -1)
    tok, exp, w = expert_choice(probs, 2)
    assert tok.shape == exp.shape == w.shape == (6,)
    assert exp.tolist() == [0, 0, 1, 1, 2, 2]


def test_expert_choice_is_not_causal():
    # Documented: a later token can change an earlier token's experts.
    r = ExpertChoiceRouter(2, 2, capacity_factor=1.0)  # C = 2 of 4 tokens per expert
    with torch.no_grad():
        r.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert r(x).mask()[0].tolist() == [True, False]
    x[3] = torch.tensor([3.0, 0.0])  # the last token now outbids token 0 for expert 0
    assert r(x).mask()[0].tolist()[0] is False


def test_router_gradient_flows_through_selected_probs():
    r = ExpertChoiceRouter(8, 4)
    x = torch.randn(10, 8)
    bank = moelab.ExpertBank(4, 8, 8)
    moelab.ops.moe_reference(x, r(x), bank).square().sum().backward()
    assert r.weight.grad.abs().sum() > 0
