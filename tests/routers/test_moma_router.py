"""MoMa (``moma``) against independent references: a brute-force per-group expert-choice loop,
the Gumbel-sigmoid of Eq. 5 written plainly, the predictor's BCE and selection written per pair;
the property that no token leaves its modality's group; causality of the predictor mode."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moelab
from moelab.core.context import RoutingContext
from moelab.models import MoELM, MoELMConfig
from moelab.routers.moma import (
    PREDICTOR_AUX,
    MoMaRouter,
    check_groups,
    modality_expert_choice,
    predicted_selection,
    predictor_bce,
)


def ctx_of(types) -> RoutingContext:
    return RoutingContext(token_types=torch.as_tensor(types, dtype=torch.long))


def brute_force_groups(scores, types, group_types, group_sizes, c):
    """For each group, for each of its experts: the group's tokens sorted by score, best ceil(T_g c / E_g)."""
    out = set()
    offset = 0
    for g_type, size in zip(group_types, group_sizes, strict=True):
        members = [i for i in range(len(types)) if int(types[i]) == g_type]
        if members:
            cap = min(len(members), math.ceil(len(members) * c / size - 1e-9))
            for j in range(offset, offset + size):
                ranked = sorted(members, key=lambda i: -float(scores[i, j]))
                out |= {(i, j, round(float(scores[i, j]), 6)) for i in ranked[:cap]}
        offset += size
    return out


def entries(routing):
    return {
        (i, j, round(w, 6))
        for i, j, w in zip(
            routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist(), strict=True
        )
    }


@pytest.mark.parametrize(
    "groups,t,c",
    [(None, 20, 1.0), ([3, 5], 17, 2.0), ({0: 2, 3: 4, 5: 2}, 30, 1.5), ([4, 4], 1, 1.0), ([1, 2], 9, 0.5)],
)
def test_per_group_expert_choice_equals_brute_force(groups, t, c):
    torch.manual_seed(t)
    e = 8 if groups is None else sum(groups.values() if isinstance(groups, dict) else groups)
    r = MoMaRouter(12, e, groups=groups, capacity_factor=c, causal_inference=False).eval()  # no noise
    group_types, sizes = check_groups(groups, e)
    types = torch.tensor(group_types)[torch.randint(0, len(group_types), (t,))]
    x = torch.randn(t, 12)
    routing = r(x, ctx_of(types))
    scores = torch.sigmoid(x @ r.weight.detach().t())
    assert entries(routing) == brute_force_groups(scores, types, group_types, sizes, c)
    assert routing.top_k is None and routing.logits.shape == (t, e)
    routing.check()
    # the pure function gives the same entries
    group_of = {g: i for i, g in enumerate(group_types)}
    tok, exp, w = modality_expert_choice(scores, torch.tensor([group_of[int(v)] for v in types]), sizes, c)
    assert torch.equal(tok, routing.token_index) and torch.equal(exp, routing.expert_index)


@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    t=st.integers(0, 24),
    c=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    mode=st.sampled_from(["train", "eval_ec", "eval_predictor"]),
    seed=st.integers(0, 2**16),
)
def test_no_token_ever_leaves_its_modality_group(sizes, t, c, mode, seed):
    torch.manual_seed(seed)
    e = sum(sizes)
    r = MoMaRouter(6, e, groups=sizes, capacity_factor=c, causal_inference=(mode == "eval_predictor"))
    r.train(mode == "train")
    if mode == "eval_predictor":  # a predictor that says yes often enough to route something
        with torch.no_grad():
            r.predictor.bias.fill_(0.5)
    types = torch.randint(0, len(sizes), (t,))
    routing = r(torch.randn(t, 6), ctx_of(types))
    owner = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))  # expert -> group (= type)
    assert torch.equal(owner[routing.expert_index], types[routing.token_index])
    assert (routing.probs[owner.unsqueeze(0) != types.unsqueeze(1)] == 0).all()
    pairs = torch.stack([routing.token_index, routing.expert_index], 1)
    assert pairs.unique(dim=0).shape[0] == pairs.shape[0]  # no pair twice
    if mode != "eval_predictor":  # expert choice: every expert of a non-empty group is full
        load = routing.tokens_per_expert()
        for g, size in enumerate(sizes):
            t_g = int((types == g).sum())
            cap = min(t_g, math.ceil(t_g * c / size - 1e-9)) if t_g else 0
            assert load[owner == g].tolist() == [cap] * size


