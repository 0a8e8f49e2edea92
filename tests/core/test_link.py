"""Cross-layer state: ``link_routers`` / ``share``; loss parameters; router metrics; token types in MoELM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moelab
from moelab.core.router import Router, link_routers, share
from moelab.core.routing import Routing
from moelab.losses.registry import check_aux_loss_kwargs
from moelab.models import MoELM, MoELMConfig
from moelab.train.monitor import router_metrics


class _Linked(Router):
    """A router that records its link and borrows the first layer's scale (test double)."""

    def __init__(self, d_model, num_experts, top_k=1):
        super().__init__(d_model, num_experts)
        self.top_k = top_k
        self._init_gate()
        self.scale = nn.Linear(1, 1, bias=False)
        self.linked = None

    def link(self, position, layers):
        self.linked = (position, len(layers))
        if position > 0:
            del self.scale  # the registered one goes; the first layer's is referenced
            share(self, "scale", layers[0].router.scale)

    def route(self, x_TD, ctx):
        logits = self.router_logits(x_TD) * self.scale.weight
        w, i = torch.softmax(logits, -1).topk(self.top_k, -1)
        return Routing.from_topk(i, w, self.num_experts, logits=logits, probs=torch.softmax(logits, -1))

    def metrics(self):
        return {"position": float(self.linked[0])}


def _layers(n):
    return [moelab.MoE(8, 4, 1, router=_Linked(8, 4)) for _ in range(n)]


def test_link_routers_gives_each_router_its_position_and_share_registers_nothing():
    layers = _layers(3)
    link_routers(layers)
    assert [m.router.linked for m in layers] == [(0, 3), (1, 3), (2, 3)]
    first = layers[0].router.scale
    assert all(m.router.scale is first for m in layers)
    stack = nn.ModuleList(layers)
    names = [n for n, _ in stack.named_parameters() if "scale" in n]
    assert names == ["0.router.scale.weight"]  # owned, saved and counted once
    assert sum("scale" in k for k in stack.state_dict()) == 1
    # one gradient reaches the shared module from every layer
    x = torch.randn(5, 8)
    sum(m(x).sum() for m in layers).backward()
    assert first.weight.grad is not None
    metrics = router_metrics(stack)
    assert metrics == {"position": 1.0}  # the mean over layers of Router.metrics(); no loss asked for
    metrics = router_metrics(stack, ["erc"])
    assert metrics["position"] == 1.0
    assert "erc_diag_dominance" in metrics  # diagnostics asked for apply to every layer with a gate
    own = moelab.MoE(8, 4, 1, aux_losses={"erc": 0.1})
    assert "erc_diag_dominance" in router_metrics(own)  # a layer's own losses are always diagnosed


def test_share_refuses_registered_names_and_non_modules():
    r = _Linked(8, 4)
    with pytest.raises(ValueError, match="registered"):
        share(r, "scale", nn.Linear(1, 1))
    with pytest.raises(TypeError, match="nn.Module"):
        share(r, "other", torch.zeros(1))


def test_moelm_links_its_routers_in_depth_order():
    seen = []
    orig = Router.link

    def spy(self, position, layers):
        seen.append((position, len(layers)))
        return orig(self, position, layers)

    Router.link = spy
    try:
        MoELM(MoELMConfig(d_model=16, n_layers=4, n_heads=2, moe_every=2, num_experts=4, max_seq_len=16))
    finally:
        Router.link = orig
    assert seen == [(0, 2), (1, 2)]


def test_aux_loss_kwargs_reach_the_loss_and_bad_ones_are_named():
    from moelab import registry
    from moelab.losses.registry import register_loss

    @register_loss("test_scaled", paper="test", summary="test")
    def _scaled(routing, *, ctx=None, layer=None, factor=2.0):
        return routing.weight.sum() * 0 + factor

    try:  # registered for this test only: the registry is what `moelab list` and the docs check
        m = moelab.MoE(8, 4, 2, aux_losses={"test_scaled": 1.0}, aux_loss_kwargs={"test_scaled": {"factor": 5.0}})
        m(torch.randn(3, 8))
        assert float(m.aux_terms["test_scaled"].detach()) == 5.0
        with pytest.raises(ValueError, match="does not take"):
            check_aux_loss_kwargs({"test_scaled": {"nope": 1}}, {"test_scaled": 1.0})
        with pytest.raises(ValueError, match="not one of the layer's aux_losses"):
            check_aux_loss_kwargs({"z": {}}, {"test_scaled": 1.0})
        with pytest.raises(TypeError, match="dict of parameters"):
            check_aux_loss_kwargs({"test_scaled": 3}, {"test_scaled": 1.0})
    finally:
        registry._METHODS.pop(("loss", "test_scaled"), None)


def test_moelm_passes_token_types_to_routers_and_checks_them():
    model = MoELM(MoELMConfig(d_model=16, n_layers=1, n_heads=2, num_experts=4, max_seq_len=16))
    got = []
    model.moe_layers()[0][1].router.register_forward_pre_hook(lambda m, a: got.append(a[1].token_types))
    ids = torch.randint(0, 256, (2, 5))
    types = torch.randint(0, 2, (2, 5))
    model(ids, token_types=types)
    assert torch.equal(got[0], types.reshape(-1))
    with pytest.raises(ValueError, match="token_types"):
        model(ids, token_types=types[:, :3])
    with pytest.raises(ValueError, match="token_types"):
        model(ids, token_types=types.float())
