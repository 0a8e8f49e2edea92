"""Residual-MoE (layer ``residual_moe``) against references written plainly: a per-token loop of
``MLP(x) + sum_k w_k E_k(x)`` (the paper's sum) and DeepSpeed's ``c_0 MoE + c_1 MLP`` with
``c = softmax(W_c x + b_c)``; zeroed routed experts leave the MLP; tracing and the auxiliary loss
count the routing once; it trains in ``MoELM``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moelab
from moelab import registry
from moelab.core.routed import routed_layers
from moelab.layers.moe import MoE
from moelab.layers.residual_moe import ResidualMoE, residual_mix
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM


def plain_mlp(layer: ResidualMoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The fixed SwiGLU MLP written plainly: ``down(silu(gate x) * up x)``."""
    m = layer.mlp
    return (F.silu(x_TD @ m.gate_proj.weight.T) * (x_TD @ m.up_proj.weight.T)) @ m.down_proj.weight.T


def per_token_moe(layer: ResidualMoE, x_TD: torch.Tensor, routing) -> torch.Tensor:
    """``sum_k w_k E_k(x_t)`` one assignment at a time, from the routing that ran."""
    out = torch.zeros_like(x_TD)
    for t, e, w in zip(
        routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True
    ):
        out[t] += w * layer.experts.expert_forward(e, x_TD[t : t + 1])[0]
    return out


@pytest.mark.parametrize("top_k", [1, 2])
def test_sum_mix_is_mlp_plus_routed_experts_per_token(top_k):
    torch.manual_seed(0)
    layer = ResidualMoE(16, 4, top_k)
    x = torch.randn(11, 16)
    y, routing = layer.forward_routed(x)
    ref = plain_mlp(layer, x) + per_token_moe(layer, x, routing)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert routing.top_k == top_k


def test_zeroed_routed_experts_leave_the_mlp():
    torch.manual_seed(1)
    layer = ResidualMoE(16, 4, 1)
    with torch.no_grad():
        layer.experts.down_proj.zero_()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), plain_mlp(layer, x.reshape(-1, 16)).view(2, 5, 16))


