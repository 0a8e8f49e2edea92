"""Read-ME pre-gating (``pregate``) against independent references: the pre-gate transformer
written as plain per-token equations (RMSNorm, RoPE pair rotations, causal softmax attention),
the gate rules written plainly, and the routing a model actually runs (traced) against the
decisions computed from the ids alone; the lookahead cache on the pre-gated sequence against LRU."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.analysis.cache import simulate_cache
from moelab.analysis.pregate import (
    find_pregate_router,
    pregate_decisions,
    pregate_lookahead_hit_rate,
    pregate_topk_index,
)
from moelab.core.context import RoutingContext
from moelab.core.router import link_routers
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM
from moelab.routers.pregate import PreGate, PreGateRouter, pregate_gate, rope_rotate


def tiny_lm(**over) -> MoELM:
    kw = dict(
        d_model=32,
        n_layers=3,
        n_heads=2,
        num_experts=4,
        top_k=1,
        max_seq_len=32,
        vocab_size=256,
        router="pregate",
        router_kwargs={"d_router": 16},
        aux_losses={"load_balance": 1e-2},
    )
    kw.update(over)
    return MoELM(MoELMConfig(**kw))


# ------------------------------------------------------------------------------ plain reference
def naive_pregate_logits(pg: PreGate, ids: list[int], positions: list[int] | None = None) -> torch.Tensor:
    """Read-ME's pre-gate for one sequence, token by token, in float64, from its state_dict."""
    w = {k: v.detach().double() for k, v in pg.state_dict().items()}
    d, n_heads = pg.d_router, pg.n_heads
    hd = d // n_heads
    scale = 1 / math.sqrt(hd) if pg.attn_normalizer is None else 1 / pg.attn_normalizer
    pos = list(range(len(ids))) if positions is None else positions

    def rms(x, g):
        return x / torch.sqrt((x * x).mean() + 1e-6) * g

    def rotate(v, p):  # pair (i, i + hd/2) turned by p * theta^(-2i/hd)
        out = v.clone()
        for i in range(hd // 2):
            a = p * pg.rope_theta ** (-2 * i / hd)
            out[i] = v[i] * math.cos(a) - v[i + hd // 2] * math.sin(a)
            out[i + hd // 2] = v[i] * math.sin(a) + v[i + hd // 2] * math.cos(a)
        return out

    h = [w["embed.weight"][t].clone() for t in ids]
    for layer in range(pg.n_layers):
        p = f"blocks.{layer}."
        qkv = [w[p + "qkv.weight"] @ rms(x, w[p + "attn_norm.weight"]) + w[p + "qkv.bias"] for x in h]
        heads = []
        for j, v in enumerate(qkv):
            q, k, val = v[:d], v[d : 2 * d], v[2 * d :]
            heads.append(
                [
                    (
                        rotate(q[i * hd : (i + 1) * hd], pos[j]),
                        rotate(k[i * hd : (i + 1) * hd], pos[j]),
                        val[i * hd : (i + 1) * hd],
                    )
                    for i in range(n_heads)
                ]
            )
        new = []
        for t in range(len(ids)):
            outs = []
            for i in range(n_heads):
                s = torch.stack([heads[t][i][0] @ heads[j][i][1] * scale for j in range(t + 1)])  # keys <= t
                a = torch.softmax(s, 0)
                outs.append(sum(a[j] * heads[j][i][2] for j in range(t + 1)))
            x = h[t] + w[p + "out.weight"] @ torch.cat(outs) + w[p + "out.bias"]
            u = w[p + "up.weight"] @ rms(x, w[p + "mlp_norm.weight"]) + w[p + "up.bias"]
            new.append(x + w[p + "down.weight"] @ (u * torch.sigmoid(u)) + w[p + "down.bias"])
        h = new
    return torch.stack([w["head.weight"] @ rms(x, w["norm.weight"]) + w["head.bias"] for x in h])


@pytest.mark.parametrize("attn_normalizer", [None, 1.0])
def test_pregate_matches_the_plain_per_token_equations(attn_normalizer):
    torch.manual_seed(0)
    pg = PreGate(50, 5, d_router=16, attn_normalizer=attn_normalizer)
    with torch.no_grad():  # non-trivial norms and biases, so that every term is checked
        for name, p in pg.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
        pg.embed.weight.mul_(20)
    ids = torch.randint(0, 50, (2, 9))
    logits = pg(ids)
    assert logits.shape == (2, 9, 5) and logits.dtype == torch.float32
    for b in range(2):
        ref = naive_pregate_logits(pg, ids[b].tolist())
        torch.testing.assert_close(logits[b].double(), ref, atol=2e-5, rtol=1e-4)
    # positions given explicitly (pruned tokens keep their original positions)
    positions = torch.tensor([[0, 2, 3, 7, 8, 9, 11, 12, 20]])
    ref = naive_pregate_logits(pg, ids[0].tolist(), positions[0].tolist())
    torch.testing.assert_close(pg(ids[:1], positions)[0].double(), ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(pg(ids[:1], positions), pg(ids[:1]), atol=1e-3)  # RoPE is not idle


def test_rope_rotate_is_a_rotation_and_identity_at_position_zero():
    x = torch.randn(2, 3, 5, 8)
    pos = torch.arange(5).expand(2, 5)
    y = rope_rotate(x, pos)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    # relative: <R(m) q, R(n) k> depends on m - n only
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dot = [
        float((rope_rotate(q, torch.tensor([[m]])) * rope_rotate(k, torch.tensor([[m - 3]]))).sum())
        for m in (3, 7, 40)
    ]
    assert dot == pytest.approx([dot[0]] * 3, abs=1e-5)


def test_gate_rules():
    torch.manual_seed(1)
    logits = torch.randn(6, 4, requires_grad=True)
    probs = torch.softmax(logits.detach(), -1)
    for gate in ("one", "straight_through", "prob"):
        p, w, i = pregate_gate(logits, 1, gate)
        assert torch.equal(i[:, 0], probs.argmax(-1))  # Read-ME: argmax
        torch.testing.assert_close(p, probs)
    _, w_one, _ = pregate_gate(logits, 1, "one")
    assert torch.equal(w_one, torch.ones(6, 1)) and not w_one.requires_grad
    _, w_st, _ = pregate_gate(logits, 1, "straight_through")
    torch.testing.assert_close(w_st, torch.ones(6, 1))  # the paper's weight in the forward pass
    g_st = torch.autograd.grad((w_st * torch.arange(6.0)[:, None]).sum(), logits)[0]
    _, w_p, _ = pregate_gate(logits, 1, "prob")
    torch.testing.assert_close(w_p[:, 0], probs.max(-1).values)
    g_p = torch.autograd.grad((w_p * torch.arange(6.0)[:, None]).sum(), logits)[0]
    torch.testing.assert_close(g_st, g_p)  # ... and Switch's gradient in the backward pass
    _, w2, i2 = pregate_gate(logits, 2, "straight_through")
    torch.testing.assert_close(w2, torch.full((6, 2), 0.5))
    assert torch.equal(i2, probs.topk(2, -1).indices)
    with pytest.raises(ValueError, match="gate"):
        pregate_gate(logits, 1, "hard")


def test_decisions_are_causal_and_per_sequence():
    torch.manual_seed(2)
    pg = PreGate(256, 8, d_router=16)
    ids = torch.randint(0, 256, (3, 20))
    logits = pg(ids)
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 256, (3, 8))
    after = pg(changed)
    torch.testing.assert_close(after[:, :12], logits[:, :12], atol=1e-6, rtol=0)  # earlier tokens unchanged
    assert not torch.allclose(after[:, 12:], logits[:, 12:])
    # each row is its own sequence: the same as running it alone
    torch.testing.assert_close(pg(ids[1:2])[0], logits[1], atol=1e-6, rtol=0)

    # through the router: batch_shape splits the flat ids; without it T tokens are one sequence
    r = PreGateRouter(8, 8, d_router=16)
    r.pregate.load_state_dict(pg.state_dict())
    x = torch.zeros(60, 8)
    flat = ids.reshape(-1)
    split = r(x, RoutingContext(token_ids=flat, batch_shape=(3, 20)))
    torch.testing.assert_close(split.logits, logits.reshape(60, 8))
    one = r(x, RoutingContext(token_ids=flat))
    torch.testing.assert_close(one.logits, pg(flat[None])[0])


def test_routing_is_identical_across_layers_and_computed_once_per_forward():
    torch.manual_seed(3)
    model = tiny_lm(n_layers=4)
    owner = find_pregate_router(model)
    calls = []
    owner.pregate.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, 256, (2, 16))
    with moelab.trace(model) as tr:
        model(ids)
    assert len(calls) == 1  # one pre-gate pass for all four routed layers
    assert len(tr.layers) == 4
    first = tr.routing(tr.layers[0])
    for name in tr.layers[1:]:
        r = tr.routing(name)
        assert torch.equal(r.expert_index, first.expert_index) and torch.equal(r.weight, first.weight)
    # ... and equal to the decision computed from the ids alone, before any backbone runs
    assert torch.equal(pregate_decisions(model, ids), first.topk_index().view(2, 16))
    # the routing does not depend on the mode (no noise) nor on the hidden states
    model.eval()
    with moelab.trace(model) as tr2:
        model(ids)
    assert torch.equal(tr2.routing(tr2.layers[2]).expert_index, first.expert_index)
    # a layer's history also sees the same choice
    ctx = RoutingContext()
    model(ids, ctx=ctx)
    assert len(ctx.history) == 4 and all(torch.equal(h.expert_index, first.expert_index) for h in ctx.history)


def test_pregate_is_owned_once(tmp_path):
    torch.manual_seed(4)
    model = tiny_lm()
    routers = [m.router for _, m in model.moe_layers()]
    assert [r.owns_pregate for r in routers] == [True, False, False]
    assert all(r.pregate is routers[0].pregate for r in routers)
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    pregate_ids = {id(p) for p in routers[0].pregate.parameters()}
    assert sum(id(p) in pregate_ids for p in params) == len(pregate_ids)  # each exactly once
    keys = [k for k in model.state_dict() if ".pregate." in k]
    assert len(keys) == len(routers[0].pregate.state_dict()) and all(k.startswith("blocks.0.") for k in keys)
    # checkpoints hold it once and load back into the shared layout
    model.save_pretrained(tmp_path)
    back = MoELM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(back(ids).logits, model(ids).logits)
    assert back.blocks[2].ffn.router.pregate is back.blocks[0].ffn.router.pregate


def test_link_rejects_layers_that_disagree_and_first_router_owns():
    a = moelab.MoE(16, 4, 1, router="pregate", router_kwargs={"d_router": 16})
    b = moelab.MoE(16, 4, 1, router="pregate", router_kwargs={"d_router": 32})
    with pytest.raises(ValueError, match="d_router"):
        link_routers([a, b])
    c = moelab.MoE(16, 4, 1, router="pregate", router_kwargs={"d_router": 16})
    plain = moelab.MoE(16, 4, 1)
    link_routers([plain, a, c])
    assert a.router.owns_pregate and not c.router.owns_pregate and c.router.pregate is a.router.pregate


def test_lookahead_on_pregated_experts_is_at_least_lru():
    torch.manual_seed(5)
    model = tiny_lm(num_experts=8, router_kwargs={"d_router": 16})
    ids = torch.randint(0, 256, (4, 32))
    index = pregate_topk_index(model, ids)
    assert index.shape == (4, 32, 1) and len(index.unique()) > 2  # a sequence worth caching
    for size in (1, 2, 4):
        rates = pregate_lookahead_hit_rate(model, ids, cache_size=size)
        assert rates["lookahead"] >= rates["lru"]
        assert rates["belady"] >= rates["lookahead"]
        assert rates["lru"] == simulate_cache(index, 8, size, "lru").hit_rate
    # a window of 0 tokens is LRU
    assert (
        pregate_lookahead_hit_rate(model, ids, 2, window=0)["lookahead"]
        == simulate_cache(index, 8, 2, "lru").hit_rate
    )
    with pytest.raises(ValueError, match="cache_size"):
        pregate_lookahead_hit_rate(model, ids, cache_size=9)


def test_analysis_input_checks():
    model = tiny_lm(top_k=2, n_layers=2)
    ids = torch.randint(0, 256, (2, 8))
    assert pregate_topk_index(model, ids).shape == (2, 8, 2)
    with pytest.raises(ValueError, match="top_k=2"):
        pregate_decisions(model, ids)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        pregate_decisions(model, ids[0])
    with pytest.raises(ValueError, match="no pregate router"):
        pregate_decisions(tiny_lm(router="topk", router_kwargs={}), ids)


@pytest.mark.parametrize("gate", ["straight_through", "prob"])
def test_trains_in_moelm(gate):
    torch.manual_seed(6)
    model = tiny_lm(router_kwargs={"d_router": 16, "gate": gate})
    pg = find_pregate_router(model).pregate
    before = pg.head.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 32))
    losses = []
    for _ in range(6):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        assert torch.isfinite(out.loss) and pg.head.weight.grad.abs().sum() > 0
        opt.step()
        moelab.step_end(model)
        losses.append(out.ce_loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(pg.head.weight, before)


def test_weight_one_gives_the_pregate_no_task_gradient():
    """The paper's hard weight 1: the LM loss cannot train the pre-gate (hence our default)."""
    torch.manual_seed(7)
    model = tiny_lm(router_kwargs={"d_router": 16, "gate": "one"}, aux_losses={})
    ids = torch.randint(0, 256, (2, 16))
    model(ids, labels=ids).loss.backward()
    pg = find_pregate_router(model).pregate
    assert all(p.grad is None or not p.grad.any() for p in pg.parameters())


def test_lone_moe_forward_backward_and_context_checks():
    torch.manual_seed(8)
    moe = moelab.MoE(16, 4, 1, router="pregate", router_kwargs={"d_router": 16})
    assert moe.router.causal_at_eval and moe.router.owns_pregate
    for shape in [(2, 7, 16), (1, 1, 16), (1, 16), (0, 16), (2, 0, 16)]:
        x = torch.randn(*shape, requires_grad=True)
        t = x.numel() // 16
        y = moe(x, RoutingContext(token_ids=torch.randint(0, 256, (t,))))
        assert y.shape == x.shape and torch.isfinite(y).all()
        (y.square().sum() + moe.aux_loss).backward()
        assert x.grad is not None
    x = torch.randn(5, 16)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x)
    with pytest.raises(ValueError, match="token_ids"):
        moe(x, RoutingContext(token_ids=torch.zeros(4, dtype=torch.long)))
    with pytest.raises(TypeError, match="token_ids"):
        moe(x, RoutingContext(token_ids=torch.zeros(5)))
    with pytest.raises(ValueError, match="vocab_size=256"):
        moe(x, RoutingContext(token_ids=torch.full((5,), 300)))
    with pytest.raises(ValueError, match="batch_shape"):
        moe.router(x, RoutingContext(token_ids=torch.zeros(5, dtype=torch.long), batch_shape=(2, 3)))


def test_a_reused_context_recomputes_after_an_optimizer_step():
    torch.manual_seed(9)
    r = PreGateRouter(8, 4, d_router=16)
    ctx = RoutingContext(token_ids=torch.randint(0, 256, (6,)))
    x = torch.zeros(6, 8)
    first = r.decision(ctx, 6)
    assert r.decision(ctx, 6) is first  # one forward: cached
    with torch.no_grad():
        r.pregate.head.bias.add_(1.0)  # an optimizer step updates parameters in place
    assert r.decision(ctx, 6) is not first
    r(x, ctx).weight.sum().backward()  # a fresh graph, not the freed one


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"gate": "hard"}, "gate"),
        ({"d_router": 30, "n_heads": 4}, "d_router"),
        ({"d_router": 0}, "d_router"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"attn_normalizer": -1.0}, "attn_normalizer"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"embed_std": 0.0}, "embed_std"),
        ({"top_k": 5}, "top_k"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        moelab.build_router("pregate", d_model=8, num_experts=4, **kwargs)
