"""FTP token pruning against references: the base model, a per-sequence loop with the attention
feature written plainly, a block run by hand on the kept subsequence, the loss formulas, a toy
objective with a known optimum for the schedule search."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import moelab
import moelab.depth.prune  # noqa: F401  (registers depth "ftp" until the package imports it)
from moelab.depth.prune import (
    FTPRouter,
    attach_ftp,
    attention_received,
    causal_attention_probs,
    ftp_distillation_loss,
    ftp_features,
    ftp_guide_loss,
    ftp_loss_fn,
    ftp_sparsity_loss,
    keep_count,
    pruned_val_loss,
    rank_in_sequence,
    static_keep_targets,
)
from moelab.depth.schedule_search import project_schedule, search_sparsity_schedule
from moelab.models import MoELM, MoELMConfig

BASE = dict(d_model=32, n_layers=4, n_heads=2, max_seq_len=64, moe_every=99)


def _pair(**kw):
    torch.manual_seed(0)
    dense = MoELM(MoELMConfig(**BASE))
    pruned = MoELM(MoELMConfig(**BASE, depth="ftp", depth_kwargs=kw))
    missing = pruned.load_state_dict(dense.state_dict(), strict=False).missing_keys
    assert all(k.startswith("depth.") for k in missing)
    return dense.eval(), pruned.eval()


# -- plain re-statements -------------------------------------------------------------------------
def _rotate(x_SHE: torch.Tensor, pos: list[int], rope) -> torch.Tensor:
    """RoPE written out: the halves (a, b) of each head rotate by the angle of the position."""
    cos, sin = rope[0][pos][:, None], rope[1][pos][:, None]  # [S, 1, E/2]
    half = x_SHE.shape[-1] // 2
    a, b = x_SHE[..., :half], x_SHE[..., half:]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def _naive_received(block, x_SD: torch.Tensor, rope) -> torch.Tensor:
    """Attention received, one sequence at positions 0..S-1, as the docstring states it:
    mean over heads and over queries i >= j of (i + 1) * P[i, j]."""
    s, d = x_SD.shape
    heads, e = block.attn.n_heads, block.attn.head_dim
    qkv = block.attn.qkv(block.attn_norm(x_SD)).view(s, 3, heads, e)
    q, k = _rotate(qkv[:, 0], list(range(s)), rope), _rotate(qkv[:, 1], list(range(s)), rope)
    out = torch.zeros(s)
    for h in range(heads):
        scores = (q[:, h] @ k[:, h].T) / math.sqrt(e)
        probs = torch.zeros(s, s)
        for i in range(s):
            probs[i, : i + 1] = torch.softmax(scores[i, : i + 1], dim=0)
        for j in range(s):
            out[j] += sum((i + 1) * probs[i, j] for i in range(j, s)) / (s - j) / heads
    return out


def _reference(dense: MoELM, router: FTPRouter, ids: torch.Tensor) -> torch.Tensor:
    """FTP written plainly: one sequence at a time; per prunable block, the features from the
    previous block's input, the router MLP, the kept positions by sorting (or the threshold), the
    block on that subsequence at its positions, the kept rows replaced."""
    rope = (dense.rope_cos, dense.rope_sin)
    ctx = moelab.RoutingContext()
    outs = []
    for row in ids:
        x = dense.embed(row[None])
        s = x.shape[1]
        prev = x
        for i, blk in enumerate(dense.blocks):
            if i not in router.layers:
                prev = x
                x = blk(x, rope, ctx)
                continue
            sp = router.schedule[router.layers.index(i)]
            received = _naive_received(dense.blocks[i - 1], prev[0], rope)
            prev = x
            if router.scorer == "attention":
                scores = received
            elif router.scorer == "features":
                pos = torch.arange(s).float() / (router.max_seq_len - 1)
                rank = torch.tensor(
                    [sorted(received.tolist()).index(v) for v in received.tolist()]
                ).float() / (s - 1)
                feats = torch.stack((pos, received.clamp(min=1e-6).log(), rank, torch.full((s,), sp)), dim=-1)
                scores = router.feature_mlp(feats).squeeze(-1)
            else:
                h = x[0] / x[0].square().mean(-1, keepdim=True).add(1e-6).sqrt()
                scores = router.hidden_mlp(torch.cat((h, torch.full((s, 1), sp)), -1)).squeeze(-1)
            if router.selection == "threshold":
                keep = [t for t in range(s) if scores[t] > 0]
            else:
                k = math.ceil((1 - sp) * s - 1e-9)
                keep = sorted(sorted(range(s), key=lambda t: -float(scores[t]))[:k])
            new = x.clone()
            if keep:
                sub = x[:, keep]
                new[:, keep] = blk(sub, rope, ctx, positions=torch.tensor([keep]))
            x = new
        outs.append(F.linear(dense.norm(x), dense.embed.weight)[0])
    return torch.stack(outs)


# -- references ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["features", "hidden_state", "attention"])
def test_sparsity_zero_is_the_base_model(scorer):
    dense, pruned = _pair(sparsity=0.0, scorer=scorer)
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(pruned(ids).logits, dense(ids).logits)
    with torch.no_grad():  # training mode (straight-through mask of ones): the same numbers
        torch.testing.assert_close(pruned.train()(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kw",
    [
        {"scorer": "features", "sparsity": [0.25, 0.5, 0.4]},
        {"scorer": "hidden_state", "sparsity": 0.3},
        {"scorer": "attention", "sparsity": [0.5, 0.1, 0.3]},
        {"scorer": "features", "sparsity": 0.25, "layers": [2, 3]},
        {"scorer": "features", "selection": "threshold"},
    ],
    ids=["features", "hidden", "static", "layers", "threshold"],
)
def test_matches_a_per_sequence_loop(kw):
    dense, pruned = _pair(**kw)
    if kw.get("selection") == "threshold":  # logit = gelu(rank) - gelu(0.5): the upper half runs
        first, last = pruned.depth.feature_mlp[0], pruned.depth.feature_mlp[2]
        with torch.no_grad():
            for p in (first.weight, first.bias, last.weight):
                p.zero_()
            first.weight[0, 2] = 1.0
            last.weight[0, 0] = 1.0
            last.bias.fill_(-float(F.gelu(torch.tensor(0.5))))
    ids = torch.randint(0, 256, (3, 11))
    with torch.no_grad():
        got = pruned(ids).logits
        ref = _reference(dense, pruned.depth, ids)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    kept = pruned.depth.last_stats["kept_fraction"]
    if kw.get("selection") == "threshold":
        assert 0 < kept < 1
    assert not torch.equal(got, dense(ids).logits)


@pytest.mark.parametrize(
    "kw",
    [{"sparsity": 0.4}, {"scorer": "hidden_state"}, {"selection": "threshold"}],
    ids=["topk", "hidden", "threshold"],
)
def test_training_forward_equals_eval_forward(kw):
    # the straight-through mask adds exact zeros: training computes the pruned model itself
    _, pruned = _pair(**kw)
    ids = torch.randint(0, 256, (2, 16))
    ev = pruned.eval()(ids).logits
    out = pruned.train()(ids, labels=ids)
    assert torch.equal(out.logits, ev)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pruned.depth.parameters())


def test_straight_through_gradient_of_the_router_logits():
    """d loss / d z_j = <d loss / d x_j, Delta_j> sigma'(z_j): Delta_j the kept subsequence's update
    for kept tokens, the dense block's update for skipped ones (docs/methods/ftp.md)."""
    cfg = dict(BASE, n_layers=2)
    torch.manual_seed(2)
    model = MoELM(
        MoELMConfig(**cfg, depth="ftp", depth_kwargs={"sparsity": 0.5, "guide_coef": 0, "sparsity_coef": 0})
    )
    model.train()
    seen = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        seen["z"] = output

    hook = model.depth.feature_mlp.register_forward_hook(keep_logits)
    ids = torch.randint(0, 256, (2, 10))
    out = model(ids)
    hook.remove()
    weights = torch.randn_like(out.logits)
    (out.logits * weights).sum().backward()
    z = seen["z"].detach().squeeze(-1)
    got = seen["z"].grad.squeeze(-1)
    rope, ctx = (model.rope_cos, model.rope_sin), moelab.RoutingContext()
    with torch.no_grad():
        x = model.blocks[0](model.embed(ids), rope, ctx)
        delta = model.blocks[1](x, rope, ctx) - x  # skipped tokens: the dense update
        new = x.clone()
        for b in range(2):
            keep = sorted(torch.argsort(z[b], descending=True)[:5].tolist())
            sub = model.blocks[1](x[b, keep][None], rope, ctx, positions=torch.tensor([keep]))[0]
            delta[b, keep] = sub - x[b, keep]
            new[b, keep] = sub
    leaf = new.clone().requires_grad_(True)
    (F.linear(model.norm(leaf), model.embed.weight) * weights).sum().backward()
    sig = torch.sigmoid(z)
    expected = (leaf.grad * delta).sum(-1) * sig * (1 - sig)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_moe_model():
    """FTP over MoE blocks: the MoE layers inside a pruned block route the kept tokens only."""
    cfg = dict(BASE, moe_every=1, num_experts=4, top_k=2)
    torch.manual_seed(0)
    base = MoELM(MoELMConfig(**cfg)).eval()
    pruned = MoELM(MoELMConfig(**cfg, depth="ftp", depth_kwargs={"sparsity": 0.0})).eval()
    pruned.load_state_dict(base.state_dict(), strict=False)
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(pruned(ids).logits, base(ids).logits)
    pruned.depth.set_sparsity(0.5)
    ctx = moelab.RoutingContext()
    pruned(ids, ctx=ctx)
    moe_tokens = [r.num_tokens for r in ctx.history if r.num_experts == 4]
    assert moe_tokens == [24, 12, 12, 12]  # block 0 on every token, the others on half of each row
    out = pruned.train()(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in pruned.depth.parameters())