def test_learned_mix_matches_deepspeed_formula():
    torch.manual_seed(2)
    layer = ResidualMoE(16, 4, 1, router_kwargs={"mix": "learned"})
    with torch.no_grad():
        layer.coefficient.weight.normal_()  # make the gate far from uniform
    x = torch.randn(9, 16)
    y, routing = layer.forward_routed(x)
    coef = torch.softmax(x @ layer.coefficient.weight.T + layer.coefficient.bias, dim=-1)
    ref = coef[:, :1] * per_token_moe(layer, x, routing) + coef[:, 1:] * plain_mlp(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(coef[:, 0], torch.full_like(coef[:, 0], 0.5), atol=0.05)


def test_residual_mix_function():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(residual_mix(a, b), a + b)
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [-10.0, 10.0]])
    y = residual_mix(a, b, logits)
    torch.testing.assert_close(y[0], 0.5 * (a[0] + b[0]))
    torch.testing.assert_close(y[1], a[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(y[2], b[2], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="coef_logits"):
        residual_mix(a, b, torch.randn(3, 3))
    with pytest.raises(ValueError, match="same shape"):
        residual_mix(a, torch.randn(3, 5))


@pytest.mark.parametrize("mix", ["sum", "learned"])
@pytest.mark.parametrize("shape", [(2, 7, 16), (1, 16), (1, 1, 16), (0, 16)])
def test_forward_backward_and_edge_sizes(mix, shape):
    torch.manual_seed(3)
    layer = ResidualMoE(16, 4, 1, router_kwargs={"mix": mix}, aux_losses={"load_balance": 1e-2})
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    (y.square().sum() + layer.aux_loss).backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    if x.numel():
        assert torch.isfinite(x.grad).all()
        assert all(p.grad is not None for p in layer.mlp.parameters())
        assert layer.router.weight.grad is not None
        if mix == "learned":
            assert layer.coefficient.weight.grad.abs().sum() > 0


def test_traced_once_aux_once_and_router_is_the_inner_one():
    torch.manual_seed(4)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=1, max_seq_len=32,
        router="residual_moe", aux_losses={"load_balance": 1e-2},
    )  # fmt: skip
    model = MoELM(cfg)
    layers = [m for _, m in model.moe_layers()]
    assert all(isinstance(m, ResidualMoE) for m in layers)
    assert all(m.router is m.moe.router and m.experts is m.moe.experts for m in layers)
    # router and experts are registered once, under the inner MoE
    names = [n for n, _ in model.named_parameters()]
    assert not any(".ffn.router." in n or ".ffn.experts." in n for n in names)
    assert len(names) == len(set(id(p) for p in model.parameters()))
    assert [n for n, _ in routed_layers(model)] == ["blocks.0.ffn.moe", "blocks.1.ffn.moe"]
    ids = torch.randint(0, 256, (2, 8))
    with moelab.trace(model) as tr:
        out = model(ids, labels=ids)
    assert tr.layers == ["blocks.0.ffn.moe", "blocks.1.ffn.moe"]
    assert all(len(tr.records[n]) == 1 and tr.records[n][0].num_tokens == 16 for n in tr.layers)
    total = sum(m.moe.aux_loss for m in layers)
    torch.testing.assert_close(moelab.aux_loss(model), total)
    torch.testing.assert_close(out.aux_loss, total)
    from moelab.train.monitor import model_routers

    assert [r for _, r in model_routers(model)] == [m.router for m in layers]


def test_moelm_with_residual_moe_trains_without_nan():
    assert "residual_moe" in registry.names("layer")
    torch.manual_seed(5)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=1, max_seq_len=32,
        router="residual_moe", router_kwargs={"mix": "learned"}, aux_losses={"load_balance": 1e-2},
    )  # fmt: skip
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        ids = torch.randint(0, 64, (4, 16))
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss)
        first = out.loss.item() if first is None else first
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(model)
    assert out.loss.item() < first
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_router_choice_and_router_kwargs_reach_the_inner_router():
    layer = ResidualMoE(8, 4, 2, router_kwargs={"router": "topk", "mlp_hidden": 12})
    assert layer.mlp.hidden == 12 and isinstance(layer.moe, MoE) and layer.top_k == 2
    default = ResidualMoE(8, 4, 2)
    assert default.mlp.hidden == default.experts.hidden and default.mix == "sum"


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"router_kwargs": {"mix": "avg"}}, "mix"),
        ({"mix": "avg"}, "mix"),
        ({"mix": "sum", "router_kwargs": {"mix": "sum"}}, "mix"),
        ({"router_kwargs": {"mlp_hidden": 0}}, "mlp_hidden"),
        ({"router_kwargs": {"router": "no_such_router"}}, "no_such_router"),
        ({"router_kwargs": [1]}, "router_kwargs"),
        ({"top_k": 5}, "top_k"),
        ({"backend": "nope"}, "backend"),
        ({"aux_losses": {"nope": 1.0}}, "nope"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg):
    kw = {"d_model": 8, "num_experts": 4, **kwargs}
    with pytest.raises((ValueError, TypeError, KeyError), match=arg):
        ResidualMoE(**kw)


def test_bad_inputs():
    layer = ResidualMoE(8, 2, 1)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="x"):
        layer(torch.full((2, 8), float("nan")))


def test_state_dict_round_trip_holds_each_tensor_once():
    torch.manual_seed(6)
    a, b = ResidualMoE(8, 4, 1, mix="learned"), ResidualMoE(8, 4, 1, mix="learned")
    keys = set(a.state_dict())
    assert {k.split(".")[0] for k in keys} == {"moe", "mlp", "coefficient"}
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(a(x), b(x))


def test_router_kwargs_top_k_sets_the_routed_k_at_the_model_widths():
    layer = ResidualMoE(16, 4, 2, router_kwargs={"top_k": 1})
    assert layer.top_k == 1 and layer.router.top_k == 1
    assert layer.experts.hidden == 4 * 16 // 2 == layer.mlp.hidden  # top-2's active width
    _, routing = layer.forward_routed(torch.randn(5, 16))
    assert routing.top_k == 1
    with pytest.raises(ValueError, match="top_k"):
        ResidualMoE(16, 4, 2, router_kwargs={"top_k": 5})
