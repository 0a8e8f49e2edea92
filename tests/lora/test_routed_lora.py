"""``RoutedLoRA``: base(x) plus the routed LoRA experts, against one routing entry at a time
(forward and the gradients of x, A, B and the router); the frozen base; contexts, transforms,
presets and bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import moelab
from moelab import Routing, RoutingContext
from moelab.lora import MIXTURE_PRESETS, RoutedLoRA, resolve_mixture
from moelab.routers.topk import TopKRouter
from moelab.routers.tsallis import TsallisTopPRouter


def naive(layer: RoutedLoRA, x: Tensor, routing: Routing) -> Tensor:
    """``base(x) + sum over the routing's (t, e, w) of w * scaling * B_e A_e x_t``, entry by entry."""
    x_TD = x.reshape(-1, layer.d_model)
    bank = layer.experts
    rows = [x_TD.new_zeros(layer.d_out) for _ in range(x_TD.shape[0])]
    for t, e, w in zip(
        routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True
    ):
        a, b = bank.lora_A[e], bank.lora_B[e]
        rows[t] = rows[t] + w.to(x.dtype) * bank.scaling * (b @ (a @ x_TD[t]))
    delta = torch.stack(rows) if rows else x_TD.new_zeros(0, layer.d_out)
    return nn.functional.linear(x, layer.base.weight, layer.base.bias) + delta.view(
        *x.shape[:-1], layer.d_out
    )


def make_layer(d_in=12, d_out=20, e=4, r=4, seed=0, **kwargs) -> RoutedLoRA:
    torch.manual_seed(seed)
    layer = RoutedLoRA(nn.Linear(d_in, d_out), e, r, alpha=6.0, **kwargs).double()
    with torch.no_grad():
        layer.experts.lora_B.normal_()
    return layer


CASES = [
    ("mole", {}),
    ("dynmole", {}),
    (None, dict(router="sigmoid_topk", top_k=3)),
    (None, dict(router="expert_choice", router_kwargs={"capacity_factor": 1.5})),
    (None, dict(router="topk", top_k=1, router_kwargs={"capacity_factor": 0.5})),  # drops tokens
]