def test_kept_tokens_run_at_their_true_positions():
    """Block 1 of a 2-block model on the kept subsequence, computed by hand at the kept tokens'
    true positions (explicit RoPE, causal softmax, SwiGLU), against the pruned model."""
    cfg = dict(BASE, n_layers=2)
    torch.manual_seed(1)
    model = MoELM(
        MoELMConfig(**cfg, depth="ftp", depth_kwargs={"sparsity": 0.5, "scorer": "attention"})
    ).eval()
    with torch.no_grad():  # sharp attention, so that where the tokens sit matters
        model.blocks[1].attn.qkv.weight.mul_(20.0)
    ids = torch.randint(0, 256, (1, 10))
    ctx = moelab.RoutingContext()
    with torch.no_grad():
        logits = model(ids, ctx=ctx).logits
        (routing,) = ctx.history
        keep = routing.token_index.tolist()
        assert len(keep) == keep_count(0.5, 10) == 5 and keep != list(range(5))
        rope = (model.rope_cos, model.rope_sin)
        x = model.blocks[0](model.embed(ids), rope, moelab.RoutingContext())[0]
        blk = model.blocks[1]
        sub = x[keep]
        k = len(keep)
        heads, e = blk.attn.n_heads, blk.attn.head_dim
        qkv = blk.attn.qkv(blk.attn_norm(sub)).view(k, 3, heads, e)
        q, kk, v = _rotate(qkv[:, 0], keep, rope), _rotate(qkv[:, 1], keep, rope), qkv[:, 2]
        y = torch.zeros(k, heads, e)
        for h in range(heads):
            for i in range(k):
                p = torch.softmax((kk[: i + 1, h] @ q[i, h]) / math.sqrt(e), dim=0)
                y[i, h] = p @ v[: i + 1, h]
        mid = sub + blk.attn.out(y.reshape(k, -1))
        gate, up = blk.ffn.gate_up(blk.ffn_norm(mid)).chunk(2, -1)
        new = x.clone()
        new[keep] = mid + blk.ffn.down(F.silu(gate) * up)
        ref = F.linear(model.norm(new), model.embed.weight)
        torch.testing.assert_close(logits[0], ref, atol=2e-5, rtol=2e-5)
        # the same block at positions 0..k-1 gives another answer: the positions are used
        wrong = blk(sub[None], rope, moelab.RoutingContext())[0]
        assert not torch.allclose(wrong, new[keep], atol=1e-3)


