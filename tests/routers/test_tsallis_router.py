"""DynMoLE's Tsallis top-p router (``tsallis_topp``) and Tsallis entropy loss (``tsallis_entropy``)
against independent references: the entropy formula written plainly and its q -> 1 (Shannon)
limit, a per-token loop of the code's routing rule, and the two baselines the router reduces to
(dense softmax with top_p = 1, plain top-k without renormalisation with a tiny top_p), with
broadcasting off."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.core.context import RoutingContext
from moelab.losses.entropy import tsallis_entropy, tsallis_entropy_loss
from moelab.models import MoELM, MoELMConfig
from moelab.routers.tsallis import TsallisTopPRouter, tsallis_topp


# ------------------------------------------------------------------ references written plainly
def tsallis_plain(row: list[float], q: float) -> float:
    """S_q(p) = (1 - sum p^q) / (q - 1); Shannon at q = 1."""
    if q == 1:
        return -sum(v * math.log(v) for v in row if v > 0)
    return (1 - sum(v**q for v in row)) / (q - 1)


def routing_loop(probs: torch.Tensor, top_p: float, keep: int, threshold: float, q: float, eps: float):
    """DynMoLE's rule one token at a time: sorted cumsum <= top_p, at least `keep`, all if uncertain."""
    t, e = probs.shape
    out = torch.zeros(t, e, dtype=torch.bool)
    for i, row in enumerate(probs.double().tolist()):
        ranked = sorted(range(e), key=lambda j: (-row[j], j))
        total = 0.0
        for rank, j in enumerate(ranked):
            total += row[j]
            if total <= top_p or rank < keep:
                out[i, j] = True
        shifted = [v + eps for v in row]
        top = math.log(e) if q == 1 else (1 - e ** (1 - q)) / (q - 1)
        if threshold < 1 and tsallis_plain(shifted, q) / top > threshold:
            out[i] = True
    return out


