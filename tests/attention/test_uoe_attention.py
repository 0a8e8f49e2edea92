"""UoE selective multi-head attention (``uoe_attention``) against references written plainly:
``torch.nn.MultiheadAttention`` with the same weights (every head and every token selected: the
layer is MHA, forward and backward, float64, causal and not, with and without biases and RoPE),
``scaled_dot_product_attention`` for the functional form, and a per-sequence, per-head loop
(gather the head's tokens, attend causally by position, project, add back) for any selection;
the gate's selection against the official ``SwitchGate`` / ``preprocess`` written as loops and
against the MLP part's ``patchwise_select``; the routing, tracing and routing transforms; the
gate's gradient and the auxiliary loss; causality; one token; bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moelab
from moelab import registry
from moelab.attention.selective_heads import (
    SelectiveHeadAttention,
    gathered_head_attention,
    head_token_positions,
    selective_head_attention,
    uoe_head_gate,
    uoe_select_head_tokens,
)
from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.models.blocks import apply_rope, rope_tables
from moelab.routers.uoe import patchwise_select, uoe_capacity, uoe_scores

F64 = torch.float64


# --------------------------------------------------------------------------------- references
def mha_reference(layer, x, *, causal, rope=None):
    """The same weights in ``torch.nn.MultiheadAttention`` (no RoPE), or written plainly with
    ``moelab.models.blocks.apply_rope`` at positions ``0 .. S-1`` (with RoPE)."""
    d, h, dh = layer.d_model, layer.n_heads, layer.head_dim
    b, s, _ = x.shape
    if rope is None:
        mha = nn.MultiheadAttention(d, h, bias=layer.q_proj.bias is not None, batch_first=True).to(x.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(
                torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
            )
            mha.out_proj.weight.copy_(layer.o_proj.weight)
            if layer.q_proj.bias is not None:
                mha.in_proj_bias.copy_(torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))
                mha.out_proj.bias.copy_(layer.o_proj.bias)
        mask = torch.ones(s, s, dtype=torch.bool).triu(1) if causal else None
        return mha(x, x, x, attn_mask=mask, need_weights=False)[0], mha
    q, k, v = (p(x).view(b, s, h, dh).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    cos, sin = rope
    q, k = apply_rope(q, cos[:s], sin[:s]), apply_rope(k, cos[:s], sin[:s])
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h * dh)
    return layer.o_proj(o), None


def rotate(x, cos, sin):
    """RoPE written out for one row set ``x [n, Dh]`` at tables ``cos, sin [n, Dh/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def loop_reference(layer, x, select, *, weight=None, positions=None, rope=None):
    """Per sequence and head: the head's tokens (position order), their q/k/v by the head's
    slices, attention causal by true position, the head's rows of W_o, added into the tokens."""
    b, s, d = x.shape
    dh = layer.head_dim
    ys = []
    for bi in range(b):
        y = x.new_zeros(s, d)
        for h in range(layer.n_heads):
            idx = [si for si in range(s) if bool(select[bi, si, h])]
            if not idx:
                continue
            rows = slice(h * dh, (h + 1) * dh)
            xs = x[bi, idx]
            q, k, v = (
                xs @ p.weight[rows].T + (0 if p.bias is None else p.bias[rows])
                for p in (layer.q_proj, layer.k_proj, layer.v_proj)
            )
            pos = torch.tensor(idx) if positions is None else positions[bi, idx]
            if rope is not None:
                at = pos if layer.rope_positions == "token" else torch.arange(len(idx))
                q, k = rotate(q, rope[0][at], rope[1][at]), rotate(k, rope[0][at], rope[1][at])
            scores = q @ k.T / math.sqrt(dh)
            if layer.causal:
                scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            o = scores.softmax(-1) @ v
            if weight is not None:
                o = o * weight[bi, idx, h][:, None]
            y = y.index_add(0, torch.tensor(idx), o @ layer.o_proj.weight[:, rows].T)
        ys.append(y)
    out = torch.stack(ys)
    return out if layer.o_proj.bias is None else out + layer.o_proj.bias


def select_of(routing: Routing, b: int, s: int, h: int) -> torch.Tensor:
    sel = torch.zeros(b * s, h, dtype=torch.bool)
    sel[routing.token_index, routing.expert_index] = True
    return sel.view(b, s, h)


def top_k_loop(probs_BSH, k):
    """Each token's k most probable heads, by Python sorting."""
    b, s, h = probs_BSH.shape
    sel = torch.zeros(b, s, h, dtype=torch.bool)
    for bi in range(b):
        for si in range(s):
            for hh in sorted(range(h), key=lambda j: -float(probs_BSH[bi, si, j].detach()))[:k]:
                sel[bi, si, hh] = True
    return sel


def grads(tensors):
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def zero_grads(tensors):
    for t in tensors:
        t.grad = None


# --------------------------------------------------------------------------------- MHA exactly
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_all_heads_all_tokens_is_mha(causal, bias):
    torch.manual_seed(1)
    layer = SelectiveHeadAttention(12, 3, heads_per_token=3, causal=causal, bias=bias).to(F64)
    if bias:
        with torch.no_grad():
            for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
                p.bias.normal_()
    x = torch.randn(2, 9, 12, dtype=F64, requires_grad=True)
    y, routing = layer.forward_routed(x)
    assert routing.num_assignments == 2 * 9 * 3  # every token takes every head
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, mha = mha_reference(layer, x_ref, causal=causal)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)

    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-11, atol=1e-11)
    w_in = torch.cat([layer.q_proj.weight.grad, layer.k_proj.weight.grad, layer.v_proj.weight.grad])
    torch.testing.assert_close(w_in, mha.in_proj_weight.grad, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(layer.o_proj.weight.grad, mha.out_proj.weight.grad, rtol=1e-11, atol=1e-11)
    if bias:
        b_in = torch.cat([layer.q_proj.bias.grad, layer.k_proj.bias.grad, layer.v_proj.bias.grad])
        torch.testing.assert_close(b_in, mha.in_proj_bias.grad, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(layer.o_proj.bias.grad, mha.out_proj.bias.grad, rtol=1e-11, atol=1e-11)
    assert layer.gate.weight.grad is None  # the gate only selects (official)


@pytest.mark.parametrize("rope_positions", ["token", "rank"])
def test_all_heads_with_rope_is_mha_with_rope(rope_positions):
    torch.manual_seed(2)
    layer = SelectiveHeadAttention(16, 4, 4, rope_positions=rope_positions).to(F64)
    cos, sin = (t.to(F64) for t in rope_tables(4, 32, 10000.0))
    x = torch.randn(3, 11, 16, dtype=F64, requires_grad=True)
    y = layer(x, rope=(cos, sin))
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, _ = mha_reference(layer, x_ref, causal=True, rope=(cos, sin))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-11, atol=1e-11)


def test_from_weights_is_that_mha():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, bias=False, batch_first=True).to(F64)
    w_q, w_k, w_v = mha.in_proj_weight.detach().chunk(3)
    layer = SelectiveHeadAttention.from_weights(
        w_q, w_k, w_v, mha.out_proj.weight.detach(), 2, heads_per_token=2
    )
    assert layer.q_proj.weight.dtype == F64 and layer.head_dim == 4
    x = torch.randn(2, 5, 8, dtype=F64)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    torch.testing.assert_close(layer(x), mha(x, x, x, attn_mask=mask, need_weights=False)[0])


