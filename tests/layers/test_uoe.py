"""Union of Experts, MLP part (layer ``uoe``, router ``uoe_select``) against references written
plainly: the dense MLP itself (k = E, every token taken: the union is the MLP, forward and
backward, float64), the decomposition's round trip, the official gate and selection as a
per-sequence, per-expert loop (sort, keep the top max_len), the unweighted / gate-weighted sum
per assignment, edge sizes, bad arguments, and training in ``MoELM``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import moelab
from moelab import registry
from moelab.core.context import RoutingContext
from moelab.core.routed import routed_layers
from moelab.experts.shared import SharedExperts
from moelab.layers.uoe import UnionOfExperts, assemble_mlp, decompose_mlp, dense_mlp_weights
from moelab.models.config import MoELMConfig
from moelab.models.lm import DenseFFN, MoELM
from moelab.routers.uoe import UoESelectRouter, patchwise_select, uoe_capacity, uoe_scores

D = 12


def plain_mlp(w_in, w_out, x, activation):
    """The dense MLP written plainly (gated: gate rows first)."""
    act = {"swiglu": nn.functional.silu, "geglu": nn.functional.gelu, "gelu": nn.functional.gelu}.get(
        activation, {"relu": torch.relu, "silu": nn.functional.silu}.get(activation)
    )
    h = x @ w_in.T
    if activation in ("swiglu", "geglu"):
        gate, up = h.chunk(2, dim=-1)
        return (act(gate) * up) @ w_out.T
    return act(h) @ w_out.T


def reference_selection(probs_BSE, top_k, capacity, *, pad, normalize=True, axis="sequence", eps=1e-8):
    """The official gate and ``preprocess`` as loops: set of (token, expert) pairs, token = b*S + s.

    The arithmetic is fp32 scalar by scalar, as the official gate's: ``m / (m + eps)`` rounds to
    1.0 for most ``m``, and those ties (broken by position) are part of what it does."""
    b_, s_, e_ = probs_BSE.shape
    p = probs_BSE.detach().float().numpy()
    eps = np.float32(eps)
    chosen = [
        [set(sorted(range(e_), key=lambda j: -p[b, s, j])[:top_k]) for s in range(s_)] for b in range(b_)
    ]
    masked = [
        [[p[b, s, j] if j in chosen[b][s] else np.float32(0) for j in range(e_)] for s in range(s_)]
        for b in range(b_)
    ]
    out = set()
    if axis == "sequence":
        rows, length = range(b_), s_
        cell = lambda row, pos: (row, pos)  # noqa: E731
        other = lambda b, s, j: sum(masked[bb][s][j] for bb in range(b_)) or np.float32(0)  # noqa: E731  (over the batch)
    else:
        rows, length = range(s_), b_
        cell = lambda row, pos: (pos, row)  # noqa: E731
        other = lambda b, s, j: sum(masked[b][ss][j] for ss in range(s_)) or np.float32(0)  # noqa: E731  (over positions)
    max_len = min(length, math.ceil(capacity * length * top_k / e_ - 1e-9))
    for row in rows:
        for j in range(e_):
            cands = []
            for pos in range(length):
                b, s = cell(row, pos)
                score = masked[b][s][j]
                if normalize:
                    score = score / (other(b, s, j) + eps)
                cands.append((j in chosen[b][s], score, pos))
            cands.sort(key=lambda c: (not c[0], -c[1], c[2]))  # choosers, then score, then position
            for is_chooser, _, pos in cands[:max_len]:
                if pad or is_chooser:
                    b, s = cell(row, pos)
                    out.add((b * s_ + s, j))
    return out


def per_assignment_output(layer, x_TD, routing):
    """``sum over (t, e) of w * E_e(x_t)``, one assignment at a time (+ the layer's bias)."""
    out = torch.zeros_like(x_TD)
    for t, e, w in zip(
        routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True
    ):
        out[t] += w.to(x_TD.dtype) * layer.experts.expert_forward(e, x_TD[t : t + 1])[0]
    return out if layer.bias is None else out + layer.bias


# --------------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
def test_slices_sum_to_the_dense_mlp_and_reassemble_exactly(activation):
    torch.manual_seed(0)
    hidden, e = 24, 4
    rows = 2 * hidden if activation in ("swiglu", "geglu") else hidden
    w_in, w_out = torch.randn(rows, D, dtype=torch.float64), torch.randn(7, hidden, dtype=torch.float64)
    bank = decompose_mlp(w_in, w_out, e, activation)
    assert (bank.num_experts, bank.hidden, bank.d_in, bank.d_out) == (e, hidden // e, D, 7)
    x = torch.randn(9, D, dtype=torch.float64)
    total = sum(bank.expert_forward(i, x) for i in range(e))
    torch.testing.assert_close(total, plain_mlp(w_in, w_out, x, activation), rtol=1e-12, atol=1e-12)
    back_in, back_out = assemble_mlp(bank)
    assert torch.equal(back_in, w_in) and torch.equal(back_out, w_out)
    # expert i holds hidden units [i h, (i + 1) h)
    h = hidden // e
    assert torch.equal(bank.down_proj[1], w_out[:, h : 2 * h])
    assert torch.equal(bank.w_in[1][:h], w_in[h : 2 * h])


def test_dense_mlp_weights_reads_moelab_and_torch_mlps():
    torch.manual_seed(1)
    ffn = DenseFFN(D, 16)
    w_in, w_out, b_out, act = dense_mlp_weights(ffn)
    assert w_in is ffn.gate_up.weight and w_out is ffn.down.weight and b_out is None and act == "swiglu"
    shared = SharedExperts(D, 16, "geglu")
    w_in, _, _, act = dense_mlp_weights(shared)
    assert act == "geglu" and torch.equal(w_in, torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
    seq = nn.Sequential(nn.Linear(D, 16, bias=False), nn.GELU(), nn.Linear(16, D))
    w_in, w_out, b_out, act = dense_mlp_weights(seq)
    assert act == "gelu" and b_out is seq[2].bias
    with pytest.raises(ValueError, match="mlp"):
        dense_mlp_weights(nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D)))  # input bias
    with pytest.raises(ValueError, match="mlp"):
        dense_mlp_weights(SharedExperts(D, 16, gate=True))
    with pytest.raises(TypeError, match="mlp"):
        dense_mlp_weights(nn.Sequential(nn.Linear(D, 16, bias=False), nn.Tanh(), nn.Linear(16, D)))


# --------------------------------------------------------------------------- the union is the MLP
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("axis", ["sequence", "batch"])
@pytest.mark.parametrize("kind", ["swiglu_ffn", "gelu_with_output_bias"])
def test_k_equals_e_with_every_token_taken_is_the_dense_mlp_forward_and_backward(kind, axis, pad):
    torch.manual_seed(2)
    if kind == "swiglu_ffn":
        dense = DenseFFN(D, 16).double()
    else:
        dense = nn.Sequential(nn.Linear(D, 16, bias=False), nn.GELU(), nn.Linear(16, D)).double()
        nn.init.normal_(dense[2].bias)
    e = 4
    layer = UnionOfExperts.from_dense(
        dense, e, e, router_kwargs={"capacity": 1.0, "pad_to_capacity": pad, "axis": axis}, aux_losses={}
    )
    assert layer.router.weight.dtype == torch.float64 and (layer.bias is not None) == (kind != "swiglu_ffn")
    x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    y, routing = layer.forward_routed(x)
    assert routing.num_assignments == 15 * e  # every token, every expert
    ref = dense(x_dense)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_dense.grad, rtol=1e-12, atol=1e-12)
    w_in, w_out, b_out, act = dense_mlp_weights(dense)
    grads = decompose_mlp(w_in.grad, w_out.grad, e, act)  # the dense gradients, sliced
    torch.testing.assert_close(layer.experts.w_in.grad, grads.w_in, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.experts.down_proj.grad, grads.down_proj, rtol=1e-12, atol=1e-12)
    if b_out is not None:
        torch.testing.assert_close(layer.bias.grad, b_out.grad)
    # the layer reassembles into the dense weights it was built from
    a_in, a_out, a_b = layer.dense_weights()
    assert torch.equal(a_in, w_in) and torch.equal(a_out, w_out)
    assert (a_b is None) == (b_out is None)