# ------------------------------------------------------------------ the entropy
@pytest.mark.parametrize("q", [0.5, 1.0, 1.1, 2.0])
def test_tsallis_entropy_matches_the_formula(q):
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(20, 6, dtype=torch.float64) * 2, -1)
    ours = tsallis_entropy(p, q, normalize=False, eps=0.0)
    ref = torch.tensor([tsallis_plain(row, q) for row in p.tolist()], dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tsallis_entropy(p.float(), q, normalize=False, eps=0.0), ref.float())
    # the code's form: p + eps inside, divided by the maximum (1 - E^(1-q)) / (q - 1)
    eps = 1e-5
    top = math.log(6) if q == 1 else (1 - 6 ** (1 - q)) / (q - 1)
    ref_code = torch.tensor(
        [tsallis_plain([v + eps for v in row], q) / top for row in p.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(tsallis_entropy(p, q), ref_code, rtol=1e-10, atol=1e-12)


def test_tsallis_entropy_limits_and_extremes():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(10, 8, dtype=torch.float64), -1)
    shannon = tsallis_entropy(p, 1.0, normalize=False, eps=0.0)
    gaps = [
        (tsallis_entropy(p, q, normalize=False, eps=0.0) - shannon).abs().max().item()
        for q in (1.1, 1.01, 1.001)
    ]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 5e-3  # S_q -> Shannon as q -> 1, linearly in q - 1
    assert gaps[1] / gaps[2] == pytest.approx(10, rel=0.1)
    for q in (1 - 1e-6, 1 + 1e-6):
        torch.testing.assert_close(
            tsallis_entropy(p, q, normalize=False, eps=0.0), shannon, atol=1e-5, rtol=0
        )
    uniform, one_hot = torch.full((1, 8), 1 / 8), torch.eye(8)[:1]
    for q in (0.5, 1.0, 1.1, 2.0):  # normalised: 1 at the uniform distribution, 0 at a one-hot one
        assert tsallis_entropy(uniform, q, eps=0.0).item() == pytest.approx(1.0, abs=1e-6)
        assert tsallis_entropy(one_hot, q, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert tsallis_entropy(torch.ones(3, 1), 1.1).tolist() == [0.0, 0.0, 0.0]  # E = 1
    with pytest.raises(ValueError, match="q"):
        tsallis_entropy(p, 0.0)
    with pytest.raises(ValueError, match="eps"):
        tsallis_entropy(p, 1.1, eps=-1e-3)


def test_entropy_loss_is_the_mean_and_empty_is_zero():
    p = torch.softmax(torch.randn(7, 4, requires_grad=True), -1)
    loss = tsallis_entropy_loss(p, 1.1)
    torch.testing.assert_close(loss, tsallis_entropy(p, 1.1).mean())
    loss.backward()
    z = tsallis_entropy_loss(torch.zeros(0, 4, requires_grad=True))
    assert z.item() == 0.0 and z.requires_grad


# ------------------------------------------------------------------ the routing rule
@pytest.mark.parametrize(
    "top_p,keep,threshold,q",
    [(0.75, 2, 0.9, 1.1), (0.5, 1, 0.8, 1.1), (0.9, 3, 0.95, 2.0), (0.75, 2, 1.0, 1.1)],
)
def test_tsallis_topp_matches_a_per_token_loop(top_p, keep, threshold, q):
    torch.manual_seed(2)
    probs = torch.softmax(torch.randn(60, 8) * torch.rand(60, 1) * 4, -1)  # sharp and flat tokens
    mask, entropy = tsallis_topp(probs, top_p, keep, threshold, q)
    assert torch.equal(mask, routing_loop(probs, top_p, keep, threshold, q, 1e-5))
    torch.testing.assert_close(entropy, tsallis_entropy(probs, q))
    assert int(mask.sum(-1).min()) >= keep
    if threshold < 1:  # both kinds of tokens are present
        assert bool((mask.sum(-1) == 8).any()) and bool((mask.sum(-1) < 8).any())


def test_reduces_to_dense_softmax_with_top_p_one():
    torch.manual_seed(3)
    r = TsallisTopPRouter(16, 8, top_k=2, top_p=1.0, entropy_threshold=float("inf"))
    x = torch.randn(25, 16) * 3
    out = r(x)
    probs = torch.softmax(x @ r.weight.t(), -1)
    assert out.mask().all()  # cumsum <= 1 keeps every expert
    torch.testing.assert_close(out.dense(), probs)  # the dense softmax mixture
    torch.testing.assert_close(out.dense().sum(-1), torch.ones(25))


def test_reduces_to_plain_top_k_without_renormalisation_with_a_tiny_top_p():
    torch.manual_seed(4)
    r = TsallisTopPRouter(16, 8, top_k=2, top_p=1e-6, entropy_threshold=float("inf"))
    base = moelab.build_router("topk", d_model=16, num_experts=8, top_k=2, normalize=False)
    base.weight.data.copy_(r.weight.data)
    x = torch.randn(30, 16)
    a, b = r(x), base(x)
    assert torch.equal(a.mask(), b.mask())
    torch.testing.assert_close(a.dense(), b.dense())
    assert a.top_k is None and b.top_k == 2


def test_uncertain_tokens_activate_every_expert_and_gates_are_not_renormalised():
    r = TsallisTopPRouter(4, 4, top_k=1, top_p=0.5)
    with torch.no_grad():
        r.weight.copy_(torch.eye(4) * 8)
    x = torch.tensor([[1.0, 0, 0, 0], [0.01, 0, 0, 0]])  # confident; nearly uniform
    out = r(x)
    probs = torch.softmax(x @ r.weight.t(), -1)
    assert out.experts_per_token().tolist() == [1, 4]
    torch.testing.assert_close(out.dense(), probs * out.mask())  # p * mask
    assert out.dense()[0].sum() < 1  # the confident token's gate is p, not 1
    norm = TsallisTopPRouter(4, 4, top_k=1, top_p=0.5, normalize=True)
    norm.weight.data.copy_(r.weight.data)
    torch.testing.assert_close(norm(x).dense().sum(-1), torch.ones(2))


def test_tsallis_topp_errors():
    p = torch.softmax(torch.randn(3, 4), -1)
    with pytest.raises(ValueError, match="top_p"):
        tsallis_topp(p, top_p=1.5)
    with pytest.raises(ValueError, match="keep_top_k"):
        tsallis_topp(p, keep_top_k=5)
    with pytest.raises(ValueError, match="entropy_threshold"):
        tsallis_topp(p, entropy_threshold=0.0)
    with pytest.raises(ValueError, match="probs_TE"):
        tsallis_topp(p[0])
    mask, entropy = tsallis_topp(torch.zeros(0, 4))
    assert mask.shape == (0, 4) and entropy.shape == (0,)


# ------------------------------------------------------------------ in a layer and a model
@pytest.mark.parametrize("t", [0, 1, 9])
def test_lone_moe_forward_and_backward_with_the_loss(t):
    torch.manual_seed(5)
    moe = moelab.MoE(16, num_experts=4, top_k=2, router="tsallis_topp", aux_losses={"tsallis_entropy": 1e-2})
    x = torch.randn(t, 16, requires_grad=True)
    y, routing = moe.forward_routed(x)
    (y.square().sum() + moe.aux_loss).backward()
    assert y.shape == (t, 16) and torch.isfinite(y).all() and torch.isfinite(moe.aux_loss)
    assert routing.top_k is None and routing.num_tokens == t
    if t:
        torch.testing.assert_close(
            moe.aux_terms["tsallis_entropy"], tsallis_entropy(routing.probs, 1.1).mean()
        )
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_loss_parameters_pass_through_the_layer_and_need_probs():
    moe = moelab.MoE(
        8,
        num_experts=4,
        top_k=2,
        aux_losses={"tsallis_entropy": 1.0},
        aux_loss_kwargs={"tsallis_entropy": {"q": 2.0, "normalize": False}},
    )
    x = torch.randn(5, 8)
    _, routing = moe.forward_routed(x)
    torch.testing.assert_close(moe.aux_loss, tsallis_entropy(routing.probs, 2.0, normalize=False).mean())
    empty = moelab.Routing.from_topk(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 4)
    with pytest.raises(ValueError, match="probs"):
        moelab.losses.registry.get_loss("tsallis_entropy")(empty)


def test_the_loss_lowers_router_entropy_in_moelm_and_training_has_no_nan():
    torch.manual_seed(6)
    ids = torch.randint(0, 256, (4, 32))
    final = {}
    for coef in (0.0, 1.0):  # a large coefficient so that 8 steps show the direction
        torch.manual_seed(6)
        cfg = MoELMConfig(
            d_model=32,
            n_layers=2,
            n_heads=2,
            max_seq_len=32,
            num_experts=4,
            top_k=2,
            router="tsallis_topp",
            aux_losses={"tsallis_entropy": coef} if coef else {},
        )
        model = MoELM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(8):
            out = model(ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            assert math.isfinite(out.loss.item())
        active = [m.router.metrics()["mean_active_experts"] for _, m in model.moe_layers()]
        assert all(2.0 <= a <= 4.0 for a in active)
        ctx = RoutingContext()
        with torch.no_grad():
            model.eval()(ids, ctx=ctx)
        final[coef] = torch.stack([tsallis_entropy(r.probs).mean() for r in ctx.history]).mean().item()
    assert final[1.0] < final[0.0]


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"top_p": 0.0 - 1e-3}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"entropy_threshold": -0.5}, "entropy_threshold"),
        ({"q": 0.0}, "q"),
        ({"eps": -1.0}, "eps"),
        ({"top_k": 9}, "top_k"),
        ({"top_p": "0.7"}, "top_p"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        moelab.build_router("tsallis_topp", d_model=8, num_experts=8, **kwargs)
