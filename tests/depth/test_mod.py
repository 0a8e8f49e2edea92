"""Mixture-of-depths against references: the dense block, a per-sequence loop, the BCE formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moelab
from moelab.depth.gather import capacity_count, ragged_index, topk_per_sequence
from moelab.depth.mod import MixtureOfDepths, mod_topk_targets
from moelab.models import MoELM, MoELMConfig

BASE = dict(d_model=32, n_layers=4, n_heads=2, max_seq_len=64, moe_every=99)


def _pair(**kw):
    torch.manual_seed(0)
    dense = MoELM(MoELMConfig(**BASE))
    mod = MoELM(MoELMConfig(**BASE, depth="mod", depth_kwargs=kw))
    mod.load_state_dict(dense.state_dict(), strict=False)
    return dense, mod


def _reference(dense: MoELM, mod: MoELM, ids: torch.Tensor, k: int | None) -> torch.Tensor:
    """MoD written plainly: per sequence, per routed block, pick the top-k scores, run the block
    on that subsequence (RoPE at the kept positions), add r * (block(x) - x) token by token."""
    rope = (dense.rope_cos, dense.rope_sin)
    ctx = moelab.RoutingContext()
    x = dense.embed(ids)
    b, s, _ = x.shape
    for i, blk in enumerate(dense.blocks):
        if i not in mod.depth.layers:
            x = blk(x, rope, ctx)
            continue
        w = mod.depth.routers[str(i)].weight[0]
        rows = []
        for bi in range(b):
            xb = x[bi]
            r = xb @ w
            keep = sorted(torch.argsort(r, descending=True)[:k].tolist()) if k is not None else list(range(s))
            pos = torch.tensor([keep])
            sub = xb[keep][None]
            delta = blk(sub, rope, ctx, positions=pos)[0] - sub[0]
            new = xb.clone()
            for j, t in enumerate(keep):
                new[t] = xb[t] + r[t] * delta[j]
            rows.append(new)
        x = torch.stack(rows)
    return F.linear(dense.norm(x), dense.embed.weight)


def test_capacity_one_with_unit_weights_is_the_dense_model():
    dense, mod = _pair(capacity=1.0, every=1)
    # every token chosen, and r = 1 for each: x + 1 * (block(x) - x) is the dense block
    mod.depth._weights = lambda logits: torch.ones_like(logits)
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(mod.train()(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity", [1.0, 0.25, 0.5])
def test_topk_forward_matches_per_sequence_loop(capacity):
    dense, mod = _pair(capacity=capacity)
    mod.train()
    ids = torch.randint(0, 256, (3, 11))
    k = capacity_count(capacity, 11)
    want = _reference(dense, mod, ids, k)
    torch.testing.assert_close(mod(ids).logits, want, atol=1e-4, rtol=1e-4)


def test_gradients_reach_router_and_only_chosen_tokens_change():
    _, mod = _pair(capacity=0.25)
    mod.train()
    ids = torch.randint(0, 256, (2, 16))
    out = mod(ids, labels=ids)
    out.loss.backward()
    for r in mod.depth.routers.values():
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    assert out.aux_loss > 0


@torch.no_grad()
def test_aux_bce_matches_formula():
    _, mod = _pair(capacity=0.25, aux_coef=0.5)
    mod.train()
    ids = torch.randint(0, 256, (2, 8))
    mod(ids)
    # recompute the BCE from the routers' logits on the same inputs
    x = mod.embed(ids)
    rope = (mod.rope_cos, mod.rope_sin)
    ctx = moelab.RoutingContext()
    want = 0.0
    for i, blk in enumerate(mod.blocks):
        if i in mod.depth.layers:
            logits = x @ mod.depth.routers[str(i)].weight[0]
            k = capacity_count(0.25, 8)
            target = torch.zeros(2, 8)
            for bi in range(2):
                target[bi, torch.argsort(logits[bi], descending=True)[:k]] = 1.0
            p = torch.sigmoid(logits)
            want += 0.5 * float(-(target * p.log() + (1 - target) * (1 - p).log()).mean())
            idx = topk_per_sequence(logits, k)
            sub = x.gather(1, idx[..., None].expand(-1, -1, 32))
            upd = (blk(sub, rope, ctx, positions=idx) - sub) * logits.gather(1, idx)[..., None]
            x = x.scatter_add(1, idx[..., None].expand(-1, -1, 32), upd)
        else:
            x = blk(x, rope, ctx)
    assert math.isclose(float(mod.depth.aux_loss), want, rel_tol=1e-4)


def test_predictor_sees_stopped_gradients():
    _, mod = _pair(capacity=0.25, causal="predictor")
    mod.train()
    ids = torch.randint(0, 256, (2, 8))
    mod(ids)
    mod.depth.aux_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in mod.blocks.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.depth.predictors.parameters())
    assert all(r.weight.grad is None for r in mod.depth.routers.values())


@pytest.mark.parametrize("causal", ["aux_bce", "predictor"])
def test_eval_is_causal_and_cached_generation_matches(causal):
    _, mod = _pair(capacity=0.25, causal=causal)
    mod.eval()
    assert mod.depth.causal_at_eval
    ids = torch.randint(0, 256, (2, 10))
    other = ids.clone()
    other[:, 6:] = torch.randint(0, 256, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(mod(ids).logits[:, :6], mod(other).logits[:, :6])
    a = moelab.generate(mod, ids, 12)
    b = moelab.generate(mod, ids, 12, use_cache=False)
    assert torch.equal(a, b)
    assert 0.0 <= mod.depth.last_stats["predictor_accuracy"] <= 1.0


def test_routing_is_traced_and_flops_shrink():
    dense, mod = _pair(capacity=0.125)
    mod.train()
    ids = torch.randint(0, 256, (2, 16))
    with moelab.trace(mod) as tr:
        mod(ids)
    r = tr.routing(next(iter(tr.records)))
    assert r.num_experts == 1 and r.num_assignments == 2 * len(mod.depth.layers) * capacity_count(0.125, 16)
    dense(ids)
    assert mod.flops_per_token() < dense.flops_per_token()
    by_layer = mod.flops_by_layer()
    assert by_layer["blocks.1.attn"] < by_layer["blocks.0.attn"]


def test_gather_helpers():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [1.0, 0.0, 0.2, 0.3]])
    assert topk_per_sequence(scores, 2).tolist() == [[1, 3], [0, 3]]
    idx, valid = ragged_index(torch.tensor([[True, False, True], [False, False, False]]))
    assert idx.tolist() == [[0, 2], [0, 0]] and valid.tolist() == [[True, True], [False, False]]
    assert mod_topk_targets(scores, 1).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert capacity_count(0.125, 16) == 2 and capacity_count(0.125, 1) == 1 and capacity_count(0.5, 0) == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"capacity": 0.0}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"causal": "oracle"}, "causal"),
        ({"gate": "tanh"}, "gate"),
        ({"layers": [7]}, "layers"),
        ({"eval_selection": "all"}, "eval_selection"),
        ({"aux_coef": -1.0}, "aux_coef"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MixtureOfDepths(32, 4, **kw)


def test_unknown_depth_router_is_named():
    with pytest.raises((KeyError, ValueError), match="nope"):
        MoELM(MoELMConfig(**BASE, depth="nope"))


def test_routers_inside_a_routed_block_read_the_gathered_tokens_ids():
    # Read-ME's pre-gate routes from token ids: inside a MoD block it must see the chosen tokens' ids
    torch.manual_seed(0)
    cfg = MoELMConfig(
        **{**BASE, "moe_every": 1},
        num_experts=4,
        router="pregate",
        depth="mod",
        depth_kwargs={"capacity": 0.5},
    )
    model = MoELM(cfg).train()
    ids = torch.randint(0, 256, (2, 12))
    with moelab.trace(model) as tr:
        model(ids, labels=ids).loss.backward()
    routed = [n for n in tr.layers if n != "depth"]
    # block 1 is routed by MoD: its MoE layer saw 6 of 12 tokens per row, and their own ids
    r = tr.routing(routed[1])
    assert r.num_tokens == 2 * 6
    kept = tr.routing("depth").token_index
    assert torch.equal(tr.tokens(routed[1]), ids.reshape(-1)[kept[:12]])


def test_a_routing_transform_decides_which_tokens_run():
    # a transform that empties the depth router's routing: the routed blocks run no token at all
    dense, mod = _pair(capacity=0.5)
    mod.train()
    ids = torch.randint(0, 256, (2, 10))

    def none_run(routing, site):
        keep = routing.token_index[:0]
        return moelab.Routing(keep, keep, routing.weight[:0], routing.num_tokens, 1, validate=False)

    with moelab.override_routing(mod, none_run, layers=["depth"]):
        out = mod(ids).logits
    rope = (dense.rope_cos, dense.rope_sin)
    x = dense.embed(ids)
    for i, blk in enumerate(dense.blocks):
        if i not in mod.depth.layers:
            x = blk(x, rope, moelab.RoutingContext())
    torch.testing.assert_close(out, F.linear(dense.norm(x), dense.embed.weight), atol=1e-5, rtol=1e-5)
