"""Expert capacity and drop policies against a brute-force greedy loop."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from moelab.routers import TopKRouter, capacity_keep_mask, expert_capacity
from moelab.routers.expert_choice import expert_choice_capacity


def brute_keep(idx_TK, score_TK, cap, num_experts, policy, valid_TK=None):
    """Visit assignments in priority order; an expert accepts while it has room.

    Order: "position" = GShard's dispatch, all first choices in token order, then all second
    choices, ...; "probs" (Megatron) = highest score first over all assignments, ties by that
    same (slot, token) order; "batch_priority" (V-MoE) = slot by slot, and within a slot the
    tokens by their best valid score, highest first (ties: earlier token).
    """
    t, k = idx_TK.shape
    entries = [(j, i) for j in range(k) for i in range(t)]
    if policy == "probs":
        entries = sorted(entries, key=lambda ji: -float(score_TK[ji[1], ji[0]]))  # sorted() is stable
    elif policy == "batch_priority":
        def best(i):
            vals = [float(score_TK[i, j]) for j in range(k) if valid_TK is None or valid_TK[i, j]]
            return max(vals) if vals else -math.inf

        entries = sorted(entries, key=lambda ji: (ji[0], -best(ji[1])))
    taken = [0] * num_experts
    keep = torch.zeros(t, k, dtype=torch.bool)
    for j, i in entries:
        if valid_TK is not None and not valid_TK[i, j]:
            continue
        e = int(idx_TK[i, j])
        if taken[e] < cap:
            taken[e] += 1
            keep[i, j] = True
    return keep


def _random_topk(t, e, k, gen, quantise=False):
    idx = (
        torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        if t
        else torch.zeros(0, k).long()
    )
    score = torch.rand(t, k, generator=gen)
    if quantise:  # many exact ties
        score = (score * 3).floor() / 3
    return idx, score


@pytest.mark.parametrize("policy", ["batch_priority", "probs", "position"])
@pytest.mark.parametrize("seed", range(12))
def test_capacity_keep_mask_matches_brute_force(policy, seed):
    gen = torch.Generator().manual_seed(seed)
    t = int(torch.randint(0, 12, (1,), generator=gen))
    e = int(torch.randint(1, 6, (1,), generator=gen))
    k = int(torch.randint(1, e + 1, (1,), generator=gen))
    cap = int(torch.randint(0, 5, (1,), generator=gen))
    idx, score = _random_topk(t, e, k, gen, quantise=seed % 2 == 0)
    valid = torch.rand(t, k, generator=gen) < 0.8 if seed % 3 == 0 else None
    got = capacity_keep_mask(idx, score, cap, e, policy, valid_TK=valid)
    assert got.shape == (t, k) and got.dtype == torch.bool
    assert torch.equal(got, brute_keep(idx, score, cap, e, policy, valid))


def test_score_policies_keep_highest_scores_position_keeps_first_tokens():
    # Four tokens all choose expert 0 (first choice), capacity 2.
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    score = torch.tensor([[0.1, 0.0], [0.9, 0.0], [0.2, 0.0], [0.8, 0.0]])
    for policy in ("probs", "batch_priority"):
        prob = capacity_keep_mask(idx, score, 2, 2, policy)
        assert prob[:, 0].tolist() == [False, True, False, True]
    pos = capacity_keep_mask(idx, score, 2, 2, "position")
    assert pos[:, 0].tolist() == [True, True, False, False]
    # Position order is slot-major: every first choice before any second choice.
    idx = torch.tensor([[1, 0], [0, 1]])
    pos = capacity_keep_mask(idx, torch.rand(2, 2), 1, 2, "position")
    assert pos.tolist() == [[True, False], [True, False]]


def test_batch_priority_serves_every_first_choice_before_a_second_choice():
    """Defect A (issue 8): E=4, k=2, C=1. Token A has gates (.26, .25) on experts (0, 1), token B
    (.50, .45) on experts (1, 0). Megatron's global "probs" ranking lets B's second choice (.45
    on expert 0) evict A's first choice (.26): B keeps both experts, A gets none. Batch-
    prioritised routing (V-MoE / ST-MoE) serves first choices first: A keeps expert 0, B expert 1."""
    idx = torch.tensor([[0, 1], [1, 0]])
    score = torch.tensor([[0.26, 0.25], [0.50, 0.45]])
    assert capacity_keep_mask(idx, score, 1, 4, "probs").tolist() == [[False, False], [True, True]]
    assert capacity_keep_mask(idx, score, 1, 4, "batch_priority").tolist() == [[True, False], [True, False]]
    # The routers' default is batch priority.
    assert TopKRouter(4, 4, top_k=2, capacity_factor=1.0).capacity.drop_policy == "batch_priority"


def test_batch_priority_ranks_tokens_by_their_top1_gate():
    # Three tokens' first choices on expert 0 (C=2): the two with the highest top-1 gates win,
    # whatever their second-choice gates are.
    idx = torch.tensor([[0, 1], [0, 2], [0, 3]])
    score = torch.tensor([[0.40, 0.39], [0.60, 0.01], [0.50, 0.45]])
    keep = capacity_keep_mask(idx, score, 2, 4, "batch_priority")
    assert keep[:, 0].tolist() == [False, True, True]


def test_old_probability_policy_name_explains_the_split():
    with pytest.raises(ValueError, match="batch_priority.*probs"):
        TopKRouter(4, 4, top_k=2, capacity_factor=1.0, drop_policy="probability")


def test_capacity_keep_mask_bad_policy():
    with pytest.raises(ValueError, match="drop_policy"):
        capacity_keep_mask(torch.zeros(2, 1).long(), torch.rand(2, 1), 1, 2, "random")


@pytest.mark.parametrize("cf", [0.1, 0.3, 0.7, 1.0, 1.1, 1.25, 1.2, 2.0, 2.5])
def test_expert_capacity_is_exact_ceiling(cf):
    for t in (1, 7, 25, 50, 100, 333):
        for e in (1, 3, 8):
            for k in (1, 2):
                exact = math.ceil(Fraction(str(cf)) * t * k / e)
                assert expert_capacity(t, e, k, cf) == exact, (t, e, k, cf)
                assert expert_choice_capacity(t, e, cf) == min(t, math.ceil(Fraction(str(cf)) * t / e))


@pytest.mark.parametrize("policy", ["batch_priority", "probs", "position"])
def test_router_capacity_matches_brute_force(policy):
    r = TopKRouter(8, 4, top_k=2, capacity_factor=0.75, drop_policy=policy)
    x = torch.randn(16, 8)
    x[:8] += 2 * r.weight.detach()[0]  # skew: expert 0 oversubscribed
    routing = r(x)
    ref = TopKRouter(8, 4, top_k=2)
    ref.load_state_dict(r.state_dict())
    full = ref(x)
    idx, w = full.topk_index(), full.weight.detach().view(16, 2)
    cap = expert_capacity(16, 4, 2, 0.75)
    assert cap == 6
    keep = brute_keep(idx, w, cap, 4, policy)
    assert keep.sum() < 32  # something was dropped
    assert routing.top_k is None
    assert routing.token_index.tolist() == torch.arange(16).repeat_interleave(2)[keep.reshape(-1)].tolist()
    assert routing.expert_index.tolist() == idx[keep].tolist()
    torch.testing.assert_close(routing.weight, w[keep])
    assert routing.requested.tolist() == torch.bincount(idx.reshape(-1), minlength=4).tolist()
    assert routing.tokens_per_expert().max() <= cap
    assert routing.drop_rate() == pytest.approx(1 - int(keep.sum()) / 32)


def test_router_eval_capacity_factor_and_dropless_default():
    r = TopKRouter(8, 4, top_k=2, capacity_factor=0.5, eval_capacity_factor=4.0)
    x = torch.randn(16, 8)
    r.train()
    assert r(x).drop_rate() > 0
    r.eval()
    ev = r(x)  # capacity 4 * 16 * 2 / 4 = 32 >= any load: nothing dropped
    assert ev.drop_rate() == 0.0 and ev.num_assignments == 32
    assert not r.causal_at_eval  # a capacity at eval makes a token's experts depend on the others
    same = TopKRouter(8, 4, top_k=2, capacity_factor=0.5)  # eval_capacity_factor="same"
    same.eval()
    assert same(x).drop_rate() > 0 and not same.causal_at_eval
    free = TopKRouter(8, 4, top_k=2, capacity_factor=0.5, eval_capacity_factor=None)
    free.load_state_dict(r.state_dict())
    free.eval()
    ev = free(x)  # dropless at eval: the full top-k of every token, causal
    assert ev.requested is None and ev.top_k == 2 and free.causal_at_eval
    dropless = TopKRouter(8, 4, top_k=2)
    routing = dropless(x)
    assert routing.requested is None and routing.top_k == 2 and routing.num_assignments == 32


def test_score_policies_rank_by_raw_gate_not_scaled_weight():
    # Scaling every gate by the same factor cannot change which assignments survive.
    x = torch.randn(20, 8)
    a = TopKRouter(8, 4, top_k=2, capacity_factor=0.6)
    b = TopKRouter(8, 4, top_k=2, capacity_factor=0.6, scale=3.0)
    b.load_state_dict(a.state_dict())
    ra, rb = a(x), b(x)
    assert torch.equal(ra.token_index, rb.token_index) and torch.equal(ra.expert_index, rb.expert_index)
    torch.testing.assert_close(rb.weight, 3.0 * ra.weight)