def test_routing_per_prunable_block():
    _, pruned = _pair(sparsity=[0.25, 0.5, 0.75])
    ctx = moelab.RoutingContext()
    with torch.no_grad():
        pruned(torch.randint(0, 256, (2, 8)), ctx=ctx)
    assert len(ctx.history) == 3
    for r, sp in zip(ctx.history, (0.25, 0.5, 0.75), strict=True):
        assert r.num_experts == 1 and r.num_tokens == 16
        assert r.token_index.numel() == 2 * keep_count(sp, 8)
        assert torch.equal(r.expert_index, torch.zeros_like(r.token_index))
        torch.testing.assert_close(r.weight, r.probs[r.token_index, 0])


def test_flops_count_the_kept_tokens_and_the_router():
    _, pruned = _pair(sparsity=0.5, layers=[2])
    with torch.no_grad():
        pruned(torch.randint(0, 256, (2, 16)))
    d, k, s = 32, 8, 16
    assert pruned.blocks[2].attn.flops == 2.0 * 2 * k * (4 * d * d + 2 * d * (k + 1) / 2)
    assert pruned.blocks[1].attn.flops == 2.0 * 2 * s * (4 * d * d + 2 * d * (s + 1) / 2)
    mlp = sum(p.numel() for p in pruned.depth.feature_mlp.parameters())
    recompute = 2.0 * 2 * s * 2 * d * d + 2.0 * 2 * s * d * (s + 1) / 2
    assert pruned.depth.flops == pytest.approx(2.0 * mlp * 2 * s + recompute)


