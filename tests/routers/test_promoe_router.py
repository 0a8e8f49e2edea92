"""ProMoE (``promoe``) and its routing contrastive loss (``rcl``) against independent references:
cosine similarities and top-k written per token, the RCL written as a plain loop over prototypes
(the official ``compute_routing_contrastive_loss`` restated), purity / NMI against scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.core.context import RoutingContext
from moelab.losses.rcl import rcl
from moelab.models import MoELM, MoELMConfig
from moelab.routers.promoe import (
    ProMoERouter,
    expert_label_purity,
    prototype_scores,
    routing_contrastive_loss,
)


def ctx_of(types) -> RoutingContext:
    return RoutingContext(token_types=torch.as_tensor(types, dtype=torch.long))


def plain_cos(a: list[float], b: list[float]) -> float:
    dot = sum(u * v for u, v in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))


def plain_rcl(x, prototypes, assignments, tau):
    """The loss written plainly: per prototype the mean of its tokens, then per prototype row
    -log(exp(cos(P_i, m_i)/tau) / sum_j exp(cos(P_i, m_j)/tau)), averaged over valid prototypes."""
    x, protos = x.tolist(), prototypes.tolist()
    valid, means = [], []
    for e in range(len(protos)):
        rows = [x[t] for t, exps in enumerate(assignments) if e in exps]
        if rows:
            valid.append(e)
            means.append([sum(col) / len(rows) for col in zip(*rows, strict=True)])
    if len(valid) < 2:
        return 0.0
    total = 0.0
    for i, e in enumerate(valid):
        logits = [plain_cos(protos[e], m) / tau for m in means]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
    return total / len(valid)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode", ["identity", "softmax", "sigmoid"])
def test_prototype_scores_and_topk_equal_plain_cosines(k, mode):
    torch.manual_seed(k)
    r = ProMoERouter(6, 5, top_k=k, unconditional_type=None, weight_mode=mode)
    x = torch.randn(9, 6)
    routing = r(x)
    protos = r.prototypes.detach()
    assert protos.shape == (5, 6) and r.unconditional_expert is None
    cos = torch.tensor([[plain_cos(x[t].tolist(), protos[e].tolist()) for e in range(5)] for t in range(9)])
    torch.testing.assert_close(prototype_scores(x, protos), cos, atol=1e-6, rtol=1e-5)
    gate = {"identity": cos, "softmax": torch.softmax(cos, -1), "sigmoid": torch.sigmoid(cos)}[mode]
    for t in range(9):
        best = sorted(range(5), key=lambda e: -float(gate[t, e]))[:k]
        assert routing.expert_index.view(9, k)[t].tolist() == best
        torch.testing.assert_close(routing.weight.view(9, k)[t], gate[t, best], atol=1e-6, rtol=1e-5)
    assert routing.top_k == k
    torch.testing.assert_close(routing.probs, torch.softmax(cos, -1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_unconditional_tokens_go_to_the_dedicated_expert_with_weight_one(k):
    torch.manual_seed(10 + k)
    r = ProMoERouter(8, 6, top_k=k, unconditional_type=1)  # expert 5 is the unconditional one
    x, types = torch.randn(20, 8), torch.randint(0, 3, (20,))
    types[0], types[1] = 1, 0
    routing = r(x, ctx_of(types))
    routing.check()
    assert r.unconditional_expert == 5 and r.prototypes.shape == (5, 8)
    cos = prototype_scores(x, r.prototypes.detach())
    for t in range(20):
        mine = routing.token_index == t
        exps, ws = routing.expert_index[mine].tolist(), routing.weight[mine].tolist()
        if types[t] == 1:
            assert exps == [5] and ws == [1.0]  # one entry: the expert runs once
            assert routing.probs[t].tolist() == [0.0] * 5 + [1.0]
        else:
            assert 5 not in exps and exps == cos[t].topk(k).indices.tolist()
            assert routing.probs[t, 5] == 0
    assert routing.top_k == (1 if k == 1 else None)
    torch.testing.assert_close(routing.probs.sum(1), torch.ones(20))


def test_routing_contrastive_loss_equals_a_plain_loop():
    torch.manual_seed(20)
    x, protos = torch.randn(30, 7), torch.randn(6, 7)
    exps = [torch.randperm(7)[:2].tolist() for _ in range(30)]  # expert 6 has no prototype: ignored
    exps[3] = [6]
    tok = torch.tensor([t for t, e in enumerate(exps) for _ in e])
    exp = torch.tensor([j for e in exps for j in e])
    for tau in (0.07, 0.5):
        got = routing_contrastive_loss(x, protos, tok, exp, tau=tau)
        assert float(got) == pytest.approx(plain_rcl(x, protos, exps, tau), rel=1e-4)
    # fewer than two prototypes with tokens: 0, as in the official code
    one = routing_contrastive_loss(x, protos, torch.arange(4), torch.tensor([2, 2, 6, 6]))
    assert float(one) == 0.0


def test_rcl_gradient_reaches_the_prototypes_and_pulls_them_to_their_tokens():
    torch.manual_seed(21)
    moe = moelab.MoE(
        8, 5, 1, router="promoe", router_kwargs={"unconditional_type": 0}, aux_losses={"rcl": 1.0}
    )
    x = torch.randn(40, 8, requires_grad=True)
    ctx = ctx_of(torch.randint(0, 2, (40,)))
    routing = moe.forward_routed(x, ctx)[1]
    loss = moe.aux_terms["rcl"]
    # the layer's term is the pure function on the layer's input and its router's routing
    ref = routing_contrastive_loss(x, moe.router.prototypes, routing.token_index, routing.expert_index)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    g = moe.router.prototypes.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0  # the official loss does not detach x
    # a few steps on the loss alone lower it (prototypes move towards their own centroids)
    router = moe.router
    opt = torch.optim.SGD([router.prototypes], lr=0.05)
    xs = x.detach()
    first = None
    for _ in range(20):
        c = ctx_of(ctx.token_types)
        r_ = router(xs, c)
        value = rcl(r_, ctx=c, layer=moe)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < first


def test_rcl_errors_name_what_is_missing():
    topk_moe = moelab.MoE(8, 4, 1)
    routing = topk_moe.router(torch.randn(3, 8))
    with pytest.raises(ValueError, match="promoe"):
        rcl(routing, ctx=RoutingContext(), layer=topk_moe)
    moe = moelab.MoE(8, 4, 1, router="promoe", router_kwargs={"unconditional_type": None})
    routing = moe.router(torch.randn(3, 8), RoutingContext())
    with pytest.raises(ValueError, match="ctx.slot"):
        rcl(routing, ctx=RoutingContext(), layer=moe)  # another forward's context
    with pytest.raises(ValueError, match="tau"):
        moelab.MoE(8, 4, 1, router="promoe", aux_losses={"rcl": 1.0}, aux_loss_kwargs={"rcl": {"tau": 0.0}})(
            torch.randn(3, 8), ctx_of([0, 1, 1])
        )


def test_missing_or_malformed_token_types_name_ctx_token_types():
    r = ProMoERouter(8, 4)
    with pytest.raises(ValueError, match="ctx.token_types"):
        r(torch.randn(5, 8))
    with pytest.raises(ValueError, match="ctx.token_types"):
        r(torch.randn(5, 8), ctx_of([0, 1, 1]))
    assert ProMoERouter(8, 4, unconditional_type=None)(torch.randn(5, 8)).num_assignments == 5


def test_expert_label_purity_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(22)
    experts, labels = torch.randint(0, 5, (300,)), torch.randint(0, 4, (300,))
    labels[:150] = experts[:150] % 4  # partly determined
    got = expert_label_purity(experts, labels)
    nmi = sk.normalized_mutual_info_score(labels.numpy(), experts.numpy(), average_method="geometric")
    assert got["nmi"] == pytest.approx(nmi, rel=1e-6)
    table = torch.zeros(5, 4)
    for e, c in zip(experts.tolist(), labels.tolist(), strict=True):
        table[e, c] += 1
    assert got["purity"] == pytest.approx(float(table.max(1).values.sum()) / 300)
    pure = expert_label_purity(torch.tensor([0, 0, 1, 1, -1]), torch.tensor([3, 3, 2, 2, 0]))
    assert pure == {"purity": 1.0, "nmi": pytest.approx(1.0), "tokens": 4}


@pytest.mark.parametrize("t", [0, 1, 2, 11])
@pytest.mark.parametrize("k", [1, 2])
def test_lone_moe_forward_and_backward(t, k):
    torch.manual_seed(23)
    moe = moelab.MoE(16, 6, k, router="promoe", aux_losses={"rcl": 1.0}, shared_experts=1)
    x = torch.randn(t, 16, requires_grad=True)
    y = moe(x, ctx_of(torch.randint(0, 2, (t,))))
    (y.square().sum() + moe.aux_loss).backward()
    assert y.shape == (t, 16) and torch.isfinite(y).all() and torch.isfinite(moe.aux_loss)
    assert moe.router.causal_at_eval
    if t > 1:
        assert x.grad is not None and torch.isfinite(x.grad).all()


def test_trains_in_moelm_with_token_types_without_nan():
    torch.manual_seed(24)
    cfg = MoELMConfig(
        d_model=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=5, top_k=1, vocab_size=256,
        router="promoe", aux_losses={"rcl": 1.0}, shared_experts=1,
    )  # fmt: skip
    model = MoELM(cfg)
    layers = [m for _, m in model.moe_layers()]
    assert all(isinstance(m.router, ProMoERouter) for m in layers)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, types = torch.randint(0, 256, (4, 32)), torch.randint(0, 2, (4, 32))
    losses = []
    for _ in range(6):
        out = model(ids, labels=ids, token_types=types)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
        assert all("rcl" in m.aux_terms and torch.isfinite(m.aux_terms["rcl"]) for m in layers)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(m.router.prototypes.grad.abs().sum() > 0 for m in layers)
    with pytest.raises(ValueError, match="ctx.token_types"):
        model(ids)


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"unconditional_type": -1}, "unconditional_type"),
        ({"unconditional_type": "text"}, "unconditional_type"),
        ({"weight_mode": "tanh"}, "weight_mode"),
        ({"top_k": 4}, "top_k"),  # 4 experts = 3 prototypes + the unconditional one
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        moelab.build_router("promoe", d_model=8, num_experts=4, **kwargs)
    with pytest.raises(ValueError, match="num_experts"):
        moelab.build_router("promoe", d_model=8, num_experts=1)


def test_metrics_describe_the_last_eval_pass():
    torch.manual_seed(25)
    r = ProMoERouter(8, 4, unconditional_type=0)
    assert all(math.isnan(v) for v in r.metrics().values())
    x1, x2 = torch.randn(12, 8), torch.randn(7, 8)
    t1, t2 = torch.randint(0, 2, (12,)), torch.randint(0, 2, (7,))
    ids1, ids2 = torch.randint(0, 5, (12,)), torch.randint(0, 5, (7,))
    r.train()(torch.randn(9, 8), RoutingContext(token_types=torch.ones(9, dtype=torch.long)))  # not counted
    r.eval()
    a = r(x1, RoutingContext(token_types=t1, token_ids=ids1))
    b = r(x2, RoutingContext(token_types=t2, token_ids=ids2))
    x, types, ids = torch.cat([x1, x2]), torch.cat([t1, t2]), torch.cat([ids1, ids2])
    experts = torch.cat([a.expert_index, b.expert_index])
    cond = types != 0
    got = r.metrics()
    want = expert_label_purity(experts[cond], ids[cond])
    assert got["promoe_token_nmi"] == pytest.approx(want["nmi"])
    assert got["promoe_token_purity"] == pytest.approx(want["purity"])
    cos = []
    for e in range(3):
        rows = x[cond & (experts == e)]
        if len(rows):
            cos.append(plain_cos(r.prototypes[e].tolist(), rows.mean(0).tolist()))
    assert got["promoe_centroid_cos"] == pytest.approx(sum(cos) / len(cos), rel=1e-5)
    r.train()(x1, RoutingContext(token_types=t1))
    r.eval()(x2, RoutingContext(token_types=t2))  # a new eval pass, without token ids
    got = r.metrics()
    assert math.isnan(got["promoe_token_nmi"]) and math.isfinite(got["promoe_centroid_cos"])
