"""ReXMoE (``rexmoe``) and its ``UnionBank`` against independent references: plain top-k with the
same weights (r = 1, or an unlinked router), the paper's masked softmax top-k written per token, a
per-expert loop over the member banks, and the PSR schedule written as a formula."""

from __future__ import annotations

import math
import random

import pytest
import torch

import moelab
from moelab.core.context import RoutingContext
from moelab.core.router import link_routers
from moelab.core.routing import Routing
from moelab.data import load_data
from moelab.experts.bank import ExpertBank
from moelab.experts.union import UnionBank, split_expert_order
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM
from moelab.ops.executors import resolve_executor
from moelab.ops.reference import moe_reference
from moelab.routers.rexmoe import (
    ReXMoERouter,
    masked_softmax_topk,
    psr_allowed,
    psr_num_unmasked,
    psr_unmask_rank,
    reuse_group,
)
from moelab.train.trainer import TrainConfig, Trainer

D, E = 16, 4


def lm_config(**router_kwargs) -> MoELMConfig:
    return MoELMConfig(
        d_model=32, n_layers=4, n_heads=2, num_experts=E, top_k=2, max_seq_len=32,
        router="rexmoe", router_kwargs=router_kwargs,
    )  # fmt: skip


def linked_layers(n: int, **router_kwargs) -> list[moelab.MoE]:
    layers = [moelab.MoE(D, E, 2, router="rexmoe", router_kwargs=router_kwargs) for _ in range(n)]
    link_routers(layers)
    return layers


def per_token_reference(x, weight, top_k, allowed):
    """The paper's routing for one token at a time: logits W x, non-allowed candidates at -inf,
    softmax, the k largest, renormalised. Returns the [T, C] combine-weight matrix."""
    out = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        z = [float(weight[c].double() @ x[t].double()) for c in range(weight.shape[0])]
        z = [v if allowed[c] else -math.inf for c, v in enumerate(z)]
        m = max(z)
        p = [math.exp(v - m) for v in z]
        s = sum(p)
        p = [v / s for v in p]
        best = sorted(range(len(p)), key=lambda c: -p[c])[:top_k]
        norm = sum(p[c] for c in best)
        for c in best:
            out[t, c] = p[c] / norm
    return out


# ------------------------------------------------------------------------------- pure functions
def test_reuse_groups_are_consecutive_with_a_short_last_group():
    assert [list(reuse_group(i, 5, 2)) for i in range(5)] == [[0, 1], [0, 1], [2, 3], [2, 3], [4]]
    assert [list(reuse_group(i, 3, 1)) for i in range(3)] == [[0], [1], [2]]
    assert list(reuse_group(5, 6, 4)) == [4, 5]
    with pytest.raises(ValueError, match="position"):
        reuse_group(3, 3, 2)


def test_psr_schedule_is_local_then_linear_then_all():
    local, full, n = 10, 30, 12
    for step in range(45):
        expected = (
            0 if step < local else n if step >= full else math.floor(n * (step - local) / (full - local))
        )
        assert psr_num_unmasked(step, n, local, full) == expected
        # the router's on-device form gives the same numbers
        assert int(psr_num_unmasked(torch.tensor(step), n, local, full)) == expected
    counts = [psr_num_unmasked(s, n, local, full) for s in range(45)]
    assert counts == sorted(counts)  # never shrinks
    # no ramp: local-only, then everything at once
    assert [psr_num_unmasked(s, 4, 3, 3) for s in range(5)] == [0, 0, 0, 4, 4]
    assert [int(psr_num_unmasked(torch.tensor(s), 4, 3, 3)) for s in range(5)] == [0, 0, 0, 4, 4]
    with pytest.raises(ValueError, match="full_steps"):
        psr_num_unmasked(0, 4, 5, 2)


def test_unmask_order_is_nearest_layer_first_and_fixed_by_the_seed():
    # layer at position 1 of a group of 4: others 0 and 2 (distance 1), 3 (distance 2)
    rank = psr_unmask_rank([E, E, E], [1, 1, 2], E, seed=7)
    assert rank.shape == (4 * E,)
    assert (rank[:E] == -1).all()
    assert sorted(rank[E:].tolist()) == list(range(3 * E))  # a permutation of the non-local ones
    assert sorted(rank[E : 2 * E].tolist()) == list(range(E))  # layer 0: first (tie, given order)
    assert sorted(rank[2 * E : 3 * E].tolist()) == list(range(E, 2 * E))  # layer 2
    assert (rank[3 * E :] >= 2 * E).all()  # the farther layer last
    assert torch.equal(rank, psr_unmask_rank([E, E, E], [1, 1, 2], E, seed=7))
    assert not torch.equal(rank, psr_unmask_rank([E, E, E], [1, 1, 2], E, seed=8))
    allowed = psr_allowed(rank, 3)
    assert allowed[:E].all() and int(allowed.sum()) == E + 3