@pytest.mark.parametrize("method,kwargs", CASES, ids=[c[0] or c[1]["router"] for c in CASES])
@pytest.mark.parametrize("shape", [(2, 5), (7,), (1,), (0,), (2, 0), (2, 1, 3)])
def test_equals_base_plus_naive_loop_forward_and_grads(method, kwargs, shape):
    layer = make_layer(method=method, **kwargs)
    layer.train()
    x = torch.randn(*shape, 12, dtype=torch.float64, requires_grad=True)
    y, routing = layer.forward_routed(x)
    assert y.shape == (*shape, 20) and y.dtype == torch.float64
    expected = naive(layer, x, routing)
    torch.testing.assert_close(y, expected)
    if not x.numel():
        return
    upstream = torch.randn_like(y)
    params = [x, layer.experts.lora_A, layer.experts.lora_B, layer.router.weight]
    got = torch.autograd.grad((y * upstream).sum(), params, retain_graph=True)
    ref = torch.autograd.grad((expected * upstream).sum(), params)
    for name, a, b in zip(("x", "lora_A", "lora_B", "router"), got, ref, strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert layer.base.weight.grad is None and not layer.base.weight.requires_grad


def test_d_in_other_than_d_out_and_the_bank_alias():
    layer = make_layer(d_in=16, d_out=8)
    assert layer.bank is layer.experts
    assert (layer.experts.d_in, layer.experts.d_out, layer.d_out) == (16, 8, 8)
    x = torch.randn(3, 16, dtype=torch.float64)
    y, routing = layer.forward_routed(x)
    torch.testing.assert_close(y, naive(layer, x, routing))


def test_fresh_layer_equals_its_base_exactly():
    torch.manual_seed(0)
    base = nn.Linear(12, 20)
    x = torch.randn(2, 5, 12)
    before = base(x)
    layer = RoutedLoRA(base, 4, 8, method="dynmole")
    assert layer.base is base and torch.equal(layer(x), before)  # B = 0


def test_base_is_frozen_and_unchanged_by_an_optimizer_step():
    layer = make_layer(method="mole")
    weight, bias = layer.base.weight.detach().clone(), layer.base.bias.detach().clone()
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["router.weight", "experts.lora_A", "experts.lora_B"]
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    for _ in range(2):
        y = layer(torch.randn(4, 6, 12, dtype=torch.float64))
        (y.square().mean() + layer.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert torch.equal(layer.base.weight, weight) and torch.equal(layer.base.bias, bias)
    for n in trainable:
        assert not torch.equal(before[n], dict(layer.named_parameters())[n]), n


def test_presets_build_the_documented_routers_and_losses():
    mole = make_layer(method="mole")
    assert isinstance(mole.router, TopKRouter) and mole.router.top_k == 2 and mole.router.normalize
    assert mole.aux_coefficients == {"load_balance": 0.02}
    dyn = make_layer(method="dynmole")
    r = dyn.router
    assert isinstance(r, TsallisTopPRouter)
    assert (r.top_k, r.top_p, r.entropy_threshold, r.q, r.eps, r.normalize) == (
        2,
        0.75,
        0.9,
        1.1,
        1e-5,
        False,
    )
    assert dyn.aux_coefficients == {"tsallis_entropy": 1e-2, "load_balance": 1e-3}
    assert dyn.aux_loss_kwargs == {"tsallis_entropy": {"q": 1.1, "eps": 1e-5}}
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    for layer, names in ((mole, {"load_balance"}), (dyn, {"tsallis_entropy", "load_balance"})):
        layer(x)
        assert set(layer.aux_terms) == names
        expected = sum(layer.aux_coefficients[n] * v for n, v in layer.aux_terms.items())
        torch.testing.assert_close(layer.aux_loss, expected.float())
        torch.testing.assert_close(moelab.aux_loss(layer), layer.aux_loss)
    # The preset's tables: what the docs pages list.
    assert MIXTURE_PRESETS["mole"].router == "topk" and MIXTURE_PRESETS["dynmole"].router == "tsallis_topp"


def test_given_arguments_replace_the_preset():
    # Another router: the preset's router arguments do not apply to it.
    out = resolve_mixture("dynmole", router="topk")
    assert out["router"] == "topk" and out["router_kwargs"] == {} and out["top_k"] == 2
    # Given losses replace the preset's; loss parameters stay only for losses kept.
    out = resolve_mixture("dynmole", aux_losses={"load_balance": 0.5})
    assert out["aux_losses"] == {"load_balance": 0.5} and out["aux_loss_kwargs"] == {}
    out = resolve_mixture("dynmole", router_kwargs={"top_p": 0.5}, top_k=1)
    assert out["router_kwargs"] == {"top_p": 0.5} and out["top_k"] == 1
    assert resolve_mixture(None) == dict(
        router="topk", top_k=2, router_kwargs={}, aux_losses={}, aux_loss_kwargs={}
    )
    # Fresh copies: editing the result leaves the preset alone.
    resolve_mixture("mole")["aux_losses"]["load_balance"] = 9.0
    assert MIXTURE_PRESETS["mole"].aux_losses == {"load_balance": 0.02}
    layer = make_layer(method="dynmole", router="topk", top_k=1)
    assert isinstance(layer.router, TopKRouter) and layer.router.top_k == 1


def test_context_batch_shape_layer_index_and_routing_transforms():
    layer = make_layer(method="mole")
    layer.layer_index = 3
    seen = []

    def first_expert_only(routing, site):
        seen.append((site.ctx.batch_shape, site.ctx.layer_index, site.ctx.token_ids))
        keep = torch.arange(routing.num_assignments) % 2 == 0  # token-major top-2: each token's first
        return Routing(
            routing.token_index[keep], routing.expert_index[keep], routing.weight[keep],
            routing.num_tokens, routing.num_experts, probs=routing.probs,
        )  # fmt: skip

    x = torch.randn(2, 3, 12, dtype=torch.float64)
    with moelab.override_routing(layer, first_expert_only):
        y, routing = layer.forward_routed(x)
        layer(x.reshape(6, 12))
        ids = torch.arange(6)
        layer.context = RoutingContext(token_ids=ids)
        layer(x)
        layer.context = None
    assert routing.num_assignments == 6
    torch.testing.assert_close(y, naive(layer, x, routing))
    assert seen[0] == ((2, 3), 3, None) and seen[1] == (None, 3, None)
    assert seen[2][:2] == ((2, 3), 3) and seen[2][2] is ids
    # The aux loss reads the router's own routing, not the transformed one.
    assert set(layer.aux_terms) == {"load_balance"}


def test_traced_as_a_routed_layer():
    layer = make_layer(method="mole")
    with moelab.trace(layer) as tr:
        _, routing = layer.forward_routed(torch.randn(2, 4, 12, dtype=torch.float64))
    assert len(tr.layers) == 1
    recorded = tr.routing(tr.layers[0])
    assert recorded.num_tokens == 8 and torch.equal(recorded.expert_index, routing.expert_index)
    assert tr.sequence_lengths(tr.layers[0]) == [4, 4]


def test_bf16_base_gives_bf16_adapters():
    torch.manual_seed(0)
    base = nn.Linear(16, 32).to(torch.bfloat16)
    layer = RoutedLoRA(base, 4, 8, method="mole")
    assert layer.experts.lora_A.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.bfloat16
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, base(x))


def test_bad_inputs():
    with pytest.raises(TypeError, match="base must be a torch nn.Linear"):
        RoutedLoRA(nn.Conv1d(4, 4, 1), 4, 2)
    with pytest.raises(ValueError, match="method must be one of"):
        RoutedLoRA(nn.Linear(4, 4), 4, 2, method="molle")
    with pytest.raises(ValueError, match=r"top_k must be <= num_experts \(4\)"):
        RoutedLoRA(nn.Linear(4, 4), 4, 2, top_k=5)
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        RoutedLoRA(nn.Linear(4, 4), 4, 2, router="nope")
    with pytest.raises(ValueError, match="aux_losses: unknown loss"):
        RoutedLoRA(nn.Linear(4, 4), 4, 2, aux_losses={"nope": 1.0})
    with pytest.raises(ValueError, match="rank must be >= 1"):
        RoutedLoRA(nn.Linear(4, 4), 4, 0)
    layer = RoutedLoRA(nn.Linear(4, 6), 4, 2)
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., d_in=4\]"):
        layer(torch.randn(3, 5))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        layer([1.0, 2.0])
    with pytest.raises(TypeError, match="RoutedLoRA.context must be a moelab RoutingContext"):
        layer.context = "ctx"
        layer(torch.randn(3, 4))


