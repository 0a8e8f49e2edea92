"""MoFME (layer ``mofme``) and its uncertainty-aware router (``uar``) against the paper's equations
written plainly per token, MC-dropout statistics, and training in ``MoELM``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import moelab
import moelab.layers.mofme  # noqa: F401  (registers layer "mofme", bank "film", router "uar")
from moelab import MoE, registry
from moelab.layers.mofme import MoFME, compare_with_ffn_moe, gated_base
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM
from moelab.routers.topk import TopKRouter
from moelab.routers.uncertainty import UncertaintyAwareRouter, mc_dropout_logits, uar_combine


def plain_mofme(layer: MoFME, x_TD: Tensor) -> Tensor:
    """The paper's layer for each token, written out: LN, the gated base, MoFME's router
    (Linear -> KeepTopK -> softmax), the weighted feature-modulated experts, the adaptor."""
    d, k = layer.d_model, layer.top_k
    a_w, b_w = layer.base.weight[:d], layer.base.weight[d:]
    a_b, b_b = layer.base.bias[:d], layer.base.bias[d:]
    gamma_all = layer.experts.bias[:, :d]
    beta_all = layer.experts.bias[:, d:]
    up, down = layer.adaptor[0], layer.adaptor[3]
    rows = []
    for x in x_TD:
        mu, var = x.mean(), x.var(unbiased=False)
        h = (x - mu) / torch.sqrt(var + layer.norm.eps) * layer.norm.weight + layer.norm.bias
        y = torch.nn.functional.gelu(a_w @ h + a_b) * (b_w @ h + b_b)
        logits = layer.router.weight @ x + layer.router.bias
        kth = torch.sort(logits, descending=True).values[k - 1]
        kept = torch.where(logits >= kth, logits, torch.full_like(logits, -math.inf))
        w = torch.exp(kept - kept.max())
        w = w / w.sum()
        m = torch.zeros_like(x)
        for e in range(layer.num_experts):
            if w[e] > 0:
                gamma_w, _, beta_w, _ = layer.experts.maps(e)
                m = m + w[e] * ((gamma_w @ y + gamma_all[e]) * y + beta_w @ y + beta_all[e])
        hidden = torch.nn.functional.gelu(up.weight @ m + up.bias)
        rows.append(down.weight @ hidden + down.bias)
    return torch.stack(rows)


@pytest.mark.parametrize("modulation", ["full", "low_rank", "diagonal"])
def test_layer_equals_the_equation_per_token_in_eval(modulation):
    torch.manual_seed(0)
    layer = MoFME(8, num_experts=5, top_k=2, hidden=12, modulation=modulation).double().eval()
    with torch.no_grad():  # a non-trivial LayerNorm
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    out, routing = layer.forward_routed(x)
    assert out.shape == x.shape and routing.top_k == 2
    torch.testing.assert_close(out.reshape(-1, 8), plain_mofme(layer, x.reshape(-1, 8)))


def test_layer_in_training_with_router_dropout_zero_is_the_same_equation():
    torch.manual_seed(1)
    layer = MoFME(6, 4, 2, router_kwargs={"dropout": 0.0}).double().train()
    x = torch.randn(5, 6, dtype=torch.float64)
    state = torch.get_rng_state()
    torch.testing.assert_close(layer(x), plain_mofme(layer, x))
    assert torch.equal(torch.get_rng_state(), state)  # nothing sampled


def test_gated_base_is_gelu_a_times_b():
    h = torch.randn(4, 3)
    w, b = torch.randn(6, 3), torch.randn(6)
    expected = torch.nn.functional.gelu(h @ w[:3].T + b[:3]) * (h @ w[3:].T + b[3:])
    torch.testing.assert_close(gated_base(h, w, b), expected)
    with pytest.raises(ValueError, match="weight_2DD"):
        gated_base(h, torch.randn(3, 3))


# -- the uncertainty-aware router -------------------------------------------------------------------
def test_router_at_eval_is_deterministic_and_is_mofmes_router():
    torch.manual_seed(2)
    r = UncertaintyAwareRouter(8, 6, top_k=3, dropout=0.5).eval()
    x = torch.randn(10, 8)
    a, b = r(x), r(x)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.weight, b.weight)
    plain = TopKRouter(8, 6, top_k=3, normalize=True, bias=True).eval()
    plain.load_state_dict(r.state_dict())
    c = plain(x)
    assert torch.equal(a.expert_index, c.expert_index)
    torch.testing.assert_close(a.weight, c.weight)


def test_router_in_training_with_dropout_zero_equals_the_plain_router():
    torch.manual_seed(3)
    r = UncertaintyAwareRouter(8, 6, top_k=2, dropout=0.0, samples=5).train()
    plain = TopKRouter(8, 6, top_k=2, normalize=True, bias=True).train()
    plain.load_state_dict(r.state_dict())
    x = torch.randn(12, 8, requires_grad=True)
    a, c = r(x), plain(x)
    assert torch.equal(a.expert_index, c.expert_index)
    torch.testing.assert_close(a.weight, c.weight)
    torch.testing.assert_close(a.probs, c.probs)
    ga = torch.autograd.grad(a.weight.square().sum(), [x, r.weight, r.bias])
    gc = torch.autograd.grad(c.weight.square().sum(), [x, plain.weight, plain.bias])
    for u, v in zip(ga, gc, strict=True):
        torch.testing.assert_close(u, v)


def test_samples_differ_with_dropout_and_gradients_flow():
    torch.manual_seed(4)
    r = UncertaintyAwareRouter(16, 8, top_k=2, dropout=0.3).train()
    x = torch.randn(64, 16)
    a, b = r(x), r(x)
    assert not torch.equal(a.probs, b.probs)  # fresh masks every forward
    r.eval()
    det = r(x)
    assert not torch.allclose(a.probs, det.probs)
    r.train()
    out = r(x)
    (out.weight * torch.randn_like(out.weight)).sum().backward()
    assert r.weight.grad.abs().sum() > 0 and r.bias.grad.abs().sum() > 0
    m = r.metrics()
    assert m["uar_std"] > 0 and 0 < m["uar_disagreement"] < 1
    # mc_eval: sampled at eval too
    r.mc_eval = True
    r.eval()
    assert not torch.equal(r(x).probs, r(x).probs)


def test_mc_dropout_logits_drop_each_input_with_probability_p_and_rescale():
    """One-hot inputs: each sample's logit is the bias (feature dropped) or b + c W_j / (1 - p)."""
    torch.manual_seed(5)
    t, d, e, p, c = 4000, 3, 2, 0.25, 2.0
    x = torch.zeros(t, d)
    x[:, 1] = c
    w, b = torch.randn(e, d), torch.randn(e)
    z = mc_dropout_logits(x, w, b, samples=3, dropout=p)
    assert z.shape == (3, t, e)
    kept = b + c * w[:, 1] / (1 - p)
    is_dropped = torch.isclose(z, b.expand_as(z)).all(-1)
    is_kept = torch.isclose(z, kept.expand_as(z)).all(-1)
    assert bool((is_dropped ^ is_kept).all())
    rate = float(is_dropped.float().mean())
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / (3 * t))
    # samples are independent per token: not the same mask across tokens or samples
    assert is_dropped.any(1).all() and (~is_dropped).any(1).all()


