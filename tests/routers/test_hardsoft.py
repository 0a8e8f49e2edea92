"""LoRA-Mixer's hard-soft top-k: equal weights forward, the renormalised softmax's gradient backward."""

from __future__ import annotations

import pytest
import torch

from moelab import registry
from moelab.core.context import RoutingContext
from moelab.routers.hardsoft import HardSoftTopKRouter, hard_soft_topk


@pytest.mark.parametrize(("t", "e", "k"), [(7, 4, 2), (1, 3, 1), (5, 8, 3), (0, 4, 2)])
@pytest.mark.parametrize("hard_weight", ["mean", "ones"])
def test_forward_is_hard_and_gradient_is_soft(t, e, k, hard_weight):
    g = torch.Generator().manual_seed(t * 31 + e)
    logits = torch.randn(t, e, generator=g, dtype=torch.float64, requires_grad=True)
    coef = torch.randn(t, k, generator=g, dtype=torch.float64)
    probs, weight, index = hard_soft_topk(logits, k, hard_weight)
    # forward: the plain top-k indices, every weight 1/k (or 1)
    ref_index = torch.topk(torch.softmax(logits.detach(), -1), k, -1).indices
    assert torch.equal(index, ref_index)
    assert torch.equal(
        weight.detach(), torch.full((t, k), 1.0 / k if hard_weight == "mean" else 1.0, dtype=torch.float64)
    )
    # backward: the gradient of the renormalised top-k softmax gates, written plainly
    (weight * coef).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    p = torch.softmax(logits, -1)
    top = torch.gather(p, -1, ref_index)
    (top / top.sum(-1, keepdim=True) * coef).sum().backward()
    torch.testing.assert_close(got, logits.grad)


def test_router_routing_and_registry():
    router = registry.get("router", "hardsoft_topk").obj(6, 4, top_k=2)
    assert isinstance(router, HardSoftTopKRouter)
    x = torch.randn(5, 6)
    r = router.route(x, RoutingContext())
    assert r.top_k == 2 and r.num_assignments == 10
    torch.testing.assert_close(r.weight.detach(), torch.full((10,), 0.5))
    assert torch.allclose(r.probs.sum(-1), torch.ones(5))
    r.weight.sum().backward()  # the sum of weights is constant in value ...
    assert router.weight.grad is not None  # ... but the straight-through path still reaches the gate
    with pytest.raises(ValueError, match="hard_weight must be one of"):
        HardSoftTopKRouter(6, 4, hard_weight="soft")
    with pytest.raises(ValueError, match="hard_weight must be one of"):
        hard_soft_topk(torch.randn(2, 3), 1, "x")


def test_lora_mixer_preset():
    from moelab.lora import MIXTURE_PRESETS, RoutedLoRA
    from moelab.lora.presets import PAPER_TARGETS

    preset = MIXTURE_PRESETS["lora_mixer"]
    assert preset.router == "hardsoft_topk" and set(preset.aux_losses) == {"load_balance", "tsallis_entropy"}
    assert PAPER_TARGETS["lora_mixer"] == ("q_proj", "k_proj", "v_proj", "o_proj")
    layer = RoutedLoRA(torch.nn.Linear(8, 8), 4, 2, method="lora_mixer")
    assert isinstance(layer.router, HardSoftTopKRouter)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x))  # B = 0 at init: exactly the base
    assert set(layer.aux_terms) == {"load_balance", "tsallis_entropy"}
    assert "lora_mixer" in registry.names("lora")