@pytest.mark.parametrize("method", ["mole", "dynmole", "lora_mixer"])
@pytest.mark.parametrize("shape", [(2, 7), (1, 1), (0, 3)])
def test_rank_dense_path_equals_the_reference_executor(method, shape):
    """backend='auto' runs every expert in rank space when E*r is small (rank_dense_lora); it must
    equal the per-expert reference executor, forward and backward."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48, dtype=torch.float64)
    fast = RoutedLoRA(base, 4, 2, method=method)
    with torch.no_grad():
        fast.experts.lora_B.normal_()
    assert fast._rank_dense(fast.router(torch.randn(3, 32, dtype=torch.float64), RoutingContext()))
    slow = copy.deepcopy(fast)
    slow.backend = "reference"
    x = torch.randn(*shape, 32, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_fast, y_slow = fast(x), slow(x2)
    torch.testing.assert_close(y_fast, y_slow)
    g = torch.randn_like(y_fast)
    (y_fast * g).sum().backward()
    (y_slow * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (n, p), (_, q) in zip(fast.named_parameters(), slow.named_parameters(), strict=True):
        if p.requires_grad:  # an empty batch may leave a gradient None on one side, zeros on the other
            zero = torch.zeros_like(p)
            torch.testing.assert_close(
                zero if p.grad is None else p.grad, zero if q.grad is None else q.grad, msg=n
            )
