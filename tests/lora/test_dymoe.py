"""LLaVA-DyMoE (``moelab.lora.dymoe``): expansion with frozen old experts, typing, TAG, RSR."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from moelab import registry
from moelab.core.routed import override_routing
from moelab.core.routing import Routing
from moelab.lora.dymoe import (
    AMBIGUOUS,
    NEW,
    OLD,
    DyMoEGuidance,
    ExpandedLoRABank,
    expand,
    expand_layer,
    expand_router,
    expanded_layers,
    guidance,
    new_group_mass,
    rsr_separation,
    rsr_specialization,
    tag_routing,
    token_types,
)
from moelab.lora.layer import RoutedLoRA

D_IN, D_OUT, RANK = 8, 12, 4


def make_layer(num_experts: int = 3, top_k: int = 2, seed: int = 0, **kw) -> RoutedLoRA:
    torch.manual_seed(seed)
    layer = RoutedLoRA(
        nn.Linear(D_IN, D_OUT),
        num_experts,
        RANK,
        router="topk",
        top_k=top_k,
        router_kwargs={"normalize": True},
        **kw,
    )
    with torch.no_grad():
        layer.bank.lora_B.normal_()
    return layer


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = make_layer(seed=1)
        self.b = make_layer(seed=2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))[..., :D_IN])


# ------------------------------------------------------------------------------ expansion
def test_expand_shapes_groups_and_registry():
    model = TwoLayers()
    groups = expand(model, 2)
    assert groups == {"a": [3, 2], "b": [3, 2]}
    for layer in (model.a, model.b):
        assert layer.num_experts == layer.router.num_experts == layer.bank.num_experts == 5
        assert layer.router.weight.shape == (5, D_IN)
        assert layer.bank.lora_A.shape == (5, RANK, D_IN) and layer.bank.lora_B.shape == (5, D_OUT, RANK)
        assert isinstance(layer.bank, ExpandedLoRABank)
    assert expand(model, 1) == {"a": [3, 2, 1], "b": [3, 2, 1]}
    assert model.a.bank.num_frozen == 5 and model.a.router.weight_frozen.shape == (5, D_IN)
    assert set(expanded_layers(model)) == {"a", "b"}
    assert registry.get("lora", "dymoe").obj.router == "topk"
    assert model(torch.randn(2, 3, D_IN)).shape == (2, 3, D_OUT)


def test_expand_keeps_old_tokens_bit_exact():
    # top-1 with renormalised gates: a token's weight is exactly 1, so a token still routed to
    # an old expert after expansion must give the very same output (new experts have B = 0).
    layer = make_layer(num_experts=4, top_k=1)
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        before, r0 = layer.forward_routed(x)
        expand_layer(layer, 3)
        after, r1 = layer.forward_routed(x)
    same_expert = r0.expert_index == r1.expert_index
    assert bool(same_expert.any()) and bool((r1.expert_index >= 4).any())
    assert torch.equal(after[same_expert], before[same_expert])
    # The new experts add exactly 0 everywhere until trained: the old weights alone change.
    assert torch.equal(layer.bank.lora_B[4:], torch.zeros(3, D_OUT, RANK))


def test_old_params_frozen_through_training_with_weight_decay():
    layer = make_layer()
    old_A, old_B = layer.bank.lora_A.detach().clone(), layer.bank.lora_B.detach().clone()
    old_W = layer.router.weight.detach().clone()
    expand_layer(layer, 2)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"router.weight_new", "experts.lora_A_new", "experts.lora_B_new"}
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        out = layer(torch.randn(16, D_IN))
        (out.square().mean() + layer.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    for p in (layer.bank.lora_A_frozen, layer.bank.lora_B_frozen, layer.router.weight_frozen):
        assert p.grad is None
    assert layer.base.weight.grad is None
    assert torch.equal(layer.bank.lora_A[:3], old_A) and torch.equal(layer.bank.lora_B[:3], old_B)
    assert torch.equal(layer.router.weight[:3], old_W)
    assert layer.bank.lora_B_new.abs().sum() > 0  # the new experts did train


def test_state_dict_keeps_plain_keys_and_round_trips():
    layer = make_layer()
    expand_layer(layer, 2)
    with torch.no_grad():
        layer.bank.lora_B_new.normal_()
        layer.router.weight_new.normal_()
    state = layer.state_dict()
    plain = RoutedLoRA(
        nn.Linear(D_IN, D_OUT), 5, RANK, router="topk", top_k=2, router_kwargs={"normalize": True}
    )
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    other = make_layer(seed=5)
    expand_layer(other, 2)
    other.load_state_dict(state)
    x = torch.randn(10, D_IN)
    assert torch.equal(other(x), layer(x)) and torch.equal(plain(x), layer(x))
    assert not other.bank.lora_A_frozen.requires_grad
    with pytest.raises(RuntimeError, match="size mismatch"):
        make_layer().load_state_dict(state)


def test_rank_dense_path_matches_plain_layer_and_trains_new_experts():
    # Wide enough that backend="auto" runs rank_dense_lora (4 E r <= width) on the concatenation.
    torch.manual_seed(3)
    layer = RoutedLoRA(nn.Linear(64, 48), 3, 2, router="topk", top_k=2)
    expand_layer(layer, 2)
    assert layer._rank_dense(layer.router(torch.randn(2, 64)))
    with torch.no_grad():
        layer.bank.lora_B_new.normal_()
    plain = RoutedLoRA(nn.Linear(64, 48), 5, 2, router="topk", top_k=2)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(20, 64)
    out = layer(x)
    assert torch.allclose(out, plain(x), atol=1e-6)
    out.sum().backward()
    assert layer.bank.lora_A_new.grad.abs().sum() > 0 and layer.bank.lora_A_frozen.grad is None
    twin = copy.deepcopy(layer)
    assert torch.equal(twin(x), layer(x)) and type(twin.router) is type(layer.router)


def test_router_with_bias_expands():
    from moelab.core.router import build_router

    router = build_router("topk", d_model=D_IN, num_experts=3, top_k=2, bias=True)
    old_b = router.bias.detach().clone()
    expand_router(router, 2)
    assert (
        router.bias.shape == (5,)
        and torch.equal(router.bias[:3], old_b)
        and torch.equal(router.bias[3:], torch.zeros(2))
    )
    assert not router.bias_frozen.requires_grad and router.bias_new.requires_grad
    assert set(router.state_dict()) == {"weight", "bias"}
    assert router(torch.randn(4, D_IN)).num_experts == 5


# ------------------------------------------------------------------------------ typing
def test_token_types_hand_made():
    probs = torch.tensor(
        [
            [0.5, 0.4, 0.05, 0.05],  # new mass 0.10 -> old
            [0.3, 0.3, 0.2, 0.2],  # 0.40 -> ambiguous
            [0.25, 0.25, 0.25, 0.25],  # 0.50 -> new (>= new_threshold)
            [0.1, 0.1, 0.0, 0.8],  # 0.80 -> new
            [0.4, 0.4, 0.1, 0.1],  # 0.20 -> ambiguous (not < 0.2)
        ]
    )
    assert torch.allclose(new_group_mass(probs, 2), torch.tensor([0.1, 0.4, 0.5, 0.8, 0.2]))
    assert token_types(probs, 2).tolist() == [OLD, AMBIGUOUS, NEW, NEW, AMBIGUOUS]
    assert token_types(probs, 2, 0.45, 0.6).tolist() == [OLD, OLD, AMBIGUOUS, NEW, OLD]
    # Unnormalised (sigmoid) scores are read as a distribution.
    assert token_types(probs * 3.0, 2).tolist() == token_types(probs, 2).tolist()


# ------------------------------------------------------------------------------ TAG
def naive_tag(routing: Routing, types, num_new):
    """Per-token loop: steered tokens re-pick their top-n old experts, weights p * W / sum p."""
    probs = routing.probs.detach()
    num_old = routing.num_experts - num_new
    out = {}
    for t in range(routing.num_tokens):
        mine = (routing.token_index == t).nonzero().flatten().tolist()
        entries = [(int(routing.expert_index[i]), float(routing.weight[i].detach())) for i in mine]
        if types[t] != NEW and any(e >= num_old for e, _ in entries):
            n = min(len(entries), num_old)
            total = sum(w for _, w in entries)
            top = torch.topk(probs[t, :num_old], n).indices.tolist()
            s = sum(float(probs[t, e]) for e in top)
            entries = [(e, float(probs[t, e]) * total / s) for e in top]
        out[t] = sorted(entries)
    return out


def as_dict(routing: Routing):
    out = {t: [] for t in range(routing.num_tokens)}
    for t, e, w in zip(
        routing.token_index.tolist(),
        routing.expert_index.tolist(),
        routing.weight.detach().tolist(),
        strict=True,
    ):
        out[t].append((e, w))
    return {t: sorted(v) for t, v in out.items()}


def test_tag_matches_per_token_loop_and_keeps_new_and_old_only_tokens():
    layer = make_layer(num_experts=3, top_k=2)
    expand_layer(layer, 3)
    x = 4 * torch.randn(40, D_IN)  # peaked distributions: all three types occur
    routing = layer.router(x)
    types = token_types(routing.probs, 3)
    assert len(set(types.tolist())) == 3  # all three types occur in this draw
    tagged = tag_routing(routing, types, 3)
    got, want = as_dict(tagged), naive_tag(routing, types, 3)
    for t in range(40):
        assert [e for e, _ in got[t]] == [e for e, _ in want[t]]
        assert [w for _, w in got[t]] == pytest.approx([w for _, w in want[t]], rel=1e-5)
        if types[t] != NEW:
            assert all(e < 3 for e, _ in got[t])
    untouched = (types == NEW) | ~torch.isin(torch.arange(40), routing.token_index[routing.expert_index >= 3])
    keep = untouched[routing.token_index]
    assert torch.equal(tagged.weight[keep], routing.weight[keep])
    assert tagged.top_k == 2
    # Differentiable through the router's probabilities.
    tagged.weight.sum().backward()
    assert layer.router.weight_new.grad is not None


def test_tag_caps_entries_at_old_group_size():
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.3]])
    routing = Routing(
        token_index=torch.tensor([0, 0, 0]),
        expert_index=torch.tensor([1, 2, 3]),
        weight=torch.tensor([0.3, 0.3, 0.3]),
        num_tokens=1,
        num_experts=4,
        probs=probs,
        top_k=3,
    )
    # 2 old experts, 2 new; token typed old: it can hold only the 2 old experts.
    tagged = tag_routing(routing, torch.tensor([OLD], dtype=torch.int8), 2)
    assert tagged.top_k is None
    got = as_dict(tagged)[0]
    assert [e for e, _ in got] == [0, 1]
    assert [w for _, w in got] == pytest.approx([0.9 * 0.1 / 0.4, 0.9 * 0.3 / 0.4])


def test_guidance_steers_old_tokens_off_new_experts_and_adds_rsr():
    model = TwoLayers()
    expand(model, 2)
    x = torch.randn(32, D_IN)
    with guidance(model, tag=True) as names:
        assert sorted(names) == ["a", "b"]
        _, routing = model.a.forward_routed(x)
        types = model.a.token_types
        assert set(model.a.aux_terms) >= {"rsr_separation", "rsr_specialization"}
        dense = routing.dense()
        assert torch.all(dense[types != NEW][:, 3:] == 0)
        own = model.a.router(x)
        assert torch.equal(dense[types == NEW], own.dense()[types == NEW])  # new tokens untouched
        probs = own.probs
        expected = 1e-2 * rsr_separation(probs, types, 2) + 1e-2 * rsr_specialization(probs, types, 2)
        assert torch.allclose(model.a.aux_loss, expected)  # the layer has no other aux loss
    with guidance(model, tag=False):
        _, plain = model.a.forward_routed(x)
    assert torch.equal(plain.expert_index, model.a.router(x).expert_index)
    assert not model.a.__dict__["_routing_transforms"]


# ------------------------------------------------------------------------------ RSR
def test_rsr_losses_hand_cases():
    probs = torch.tensor(
        [
            [0.6, 0.3, 0.05, 0.05],  # old
            [0.05, 0.05, 0.7, 0.2],  # new
            [0.05, 0.05, 0.45, 0.45],  # new
            [0.3, 0.3, 0.2, 0.2],  # ambiguous
        ],
        requires_grad=True,
    )
    types = token_types(probs, 2)
    assert types.tolist() == [OLD, NEW, NEW, AMBIGUOUS]
    sep = rsr_separation(probs, types, 2)
    assert sep.item() == pytest.approx((0.1 + 0.1 + 0.1 + 0.4) / 4)
    spe = rsr_specialization(probs, types, 2)

    def h(q):
        return -sum(v * math.log(v) for v in q if v > 0)

    want = (h([0.7 / 0.9, 0.2 / 0.9]) + h([0.5, 0.5])) / 2 / math.log(2)
    assert spe.item() == pytest.approx(want, rel=1e-5)
    (sep + spe).backward()
    assert probs.grad is not None and torch.isfinite(probs.grad).all()
    # No new token, or a single new expert: no specialisation term.
    assert rsr_specialization(probs, torch.zeros(4, dtype=torch.int8), 2).item() == 0.0
    p3 = torch.tensor([[0.2, 0.3, 0.5]])
    assert rsr_specialization(p3, torch.tensor([NEW]), 1).item() == 0.0
    assert rsr_separation(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int8), 2).item() == 0.0


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    layer = make_layer()
    with pytest.raises(ValueError, match="new_experts"):
        expand_layer(layer, 0)
    with pytest.raises(TypeError, match="RoutedLoRA"):
        expand_layer(nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="no RoutedLoRA"):
        expand(nn.Linear(2, 2), 1)
    with pytest.raises(TypeError, match="nn.Module"):
        expand("model", 1)
    with pytest.raises(ValueError, match="num_new"):
        token_types(torch.rand(3, 4), 4)
    with pytest.raises(ValueError, match="num_new"):
        new_group_mass(torch.rand(3, 4), 0)
    with pytest.raises(ValueError, match="probs"):
        token_types(torch.rand(3), 1)
    with pytest.raises(ValueError, match="old_threshold"):
        token_types(torch.rand(3, 4), 1, 0.7, 0.5)
    with pytest.raises(ValueError, match="new_threshold"):
        token_types(torch.rand(3, 4), 1, 0.1, 1.5)
    with pytest.raises(ValueError, match="types"):
        rsr_separation(torch.rand(3, 4), torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="Routing"):
        tag_routing(torch.rand(3, 4), torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="separation_coef"):
        DyMoEGuidance(separation_coef=-1.0)
    with pytest.raises(TypeError, match="tag"):
        DyMoEGuidance(tag=1)
    with pytest.raises(ValueError, match="expand first"):
        with guidance(make_layer()):
            pass
    no_probs = Routing(torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]), 1, 2)
    with pytest.raises(ValueError, match="probs nor logits"):
        tag_routing(no_probs, torch.tensor([OLD]), 1)


def test_override_routing_still_sees_expanded_layers():
    layer = make_layer()
    expand_layer(layer, 1)
    with override_routing(layer, lambda r, site: r) as names:
        assert names == ["RoutedLoRA"]
        layer(torch.randn(3, D_IN))
