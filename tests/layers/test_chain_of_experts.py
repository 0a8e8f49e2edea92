"""Chain-of-Experts (layer ``coe``) against independent references: with one expert and one
iteration it is that expert's dense MLP; with C = 2 it equals the paper's loop written plainly with
copied weights (both residual modes); the official block output is recovered from the layer's
output as the docs say; it trains in ``MoELM``."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab import registry
from moelab.core.context import RoutingContext
from moelab.layers.chain import ChainOfExperts, chain_of_experts
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM


def reference_chain(layer: ChainOfExperts, x_TD: torch.Tensor, outer_residual: bool) -> torch.Tensor:
    """The paper's loop, one token at a time, from copied weights: DeepSeek-V2 softmax top-k
    without renormalisation, a gate per iteration (or one), shared experts at every iteration.
    Returns ``x_C`` (not the increment)."""
    gates = [r.weight.detach().clone() for r in layer.routers]
    bank, shared, k = layer.experts, layer.shared_experts, layer.top_k
    out = []
    for x in x_TD:
        xt = x.clone()
        for t in range(layer.iterations):
            w = gates[0 if layer.shared_gate else t]
            probs = torch.softmax(w @ xt, dim=0)
            top = torch.topk(probs, k).indices.tolist()
            moe = sum(probs[e] * bank.expert_forward(e, xt[None])[0] for e in top)
            if shared is not None:
                moe = moe + shared(xt[None])[0]
            xt = moe if outer_residual else xt + moe
        out.append(xt)
    return torch.stack(out)


def test_one_iteration_of_one_expert_is_the_dense_mlp_of_that_expert():
    """The issue's reference: C = 1, E = 1, k = 1: the gate is softmax over one expert = 1."""
    torch.manual_seed(0)
    for outer in (False, True):
        layer = ChainOfExperts(12, 1, 1, 20, router_kwargs={"iterations": 1, "outer_residual": outer})
        x = torch.randn(3, 7, 12)
        torch.testing.assert_close(
            layer(x), layer.experts.expert_forward(0, x.reshape(-1, 12)).view(3, 7, 12)
        )


@pytest.mark.parametrize("outer_residual", [False, True])
@pytest.mark.parametrize("shared_gate", [False, True])
@pytest.mark.parametrize("shared_experts", [0, 1])
def test_two_iterations_match_the_papers_loop(outer_residual, shared_gate, shared_experts):
    torch.manual_seed(1)
    layer = ChainOfExperts(
        10, 6, 2, 16, shared_experts=shared_experts,
        router_kwargs={"iterations": 2, "shared_gate": shared_gate, "outer_residual": outer_residual},
    )  # fmt: skip
    x = torch.randn(2, 5, 10)
    y, routings = layer.forward_routed(x)
    ref_xC = reference_chain(layer, x.reshape(-1, 10), outer_residual)
    expected = ref_xC if outer_residual else ref_xC - x.reshape(-1, 10)
    torch.testing.assert_close(y.reshape(-1, 10), expected, atol=1e-5, rtol=1e-4)
    assert len(routings) == 2 and all(r.top_k == 2 and r.num_tokens == 10 for r in routings)
    assert len(layer.routers) == (1 if shared_gate else 2)
    assert layer.keeps_block_residual is outer_residual


def test_official_block_output_from_the_layer_output():
    """``CoeDecoderLayer``'s FFN part written plainly (h -> RMSNorm -> chain), against the mapping
    the docs give: ``x_0 + y`` when ``keeps_block_residual`` is False, ``h + y`` when True."""
    torch.manual_seed(2)
    norm = torch.nn.RMSNorm(8, eps=1e-6)
    h = torch.randn(9, 8) * 3
    for outer in (False, True):
        layer = ChainOfExperts(8, 4, 2, 12, shared_experts=1, router_kwargs={"outer_residual": outer})
        with torch.no_grad():
            x0 = norm(h)
            official = h + reference_chain(layer, x0, True) if outer else reference_chain(layer, x0, False)
            y = layer(x0)
            ours = (h if layer.keeps_block_residual else x0) + y
        torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-4)


