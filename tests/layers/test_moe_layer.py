"""The MoE layer: acceptance shapes, equivalence to a plain pipeline, shared experts, aux losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moelab
from moelab.core import Router, Routing
from moelab.losses import load_balance, load_balance_seq, z

ROUTERS = ["topk", "sigmoid_topk", "expert_choice"]


@pytest.mark.parametrize("name", ROUTERS)
def test_acceptance_build_router_and_moe_forward_backward(name):
    r = moelab.build_router(name, d_model=64, num_experts=8, top_k=2)
    assert isinstance(r, Router) and r.num_experts == 8 and r.d_model == 64
    routing = r(torch.randn(32, 64))
    assert isinstance(routing, Routing) and routing.num_tokens == 32
    moe = moelab.MoE(64, num_experts=8, top_k=2, router=name, aux_losses={"load_balance": 1e-2, "z": 1e-3})
    x = torch.randn(2, 16, 64, requires_grad=True)
    y = moe(x)
    assert y.shape == (2, 16, 64) and torch.isfinite(y).all()
    (y.square().mean() + moe.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    for p in moe.experts.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def plain_expert(bank, e, x):
    """One expert by hand from the bank's fused weights (transformers layout)."""
    h = bank.hidden
    if bank.gated:
        gate, up = bank.gate_up_proj[e][:h], bank.gate_up_proj[e][h:]
        act = bank.act_fn(x @ gate.t()) * (x @ up.t())
    else:
        act = bank.act_fn(x @ bank.up_proj[e].t())
    return act @ bank.down_proj[e].t()


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_layer_equals_per_token_loop(name, activation):
    moe = moelab.MoE(12, num_experts=4, top_k=2, hidden=8, router=name, activation=activation).eval()
    x = torch.randn(2, 5, 12)
    y = moe(x)
    xt = x.reshape(-1, 12)
    routing = moe.router(xt)
    ref = torch.zeros(10, 12)
    for t, e, w in zip(
        routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist(), strict=True
    ):
        ref[t] += w * plain_expert(moe.experts, e, xt[t : t + 1])[0].detach()
    torch.testing.assert_close(y.reshape(10, 12).detach(), ref, rtol=1e-5, atol=1e-5)
    # [T, d] input gives the same rows as [B, S, d].
    torch.testing.assert_close(moe(xt), y.reshape(10, 12))


def test_backends_give_the_same_layer_output():
    torch.manual_seed(1)
    a = moelab.MoE(16, num_experts=4, top_k=2, backend="reference").eval()
    b = moelab.MoE(16, num_experts=4, top_k=2, backend="sorted").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gate", [False, True])
def test_shared_experts_match_plain_reference(gate):
    moe = moelab.MoE(8, num_experts=4, top_k=2, hidden=6, shared_experts=2, shared_gate=gate).eval()
    s = moe.shared_experts
    assert s.hidden == 12  # shared_experts * expert hidden
    x = torch.randn(7, 8)
    routed = moelab.ops.moe_reference(x, moe.router(x), moe.experts)
    shared = (F.silu(x @ s.gate_proj.weight.t()) * (x @ s.up_proj.weight.t())) @ s.down_proj.weight.t()
    if gate:
        shared = torch.sigmoid(x @ s.gate.weight.t()) * shared
    torch.testing.assert_close(moe(x), routed + shared, rtol=1e-5, atol=1e-5)


def test_shared_experts_module_and_width():
    shared = moelab.SharedExperts(8, 5, activation="gelu", gate=True)
    moe = moelab.MoE(8, num_experts=4, top_k=1, shared_experts=shared)
    assert moe.shared_experts is shared
    x = torch.randn(3, 8)
    plain = torch.sigmoid(x @ shared.gate.weight.t()) * (
        F.gelu(x @ shared.up_proj.weight.t()) @ shared.down_proj.weight.t()
    )
    routed = moelab.ops.moe_reference(x, moe.router(x), moe.experts)
    torch.testing.assert_close(moe(x), routed + plain, rtol=1e-5, atol=1e-5)
    assert moelab.MoE(8, num_experts=4, shared_experts=1, shared_hidden=3).shared_experts.hidden == 3


def test_aux_loss_is_the_weighted_sum_of_terms():
    coefs = {"load_balance": 1e-2, "z": 1e-3, "load_balance_seq": 1e-4}
    moe = moelab.MoE(8, num_experts=4, top_k=2, router="sigmoid_topk", aux_losses=coefs)
    x = torch.randn(3, 5, 8)
    with moelab.trace(moe) as tr:
        moe(x)
    r = tr.routing(tr.layers[0])
    expected = {
        "load_balance": load_balance(r),
        "z": z(r),
        "load_balance_seq": load_balance_seq(r, ctx=moelab.RoutingContext(batch_shape=(len(x), 5))),
    }
    assert set(moe.aux_terms) == set(coefs)
    for name, value in expected.items():
        torch.testing.assert_close(moe.aux_terms[name].detach(), value)
    total = sum(coefs[n] * expected[n] for n in coefs)
    torch.testing.assert_close(moe.aux_loss.detach(), total)
    no_aux = moelab.MoE(8, num_experts=4)
    no_aux(x)
    assert no_aux.aux_loss.item() == 0.0 and no_aux.aux_terms == {}


class _RouterWithAux(Router):
    """A router whose Routing carries its own loss term (e.g. an entropy regulariser)."""

    def __init__(self, d_model, num_experts, top_k=1):
        super().__init__(d_model, num_experts)
        self._init_gate()

    def route(self, x, ctx):
        logits = self.router_logits(x)
        probs = logits.softmax(-1)
        w, i = probs.max(-1, keepdim=True)
        return Routing.from_topk(
            i, w, self.num_experts, logits=logits, probs=probs, aux={"custom": probs.square().sum()}
        )


def test_router_aux_terms_enter_the_layer_loss():
    router = _RouterWithAux(8, 4)
    moe = moelab.MoE(8, num_experts=4, top_k=1, router=router, aux_losses={"z": 0.5})
    x = torch.randn(6, 8)
    moe(x)
    logits = x @ router.weight.t()
    custom = logits.softmax(-1).square().sum()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(moe.aux_terms["custom"], custom)
    torch.testing.assert_close(moe.aux_loss, 0.5 * z + 1.0 * custom)


def test_model_aux_loss_sums_layers():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = moelab.MoE(8, num_experts=4, aux_losses={"load_balance": 1.0})
            self.b = nn.Sequential(
                nn.Linear(8, 8), moelab.MoE(8, num_experts=2, top_k=1, aux_losses={"z": 2.0})
            )

        def forward(self, x):
            return self.b(self.a(x))

    model = Two()
    model(torch.randn(4, 8))
    torch.testing.assert_close(moelab.aux_loss(model), model.a.aux_loss + model.b[1].aux_loss)
    with pytest.raises(ValueError, match="no routed layer"):
        moelab.aux_loss(nn.Linear(2, 2))


def test_default_hidden_and_router_instance():
    moe = moelab.MoE(32, num_experts=4, top_k=2)
    assert moe.experts.hidden == 64  # 4 * d / k
    r = moelab.build_router("topk", d_model=32, num_experts=4, top_k=1)
    assert moelab.MoE(32, num_experts=4, top_k=1, router=r).router is r