# -- features ------------------------------------------------------------------------------------
def test_attention_received_formula():
    torch.manual_seed(3)
    b, h, s = 2, 3, 7
    pos = torch.arange(s).expand(b, s)
    probs, mask = causal_attention_probs(torch.randn(b, h, s, 4), torch.randn(b, h, s, 4), pos)
    got = attention_received(probs, mask)
    for bi, j in itertools.product(range(b), range(s)):
        ref = sum((i + 1) * probs[bi, hh, i, j] for hh in range(h) for i in range(j, s)) / h / (s - j)
        assert float(got[bi, j]) == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(b, h, s))
    assert float(probs.masked_select(~mask[:, None].expand_as(probs)).abs().max()) == 0.0
    # uniform attention receives 1 everywhere (the causal triangle is normalised away)
    uniform = mask[:, None].float() / mask.sum(-1, keepdim=True)[:, None]
    torch.testing.assert_close(attention_received(uniform, mask), torch.ones(b, s))


def test_rank_and_features():
    scores = torch.tensor([[0.3, 0.1, 0.9, 0.5], [2.0, 2.0, 1.0, 3.0]])
    torch.testing.assert_close(rank_in_sequence(scores), torch.tensor([[1, 0, 3, 2], [1, 2, 0, 3]]) / 3.0)
    pos = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    feats = ftp_features(scores, pos, 0.3, max_seq_len=9)
    assert feats.shape == (2, 4, 4)
    torch.testing.assert_close(feats[1, :, 0], torch.tensor([5, 6, 7, 8]) / 8.0)
    torch.testing.assert_close(feats[..., 1], scores.log())
    torch.testing.assert_close(feats[..., 3], torch.full((2, 4), 0.3))
    assert static_keep_targets(scores[:1], 2).tolist() == [[0, 0, 1, 1]]