# --------------------------------------------------------------------------- patch-wise selection
@pytest.mark.parametrize(
    "b,s,e,k,capacity",
    [(2, 10, 4, 2, 1.0), (3, 7, 4, 1, 1.0), (2, 9, 8, 2, 1.5), (4, 5, 3, 2, 0.5), (1, 12, 4, 2, 1.0)],
)
@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_selection_equals_a_per_sequence_per_expert_loop(b, s, e, k, capacity, pad, normalize):
    torch.manual_seed(b * 100 + s + e)
    router = UoESelectRouter(D, e, k, capacity=capacity, pad_to_capacity=pad, normalize=normalize)
    x = torch.randn(b * s, D)
    routing = router(x, RoutingContext(batch_shape=(b, s)))
    probs = torch.softmax(x @ router.weight.detach().T + router.bias.detach(), dim=-1)
    torch.testing.assert_close(routing.probs, probs)
    got = set(zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True))
    assert len(got) == routing.num_assignments  # no pair twice
    ref = reference_selection(routing.probs.view(b, s, e), k, capacity, pad=pad, normalize=normalize)
    assert got == ref
    max_len = uoe_capacity(s, k, e, capacity)
    per_seq = torch.zeros(b, e, dtype=torch.long).index_put_(
        (routing.token_index // s, routing.expert_index),
        torch.ones_like(routing.token_index),
        accumulate=True,
    )
    if pad:
        assert (per_seq == max_len).all()  # an expert always takes max_len tokens per sequence
    else:
        assert (per_seq <= max_len).all()
    routing.check()
    assert routing.top_k is None


@pytest.mark.parametrize("pad", [True, False])
def test_batch_axis_selects_across_the_batch_at_each_position(pad):
    """The official Transformer-XL layout: per position, each expert picks sequences."""
    torch.manual_seed(3)
    b, s, e, k = 6, 4, 4, 2
    router = UoESelectRouter(D, e, k, axis="batch", pad_to_capacity=pad)
    routing = router(torch.randn(b * s, D), RoutingContext(batch_shape=(b, s)))
    got = set(zip(routing.token_index.tolist(), routing.expert_index.tolist(), strict=True))
    assert got == reference_selection(routing.probs.view(b, s, e), k, 1.0, pad=pad, axis="batch")
    per_pos = torch.zeros(s, e, dtype=torch.long).index_put_(
        (routing.token_index % s, routing.expert_index), torch.ones_like(routing.token_index), accumulate=True
    )
    assert (per_pos == 3).all() if pad else (per_pos <= 3).all()  # max_len = ceil(6 * 2 / 4)


def test_functions_and_capacity_formula():
    assert uoe_capacity(150, 2, 4) == 75 == int(150 * 0.5)  # the official U_MLP's max_len
    assert uoe_capacity(1, 2, 4) == 1  # ceil keeps one token (official int() would give 0)
    assert uoe_capacity(10, 2, 4, 10.0) == 10 and uoe_capacity(0, 2, 4) == 0
    assert uoe_capacity(10, 3, 8) == 4  # ceil(3.75)
    probs = torch.softmax(torch.randn(2, 5, 4), dim=-1)
    score, mask = uoe_scores(probs, 2)
    assert (mask.sum(-1) == 2).all() and (score[~mask] == 0).all()
    masked = probs * mask
    torch.testing.assert_close(score, masked / (masked.sum(0, keepdim=True) + 1e-8))
    row, pos, expert = patchwise_select(score, mask, 0)
    assert row.numel() == pos.numel() == expert.numel() == 0
    with pytest.raises(ValueError, match="max_len"):
        patchwise_select(score, mask, 6)
    with pytest.raises(ValueError, match="probs_PLE"):
        uoe_scores(probs[0], 2)
    with pytest.raises(ValueError, match="length"):
        uoe_capacity(-1, 2, 4)


# --------------------------------------------------------------------------------- gate weighting
@pytest.mark.parametrize("scale_by_gate", [False, True])
def test_outputs_are_summed_unweighted_or_weighted_by_the_gate(scale_by_gate):
    torch.manual_seed(4)
    layer = UnionOfExperts(
        D, 4, 2, 16, router_kwargs={"scale_by_gate": scale_by_gate, "bias": True}, aux_losses={}
    )
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 6, D)
    y, routing = layer.forward_routed(x)
    probs = routing.probs[routing.token_index, routing.expert_index]
    if scale_by_gate:
        torch.testing.assert_close(routing.weight, probs)
    else:
        assert torch.equal(routing.weight, torch.ones_like(probs)) and not routing.weight.requires_grad
    ref = per_assignment_output(layer, x.reshape(-1, D), routing).view_as(y)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    # the official gate only selects: no gradient reaches the router through the output
    assert (layer.router.weight.grad is not None) == scale_by_gate
    assert layer.experts.w_in.grad is not None and layer.bias.grad is not None