def test_uar_combine_is_the_plain_mean_std_and_lcb_prefers_agreement():
    # 3 samples, 1 token, 3 experts: expert 0 high on average but erratic, expert 1 steady
    probs = torch.tensor([[[0.9, 0.05, 0.05]], [[0.1, 0.45, 0.45]], [[0.8, 0.1, 0.1]]])
    mean, std, weight, index = uar_combine(probs, 1, "mean")
    torch.testing.assert_close(mean[0], torch.tensor([0.6, 0.2, 0.2]))
    col = probs[:, 0, 0]
    torch.testing.assert_close(std[0, 0], torch.sqrt(((col - col.mean()) ** 2).sum() / 2))
    assert index.tolist() == [[0]] and weight.tolist() == [[1.0]]
    _, _, w2, idx2 = uar_combine(probs, 2, "mean")
    assert idx2[0, 0] == 0
    torch.testing.assert_close(w2[0], torch.stack([mean[0, 0], mean[0, idx2[0, 1]]]) / (0.6 + 0.2))
    # expert 0 leads on average but the samples disagree on it; expert 2 is steady
    steady = torch.tensor([[[0.65, 0.0, 0.35]], [[0.05, 0.6, 0.35]], [[0.65, 0.0, 0.35]]])
    assert uar_combine(steady, 1, "mean")[3].item() == 0  # mean 0.45 vs 0.35
    mean_s, _, w_lcb, idx_lcb = uar_combine(steady, 2, "lcb", kappa=1.0)  # 0.45 - 0.35 < 0.35 - 0
    assert idx_lcb[0].tolist() == [2, 0]
    torch.testing.assert_close(w_lcb[0], torch.tensor([0.35, 0.45]) / 0.8)  # gates: the mean, renormalised
    _, std1, _, _ = uar_combine(probs[:1], 1)
    assert torch.equal(std1, torch.zeros_like(std1))  # one sample: no spread


@pytest.mark.parametrize("t", [0, 1, 7])
def test_uar_in_a_lone_moe_forward_and_backward(t):
    torch.manual_seed(6)
    moe = MoE(16, num_experts=4, top_k=2, router="uar")
    x = torch.randn(t, 16, requires_grad=True)
    y = moe(x)
    assert y.shape == (t, 16) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad.shape == (t, 16)
    if t:
        assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 7, 16), (1, 16), (1, 1, 16), (0, 16)])