@pytest.mark.parametrize("causal", [True, False])
def test_functional_all_selected_is_sdpa(causal):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=F64, requires_grad=True) for _ in range(3))
    select = torch.ones(2, 7, 3, dtype=torch.bool)
    o = selective_head_attention(q, k, v, select, causal=causal)
    o_ref = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(o, o_ref)
    g = torch.randn_like(o)
    gq = torch.autograd.grad((o * g).sum(), (q, k, v))
    gq_ref = torch.autograd.grad((o_ref * g).sum(), (q, k, v))
    for a, b in zip(gq, gq_ref, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shuffled_positions", [False, True])
@pytest.mark.parametrize("ragged", [True, False])
def test_functional_matches_per_head_loop(causal, shuffled_positions, ragged):
    torch.manual_seed(5)
    b, h, s, dh = 3, 4, 10, 3
    q, k, v = (torch.randn(b, h, s, dh, dtype=F64, requires_grad=True) for _ in range(3))
    if ragged:
        select = torch.rand(b, s, h) < 0.4
        select[0, :, 1] = False  # a head nobody chose in one sequence
        select[1, 3] = False  # a token that chose no head
    else:  # every slot valid: with shuffled positions the mask is not the lower triangle
        select = torch.ones(b, s, h, dtype=torch.bool)
    positions = torch.stack([torch.randperm(s) for _ in range(b)]) if shuffled_positions else None
    o = selective_head_attention(q, k, v, select, causal=causal, positions_BS=positions)

    ref = []
    for bi in range(b):
        rows = []
        for hh in range(h):
            out = q.new_zeros(s, dh)
            idx = [si for si in range(s) if bool(select[bi, si, hh])]
            if idx:
                pos = torch.tensor(idx) if positions is None else positions[bi, idx]
                scores = q[bi, hh, idx] @ k[bi, hh, idx].T / math.sqrt(dh)
                if causal:
                    scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
                out = out.index_add(0, torch.tensor(idx), scores.softmax(-1) @ v[bi, hh, idx])
            rows.append(out)
        ref.append(torch.stack(rows))
    o_ref = torch.stack(ref)
    torch.testing.assert_close(o, o_ref)
    assert (o.permute(0, 2, 1, 3)[~select] == 0).all()  # unselected (token, head): zero
    g = torch.randn_like(o)
    for a, r in zip(torch.autograd.grad((o * g).sum(), (q, k, v)),
                    torch.autograd.grad((o_ref * g).sum(), (q, k, v)), strict=True):  # fmt: skip
        torch.testing.assert_close(a, r)


def test_head_token_positions_layout():
    select = torch.tensor([[[1, 0], [0, 0], [1, 1], [0, 1]]], dtype=torch.bool)  # [1, 4, 2]
    pos, valid = head_token_positions(select)
    assert pos.tolist() == [[[0, 2], [2, 3]]] and valid.all()
    select[0, 3, 1] = False
    pos, valid = head_token_positions(select)
    assert pos.tolist() == [[[0, 2], [2, 0]]] and valid.tolist() == [[[True, True], [True, False]]]
    pos, valid = head_token_positions(torch.zeros(2, 3, 2, dtype=torch.bool))
    assert pos.shape == (2, 2, 0)


def test_default_selection_is_the_gates_top_k():
    torch.manual_seed(6)
    probs = torch.randn(3, 8, 6).softmax(-1)
    sel = uoe_select_head_tokens(probs, 3)
    assert torch.equal(sel, top_k_loop(probs, 3))
    p2, mask = uoe_head_gate(torch.log(probs.view(-1, 6)), 3)
    torch.testing.assert_close(p2, probs.view(-1, 6))
    assert torch.equal(mask.view(3, 8, 6), sel)


def test_padded_selection_matches_official_preprocess_loop():
    """capacity=None, pad: every head takes max_len = the most markers any head has in the batch;
    a head with fewer is filled with non-markers (score 0; ties: earliest position first)."""
    torch.manual_seed(7)
    probs = torch.randn(2, 9, 4).softmax(-1)
    sel = uoe_select_head_tokens(probs, 2, pad_to_capacity=True)
    mask = top_k_loop(probs, 2)
    max_len = int(mask.sum(1).max())
    ref = torch.zeros_like(mask)
    for bi in range(2):
        for h in range(4):
            markers = [si for si in range(9) if mask[bi, si, h]]
            others = [si for si in range(9) if not mask[bi, si, h]]
            for si in (markers + others)[:max_len]:
                ref[bi, si, h] = True
    assert torch.equal(sel, ref)
    assert (sel.sum(1) == max_len).all()


@pytest.mark.parametrize("capacity", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("pad", [False, True])
def test_capped_selection_is_the_mlp_parts_rule(capacity, pad):
    torch.manual_seed(8)
    b, s, h, k = 3, 10, 4, 2
    probs = torch.randn(b, s, h).softmax(-1)
    sel = uoe_select_head_tokens(probs, k, capacity=capacity, pad_to_capacity=pad)
    score, mask = uoe_scores(probs, k)
    row, pos, head = patchwise_select(score, mask, uoe_capacity(s, k, h, capacity), pad_to_capacity=pad)
    ref = torch.zeros(b, s, h, dtype=torch.bool)
    ref[row, pos, head] = True
    assert torch.equal(sel, ref)
    if not pad:
        assert not (sel & ~mask).any()  # only choosers


# --------------------------------------------------------------------------------- the layer
CASES = [
    # (B, S, d, H, k, options)
    (2, 9, 12, 4, None, {}),
    (3, 7, 16, 4, 1, {"causal": False}),
    (2, 10, 12, 6, 3, {"scale_by_gate": True, "bias": True}),
    (2, 8, 16, 4, 2, {"rope": "token"}),
    (2, 8, 16, 4, 2, {"rope": "rank"}),
    (2, 8, 16, 4, 2, {"pad_to_capacity": True, "rope": "rank"}),
    (2, 9, 12, 3, 2, {"capacity": 0.7}),
    (1, 6, 8, 2, 1, {"positions": True, "rope": "token"}),
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_layer_matches_per_head_loop(case):
    b, s, d, h, k, opts = case
    opts = dict(opts)
    torch.manual_seed(9)
    rope_mode = opts.pop("rope", None)
    use_positions = opts.pop("positions", False)
    layer = SelectiveHeadAttention(d, h, k, rope_positions=rope_mode or "token", **opts).to(F64)
    if layer.q_proj.bias is not None:
        with torch.no_grad():
            for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
                p.bias.normal_()
    rope = None
    if rope_mode is not None:
        rope = tuple(t.to(F64) for t in rope_tables(layer.head_dim, 64, 100.0))
    positions = (
        torch.stack([torch.randperm(40)[:s].sort().values for _ in range(b)]) if use_positions else None
    )
    x = torch.randn(b, s, d, dtype=F64, requires_grad=True)
    y, routing = layer.forward_routed(x, rope=rope, positions=positions)
    select = select_of(routing, b, s, h)
    if layer.capacity is None and not layer.pad_to_capacity:
        probs = torch.softmax(layer.gate(x.detach().view(-1, d)), -1).view(b, s, h)
        assert torch.equal(select, top_k_loop(probs, layer.heads_per_token))
    weight = routing.probs.view(b, s, h) if layer.scale_by_gate else None

    params = [x, *layer.parameters()]
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got = grads(params)
    zero_grads(params)
    if weight is not None:
        weight = torch.softmax(layer.gate(x.view(-1, d)), -1).view(b, s, h)  # fresh graph
    y_ref = loop_reference(layer, x, select, weight=weight, positions=positions, rope=rope)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
    (y_ref * g).sum().backward()
    for name, a, r in zip(["x", *(n for n, _ in layer.named_parameters())], got, grads(params), strict=True):
        if r is None:
            assert a is None or not a.any(), name
        else:
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


def test_fp32_matches_loop():
    torch.manual_seed(10)
    layer = SelectiveHeadAttention(16, 4)
    x = torch.randn(2, 12, 16)
    y, routing = layer.forward_routed(x)
    y_ref = loop_reference(layer, x, select_of(routing, 2, 12, 4))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_flat_input_is_one_sequence_unless_ctx_says_otherwise():
    torch.manual_seed(11)
    layer = SelectiveHeadAttention(8, 4).to(F64)
    x = torch.randn(2, 5, 8, dtype=F64)
    torch.testing.assert_close(layer(x[0]), layer(x[:1])[0])
    flat = layer(x.reshape(10, 8), RoutingContext(batch_shape=(2, 5)))
    torch.testing.assert_close(flat, layer(x).reshape(10, 8))


@pytest.mark.parametrize("shape", [(1, 1, 8), (1, 8), (3, 1, 8)])
def test_one_token_per_sequence(shape):
    """A lone token attends only itself in each head it chose: y = sum_h W_o[:, h] W_v[h] x."""
    torch.manual_seed(12)
    layer = SelectiveHeadAttention(8, 4, bias=True).to(F64)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    y, routing = layer.forward_routed(x)
    assert y.shape == x.shape and routing.top_k == 2 and routing.num_assignments == 2 * x[..., 0].numel()
    x2 = x.reshape(-1, 8)
    sel = select_of(routing, x2.shape[0], 1, 4)[:, 0]
    v = layer.v_proj(x2).view(-1, 4, 2) * sel[..., None]
    y_ref = layer.o_proj(v.reshape(-1, 8)).reshape(shape)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_empty_sequence():
    layer = SelectiveHeadAttention(8, 2)
    y, routing = layer.forward_routed(torch.randn(2, 0, 8))
    assert y.shape == (2, 0, 8) and routing.num_tokens == 0 and routing.num_assignments == 0


# --------------------------------------------------------------------------------- routing
def test_routing_trace_history_and_flops():
    torch.manual_seed(13)
    layer = SelectiveHeadAttention(12, 4)
    x = torch.randn(2, 6, 12)
    ctx = RoutingContext()
    with moelab.trace(layer) as tr:
        y, routing = layer.forward_routed(x, ctx)
    assert isinstance(routing, Routing) and routing.num_tokens == 12 and routing.num_experts == 4
    assert routing.top_k == 2 and routing.probs.shape == (12, 4) and routing.logits.shape == (12, 4)
    torch.testing.assert_close(routing.weight, torch.ones(24))
    torch.testing.assert_close(routing.requested, routing.tokens_per_expert())
    routing.check()
    assert ctx.history == [routing] and tr.layers == ["SelectiveHeadAttention"]
    assert torch.equal(tr.routing("SelectiveHeadAttention").expert_index, routing.expert_index)
    # FLOPs: gate, 4 projections per (token, head), causal pairs per head
    counts = select_of(routing, 2, 6, 4).sum(1).double()
    expected = 2.0 * (12 * 12 * 4 + 24 * 4 * 12 * 3 + float((counts * (counts + 1) / 2).sum()) * 2 * 3)
    assert layer.flops == pytest.approx(expected)
    capped = SelectiveHeadAttention(12, 4, capacity=0.5)
    assert capped.forward_routed(x)[1].top_k is None and not capped.causal_at_eval


def test_routing_transform_changes_what_runs():
    torch.manual_seed(14)
    layer = SelectiveHeadAttention(12, 4).to(F64)
    x = torch.randn(2, 7, 12, dtype=F64)

    def drop_head_0(r, site):
        keep = r.expert_index != 0
        return Routing(r.token_index[keep], r.expert_index[keep], r.weight[keep], r.num_tokens, r.num_experts)

    with moelab.override_routing(layer, drop_head_0):
        y, ran = layer.forward_routed(x)
    assert not (ran.expert_index == 0).any()
    torch.testing.assert_close(y, loop_reference(layer, x, select_of(ran, 2, 7, 4)))


def test_gate_gradient_and_aux_loss():
    torch.manual_seed(15)
    x = torch.randn(2, 6, 8)
    plain = SelectiveHeadAttention(8, 4)
    plain(x).sum().backward()
    assert plain.gate.weight.grad is None and float(plain.aux_loss) == 0.0 and plain.aux_terms == {}

    weighted = SelectiveHeadAttention(8, 4, scale_by_gate=True)
    weighted(x).sum().backward()
    assert weighted.gate.weight.grad is not None and weighted.gate.weight.grad.abs().sum() > 0

    balanced = SelectiveHeadAttention(8, 4, aux_losses={"load_balance": 0.01, "z": 0.001})
    y = balanced(x)
    assert set(balanced.aux_terms) == {"load_balance", "z"} and float(balanced.aux_loss.detach()) > 0
    (y.sum() + moelab.aux_loss(balanced)).backward()
    assert balanced.gate.weight.grad.abs().sum() > 0


def test_default_is_causal_padding_is_not():
    torch.manual_seed(16)
    layer = SelectiveHeadAttention(8, 4).to(F64)
    assert layer.causal_at_eval
    x = torch.randn(1, 10, 8, dtype=F64)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 8, dtype=F64)
    torch.testing.assert_close(layer(x)[:, :6], layer(x2)[:, :6])
    padded = SelectiveHeadAttention(8, 4, pad_to_capacity=True)
    assert not padded.causal_at_eval and not SelectiveHeadAttention(8, 4, causal=False).causal_at_eval


def test_registered():
    info = registry.get("attention", "uoe_attention")
    assert info.obj is SelectiveHeadAttention and "2503.02495" in info.paper


# --------------------------------------------------------------------------------- bad inputs
def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=8"):
        SelectiveHeadAttention(8, 3)
    with pytest.raises(ValueError, match="heads_per_token"):
        SelectiveHeadAttention(8, 4, 5)
    with pytest.raises(ValueError, match="heads_per_token"):
        SelectiveHeadAttention(8, 4, 0)
    with pytest.raises(TypeError, match="heads_per_token"):
        SelectiveHeadAttention(8, 4, True)
    with pytest.raises(ValueError, match="capacity"):
        SelectiveHeadAttention(8, 4, capacity=0.0)
    with pytest.raises(TypeError, match="causal"):
        SelectiveHeadAttention(8, 4, causal=1)
    with pytest.raises(ValueError, match="rope_positions"):
        SelectiveHeadAttention(8, 4, rope_positions="absolute")
    with pytest.raises(ValueError, match="aux_losses"):
        SelectiveHeadAttention(8, 4, aux_losses={"nope": 1.0})
    with pytest.raises(ValueError, match="w_o"):
        SelectiveHeadAttention.from_weights(
            torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8), torch.randn(4, 8), 2
        )

    layer = SelectiveHeadAttention(8, 4)
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"\[T, d\] or \[B, S, d\]"):
        layer(torch.randn(8))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        layer(torch.full((1, 2, 8), float("nan")))
    with pytest.raises(TypeError, match="ctx"):
        layer(torch.randn(1, 2, 8), ctx="ctx")
    with pytest.raises(ValueError, match="positions must be"):
        layer(torch.randn(1, 3, 8), positions=torch.arange(4)[None])
    with pytest.raises(TypeError, match="positions must be a torch.long"):
        layer(torch.randn(1, 3, 8), positions=torch.zeros(1, 3))
    cos, sin = rope_tables(2, 4, 10000.0)
    with pytest.raises(ValueError, match="cover 4 positions"):
        layer(torch.randn(1, 6, 8), rope=(cos, sin))
    with pytest.raises(ValueError, match="head_dim / 2"):
        layer(torch.randn(1, 3, 8), rope=rope_tables(4, 8, 10000.0))
    with pytest.raises(TypeError, match="rope"):
        layer(torch.randn(1, 3, 8), rope=cos)

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="select_BSH"):
        selective_head_attention(q, q, q, torch.ones(1, 3, 2))
    with pytest.raises(ValueError, match=r"select_BSH must be \[B, S, H\]"):
        selective_head_attention(q, q, q, torch.ones(1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="k_BHSD"):
        selective_head_attention(q, q[..., :2], q, torch.ones(1, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid_BHL"):
        gathered_head_attention(q, q, q, torch.zeros(1, 2, 3, dtype=torch.long), torch.ones(1, 2, 3))
    with pytest.raises(ValueError, match="probs_BSH"):
        uoe_select_head_tokens(torch.rand(3, 4), 2)
    with pytest.raises(ValueError, match="heads_per_token"):
        uoe_head_gate(torch.randn(3, 4), 5)
