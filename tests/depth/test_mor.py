"""Mixture-of-Recursions (``moelab.depth.recursion``, registry ``depth/mor``) against references:
the plain model (one recursion), per-sequence loops written from the paper's equations, the
balance-loss formula, and uncached greedy decoding (the caches)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moelab
import moelab.depth.recursion  # noqa: F401  (registers depth/mor until moelab.depth imports it)
from moelab.core.context import RoutingContext, Session
from moelab.depth.recursion import (
    MixtureOfRecursions,
    default_capacities,
    expert_choice_bce,
    recursion_balance_loss,
    recursion_layout,
    recursion_token_counts,
    warmed_capacity,
)
from moelab.models import MoELM, MoELMConfig

BASE = dict(d_model=32, n_layers=4, n_heads=2, max_seq_len=48, vocab_size=256, moe_every=100)


def _model(seed: int = 0, base: dict | None = None, **depth_kwargs) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(MoELMConfig(**{**BASE, **(base or {})}, depth="mor", depth_kwargs=depth_kwargs))


def _ids(b: int = 2, s: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, s), generator=g)


def _logits(m: MoELM, x: torch.Tensor) -> torch.Tensor:
    return F.linear(m.norm(x), m.embed.weight)


def _rope(m: MoELM):
    return (m.rope_cos, m.rope_sin)


# -- pure functions ----------------------------------------------------------------------------------
def test_layout_capacities_counts():
    assert recursion_layout(5) == ([0], [1, 2, 3], [4])
    assert recursion_layout(3, "cycle") == ([], [0, 1, 2], [])
    assert default_capacities(3) == (1.0, 2 / 3, 1 / 3)
    assert default_capacities(1) == (1.0,)
    assert recursion_token_counts(default_capacities(3), 32) == [32, 21, 10]
    assert recursion_token_counts(default_capacities(3), 3) == [3, 2, 1]
    assert recursion_token_counts(default_capacities(3), 1) == [1, 1, 1]
    assert warmed_capacity(0.25, 0, 10) == 1.0 and warmed_capacity(0.25, 10, 10) == 0.25
    assert warmed_capacity(0.25, 5, 10) == pytest.approx(0.625) and warmed_capacity(0.25, 3, 0) == 0.25
    m = _model(num_recursions=3)
    assert m.depth.effective_depth == 2 + 2 * 3
    assert m.depth.causal_at_eval is True
    assert "mor" in moelab.registry.names("depth")


def test_balance_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(50, 3, generator=g).softmax(-1)
    choice = probs.argmax(-1)
    expected = 0.0
    for i in range(3):
        p_i = sum(float(probs[t, i]) for t in range(50)) / 50
        f_i = sum(1 for t in range(50) if int(choice[t]) == i) / 50
        expected += p_i * f_i
    assert float(recursion_balance_loss(probs, choice)) == pytest.approx(3 * expected, rel=1e-6)
    uniform = torch.full((6, 3), 1 / 3)
    assert float(recursion_balance_loss(uniform, torch.tensor([0, 1, 2, 0, 1, 2]))) == pytest.approx(1.0)


def test_bce_matches_plain_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    sel = torch.tensor([[True, False, False], [False, True, False]])
    among = torch.tensor([[True, True, False], [True, True, True]])
    terms = []
    for b in range(2):
        for i in range(3):
            if among[b, i]:
                p = 1 / (1 + math.exp(-float(logits[b, i])))
                y = float(sel[b, i])
                terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
    assert float(expert_choice_bce(logits, sel, among)) == pytest.approx(sum(terms) / len(terms), rel=1e-6)


# -- one recursion is the plain model -----------------------------------------------------------------
@pytest.mark.parametrize("router", ["expert_choice", "token_choice", "none"])
@pytest.mark.parametrize("base", [{}, {"moe_every": 2, "num_experts": 4, "top_k": 2}], ids=["dense", "moe"])
def test_one_recursion_equals_plain_model(router, base):
    torch.manual_seed(0)
    plain = MoELM(MoELMConfig(**{**BASE, **base}))
    mor = _model(base=base, num_recursions=1, router=router, gating="none", update="delta")
    missing, unexpected = mor.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("depth.") for k in missing)
    ids = _ids()
    for train in (True, False):
        plain.train(train)
        mor.train(train)
        with torch.no_grad():
            assert torch.equal(mor(ids).logits, plain(ids).logits)
    assert torch.equal(mor.depth.last_depth, torch.ones_like(ids))


def test_one_recursion_token_choice_weighted_gate_is_one():
    """Token choice's softmax over one depth is exactly 1, so the weighted ``delta`` update is the
    plain block up to the rounding of ``x + 1 * (h - x)``."""
    torch.manual_seed(0)
    plain = MoELM(MoELMConfig(**BASE))
    mor = _model(num_recursions=1, router="token_choice", update="delta")
    mor.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(mor(_ids()).logits, plain(_ids()).logits, atol=1e-5, rtol=0)


def test_plain_recursion_is_the_block_loop():
    m = _model(router="none", num_recursions=3, base={"n_layers": 4})
    ids = _ids()
    ctx, rope = RoutingContext(), _rope(m)
    with torch.no_grad():
        x = m.blocks[0](m.embed(ids), rope, ctx)
        for _ in range(3):
            x = m.blocks[2](m.blocks[1](x, rope, ctx), rope, ctx)
        x = m.blocks[3](x, rope, ctx)
        assert torch.equal(m(ids).logits, _logits(m, x))


# -- expert choice against a per-sequence loop ---------------------------------------------------------
def _expert_choice_reference(m: MoELM, ids: torch.Tensor, causal: bool):
    """The paper's expert-choice recursion, one sequence and one token at a time: python sorting for
    the top-k (training) or the sign of the logit (evaluation), the shared group run on the chosen
    tokens alone at their positions, ``H[sel] += g * Block(H[sel])``."""
    mor, rope, ctx = m.depth, _rope(m), RoutingContext()
    b, s = ids.shape
    x = m.blocks[0](m.embed(ids), rope, ctx)
    rows, depths, bce_sum, bce_n = [], [], [0.0] * mor.num_recursions, [0] * mor.num_recursions
    for bi in range(b):
        h = x[bi].clone()
        active, depth = list(range(s)), [0] * s
        for r in range(mor.num_recursions):
            w = mor.step_routers[r].weight[0]
            logit = [float(w @ (h[i] / mor.temperature)) for i in range(s)]
            if causal:
                chosen = active if mor.capacities[r] >= 1 else [i for i in active if logit[i] > 0]
            else:
                k = max(1, int(mor.capacities[r] * s + 1e-9))
                chosen = sorted(sorted(active, key=lambda i: -logit[i])[:k])
                for i in active:
                    p = 1 / (1 + math.exp(-logit[i]))
                    y = 1.0 if i in chosen else 0.0
                    bce_sum[r] -= y * math.log(p) + (1 - y) * math.log(1 - p)
                    bce_n[r] += 1
            if not chosen:
                break
            sub = h[chosen][None]
            pos = torch.tensor(chosen)[None]
            for j in mor.shared:
                sub = m.blocks[j](sub, rope, ctx, positions=pos)
            g = mor.alpha * torch.sigmoid(torch.tensor([logit[i] for i in chosen]))
            h = h.clone()
            h[chosen] = h[chosen] + g[:, None] * sub[0]
            for i in chosen:
                depth[i] = r + 1
            active = chosen
        rows.append(h)
        depths.append(depth)
    out = m.blocks[-1](torch.stack(rows), rope, ctx)
    bce = sum(bce_sum[r] / bce_n[r] for r in range(mor.num_recursions) if bce_n[r])
    return _logits(m, out), torch.tensor(depths), bce


@pytest.mark.parametrize("causal", [False, True], ids=["train_topk", "eval_causal"])
def test_expert_choice_matches_per_sequence_loop(causal):
    m = _model(num_recursions=3, init_std=0.5)
    m.train(not causal)
    ids = _ids(s=15)
    with torch.no_grad():
        out = m(ids)
        ref, ref_depth, ref_bce = _expert_choice_reference(m, ids, causal)
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(m.depth.last_depth, ref_depth)
    assert m.depth.last_stats["mean_depth"] == pytest.approx(float(ref_depth.float().mean()))
    if causal:
        assert float(out.aux_loss) == 0.0
        assert len(set(ref_depth.flatten().tolist())) > 1  # the causal decisions are not all equal
    else:
        assert 0.0 <= m.depth.last_stats["predictor_accuracy"] <= 1.0
        assert float(m.depth.aux_terms["bce"]) == pytest.approx(ref_bce, rel=1e-5)
        assert float(out.aux_loss) == pytest.approx(1e-3 * ref_bce, rel=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["train_topk", "eval_causal"])
def test_expert_choice_selection_is_nested(causal):
    """The shared block's calls, one per step, see nested token sets; in training each set holds
    exactly k_r tokens of every sequence, the top-k_r by the step's logits among the previous set."""
    m = _model(num_recursions=3, init_std=0.5)
    m.train(not causal)
    ids = _ids(b=3, s=12)
    b, s = ids.shape
    seen = []

    def grab(module, args, kwargs):
        pos, valid = kwargs.get("positions"), kwargs.get("valid")
        if pos is None:
            pos = torch.arange(args[0].shape[1]).expand(args[0].shape[0], -1)
        sets = []
        for bi in range(pos.shape[0]):
            keep = pos[bi] if valid is None else pos[bi][valid[bi]]
            sets.append(set(keep.tolist()))
        seen.append(sets)

    handle = m.blocks[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            m(ids)
    finally:
        handle.remove()
    assert 2 <= len(seen) <= 3
    counts = recursion_token_counts(default_capacities(3), s)
    for r, sets in enumerate(seen):
        for bi in range(b):
            before = set(range(s)) if r == 0 else seen[r - 1][bi]
            assert sets[bi] <= before
            if not causal:
                assert len(sets[bi]) == counts[r]
        if causal:
            assert r == 0 or any(len(sets[bi]) < len(seen[r - 1][bi]) for bi in range(b))
    depth = m.depth.last_depth
    for r, sets in enumerate(seen):
        for bi in range(b):
            assert sets[bi] == set((depth[bi] > r).nonzero().squeeze(-1).tolist())


# -- token choice against a per-sequence loop ---------------------------------------------------------
@pytest.mark.parametrize("update", ["block", "delta"])
def test_token_choice_matches_per_sequence_loop(update):
    m = _model(num_recursions=3, router="token_choice", update=update, init_std=0.5)
    m.train()
    ids = _ids(s=14)
    mor, rope, ctx = m.depth, _rope(m), RoutingContext()
    with torch.no_grad():
        out = m(ids)
        x = m.blocks[0](m.embed(ids), rope, ctx)
        rows, depths, all_probs = [], [], []
        for bi in range(ids.shape[0]):
            probs = (mor.depth_router(x[bi] / mor.temperature)).softmax(-1)  # [S, N_r]
            depth = [int(probs[i].argmax()) + 1 for i in range(ids.shape[1])]
            h = x[bi].clone()
            for r in range(3):
                act = [i for i in range(ids.shape[1]) if depth[i] > r]
                if not act:
                    break
                sub = h[act][None]
                for j in mor.shared:
                    sub = m.blocks[j](sub, rope, ctx, positions=torch.tensor(act)[None])
                h = h.clone()
                h[act] = sub[0]
            w = torch.tensor([float(probs[i, depth[i] - 1]) for i in range(ids.shape[1])])[:, None]
            rows.append(x[bi] + w * h if update == "block" else x[bi] + w * (h - x[bi]))
            depths.append(depth)
            all_probs.append(probs)
        ref = _logits(m, m.blocks[-1](torch.stack(rows), rope, ctx))
    torch.testing.assert_close(out.logits, ref, atol=2e-5, rtol=1e-5)
    assert torch.equal(mor.last_depth, torch.tensor(depths))
    assert len(set(torch.tensor(depths).flatten().tolist())) > 1
    probs = torch.cat(all_probs)
    balance = recursion_balance_loss(probs, probs.argmax(-1))
    assert float(mor.aux_terms["balance"]) == pytest.approx(float(balance), rel=1e-5)
    assert float(out.aux_loss) == pytest.approx(0.1 * float(balance), rel=1e-5)


def test_token_choice_runs_the_transformed_routing():
    m = _model(router="token_choice")
    m.eval()

    def shallow(routing, site):
        routing.expert_index = torch.zeros_like(routing.expert_index)
        return routing

    with torch.no_grad(), moelab.override_routing(m, shallow, layers=["depth"]):
        m(_ids())
    assert torch.equal(m.depth.last_depth, torch.ones_like(m.depth.last_depth))


def test_routing_maps_tokens_to_depths():
    for router in ("expert_choice", "token_choice"):
        m = _model(router=router, init_std=0.5)
        m.eval()
        ctx = RoutingContext()
        ids = _ids()
        with torch.no_grad():
            m(ids, ctx=ctx)
        (routing,) = [r for r in ctx.history if r.num_experts == 3]
        assert routing.num_tokens == ids.numel()
        depth = torch.zeros(ids.numel(), dtype=torch.long)
        depth[routing.token_index] = routing.expert_index + 1
        assert torch.equal(depth.view_as(ids), m.depth.last_depth)
        assert bool((routing.weight > 0).all()) and bool((routing.weight <= 1).all())
        if router == "expert_choice":
            assert bool((routing.weight <= 0.1).all())  # alpha * sigmoid


# -- causality and generation -----------------------------------------------------------------------
@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
@pytest.mark.parametrize("kv", ["recursion", "share_first"])
def test_eval_forward_is_causal(router, kv):
    m = _model(router=router, kv=kv, init_std=0.5)
    m.eval()
    a = _ids(s=16, seed=3)
    b = a.clone()
    b[:, 10:] = _ids(s=6, seed=4)
    with torch.no_grad():
        la, lb = m(a).logits, m(b).logits
    torch.testing.assert_close(la[:, :10], lb[:, :10], atol=1e-5, rtol=0)
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def _greedy(m: MoELM, prompt: torch.Tensor, steps: int, cached: bool):
    ids, logits = prompt, []
    session = Session()
    last = m(prompt, ctx=RoutingContext(session=session)).logits[:, -1] if cached else None
    for _ in range(steps):
        if not cached:
            last = m(ids).logits[:, -1]
        logits.append(last)
        nxt = last.argmax(-1)
        ids = torch.cat((ids, nxt[:, None]), dim=1)
        if cached:
            last = m(nxt[:, None], ctx=RoutingContext(session=session)).logits[:, -1]
    return ids, torch.stack(logits)


@pytest.mark.parametrize("router", ["expert_choice", "token_choice", "none"])
@pytest.mark.parametrize("kv", ["recursion", "share_first"])
def test_cached_generation_equals_uncached(router, kv):
    m = _model(router=router, kv=kv, init_std=0.5, base={"n_layers": 4})
    m.eval()
    prompt = _ids(b=2, s=6, seed=5)
    with torch.no_grad():
        ids_c, log_c = _greedy(m, prompt, 8, cached=True)
        ids_u, log_u = _greedy(m, prompt, 8, cached=False)
    assert torch.equal(ids_c, ids_u)
    torch.testing.assert_close(log_c, log_u, atol=1e-4, rtol=1e-4)
    assert torch.equal(moelab.generate(m, prompt, 8), ids_u)
    assert torch.equal(moelab.generate(m, prompt, 8, use_cache=False), ids_u)
    # teacher-forced on varied tokens (a random model's greedy text repeats itself): each cached
    # step's logits equal the full forward's at that position, with decoded tokens at every depth
    seq = _ids(b=2, s=20, seed=7)
    with torch.no_grad():
        full = m(seq).logits
        session = Session()
        steps = [m(seq[:, :4], ctx=RoutingContext(session=session)).logits]
        steps += [m(seq[:, t : t + 1], ctx=RoutingContext(session=session)).logits for t in range(4, 20)]
        m(seq)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)
    assert set(m.depth.last_depth[:, 4:].flatten().tolist()) == ({3} if router == "none" else {1, 2, 3})