def test_layer_forward_backward_at_edge_sizes(shape):
    torch.manual_seed(7)
    layer = MoFME(16, 4, 2)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad.shape == x.shape
    if x.numel():
        assert layer.experts.weight.grad.abs().sum() > 0 and layer.router.weight.grad.abs().sum() > 0
        assert layer.base.weight.grad.abs().sum() > 0 and layer.adaptor[0].weight.grad.abs().sum() > 0


def test_moelm_with_mofme_trains_without_nan():
    assert "mofme" in registry.names("layer") and "uar" in registry.names("router")
    torch.manual_seed(8)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, max_seq_len=32,
        router="mofme", router_kwargs={"modulation": "diagonal", "dropout": 0.2}, aux_losses={"load_balance": 1e-2},
    )  # fmt: skip
    model = MoELM(cfg)
    layers = [m for _, m in model.moe_layers()]
    assert all(isinstance(m, MoFME) for m in layers) and layers[0].router.dropout == 0.2
    assert layers[0].mlp_dim == 4 * 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        ids = torch.randint(0, 64, (4, 16))
        with moelab.trace(model) as tr:
            out = model(ids, labels=ids)
        assert torch.isfinite(out.loss) and all(len(tr.records[n]) == 1 for n in tr.layers)
        first = out.loss.item() if first is None else first
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(model)
    assert out.loss.item() < first
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.testing.assert_close(out.aux_loss, sum(m.aux_loss for m in layers))


def test_layer_options_reach_their_parts():
    layer = MoFME(8, 4, 2, 20, router_kwargs={"router": "topk", "norm": False, "adaptor_dropout": 0.1, "bias": True})
    assert isinstance(layer.router, TopKRouter) and layer.router.bias is not None
    assert isinstance(layer.norm, torch.nn.Identity) and layer.adaptor[2].p == 0.1 and layer.mlp_dim == 20
    low = MoFME(16, 4, 2, modulation="low_rank", rank=3, router_kwargs={"samples": 2, "combine": "lcb"})
    assert low.experts.rank == 3 and low.router.samples == 2 and low.router.combine == "lcb"
    given = UncertaintyAwareRouter(8, 4, 1)
    assert MoFME(8, 4, 1, router=given).router is given


def test_compare_with_ffn_moe_counts_parameters_by_formula():
    d, e, k, h = 16, 4, 2, 64
    row = compare_with_ffn_moe(d, e, k, mlp_dim=h, tokens=32, repeats=1, threads=1)
    router = e * d + e
    ffn = e * 2 * d * h + router
    mofme = 2 * d + (2 * d * d + 2 * d) + e * (2 * d * d + 2 * d) + (d * h + h + h * d + d) + router
    assert row["ffn_moe_params"] == ffn and row["mofme_params"] == mofme
    assert row["param_ratio"] == pytest.approx(mofme / ffn) and row["mofme_ms"] > 0 and row["ffn_moe_ms"] > 0
    diag = compare_with_ffn_moe(d, e, k, mlp_dim=h, modulation="diagonal", tokens=8, repeats=1)
    assert diag["mofme_params"] == mofme - e * (2 * d * d + 2 * d) + e * 4 * d


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"modulation": "affine"}, "modulation"),
        ({"rank": 2}, "rank"),
        ({"router_kwargs": {"modulation": "full"}, "modulation": "full"}, "modulation"),
        ({"router_kwargs": [1]}, "router_kwargs"),
        ({"hidden": 0}, "hidden"),
        ({"adaptor_dropout": 1.5}, "adaptor_dropout"),
        ({"norm": 1}, "norm"),
        ({"router_kwargs": {"router": "no_such_router"}}, "no_such_router"),
        ({"router_kwargs": {"samples": 0}}, "samples"),
        ({"router_kwargs": {"dropout": 1.0}}, "dropout"),
        ({"router_kwargs": {"combine": "median"}}, "combine"),
        ({"router_kwargs": {"kappa": -1.0}}, "kappa"),
        ({"router_kwargs": {"mc_eval": "yes"}}, "mc_eval"),
        ({"top_k": 5}, "top_k"),
        ({"experts": torch.nn.Linear(8, 8)}, "experts"),
        ({"router": UncertaintyAwareRouter(8, 4), "router_kwargs": {"samples": 3}}, "samples"),
        ({"router": UncertaintyAwareRouter(6, 4)}, "d_model"),
        ({"backend": "nope"}, "backend"),
        ({"aux_losses": {"nope": 1.0}}, "nope"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg):
    kw = {"d_model": 8, "num_experts": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=arg):
        MoFME(**kw)


def test_bad_inputs():
    layer = MoFME(8, 4, 2)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="x"):
        layer(torch.full((2, 8), float("nan")))
    with pytest.raises(ValueError, match="probs_STE"):
        uar_combine(torch.rand(3, 4), 1)
    with pytest.raises(ValueError, match="top_k"):
        uar_combine(torch.rand(2, 3, 4), 5)
    with pytest.raises(ValueError, match="dropout"):
        mc_dropout_logits(torch.randn(2, 3), torch.randn(4, 3), None, 2, 1.0)
