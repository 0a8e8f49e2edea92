"""Load-balance and z-losses against the papers' equations written plainly."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.core import Routing, RoutingContext
from moelab.losses import get_loss, load_balance, load_balance_seq, load_balance_seq_unbiased, z
from moelab.routers import TopKRouter


def seqs(b, s):
    return RoutingContext(batch_shape=(b, s))


def switch_eq4(probs, expert_of_assignment, num_experts):
    """Switch eq. 4: ``E * sum_i f_i P_i``; ``f_i`` = share of assignments sent to i, ``P_i`` = mean p_i."""
    t = len(probs)
    n = len(expert_of_assignment)
    loss = 0.0
    for i in range(num_experts):
        f_i = sum(1 for e in expert_of_assignment if e == i) / n
        p_i = sum(float(probs[s][i]) for s in range(t)) / t
        loss += f_i * p_i
    return num_experts * loss


def test_load_balance_matches_switch_eq4():
    routing = TopKRouter(8, 6, top_k=2)(torch.randn(12, 8))
    expected = switch_eq4(routing.probs.detach(), routing.expert_index.tolist(), 6)
    assert load_balance(routing).item() == pytest.approx(expected, rel=1e-5)


def test_load_balance_counts_requests_before_capacity_drops():
    r = TopKRouter(8, 4, top_k=2, capacity_factor=0.5)
    full = TopKRouter(8, 4, top_k=2)  # same weights, dropless: the router's own choices
    full.load_state_dict(r.state_dict())
    x = torch.randn(16, 8)
    routing = r(x)
    assert routing.drop_rate() > 0
    requested = full(x).expert_index.tolist()
    expected = switch_eq4(routing.probs.detach(), requested, 4)
    assert load_balance(routing).item() == pytest.approx(expected, rel=1e-5)
    survived = switch_eq4(routing.probs.detach(), routing.expert_index.tolist(), 4)
    assert load_balance(routing).item() != pytest.approx(survived, rel=1e-3)


def test_losses_equal_one_at_uniform():
    t, e, k = 8, 4, 2
    probs = torch.full((t, e), 1 / e)
    idx = torch.tensor([[(2 * s) % e, (2 * s + 1) % e] for s in range(t)])  # every expert 4 times
    routing = Routing.from_topk(idx, torch.full((t, k), 0.5), e, probs=probs, logits=torch.zeros(t, e))
    assert load_balance(routing).item() == pytest.approx(1.0)
    assert load_balance_seq(routing, ctx=seqs(2, 4)).item() == pytest.approx(1.0)
    # All tokens on one expert with p one-hot on it: the loss is E.
    idx1 = torch.zeros(t, 1, dtype=torch.long)
    probs1 = torch.zeros(t, e)
    probs1[:, 0] = 1
    worst = Routing.from_topk(idx1, torch.ones(t, 1), e, probs=probs1)
    assert load_balance(worst).item() == pytest.approx(e)


def test_load_balance_seq_matches_per_sequence_loop():
    b, s, e = 3, 5, 4
    r = moelab.build_router("sigmoid_topk", d_model=8, num_experts=e, top_k=2)
    routing = r(torch.randn(b * s, 8))
    scores = routing.probs.detach()
    total = 0.0
    for q in range(b):
        rows = range(q * s, (q + 1) * s)
        normed = [[float(scores[i, j]) / float(scores[i].sum()) for j in range(e)] for i in rows]
        assign = [
            int(ex)
            for tok, ex in zip(routing.token_index, routing.expert_index, strict=True)
            if int(tok) // s == q
        ]
        total += switch_eq4(normed, assign, e)
    assert load_balance_seq(routing, ctx=seqs(b, s)).item() == pytest.approx(total / b, rel=1e-5)
    # One sequence (no seq_len) is the global loss on normalised scores.
    glob = switch_eq4(
        [[float(scores[i, j]) / float(scores[i].sum()) for j in range(e)] for i in range(b * s)],
        routing.expert_index.tolist(),
        e,
    )
    assert load_balance_seq(routing).item() == pytest.approx(glob, rel=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        load_balance_seq(routing, ctx=seqs(4, 4))


def test_z_loss_matches_st_moe_eq5():
    logits = torch.randn(7, 5) * 3
    routing = Routing.from_topk(torch.zeros(7, 1, dtype=torch.long), torch.ones(7, 1), 5, logits=logits)
    expected = sum(math.log(sum(math.exp(float(v)) for v in row)) ** 2 for row in logits) / 7
    assert z(routing).item() == pytest.approx(expected, rel=1e-5)


def test_missing_fields_and_empty_batch():
    bare = Routing.from_topk(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), 2)
    with pytest.raises(ValueError, match="probs"):
        load_balance(bare)
    with pytest.raises(ValueError, match="probs"):
        load_balance_seq(bare)
    with pytest.raises(ValueError, match="logits"):
        z(bare)
    logits = torch.zeros(0, 4, requires_grad=True)
    empty = Routing.from_topk(
        torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4, logits=logits, probs=logits.softmax(-1)
    )
    for fn in (load_balance, load_balance_seq, load_balance_seq_unbiased, z):
        v = fn(empty)
        assert v.item() == 0.0 and v.requires_grad


def test_load_balance_seq_unbiased_counts_topk_of_the_unbiased_scores():
    """Defect D (issue 8): DeepSeek-V3 eq. 18 counts Topk(s_t, K) of the unbiased scores s, while
    ``load_balance_seq`` (Megatron's practice) counts the experts selected by s + b. With a bias
    that changes the selection, the two differ; each matches its own loop."""
    b, s, e, k = 2, 6, 4, 2
    r = moelab.build_router("sigmoid_topk", d_model=8, num_experts=e, top_k=k)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 always selected
    routing = r(torch.randn(b * s, 8))
    scores = routing.probs.detach()
    assert (routing.expert_index == 3).sum() == b * s
    def loop(counted):
        total = 0.0
        for q in range(b):
            rows = range(q * s, (q + 1) * s)
            normed = [[float(scores[i, j]) / float(scores[i].sum()) for j in range(e)] for i in rows]
            total += switch_eq4(normed, [ex for tok, ex in counted if tok // s == q], e)
        return total / b
    selected = list(zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True))
    unbiased = [(i, int(j)) for i in range(b * s) for j in torch.topk(scores[i], k).indices]
    ctx = seqs(b, s)
    assert load_balance_seq(routing, ctx=ctx).item() == pytest.approx(loop(selected), rel=1e-5)
    assert load_balance_seq_unbiased(routing, ctx=ctx, layer=None).item() == pytest.approx(loop(unbiased), rel=1e-5)
    assert loop(selected) != pytest.approx(loop(unbiased), rel=1e-3)


@pytest.mark.parametrize("name", ["load_balance", "load_balance_seq", "load_balance_seq_unbiased", "z"])
@pytest.mark.parametrize("router", ["topk", "sigmoid_topk", "expert_choice"])
def test_gradients_flow_to_router_weights(name, router):
    moe = moelab.MoE(8, num_experts=4, top_k=2, router=router, aux_losses={name: 1.0})
    moe(torch.randn(2, 6, 8))
    moe.aux_loss.backward()
    g = moe.router.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_losses_are_registered_with_papers():
    for name in ("load_balance", "load_balance_seq", "load_balance_seq_unbiased", "z"):
        assert callable(get_loss(name))
    papers = {m.name: m.paper for m in moelab.list_methods("loss")}
    assert "Switch" in papers["load_balance"] and "eq. 4" in papers["load_balance"]
    assert "DeepSeek-V3" in papers["load_balance_seq"]
    assert "ST-MoE" in papers["z"]