def test_training_scores_are_gumbel_sigmoid_and_eval_is_clean():
    torch.manual_seed(0)
    r = MoMaRouter(8, 4, groups=[2, 2], capacity_factor=1.0, causal_inference=False)
    x, types = torch.randn(16, 8), torch.randint(0, 2, (16,))
    logits = x @ r.weight.detach().t()
    torch.manual_seed(42)
    out = r.train()(x, ctx_of(types))
    torch.manual_seed(42)  # the two Gumbel draws of Eq. 5, in the router's order
    u1, u2 = torch.rand(16, 4), torch.rand(16, 4)
    noisy = torch.sigmoid(logits - torch.log(-torch.log(u1)) + torch.log(-torch.log(u2)))
    assert entries(out) == brute_force_groups(noisy, types, (0, 1), (2, 2), 1.0)
    clean = brute_force_groups(torch.sigmoid(logits), types, (0, 1), (2, 2), 1.0)
    assert entries(r.eval()(x, ctx_of(types))) == clean
    assert entries(r.eval()(x, ctx_of(types))) == clean  # eval draws nothing: the same twice
    r_quiet = MoMaRouter(8, 4, groups=[2, 2], capacity_factor=1.0, gumbel_noise=False).train()
    r_quiet.weight.data.copy_(r.weight.data)
    assert entries(r_quiet(x, ctx_of(types))) == clean


def test_predictor_bce_and_selection_equal_the_pairwise_definitions():
    torch.manual_seed(1)
    r = MoMaRouter(8, 6, groups=[2, 4], capacity_factor=1.0).train()
    x = torch.randn(10, 8, requires_grad=True)
    types = torch.randint(0, 2, (10,))
    out = r(x, ctx_of(types))
    selected = {(i, j) for i, j in zip(out.token_index.tolist(), out.expert_index.tolist(), strict=True)}
    pred = (x.detach() @ r.predictor.weight.detach().t() + r.predictor.bias.detach()).tolist()
    owner = [0, 0, 1, 1, 1, 1]
    terms = []
    for i in range(10):
        for j in range(6):
            if owner[j] == int(types[i]):
                y, p = float((i, j) in selected), 1 / (1 + math.exp(-pred[i][j]))
                terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    assert out.aux[PREDICTOR_AUX].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # stop-gradient: the BCE trains the predictor only
    out.aux[PREDICTOR_AUX].backward()
    assert r.predictor.weight.grad.abs().sum() > 0
    assert x.grad is None and r.weight.grad is None
    # causal selection: own-group pairs with sigmoid(pred) > 0.5, gated by the router's clean sigmoid
    r.eval()
    with torch.no_grad():
        r.predictor.bias.normal_()
    got = r(x.detach(), ctx_of(types))
    pred = x.detach() @ r.predictor.weight.detach().t() + r.predictor.bias.detach()
    gate = torch.sigmoid(x.detach() @ r.weight.detach().t())
    want = {
        (i, j, round(float(gate[i, j]), 6))
        for i in range(10)
        for j in range(6)
        if owner[j] == int(types[i]) and torch.sigmoid(pred[i, j]) > 0.5
    }
    assert entries(got) == want and got.aux == {}
    in_group = torch.tensor(owner).unsqueeze(0) == types.unsqueeze(1)
    tok, exp, w = predicted_selection(pred, gate, in_group, 0.5)
    assert {(i, j) for i, j in zip(tok.tolist(), exp.tolist(), strict=True)} == {(i, j) for i, j, _ in want}
    assert float(predictor_bce(pred[:0], in_group[:0], in_group[:0])) == 0.0


