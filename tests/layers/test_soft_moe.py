"""Soft MoE (layer ``soft``) against independent references: one-hot logits reduce it to a
per-token expert, the dispatch and combine weights are the two softmaxes, and the layer equals a
plain per-sequence loop of the paper's equations on every executor; it trains in ``MoELM``."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab import registry
from moelab.experts.bank import ExpertBank
from moelab.layers.soft_moe import SoftMoE, soft_moe, soft_moe_logits, soft_moe_weights, token_expert_routing
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM


def reference_soft_moe(layer: SoftMoE, x_BSD: torch.Tensor) -> torch.Tensor:
    """The paper's equations, one sequence at a time, one slot at a time."""
    r, bank, p = layer.router, layer.experts, layer.slots_per_expert
    out = []
    for x in x_BSD.double():
        xn = x / torch.sqrt((x * x).sum(1, keepdim=True) + 1e-6)
        phi = r.phi.double()
        phin = phi / torch.sqrt((phi * phi).sum(0, keepdim=True) + 1e-6)
        logits = r.scale.double() * xn @ phin  # [S, n p]
        d = torch.exp(logits) / torch.exp(logits).sum(0, keepdim=True)  # over tokens
        c = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)  # over slots
        slots = d.T @ x
        ys = torch.stack(
            [bank.expert_forward(s // p, slots[s : s + 1].float())[0].double() for s in range(slots.shape[0])]
        )
        out.append(c @ ys)
    return torch.stack(out)


def test_one_hot_logits_reduce_soft_moe_to_a_per_token_expert():
    """One slot per token and logits forcing D = C = I: token s is slot s, run by expert s // p."""
    torch.manual_seed(0)
    n, p, d = 3, 2, 8
    bank = ExpertBank(n, d, 16)
    x = torch.randn(2, n * p, d)
    logits = 50.0 * torch.eye(n * p).expand(2, n * p, n * p)
    y, dispatch, combine = soft_moe(x, logits, bank, p, backend="reference")
    torch.testing.assert_close(dispatch, torch.eye(n * p).expand_as(dispatch), atol=1e-12, rtol=0)
    torch.testing.assert_close(combine, torch.eye(n * p).expand_as(combine), atol=1e-12, rtol=0)
    ref = torch.stack(
        [torch.cat([bank.expert_forward(s // p, x[b, s : s + 1]) for s in range(n * p)]) for b in range(2)]
    )
    torch.testing.assert_close(y, ref)


def test_dispatch_columns_and_combine_rows_sum_to_one():
    torch.manual_seed(1)
    x, phi = torch.randn(3, 7, 16), torch.randn(16, 10)
    logits = soft_moe_logits(x, phi, torch.tensor(2.0))
    dispatch, combine = soft_moe_weights(logits)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(3, 10))  # each slot: a convex mix of tokens
    torch.testing.assert_close(combine.sum(2), torch.ones(3, 7))  # each token: a convex mix of slots
    # normalised logits are cosines times the scale
    xn = x / x.norm(dim=-1, keepdim=True)
    pn = phi / phi.norm(dim=0, keepdim=True)
    torch.testing.assert_close(logits, 2.0 * xn @ pn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(soft_moe_logits(x, phi, 1.0, normalize=False), x @ phi)


@pytest.mark.parametrize("backend", ["reference", "sorted", "fast"])
@pytest.mark.parametrize("n,p,b,s", [(4, 1, 2, 9), (3, 2, 3, 5), (2, 3, 1, 1)])
def test_layer_matches_a_plain_per_sequence_loop(backend, n, p, b, s):
    torch.manual_seed(2)
    layer = SoftMoE(12, n, 1, 20, router_kwargs={"slots_per_expert": p}, backend=backend)
    with torch.no_grad():
        layer.router.scale.fill_(3.0)  # sharper than at init
    x = torch.randn(b, s, 12)
    y, routing = layer.forward_routed(x)
    torch.testing.assert_close(y.double(), reference_soft_moe(layer, x), atol=1e-5, rtol=1e-4)
    # the reported routing: token -> expert mass of the combine weights, rows summing to 1
    logits = soft_moe_logits(x, layer.router.phi, layer.router.scale).reshape(b * s, n * p)
    c = torch.softmax(logits, -1).reshape(b * s, n, p).sum(-1)
    assert routing.top_k == n == layer.top_k and routing.num_tokens == b * s
    torch.testing.assert_close(routing.dense(), c)
    torch.testing.assert_close(routing.probs, c)
    torch.testing.assert_close(torch.softmax(routing.logits, -1), c)


def test_flat_input_is_one_sequence_unless_the_context_splits_it():
    torch.manual_seed(3)
    layer = SoftMoE(8, 4, 2)
    x = torch.randn(2, 6, 8)
    y = layer(x)
    split = layer(x.reshape(12, 8), moelab.RoutingContext(batch_shape=(2, 6))).view(2, 6, 8)
    torch.testing.assert_close(split, y)
    one = layer(x.reshape(12, 8))
    torch.testing.assert_close(one, layer(x.reshape(1, 12, 8))[0])
    assert not torch.allclose(one.view(2, 6, 8), y)


def test_not_causal_a_later_token_changes_an_earlier_output():
    torch.manual_seed(4)
    layer = SoftMoE(8, 4, 1).eval()
    x = torch.randn(1, 5, 8)
    x2 = x.clone()
    x2[0, 4] += 1.0
    assert not torch.allclose(layer(x)[0, 0], layer(x2)[0, 0])
    assert layer.router.causal_at_eval is False


@pytest.mark.parametrize("shape", [(2, 7, 16), (1, 16), (1, 1, 16), (0, 16), (0, 3, 16)])
def test_forward_backward_and_edge_sizes(shape):
    torch.manual_seed(5)
    layer = SoftMoE(16, 4, 2, shared_experts=1)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert layer.aux_loss.item() == 0.0 and layer.aux_terms == {}
    if x.numel():
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert layer.router.phi.grad.abs().sum() > 0 and layer.router.scale.grad is not None
        assert all(p.grad is not None for p in layer.experts.parameters())


def test_aux_losses_read_the_token_expert_routing_and_history_gets_it():
    torch.manual_seed(6)
    layer = SoftMoE(8, 4, 1, aux_losses={"z": 1e-3, "load_balance": 1e-2})
    ctx = moelab.RoutingContext()
    layer(torch.randn(2, 5, 8), ctx)
    assert set(layer.aux_terms) == {"z", "load_balance"}
    # every token uses every expert: the Switch loss is exactly 1 (no signal; the paper has no aux loss)
    assert layer.aux_terms["load_balance"].item() == pytest.approx(1.0, abs=1e-6)
    assert len(ctx.history) == 1 and ctx.history[0].num_tokens == 10
    assert ctx.slot(layer.router) == {}  # the slot logits do not outlive the forward


def test_moelm_with_router_soft_trains_without_nan():
    assert "soft" in registry.names("layer")
    torch.manual_seed(7)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=1, max_seq_len=32,
        router="soft", router_kwargs={"slots_per_expert": 2}, aux_losses={},
    )  # fmt: skip
    model = MoELM(cfg)
    assert all(isinstance(layer, SoftMoE) for _, layer in model.moe_layers())
    from moelab.train.monitor import causal_at_eval

    assert causal_at_eval(model) is False
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):
        ids = torch.randint(0, 256, (4, 32))
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss) and out.aux_loss.item() == 0.0
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_token_expert_routing_sums_the_slots_of_each_expert():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    r = token_expert_routing(logits, 2, 2)
    c = torch.softmax(logits, -1)[0]
    torch.testing.assert_close(r.weight, torch.stack([c[0] + c[1], c[2] + c[3]]))
    assert r.expert_index.tolist() == [0, 1] and r.token_index.tolist() == [0, 0]


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"router_kwargs": {"capacity_factor": 1.0}}, "capacity_factor"),
        ({"router_kwargs": {"slots_per_expert": 0}}, "slots_per_expert"),
        ({"router_kwargs": {"noise_std": -1.0}}, "noise_std"),
        ({"router_kwargs": [1]}, "router_kwargs"),
        ({"top_k": 5}, "top_k"),
        ({"backend": "nope"}, "backend"),
        ({"aux_losses": {"nope": 1.0}}, "aux_losses"),
        ({"shared_experts": -1}, "shared_experts"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg):
    kw = {"d_model": 8, "num_experts": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=arg):
        SoftMoE(**kw)


def test_bad_inputs_and_logits_shape():
    layer = SoftMoE(8, 2, 1)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="logits_BSM"):
        soft_moe(torch.randn(1, 3, 8), torch.randn(1, 3, 5), layer.experts, 1)