def test_masked_softmax_topk_matches_the_per_token_loop():
    torch.manual_seed(0)
    x, w = torch.randn(9, D), torch.randn(3 * E, D)
    allowed = psr_allowed(psr_unmask_rank([E, E], [1, 1], E, seed=0), 5)
    probs, weight, index = masked_softmax_topk(x @ w.t(), 2, True, allowed)
    got = torch.zeros(9, 3 * E, dtype=torch.float64).scatter_(1, index, weight.double())
    torch.testing.assert_close(got, per_token_reference(x, w, 2, allowed.tolist()), rtol=1e-5, atol=1e-6)
    assert (probs[:, ~allowed] == 0).all()


# ------------------------------------------------------------------------------- the union bank
def test_split_expert_order_renumbers_one_expert_range():
    torch.manual_seed(1)
    expert = torch.tensor([5, 0, 3, 3, 1, 5, 2])
    r = Routing(torch.arange(7), expert, torch.rand(7), num_tokens=7, num_experts=6)
    order = r.by_expert()  # rows: e0 | e1 | e2 | e3 e3 | e5 e5
    sub = split_expert_order(order, 2, 4, 2, 5)
    assert sub.counts.tolist() == [1, 2] and sub.offsets.tolist() == [1, 3]
    assert sub.offsets.dtype == torch.int32
    assert sub.expert_index.tolist() == [0, 1, 1]
    assert torch.equal(sub.token_index, torch.tensor([6, 2, 3]))
    assert torch.equal(sub.weight, r.weight[sub.perm])