def test_an_aux_loss_trains_the_unscaled_router():
    torch.manual_seed(5)
    layer = UnionOfExperts(D, 4, 2, 8, aux_losses={"load_balance": 1e-2})
    y = layer(torch.randn(2, 6, D))
    (y.sum() + layer.aux_loss).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------- edges and inputs
@pytest.mark.parametrize("pad", [True, False])
def test_flat_input_is_one_sequence_and_edge_sizes(pad):
    torch.manual_seed(6)
    layer = UnionOfExperts(
        D, 4, 2, 8, router_kwargs={"pad_to_capacity": pad}, aux_losses={"load_balance": 1e-2}
    )
    x = torch.randn(7, D)
    torch.testing.assert_close(layer(x), layer(x.unsqueeze(0)).squeeze(0))
    for shape in [(1, D), (1, 1, D), (0, D), (2, 0, D), (2, 1, D)]:
        xi = torch.randn(*shape, requires_grad=True)
        y, routing = layer.forward_routed(xi)
        (y.square().sum() + layer.aux_loss).backward()
        assert y.shape == xi.shape and torch.isfinite(y).all()
        if xi.numel():
            assert torch.isfinite(xi.grad).all()
    # T = 1: max_len = 1; padded, every expert takes the token; else its k choosers
    _, routing = layer.forward_routed(torch.randn(1, 1, D))
    assert routing.num_assignments == (4 if pad else 2)