def test_predictor_mode_is_causal_and_expert_choice_is_not():
    torch.manual_seed(2)
    r = MoMaRouter(8, 4, groups=[2, 2], capacity_factor=1.0).eval()
    with torch.no_grad():
        r.predictor.bias.zero_()
    assert r.causal_at_eval and not MoMaRouter(8, 4, causal_inference=False).causal_at_eval
    x, types = torch.randn(12, 8), torch.randint(0, 2, (12,))
    before = r(x, ctx_of(types))
    later = x.clone()
    later[8:] = torch.randn(4, 8) * 10  # change only the last four tokens (and their types)
    types_later = types.clone()
    types_later[8:] = 1 - types_later[8:]
    after = r(later, ctx_of(types_later))

    def upto(routing, n):
        return {(i, j, round(w, 6)) for i, j, w in entries(routing) if i < n}

    assert upto(before, 8) == upto(after, 8)
    # expert choice over the batch: a later token outbids an earlier one
    ec = MoMaRouter(2, 2, groups=[2], capacity_factor=1.0, causal_inference=False).eval()
    with torch.no_grad():
        ec.weight.copy_(torch.eye(2))
    xs = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert (0, 0) in {(i, j) for i, j, _ in entries(ec(xs, ctx_of([0] * 4)))}
    xs[3] = torch.tensor([3.0, 0.0])
    assert (0, 0) not in {(i, j) for i, j, _ in entries(ec(xs, ctx_of([0] * 4)))}


def test_predictor_learns_the_expert_choice_selection():
    """Trained on its BCE alone (the gate frozen), the predictor reproduces most EC decisions."""
    torch.manual_seed(3)
    r = MoMaRouter(8, 4, groups=[2, 2], capacity_factor=1.0, gumbel_noise=False).train()
    x, types = torch.randn(256, 8), torch.randint(0, 2, (256,))
    opt = torch.optim.Adam(r.predictor.parameters(), lr=0.05)
    for _ in range(150):
        loss = r(x, ctx_of(types)).aux[PREDICTOR_AUX]
        opt.zero_grad()
        loss.backward()
        opt.step()
    ec = {(i, j) for i, j, _ in entries(r.train()(x, ctx_of(types)))}
    pred = {(i, j) for i, j, _ in entries(r.eval()(x, ctx_of(types)))}
    own_group_pairs = 256 * 2
    agree = own_group_pairs - len(ec ^ pred)
    assert agree / own_group_pairs > 0.85


def test_groups_capacity_and_top_k_alias():
    assert check_groups(None, 8) == ((0, 1), (4, 4))
    assert check_groups([3, 5], 8) == ((0, 1), (3, 5))
    assert check_groups({2: 1, 0: 3}, 4) == ((0, 2), (3, 1))
    assert MoMaRouter(8, 4).capacity_factor == 1.0  # the paper: c_e = 1 / |E_M|
    assert MoMaRouter(8, 4, top_k=2).capacity_factor == 2.0
    assert MoMaRouter(8, 4, top_k=2, capacity_factor=0.5).capacity_factor == 0.5
    r = MoMaRouter(8, 8, groups=[4, 4]).train()
    types = torch.tensor([0] * 12 + [1] * 20)
    routing = r(torch.randn(32, 8), ctx_of(types))
    assert routing.tokens_per_expert().tolist() == [3] * 4 + [5] * 4  # T_g / 4 each
    assert routing.num_assignments == 32  # one expert per token on average
    # a type no group serves: clear error naming ctx.token_types
    r2 = MoMaRouter(8, 4, groups={0: 2, 2: 2})
    with pytest.raises(ValueError, match="ctx.token_types"):
        r2(torch.randn(3, 8), ctx_of([0, 1, 2]))
    with pytest.raises(ValueError, match="ctx.token_types"):
        r2(torch.randn(3, 8), ctx_of([0, 5, 2]))


def test_missing_or_malformed_token_types_name_ctx_token_types():
    r = MoMaRouter(8, 4)
    with pytest.raises(ValueError, match="ctx.token_types"):
        r(torch.randn(5, 8))
    with pytest.raises(ValueError, match="ctx.token_types"):
        r(torch.randn(5, 8), ctx_of([0, 1]))
    with pytest.raises(ValueError, match="ctx.token_types"):
        r(torch.randn(2, 8), RoutingContext(token_types=torch.tensor([0.0, 1.0])))