@pytest.mark.parametrize("t", [0, 1, 37])
def test_union_bank_equals_each_member_bank_on_its_own_experts(t):
    """The union's grouped forward (and the layer's "auto" executor) against a loop over the
    assignments that calls the owning member bank's expert directly."""
    torch.manual_seed(2 + t)
    banks = [ExpertBank(3, D, 8), ExpertBank(4, D, 8), ExpertBank(2, D, 8, "gelu")]
    union = UnionBank(banks[0], banks[1:])
    assert union.num_experts == 9 and union.members[1] is banks[1]
    x = torch.randn(t, D, requires_grad=True)
    k = 3
    index = (
        torch.stack([torch.randperm(9)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    )
    weight = torch.rand(t, k, requires_grad=True)
    routing = Routing.from_topk(index, weight, 9)
    executor = resolve_executor("auto", x.device, union)
    assert executor.name == "sorted"  # fast/triton read MLP weights themselves: they decline a union
    y = executor(x, routing, union)

    starts = [0, 3, 7, 9]
    ref = x.new_zeros(t, D) + 0.0 * (x.sum() + weight.sum())  # connected to the graph when t = 0
    for tok in range(t):
        for j in range(k):
            e = int(index[tok, j])
            m = max(i for i in range(3) if starts[i] <= e)
            ref[tok] = ref[tok] + weight[tok, j] * banks[m].expert_forward(e - starts[m], x[tok : tok + 1])[0]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, moe_reference(x, routing, union), atol=1e-5, rtol=1e-5)
    params = [x, weight, *(p for b in banks for p in b.parameters())]
    g = torch.autograd.grad(y.square().sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.square().sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref, strict=True):
        if b is None:
            assert a is None or not a.abs().sum()
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_union_bank_registers_only_its_local_bank():
    a, b = ExpertBank(2, D, 8), ExpertBank(2, D, 8)
    union = UnionBank(a, [b])
    assert {id(p) for p in union.parameters()} == {id(p) for p in a.parameters()}
    assert all(k.startswith("local.") for k in union.state_dict())
    with pytest.raises(ValueError, match="d_in"):
        UnionBank(a, [ExpertBank(2, D + 1, 8)])
    with pytest.raises(ValueError, match="local bank itself"):
        UnionBank(a, [a])
    with pytest.raises(TypeError, match="others"):
        UnionBank(a, b)
    with pytest.raises(ValueError, match="expert id"):
        union.expert_forward(4, torch.randn(1, D))


# ------------------------------------------------------------------------------- the router
def test_group_size_one_and_an_unlinked_router_are_plain_topk():
    torch.manual_seed(3)
    x = torch.randn(2, 7, D)
    for layers in (linked_layers(3, group_size=1), [moelab.MoE(D, E, 2, router="rexmoe")]):
        for layer in layers:
            assert layer.router.num_experts == E and isinstance(layer.experts, ExpertBank)
            base = moelab.MoE(D, E, 2, router="topk")
            base.router.weight.data.copy_(layer.router.weight.data)
            base.experts.load_state_dict(layer.experts.state_dict())
            y, r = layer.forward_routed(x)
            y_ref, r_ref = base.forward_routed(x)
            assert torch.equal(r.expert_index, r_ref.expert_index)
            torch.testing.assert_close(r.weight, r_ref.weight, rtol=0, atol=0)
            torch.testing.assert_close(y, y_ref)


def test_link_grows_the_gate_and_installs_the_group_union():
    torch.manual_seed(4)
    layers = [moelab.MoE(D, E, 2, router="rexmoe") for _ in range(3)]
    own_banks = [m.experts for m in layers]
    gates = [m.router.weight.detach().clone() for m in layers]
    link_routers(layers)
    for i, m in enumerate(layers):
        g = 1 if i == 2 else 2  # the last group is short
        assert m.num_experts == m.router.num_experts == m.experts.num_experts == g * E
        assert m.router.weight.shape == (g * E, D)
        torch.testing.assert_close(m.router.weight[:E], gates[i])  # the local rows keep their init
    assert layers[0].experts.members == [own_banks[0], own_banks[1]]  # local first, then by depth
    assert layers[1].experts.members == [own_banks[1], own_banks[0]]
    assert layers[2].experts is own_banks[2]  # a group of one: nothing to reuse
    rows = layers[0].router.weight
    link_routers(layers)  # linking again keeps the gate and the layout
    assert layers[0].router.weight is rows and layers[0].experts.members == [own_banks[0], own_banks[1]]


def test_routing_is_the_masked_softmax_topk_of_the_schedule():
    torch.manual_seed(5)
    layer = linked_layers(2, psr_local_steps=2, psr_full_steps=6)[0]
    router = layer.router
    x = torch.randn(11, D)
    rank = router.unmask_rank
    for step in range(8):
        r = router(x)
        n = psr_num_unmasked(step, E, 2, 6)
        assert router.num_unmasked() == n
        allowed = (rank < n).tolist()
        ref = per_token_reference(x, router.weight.detach(), 2, allowed)
        torch.testing.assert_close(r.dense().double(), ref, rtol=1e-5, atol=1e-6)
        chosen_nonlocal = r.expert_index[r.expert_index >= E]
        assert (rank[chosen_nonlocal] < n).all()  # only unmasked candidates are ever chosen
        router.step_end()
    assert int(router.psr_step) == 8


def test_without_psr_every_candidate_is_open_from_the_start():
    torch.manual_seed(6)
    layer = linked_layers(2, psr=False)[0]
    assert layer.router.allowed_candidates() is None and layer.router.num_unmasked() == E
    x = torch.randn(64, D)
    with torch.no_grad():
        layer.router.weight[E:] *= 20  # make the other layer's candidates attractive
    r = layer.router(x)
    assert (r.expert_index >= E).any()
    ref = per_token_reference(x, layer.router.weight.detach(), 2, [True] * 2 * E)
    torch.testing.assert_close(r.dense().double(), ref, rtol=1e-5, atol=1e-6)


def test_gradient_reaches_the_other_layers_experts_through_this_layer():
    torch.manual_seed(7)
    a, b = linked_layers(2, psr=False)
    with torch.no_grad():
        a.router.weight[E:] *= 20
    y = a(torch.randn(2, 8, D))
    y.square().sum().backward()
    other = a.experts.members[1]
    assert other is b.experts.local
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in other.parameters())
    assert b.router.weight.grad is None  # layer b did not run