def test_cached_generation_with_moe_blocks_and_cycle_sharing():
    m = _model(
        base={"n_layers": 2, "moe_every": 1, "num_experts": 4, "top_k": 2},
        sharing="cycle",
        kv="share_first",
        init_std=0.5,
    )
    m.eval()
    prompt = _ids(b=2, s=5, seed=6)
    with torch.no_grad():
        ids_c, log_c = _greedy(m, prompt, 6, cached=True)
        ids_u, log_u = _greedy(m, prompt, 6, cached=False)
    assert torch.equal(ids_c, ids_u)
    torch.testing.assert_close(log_c, log_u, atol=1e-4, rtol=1e-4)


def test_share_first_differs_from_recursion_kv():
    """The option changes what later steps attend to (a check that it is not silently ignored)."""
    a = _model(kv="recursion", init_std=0.5)
    b = _model(kv="share_first", init_std=0.5)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        assert not torch.allclose(a(_ids()).logits, b(_ids()).logits)


# -- FLOPs, training, bad input ------------------------------------------------------------------------
def test_router_and_block_flops():
    d, b, s = 32, 2, 16
    m = _model(num_recursions=3)
    m.train()
    with torch.no_grad():
        m(_ids(b=b, s=s))
    counts = recursion_token_counts(default_capacities(3), s)  # 16, 10, 5
    candidates = s + counts[0] + counts[1]  # the active tokens each step's router scores
    assert m.depth.flops == 2.0 * d * b * candidates
    hidden = 4 * d
    assert m.blocks[1].ffn.flops == 2.0 * b * sum(counts) * 3 * d * hidden
    assert m.blocks[0].ffn.flops == 2.0 * b * s * 3 * d * hidden
    t = _model(router="token_choice")
    with torch.no_grad():
        t(_ids(b=b, s=s))
    assert t.depth.flops == 2.0 * d * 3 * b * s
    # a ragged gather pads each step to its longest row, and the blocks count the padding rows
    rows = sum(b * int((t.depth.last_depth > r).sum(dim=1).max()) for r in range(3))
    assert t.blocks[2].ffn.flops == 2.0 * 3 * d * hidden * rows


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_trains_without_nan(router):
    m = _model(router=router)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = _ids(b=4, s=24)
    losses = []
    for _ in range(6):
        out = m(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    router_params = list(m.depth.parameters())
    assert router_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in router_params)


