"""``moelab.override_routing``: a routing transform between router and executor, on any model with
moelab routed layers, removed exactly on exit."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab import MoE, Routing
from moelab.models import MoELM, MoELMConfig


def first_choice_only(routing: Routing, site) -> Routing:
    """Each token keeps only its first expert, at weight 1 (a 'weak' routing)."""
    k = routing.top_k
    idx = routing.expert_index.view(routing.num_tokens, k)[:, :1]
    return Routing.from_topk(idx, torch.ones_like(idx, dtype=routing.weight.dtype), routing.num_experts)


def test_transform_changes_what_runs_and_is_removed_on_exit():
    torch.manual_seed(0)
    moe = MoE(16, num_experts=4, top_k=2, backend="reference")
    x = torch.randn(3, 5, 16)
    base = moe(x)
    with moelab.override_routing(moe, first_choice_only) as names:
        y = moe(x)
    assert names == ["MoE"]
    # Independently: the same router's top-1 choice, each token through that one expert.
    routing = moe.router(x.reshape(-1, 16))
    idx = routing.expert_index.view(-1, 2)[:, 0].tolist()
    rows = [moe.experts.expert_forward(e, x.reshape(-1, 16)[t : t + 1])[0] for t, e in enumerate(idx)]
    torch.testing.assert_close(y.reshape(-1, 16), torch.stack(rows))
    torch.testing.assert_close(moe(x), base, rtol=0, atol=0)


def test_aux_losses_read_the_routers_own_routing():
    moe = MoE(8, num_experts=4, top_k=2, aux_losses={"load_balance": 1.0})
    x = torch.randn(12, 8)
    moe(x)
    plain = moe.aux_loss.detach().clone()
    with moelab.override_routing(moe, first_choice_only):
        moe(x)
    torch.testing.assert_close(moe.aux_loss.detach(), plain)


def test_moelm_transform_layers_filter_nesting_and_exception_safety():
    cfg = MoELMConfig(d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, max_seq_len=16)
    model = MoELM(cfg).eval()
    ids = torch.randint(0, 256, (2, 8))
    base = model(ids).logits
    seen: list[tuple[str, int]] = []

    def spy(routing, site):
        seen.append((site.name, site.layer_index))
        assert site.x.shape == (16, 32) and site.layer is dict(model.named_modules())[site.name]
        return routing

    with moelab.override_routing(model, first_choice_only):
        weak = model(ids).logits
        with moelab.override_routing(model, spy, layers=["blocks.1.ffn"]):
            model(ids)
    assert (weak - base).abs().max() > 1e-3
    assert seen == [("blocks.1.ffn", 1)]
    with pytest.raises(RuntimeError, match="boom"):
        with moelab.override_routing(model, first_choice_only):
            raise RuntimeError("boom")
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    with moelab.trace(model) as tr, moelab.override_routing(model, first_choice_only):
        model(ids)
    # The trace records what ran.
    assert all(tr.routing(n).num_assignments == 16 for n in tr.layers)


def test_bad_transforms_and_models():
    moe = MoE(8, num_experts=4, top_k=2)
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="must return a moelab Routing"):
        with moelab.override_routing(moe, lambda r, s: None):
            moe(x)
    with pytest.raises(ValueError, match="keep num_tokens=4"):
        with moelab.override_routing(moe, lambda r, s: Routing.from_topk(torch.zeros(2, 1).long(), torch.ones(2, 1), 4)):
            moe(x)
    with pytest.raises(TypeError, match="fn must be callable"):
        with moelab.override_routing(moe, "first"):
            pass
    with pytest.raises(ValueError, match="no moelab routed layer"):
        with moelab.override_routing(torch.nn.Linear(2, 2), first_choice_only):
            pass
    with pytest.raises(ValueError, match=r"layers \['nope'\]"):
        with moelab.override_routing(moe, first_choice_only, layers=["nope"]):
            pass
    # After errors nothing stays installed.
    torch.testing.assert_close(moe(x), moe(x))
    assert moe.__dict__["_routing_transforms"] == []