def test_lone_moe_forward_backward_shapes_t1_t0():
    torch.manual_seed(8)
    moe = moelab.MoE(D, E, 2, router="rexmoe")
    for shape in [(2, 5, D), (1, D), (0, D), (1, 0, D)]:
        x = torch.randn(*shape, requires_grad=True)
        y = moe(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        (y.sum() + moe.aux_loss).backward()
    a, _ = linked_layers(2, psr=False)
    for shape in [(1, D), (0, D)]:  # the union bank too
        x = torch.randn(*shape, requires_grad=True)
        y = a(x)
        (y.sum() + a.aux_loss).backward()
        assert y.shape == x.shape


def test_union_layer_auto_backend_equals_reference_backend():
    torch.manual_seed(9)
    a, _ = linked_layers(2, psr=False)
    x = torch.randn(3, 6, D)
    y_auto = a(x)
    a.backend = "reference"
    torch.testing.assert_close(a(x), y_auto, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- in MoELM
def test_moelm_counts_and_saves_each_expert_once():
    torch.manual_seed(10)
    model = MoELM(lm_config())
    base = MoELM(MoELMConfig(**{**lm_config().to_dict(), "router": "topk", "router_kwargs": {}}))
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(params)
    # only the gates grew: (g - 1) * E rows of d per layer
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in base.parameters())
    assert extra == 4 * (2 - 1) * E * 32
    state = model.state_dict()
    assert not any(".other" in k for k in state)
    ptrs = [v.data_ptr() for k, v in state.items() if v.numel()]
    assert len(set(ptrs)) == len(ptrs)
    assert "blocks.0.ffn.experts.local.gate_up_proj" in state and "blocks.0.ffn.router.psr_step" in state
    bank1 = model.blocks[1].ffn.experts.local
    assert model.blocks[0].ffn.experts.members[1] is bank1  # layer 0 reuses layer 1's bank itself


def test_moelm_save_load_round_trip_keeps_outputs_and_schedule(tmp_path):
    torch.manual_seed(11)
    model = MoELM(lm_config(psr_local_steps=1, psr_full_steps=9))
    for _ in range(4):
        moelab.step_end(model)
    model.eval()
    ids = torch.randint(0, 256, (2, 12))
    out = model(ids).logits
    loaded = MoELM.from_pretrained(model.save_pretrained(tmp_path / "ckpt")).eval()
    assert all(int(m.router.psr_step) == 4 for _, m in loaded.moe_layers())
    assert loaded.blocks[0].ffn.experts.members[1] is loaded.blocks[1].ffn.experts.local
    torch.testing.assert_close(loaded(ids).logits, out, rtol=0, atol=0)


def test_moelm_psr_keeps_routing_local_then_opens_the_group_while_training():
    torch.manual_seed(12)
    model = MoELM(lm_config(psr_local_steps=3, psr_full_steps=5))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 16))
    losses, nonlocal_share = [], []
    for step in range(8):
        ctx = RoutingContext()
        out = model(ids, labels=ids, ctx=ctx)
        routings = ctx.history
        assert len(routings) == 4 and all(r.num_experts == 2 * E for r in routings)
        for (_, layer), r in zip(model.moe_layers(), routings, strict=True):
            n = psr_num_unmasked(step, E, 3, 5)
            assert layer.router.num_unmasked() == n
            assert (layer.router.unmask_rank[r.expert_index] < n).all()
        nonlocal_share.append(float(torch.cat([r.expert_index >= E for r in routings]).float().mean()))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        moelab.step_end(model)
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert nonlocal_share[:3] == [0.0, 0.0, 0.0] and max(nonlocal_share[5:]) > 0
    assert losses[-1] < losses[0]


def test_trainer_resume_continues_the_schedule_bit_identically(tmp_path):
    """The PSR step lives in the router's state: a run cut at step 6 and resumed from its step-4
    checkpoint ends where an uninterrupted run does (the schedule opens at steps 3-7)."""
    data = load_data()
    mcfg = MoELMConfig(
        d_model=32, n_layers=2, n_heads=2, max_seq_len=64, num_experts=E, top_k=2,
        router="rexmoe", router_kwargs={"psr_local_steps": 3, "psr_full_steps": 7},
    )  # fmt: skip
    cfg = TrainConfig(steps=10, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=3, eval_batches=2,
                      ckpt_every=4)  # fmt: skip
    full = Trainer(mcfg, cfg, tmp_path / "full", data=data, progress=False)
    full.train()
    Trainer(mcfg, cfg, tmp_path / "cut", data=data, progress=False).train(stop_after=6)
    torch.manual_seed(1234)  # a new process would start from other RNG states
    random.seed(1234)
    resumed = Trainer(mcfg, cfg, tmp_path / "cut", data=data, progress=False)
    resumed.train(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert int(b["blocks.0.ffn.router.psr_step"]) == 10
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history["loss"] == full.history["loss"]


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"group_size": 0}, "group_size"),
        ({"group_size": 2.0}, "group_size"),
        ({"psr": "yes"}, "psr"),
        ({"psr_local_steps": -1}, "psr_local_steps"),
        ({"psr_local_steps": 10, "psr_full_steps": 5}, "psr_full_steps"),
        ({"psr_seed": 1.5}, "psr_seed"),
        ({"top_k": 5}, "top_k"),
        ({"normalize": 1}, "normalize"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        moelab.build_router("rexmoe", d_model=8, num_experts=4, **kwargs)


def test_link_rejects_a_layer_that_is_not_its_own_or_has_no_bank():
    layer = moelab.MoE(D, E, 2, router="rexmoe")
    other = moelab.MoE(D, E, 2, router="topk")
    with pytest.raises(ValueError, match="not this router's layer"):
        layer.router.link(1, [layer, other])
    with pytest.raises(ValueError, match="no expert bank"):
        layer.router.link(0, [layer, torch.nn.Linear(D, D)])
    assert isinstance(ReXMoERouter(D, E), ReXMoERouter)