def test_router_in_a_lone_moe_forward_backward_and_not_causal():
    torch.manual_seed(7)
    moe = moelab.MoE(D, num_experts=4, top_k=2, router="uoe_select", aux_losses={"load_balance": 1e-2})
    assert isinstance(moe.router, UoESelectRouter) and not moe.router.causal_at_eval
    for shape in [(2, 5, D), (1, D), (0, D)]:
        x = torch.randn(*shape, requires_grad=True)
        y = moe(x)
        (y.sum() + moe.aux_loss).backward()
        assert y.shape == x.shape
    # a later token changes an earlier token's selection: not causal
    router = UoESelectRouter(D, 4, 1, pad_to_capacity=False)
    x = torch.randn(1, 8, D)
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # every token chooses expert 0
    a = router(x[0], RoutingContext(batch_shape=(1, 8)))
    a0 = set(a.token_index[a.expert_index == 0].tolist())
    assert len(a0) == 2  # max_len = ceil(8 / 4): the first two by position (ties)
    with pytest.raises(ValueError, match="batch_shape"):
        router(x[0], RoutingContext(batch_shape=(2, 3)))


def test_requested_counts_the_dropped_choosers():
    torch.manual_seed(8)
    router = UoESelectRouter(D, 4, 2, pad_to_capacity=False, capacity=0.5)
    routing = router(torch.randn(16, D), RoutingContext(batch_shape=(2, 8)))
    assert (
        routing.requested.tolist()
        == (routing.probs.topk(2, -1).indices.reshape(-1).bincount(minlength=4)).tolist()
    )
    assert 0 < routing.drop_rate() < 1


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"router_kwargs": {"capacity": 0.0}}, "capacity"),
        ({"router_kwargs": {"axis": "tokens"}}, "axis"),
        ({"router_kwargs": {"pad_to_capacity": 1}}, "pad_to_capacity"),
        ({"router_kwargs": {"scale_by_gate": "yes"}}, "scale_by_gate"),
        ({"router_kwargs": {"eps": -1.0}}, "eps"),
        ({"router_kwargs": {"nope": 1}}, "nope"),
        ({"router_kwargs": {"bias": True}, "bias": True}, "bias"),
        ({"router_kwargs": [1]}, "router_kwargs"),
        ({"experts": nn.Linear(2, 2)}, "experts"),
        ({"aux_losses": {"nope": 1.0}}, "nope"),
        ({"backend": "nope"}, "backend"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, arg):
    kw = {"d_model": D, "num_experts": 4, **kwargs}
    with pytest.raises((ValueError, TypeError), match=arg):
        UnionOfExperts(**kw)