def test_chain_function_residual_modes():
    steps = [lambda x: 2 * x, lambda x: x + 1]
    x0 = torch.tensor([1.0])
    # inner: x1 = 1 + 2 = 3, x2 = 3 + 4 = 7; increment 6.  outer: x1 = 2, x2 = 3
    assert chain_of_experts(x0, steps).item() == 6.0
    assert chain_of_experts(x0, steps, outer_residual=True).item() == 3.0
    with pytest.raises(ValueError, match="moe_steps"):
        chain_of_experts(x0, [])


def test_each_iteration_is_routed_traced_and_adds_its_aux_loss():
    torch.manual_seed(3)
    layer = ChainOfExperts(
        8, 4, 2, 12, router_kwargs={"iterations": 3}, aux_losses={"load_balance_seq": 1e-3}
    )
    ctx = RoutingContext()
    x = torch.randn(2, 6, 8)
    _, routings = layer.forward_routed(x, ctx)
    assert len(ctx.history) == 3 and all(a is b for a, b in zip(ctx.history, routings, strict=True))
    # the sum over iterations of each iteration's loss, recomputed from the routings
    from moelab.losses.registry import get_loss

    per_iter = [get_loss("load_balance_seq")(r, ctx=ctx.replace(batch_shape=(2, 6))) for r in routings]
    torch.testing.assert_close(layer.aux_terms["load_balance_seq"], sum(per_iter))
    torch.testing.assert_close(layer.aux_loss, 1e-3 * sum(per_iter))
    # iterations route different inputs with different gates
    assert not torch.equal(routings[0].weight, routings[1].weight)
    with moelab.trace(layer) as tr:
        layer(x)
    assert len(tr.records[next(iter(tr.records))]) == 3


def test_weights_are_not_renormalised_and_every_gate_learns():
    torch.manual_seed(4)
    layer = ChainOfExperts(8, 4, 2, 12, shared_experts=1)
    x = torch.randn(5, 8)
    y, routings = layer.forward_routed(x)
    assert (routings[0].weight.view(5, 2).sum(-1) < 1).all()  # DeepSeek-V2: raw top-k probabilities
    y.square().mean().backward()
    for r in layer.routers:
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    assert layer.experts.down_proj.grad.abs().sum() > 0
    # one copy of each gate in the state: `router` is a plain reference to the first
    assert layer.router is layer.routers[0]
    assert sum(1 for k in layer.state_dict() if "weight" in k and "router" in k) == 2


@pytest.mark.parametrize("shape", [(1, 1, 16), (1, 16), (0, 16)])
def test_lone_layer_forward_backward_small_inputs(shape):
    torch.manual_seed(5)
    layer = ChainOfExperts(16, 4, 2, shared_experts=1, aux_losses={"load_balance_seq": 1e-3})
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    (y.sum() + layer.aux_loss).backward()
    assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(layer.aux_loss)
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(
    "kwargs,err,arg",
    [
        ({"iterations": 0}, ValueError, "iterations"),
        ({"shared_gate": 1}, TypeError, "shared_gate"),
        ({"outer_residual": "yes"}, TypeError, "outer_residual"),
        ({"slots": 2}, ValueError, "slots"),
        ({"top_k": 3}, ValueError, "top_k"),
    ],
)
def test_bad_options_name_the_argument(kwargs, err, arg):
    with pytest.raises(err, match=arg):
        ChainOfExperts(8, 4, 2, router_kwargs=kwargs)
    with pytest.raises(TypeError, match="router_kwargs"):
        ChainOfExperts(8, 4, 2, router_kwargs=[("iterations", 2)])


def test_moelm_with_router_coe_trains_without_nan():
    assert "coe" in registry.names("layer")
    torch.manual_seed(7)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=8, top_k=2, max_seq_len=32,
        router="coe", router_kwargs={"iterations": 2}, shared_experts=1, aux_losses={"load_balance_seq": 1e-3},
    )  # fmt: skip
    model = MoELM(cfg)
    assert all(isinstance(layer, ChainOfExperts) for _, layer in model.moe_layers())
    from moelab.train.monitor import causal_at_eval

    assert causal_at_eval(model) is True
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        ids = torch.randint(0, 64, (4, 16))
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss) and out.aux_loss.item() > 0
        first = out.loss.item() if first is None else first
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert out.loss.item() < first