@pytest.mark.parametrize("t", [0, 1, 2, 13])
def test_lone_moe_forward_and_backward(t):
    torch.manual_seed(4)
    moe = moelab.MoE(16, 4, 1, router="moma")
    x = torch.randn(t, 16, requires_grad=True)
    ctx = ctx_of(torch.randint(0, 2, (t,)))
    y = moe(x, ctx)
    (y.square().sum() + moe.aux_loss).backward()
    assert y.shape == (t, 16) and torch.isfinite(y).all()
    assert PREDICTOR_AUX in moe.aux_terms and torch.isfinite(moe.aux_loss)
    if t > 1:
        assert moe.router.weight.grad.abs().sum() > 0  # the sigmoid gates learn from the task
        assert moe.router.predictor.weight.grad.abs().sum() > 0
    moe.eval()
    assert moe(x, ctx).shape == (t, 16)


def test_trains_in_moelm_with_token_types_without_nan():
    torch.manual_seed(5)
    cfg = MoELMConfig(
        d_model=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=8, top_k=2, vocab_size=256,
        router="moma", aux_losses={},
    )  # fmt: skip
    model = MoELM(cfg)
    assert not [m for _, m in model.moe_layers() if not isinstance(m.router, MoMaRouter)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, types = torch.randint(0, 256, (4, 32)), torch.randint(0, 2, (4, 32))
    losses = []
    for _ in range(6):
        out = model(ids, labels=ids, token_types=types)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids, token_types=types).logits).all()
    with pytest.raises(ValueError, match="ctx.token_types"):
        model(ids)


def test_saved_model_with_groups_loads_back(tmp_path):
    """``groups={0: .., 1: ..}`` comes back from config.json with string keys."""
    torch.manual_seed(7)
    cfg = MoELMConfig(
        d_model=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=6, top_k=1, router="moma",
        router_kwargs={"groups": {0: 2, 1: 4}}, aux_losses={},
    )  # fmt: skip
    model = MoELM(cfg).eval()
    loaded = MoELM.from_pretrained(model.save_pretrained(tmp_path)).eval()
    assert [m.router.group_sizes for _, m in loaded.moe_layers()] == [(2, 4), (2, 4)]
    ids, types = torch.randint(0, 256, (2, 16)), torch.randint(0, 2, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids, token_types=types).logits, model(ids, token_types=types).logits
        )


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"groups": [3, 3]}, "groups"),  # sums to 6, not 8
        ({"groups": [8, 0]}, "groups"),
        ({"groups": {-1: 4, 0: 4}}, "groups"),
        ({"groups": "44"}, "groups"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": 0.0}, "threshold"),
        ({"top_k": 9}, "top_k"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        moelab.build_router("moma", d_model=8, num_experts=8, **kwargs)
    with pytest.raises(ValueError, match="groups"):
        moelab.build_router("moma", d_model=8, num_experts=5)  # odd E cannot split evenly


def test_metrics_report_predictor_agreement_and_eval_experts_per_token():
    torch.manual_seed(6)
    r = MoMaRouter(8, 4, groups=[2, 2], capacity_factor=1.0, gumbel_noise=False)
    assert all(math.isnan(v) for v in r.metrics().values())
    x, types = torch.randn(20, 8), torch.randint(0, 2, (20,))
    out = r.train()(x, ctx_of(types))
    said = torch.sigmoid(x @ r.predictor.weight.detach().t() + r.predictor.bias.detach()) > 0.5
    owner = torch.tensor([0, 0, 1, 1])
    in_group = owner.unsqueeze(0) == types.unsqueeze(1)
    chosen = out.mask()
    want = float(((said == chosen) & in_group).sum()) / float(in_group.sum())
    assert r.metrics()["moma_predictor_accuracy"] == pytest.approx(want)
    r.eval()
    a = r(x, ctx_of(types))
    b = r(x[:5], ctx_of(types[:5]))
    want = (a.num_assignments + b.num_assignments) / 25
    assert r.metrics()["moma_eval_experts_per_token"] == pytest.approx(want)
    r.train()(x, ctx_of(types))  # a training forward ends the eval pass
    assert math.isnan(r.metrics()["moma_eval_experts_per_token"])