# -- losses --------------------------------------------------------------------------------------
def test_losses_against_their_formulas():
    torch.manual_seed(4)
    z, y = torch.randn(3, 5), (torch.rand(3, 5) > 0.5).float()
    p = torch.sigmoid(z)
    bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert float(ftp_guide_loss(z, y)) == pytest.approx(float(bce), rel=1e-5)
    kept, sp = torch.tensor([0.7, 0.5, 0.9]), torch.tensor([0.25, 0.5, 0.2])
    ref = sum((a - (1 - b)) ** 2 for a, b in zip(kept.tolist(), sp.tolist(), strict=True)) / 3
    assert float(ftp_sparsity_loss(kept, sp)) == pytest.approx(ref, rel=1e-5)
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    for tau in (1.0, 2.0):
        ps, pt = torch.softmax(s / tau, -1), torch.softmax(t / tau, -1)
        kl = (pt * (pt.log() - ps.log())).sum(-1).mean() * tau**2
        assert float(ftp_distillation_loss(s, t, tau)) == pytest.approx(float(kl), rel=1e-5)
    assert float(ftp_distillation_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_aux_loss_is_the_sparsity_constraint_on_the_routed_probabilities():
    _, pruned = _pair(sparsity=[0.2, 0.5, 0.3], guide_coef=0.0, sparsity_coef=2.0)
    ctx = moelab.RoutingContext()
    out = pruned.train()(torch.randint(0, 256, (2, 10)), ctx=ctx)
    kept = torch.stack([r.probs.mean() for r in ctx.history])
    ref = 2.0 * ((kept - (1 - torch.tensor([0.2, 0.5, 0.3]))) ** 2).mean()
    torch.testing.assert_close(out.aux_loss, ref)


# -- schedule search -------------------------------------------------------------------------------
def test_projection_is_the_closest_feasible_schedule():
    for v, t in (([0.9, -0.2], 0.3), ([0.1, 0.2], 0.5), ([2.0, 2.0], 0.8)):
        got = project_schedule(v, t, max_sparsity=0.9)
        assert sum(got) / 2 == pytest.approx(t, abs=1e-9)
        # brute force over the feasible segment {(a, 2t - a)}
        grid = [a / 10000 for a in range(0, 9001) if 0 <= 2 * t - a / 10000 <= 0.9]
        best = min(grid, key=lambda a: (a - v[0]) ** 2 + (2 * t - a - v[1]) ** 2)
        assert got[0] == pytest.approx(best, abs=2e-4)


def test_genetic_search_finds_the_optimum_of_a_toy_objective():
    optimum = [0.05, 0.45, 0.2, 0.3, 0.25]  # mean 0.25
    calls = []

    def loss(schedule):
        calls.append(schedule)
        return sum((a - b) ** 2 for a, b in zip(schedule, optimum, strict=True))

    res = search_sparsity_schedule(loss, 5, 0.25, population=16, generations=30, seed=0)
    assert max(abs(a - b) for a, b in zip(res.schedule, optimum, strict=True)) < 0.03
    assert res.loss < loss([0.25] * 5) / 20
    assert all(sum(c) / 5 == pytest.approx(0.25, abs=1e-9) and min(c) >= 0 for c in calls)
    assert all(b <= a for a, b in zip(res.history, res.history[1:], strict=False))  # elitism: never worse
    assert res.evaluations == len({tuple(round(x, 9) for x in c) for c in calls})
    again = search_sparsity_schedule(loss, 5, 0.25, population=16, generations=30, seed=0)
    assert again.schedule == res.schedule


def test_static_search_on_a_model():
    dense, pruned = _pair(scorer="attention", sparsity=0.25)
    batches = [torch.randint(0, 256, (2, 16))]

    def evaluate(schedule):
        with pruned.depth.using(sparsity=schedule):
            return pruned_val_loss(pruned, batches)

    res = search_sparsity_schedule(evaluate, 3, 0.25, population=4, generations=2, seed=1)
    assert res.loss <= evaluate([0.25] * 3) + 1e-12
    assert pruned.depth.schedule == [0.25] * 3  # ``using`` restores it
    assert pruned_val_loss(dense, batches) != res.loss


# -- training, attaching, saving, generation -----------------------------------------------------
def test_router_trains_without_touching_base_weights():
    torch.manual_seed(0)
    model = MoELM(MoELMConfig(**BASE))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    router = attach_ftp(model, sparsity=0.3)
    assert model.config.depth == "ftp" and model.config.depth_kwargs == {"sparsity": 0.3}
    before = {k: v.clone() for k, v in router.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in router.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    loss_fn = ftp_loss_fn()
    model.train()
    for _ in range(3):
        loss, metrics = loss_fn(model, torch.randint(0, 256, (4, 16)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(metrics["distill_loss"]) > 0
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert any(not torch.equal(state[f"depth.{k}"], v) for k, v in before.items())
    model.eval()
    val, metrics = loss_fn(model, torch.randint(0, 256, (2, 16)))
    assert metrics["row_loss"].shape == (2,) and float(val) == pytest.approx(
        float(metrics["row_loss"].mean()), rel=1e-5
    )


def test_trainer_trains_the_router(tmp_path):
    from moelab.data import TensorData
    from moelab.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = MoELM(MoELMConfig(**BASE))
    attach_ftp(model, sparsity=0.25, scorer="hidden_state")
    ids = torch.randint(0, 256, (16, 16))
    cfg = TrainConfig(steps=2, batch_size=4, eval_every=0, eval_batches=1, warmup_steps=1)
    res = Trainer(
        model, cfg, None, loss_fn=ftp_loss_fn(), data=TensorData(train=ids, val=ids[:4]), progress=False
    ).train()
    assert math.isfinite(res.val_loss)
    model.save_pretrained(tmp_path / "m")
    loaded = MoELM.from_pretrained(tmp_path / "m").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, model(ids[:2]).logits)


def test_cached_generation():
    _, pruned = _pair(sparsity=0.0)
    prompt = torch.randint(0, 256, (2, 6))
    cached = moelab.generate(pruned, prompt, 5)
    assert torch.equal(cached, moelab.generate(pruned, prompt, 5, use_cache=False))
    # pruned prefill: the prompt's skipped tokens store no keys; each decoded token runs every block
    pruned.depth.set_sparsity(0.5)
    out = moelab.generate(pruned, prompt, 5)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], prompt)
    assert pruned.depth.last_stats["kept_fraction"] == 1.0


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, err, match",
    [
        ({"sparsity": 1.0}, ValueError, "sparsity"),
        ({"sparsity": -0.1}, ValueError, "sparsity"),
        ({"sparsity": [0.2, 0.3]}, ValueError, "one value per prunable block"),
        ({"sparsity": True}, TypeError, "sparsity"),
        ({"sparsity": "0.2"}, TypeError, "sparsity"),
        ({"layers": [0, 1]}, ValueError, "layers"),
        ({"layers": [4]}, ValueError, "layers"),
        ({"layers": "12"}, TypeError, "layers"),
        ({"scorer": "mlp"}, ValueError, "scorer"),
        ({"selection": "sample"}, ValueError, "selection"),
        ({"scorer": "attention", "selection": "threshold"}, ValueError, "selection='topk'"),
        ({"guide_coef": -1.0}, ValueError, "guide_coef"),
        ({"hidden": 0}, ValueError, "hidden"),
    ],
)
def test_bad_router_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        FTPRouter(32, 4, **kw)