def test_bad_inputs():
    cfg = MoELMConfig(**BASE)
    for kwargs, err in [
        ({"router": "expert"}, ValueError),
        ({"sharing": "sequence"}, ValueError),
        ({"kv": "shared"}, ValueError),
        ({"gating": "soft"}, ValueError),
        ({"update": "residual"}, ValueError),
        ({"num_recursions": 0}, ValueError),
        ({"num_recursions": 2.0}, TypeError),
        ({"capacities": (1.0, 0.5)}, ValueError),
        ({"capacities": (0.5, 1.0, 0.25)}, ValueError),
        ({"capacities": (1.0, 0.5, 0.0)}, ValueError),
        ({"capacities": 0.5}, TypeError),
        ({"router": "token_choice", "capacities": (1.0, 0.5, 0.25)}, ValueError),
        ({"alpha": -0.1}, ValueError),
        ({"temperature": "1"}, TypeError),
        ({"bce_coef": -1.0}, ValueError),
        ({"capacity_warmup_steps": -1}, ValueError),
        ({"capcities": (1.0,)}, TypeError),
    ]:
        with pytest.raises(err):
            MixtureOfRecursions.from_config(cfg, **kwargs)
    with pytest.raises(ValueError, match="n_layers >= 3"):
        MixtureOfRecursions(32, 2)
    m = _model()
    rope = _rope(m)
    with pytest.raises(ValueError, match="x must be"):
        m.depth(torch.randn(2, 5, 16), m.blocks, rope, RoutingContext())
    with pytest.raises(ValueError, match="blocks must be"):
        m.depth(torch.randn(2, 5, 32), m.blocks[:3], rope, RoutingContext())
    with pytest.raises(ValueError, match="positions must be"):
        m.depth(
            torch.randn(2, 5, 32),
            m.blocks,
            rope,
            RoutingContext(),
            positions=torch.zeros(2, 4, dtype=torch.long),
        )