def test_bad_decompositions_name_the_argument():
    w_in, w_out = torch.randn(2 * 12, D), torch.randn(D, 12)
    with pytest.raises(ValueError, match="num_experts"):
        decompose_mlp(w_in, w_out, 5, "swiglu")  # 5 does not divide H = 12
    with pytest.raises(ValueError, match="w_out"):
        decompose_mlp(w_in, torch.randn(D, 10), 4, "swiglu")
    with pytest.raises(ValueError, match="w_in"):
        decompose_mlp(torch.randn(13, D), torch.randn(D, 6), 2, "swiglu")  # odd rows for a gated MLP
    with pytest.raises(ValueError, match="w_in"):
        decompose_mlp(torch.randn(12), w_out, 4, "relu")
    with pytest.raises(ValueError, match="activation"):
        decompose_mlp(w_in, w_out, 4, "tanh")
    with pytest.raises(ValueError, match="b_out"):
        UnionOfExperts.from_weights(w_in, w_out, 4, 2, b_out=torch.zeros(3))
    with pytest.raises(TypeError, match="bank"):
        assemble_mlp(nn.Linear(2, 2))
    layer = UnionOfExperts(D, 4, 2, 8)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match="x"):
        layer(torch.full((2, D), float("nan")))


# --------------------------------------------------------------------------------- in MoELM
def test_moelm_with_uoe_trains_without_nan_and_the_official_router_stays_fixed():
    assert "uoe" in registry.names("layer") and "uoe_select" in registry.names("router")
    torch.manual_seed(9)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, max_seq_len=32,
        router="uoe", router_kwargs={"bias": True}, aux_losses={},
    )  # fmt: skip
    model = MoELM(cfg)
    layers = [m for _, m in model.moe_layers()]
    assert all(isinstance(m, UnionOfExperts) and m.bias is not None for m in layers)
    assert [n for n, _ in routed_layers(model)] == ["blocks.0.ffn.moe", "blocks.1.ffn.moe"]
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len({id(p) for p in model.parameters()})
    router0 = layers[0].router.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
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
    # no aux loss and an unweighted output: the router keeps its initial weights, as in the official code
    assert torch.equal(layers[0].router.weight, router0)


def test_moelm_with_gate_scaling_and_balance_loss_trains():
    torch.manual_seed(10)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, max_seq_len=32,
        router="uoe", router_kwargs={"scale_by_gate": True, "pad_to_capacity": False},
        aux_losses={"load_balance": 1e-2},
    )  # fmt: skip
    model = MoELM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(5):
        ids = torch.randint(0, 64, (2, 16))
        out = model(ids, labels=ids)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert model.moe_layers()[0][1].router.weight.grad is not None
        opt.step()
        opt.zero_grad()


def test_state_dict_round_trip_and_defaults():
    torch.manual_seed(11)
    a, b = UnionOfExperts(D, 4, 2, bias=True), UnionOfExperts(D, 4, 2, bias=True)
    assert {k.split(".")[0] for k in a.state_dict()} == {"moe", "bias"}
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 5, D)
    torch.testing.assert_close(a(x), b(x))
    default = UnionOfExperts(D)
    assert (default.num_experts, default.top_k, default.experts.hidden) == (4, 2, 4 * D // 2)
    r = default.router
    assert (r.capacity, r.pad_to_capacity, r.normalize, r.scale_by_gate, r.axis) == (
        1.0,
        True,
        True,
        False,
        "sequence",
    )
    assert r.bias is not None and r.eps == 1e-8