def test_bad_inputs_elsewhere():
    with pytest.raises(ValueError, match="target"):
        project_schedule([0.1], 0.95, max_sparsity=0.9)
    with pytest.raises(ValueError, match="values"):
        project_schedule([], 0.2)
    with pytest.raises(TypeError, match="evaluate"):
        search_sparsity_schedule(None, 3, 0.2)
    with pytest.raises(ValueError, match="elite"):
        search_sparsity_schedule(lambda s: 0.0, 3, 0.2, population=2, elite=3)
    with pytest.raises(ValueError, match="NaN"):
        search_sparsity_schedule(lambda s: float("nan"), 3, 0.2)
    with pytest.raises(ValueError, match="one shape"):
        ftp_guide_loss(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="temperature"):
        ftp_distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
    with pytest.raises(ValueError, match=r"\[L\]"):
        ftp_sparsity_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="positions"):
        causal_attention_probs(
            torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), torch.zeros(1, 4, dtype=torch.long)
        )
    with pytest.raises(TypeError, match="MoELM"):
        attach_ftp(torch.nn.Linear(2, 2))
    _, pruned = _pair()
    with pytest.raises(ValueError, match="already has a depth router"):
        attach_ftp(pruned)
    with pytest.raises(ValueError, match="hidden-state MLP"):
        with pruned.depth.using(scorer="hidden_state"):
            pass
    with pytest.raises(TypeError, match="no FTP router"):
        ftp_loss_fn()(MoELM(MoELMConfig(**BASE)), torch.zeros(1, 4, dtype=torch.long))


def test_reproduction_runner_tiny():
    from moelab.repro.ftp import FTP_REPRODUCTION, run_ftp

    rows = run_ftp(
        seed=0,
        model={"d_model": 32, "n_layers": 3, "n_heads": 2, "max_seq_len": 32},
        train={
            "steps": 3,
            "batch_size": 4,
            "seq_len": 32,
            "eval_batches": 1,
            "final_eval_batches": 1,
            "warmup_steps": 1,
        },
        router_steps=2,
        search={"population": 3, "generations": 1},
    )
    assert set(rows) == {"dense", "static_uniform", "static", "features", "hidden_state", "_schedule"}
    assert all(
        math.isfinite(r["val_ppl"]) and r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        for k, r in rows.items()
        if k != "_schedule"
    )
    assert sum(rows["_schedule"][f"block{i}"] for i in (1, 2)) / 2 == pytest.approx(0.25, abs=1e-5)
    assert FTP_REPRODUCTION.judge([rows, rows])["verdict"] in ("holds", "does not hold", "inconclusive")
    assert "4-feature" in FTP_REPRODUCTION.describe(rows)
