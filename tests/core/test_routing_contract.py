"""The ``Routing`` contract: construction checks and every derived view against brute force."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab.core import Routing, cat_routings


def _routing(t=5, e=4, n=9, seed=0, **kw) -> Routing:
    g = torch.Generator().manual_seed(seed)
    return Routing(
        token_index=torch.randint(0, max(t, 1), (n,), generator=g) if t else torch.zeros(0, dtype=torch.long),
        expert_index=torch.randint(0, e, (n,), generator=g),
        weight=torch.rand(n, generator=g),
        num_tokens=t,
        num_experts=e,
        **kw,
    )


# ---------------------------------------------------------------------------------------- validation
def _fields(**over):
    base = dict(
        token_index=torch.tensor([0, 1, 2]),
        expert_index=torch.tensor([1, 0, 1]),
        weight=torch.tensor([0.5, 0.25, 1.0]),
        num_tokens=3,
        num_experts=2,
    )
    base.update(over)
    return base


BAD_FIELDS = [
    ("num_tokens", dict(num_tokens=3.0), TypeError),
    ("num_tokens", dict(num_tokens=True), TypeError),
    ("num_tokens", dict(num_tokens=-1), ValueError),
    ("num_experts", dict(num_experts=0), ValueError),
    ("num_experts", dict(num_experts="2"), TypeError),
    ("token_index", dict(token_index=[0, 1, 2]), TypeError),
    ("token_index", dict(token_index=torch.tensor([[0, 1, 2]])), ValueError),
    ("token_index", dict(token_index=torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError),
    ("token_index", dict(token_index=torch.tensor([0, 1, 3])), ValueError),  # >= T
    ("token_index", dict(token_index=torch.tensor([0, -1, 2])), ValueError),
    ("expert_index", dict(expert_index=torch.tensor([1, 0])), ValueError),  # length
    ("expert_index", dict(expert_index=torch.tensor([1.0, 0.0, 1.0])), TypeError),
    ("expert_index", dict(expert_index=torch.tensor([1, 2, 0])), ValueError),  # >= E
    ("expert_index", dict(expert_index=torch.tensor([1, -1, 0])), ValueError),
    ("weight", dict(weight=torch.tensor([0.5, 0.25])), ValueError),
    ("weight", dict(weight=torch.tensor([1, 2, 3])), TypeError),
    ("weight", dict(weight=torch.ones(3, 1)), ValueError),
    ("logits", dict(logits=torch.zeros(3, 3)), ValueError),
    ("probs", dict(probs=torch.zeros(2, 2)), ValueError),
    ("top_k", dict(top_k=2), ValueError),  # N = 3 != T * 2
    ("top_k", dict(top_k=0), ValueError),
    # N = T * top_k but not token-major: the combine fast path would put rows on the wrong tokens.
    ("top_k", dict(token_index=torch.tensor([2, 1, 0]), top_k=1), ValueError),
    ("requested", dict(requested=torch.tensor([1, 2, 3])), ValueError),
]


@pytest.mark.parametrize(
    "field,over,exc", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_FIELDS)]
)
def test_malformed_field_raises_naming_it(field, over, exc):
    with pytest.raises(exc, match=field):
        Routing(**_fields(**over))


def test_valid_routing_and_validate_false_skips_checks():
    r = Routing(**_fields(top_k=1, requested=torch.tensor([1, 3])))
    assert r.num_assignments == 3 and r.device.type == "cpu"
    # validate=False is the hot path's promise: no check at all, even on a wrong index.
    Routing(**_fields(token_index=torch.tensor([0, 1, 7])), validate=False)


def test_from_topk_validation_and_layout():
    idx = torch.tensor([[1, 0], [2, 1], [0, 2]])
    w = torch.rand(3, 2)
    r = Routing.from_topk(idx, w, 3)
    assert r.top_k == 2
    assert torch.equal(r.token_index, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(r.expert_index, idx.reshape(-1))
    with pytest.raises(ValueError, match="topk_index"):
        Routing.from_topk(idx.reshape(-1), w.reshape(-1), 3)
    with pytest.raises(ValueError, match="topk_weight"):
        Routing.from_topk(idx, w[:, :1], 3)
    with pytest.raises(ValueError, match="expert_index"):
        Routing.from_topk(idx, w, 2)


# --------------------------------------------------------------------------------------- by_expert
def _brute_order(r: Routing):
    perm = [j for e in range(r.num_experts) for j in range(r.num_assignments) if int(r.expert_index[j]) == e]
    counts = [
        sum(1 for j in range(r.num_assignments) if int(r.expert_index[j]) == e) for e in range(r.num_experts)
    ]
    offsets, run = [], 0
    for c in counts:
        run += c
        offsets.append(run)
    return perm, counts, offsets


@pytest.mark.parametrize(
    "t,e,n,seed", [(5, 4, 9, 0), (7, 6, 30, 1), (1, 3, 1, 2), (0, 3, 0, 3), (4, 8, 2, 4)]
)
def test_by_expert_matches_brute_force(t, e, n, seed):
    r = _routing(t, e, n, seed)
    order = r.by_expert()
    perm, counts, offsets = _brute_order(r)
    assert order.perm.tolist() == perm  # stable: token order kept inside each expert
    assert order.counts.tolist() == counts
    assert order.offsets.dtype == torch.int32 and order.offsets.tolist() == offsets
    assert order.expert_index.tolist() == [int(r.expert_index[j]) for j in perm]
    assert order.token_index.tolist() == [int(r.token_index[j]) for j in perm]
    assert order.weight.tolist() == [float(r.weight[j]) for j in perm]
    assert r.by_expert() is order  # cached
    assert r.tokens_per_expert().tolist() == counts


def test_by_expert_first_called_under_no_grad_keeps_the_router_gradient():
    # Analysis code may look at the load under no_grad before the backend runs; the cached
    # combine weights must still carry the router's gradient.
    router = moelab.build_router("topk", d_model=8, num_experts=4, top_k=2)
    bank = moelab.ExpertBank(4, 8, 8)
    x = torch.randn(6, 8)
    routing = router(x)
    with torch.no_grad():
        routing.tokens_per_expert()
    moelab.ops.get_executor("sorted")(x, routing, bank).square().sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ derived views
@pytest.mark.parametrize("seed", range(4))
def test_dense_mask_and_counts_match_loops(seed):
    r = _routing(6, 5, 14, seed)  # random entries: duplicates (t, e) pairs are allowed and summed
    dense = torch.zeros(6, 5)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    per_tok = [0] * 6
    per_exp = [0] * 5
    for t, e, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight.tolist(), strict=True):
        dense[t, e] += w
        mask[t, e] = True
        per_tok[t] += 1
        per_exp[e] += 1
    torch.testing.assert_close(r.dense(), dense)
    assert torch.equal(r.mask(), mask)
    assert r.experts_per_token().tolist() == per_tok
    assert r.tokens_per_expert().tolist() == per_exp


def test_dense_is_differentiable_in_weight():
    r = _routing(4, 3, 6, 0)
    w = r.weight.clone().requires_grad_(True)
    r2 = Routing(r.token_index, r.expert_index, w, 4, 3)
    (r2.dense() * torch.arange(12.0).view(4, 3)).sum().backward()
    expected = (r.token_index * 3 + r.expert_index).float()
    torch.testing.assert_close(w.grad, expected)


def test_topk_index_token_choice():
    idx = torch.tensor([[3, 1], [0, 2], [2, 3]])
    r = Routing.from_topk(idx, torch.rand(3, 2), 4)
    assert torch.equal(r.topk_index(), idx)


@pytest.mark.parametrize("seed", range(4))
def test_topk_index_ragged_matches_loop(seed):
    r = _routing(6, 5, 11, seed)
    rows = [[] for _ in range(6)]
    for t, e in zip(r.token_index.tolist(), r.expert_index.tolist(), strict=True):
        rows[t].append(e)  # entry order
    kmax = max(len(row) for row in rows)
    expected = [row + [-7] * (kmax - len(row)) for row in rows]
    assert r.topk_index(fill=-7).tolist() == expected


def test_topk_index_empty_cases():
    assert r_shape(_routing(0, 3, 0)) == (0, 0)
    r = Routing(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), 4, 3)
    assert r_shape(r) == (4, 0)


def r_shape(r: Routing) -> tuple[int, ...]:
    return tuple(r.topk_index().shape)


def test_drop_rate():
    r = _routing(5, 4, 6, 0)
    assert r.drop_rate() == 0.0
    r.requested = torch.tensor([3, 3, 2, 0])  # 8 asked, 6 kept
    assert r.drop_rate() == pytest.approx(1 - 6 / 8)
    empty = _routing(0, 4, 0, requested=torch.zeros(4, dtype=torch.long))
    assert empty.drop_rate() == 0.0


# ---------------------------------------------------------------------------- cat_routings, detach
def test_cat_routings_offsets_tokens_and_merges_fields():
    a = Routing.from_topk(torch.tensor([[0, 1], [2, 0]]), torch.rand(2, 2), 3, logits=torch.randn(2, 3))
    b = Routing.from_topk(torch.tensor([[1, 2]]), torch.rand(1, 2), 3, logits=torch.randn(1, 3))
    c = cat_routings([a, b])
    assert c.num_tokens == 3 and c.num_experts == 3 and c.top_k == 2
    assert c.token_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert c.expert_index.tolist() == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(c.weight, torch.cat([a.weight, b.weight]))
    torch.testing.assert_close(c.logits, torch.cat([a.logits, b.logits]))
    assert c.probs is None and c.requested is None
    c.check()  # the concatenation is itself a valid routing

    # A dropped part contributes its requests, an undropped part its received counts.
    d = Routing(torch.tensor([0]), torch.tensor([2]), torch.ones(1), 2, 3, requested=torch.tensor([1, 0, 2]))
    cd = cat_routings([a, d])
    assert cd.top_k is None and cd.logits is None
    assert cd.requested.tolist() == [1 + 2, 1 + 0, 1 + 2]
    assert cd.token_index.tolist() == [0, 0, 1, 1, 2]
    assert cd.drop_rate() == pytest.approx(1 - 5 / 7)


def test_cat_routings_errors():
    with pytest.raises(ValueError, match="routings"):
        cat_routings([])
    with pytest.raises(ValueError, match="num_experts"):
        cat_routings([_routing(2, 3, 2), _routing(2, 4, 2)])


def test_detach_copies_to_cpu_without_graph():
    w = torch.rand(4, requires_grad=True)
    logits = torch.randn(3, 2, requires_grad=True)
    r = Routing(
        torch.tensor([0, 1, 2, 2]),
        torch.tensor([1, 0, 1, 0]),
        w * 2,
        3,
        2,
        logits=logits * 1,
        probs=logits.softmax(-1),
        aux={"x": (w**2).sum()},
        requested=torch.tensor([3, 2]),
    )
    d = r.detach()
    for name in ("weight", "logits", "probs"):
        assert not getattr(d, name).requires_grad
        assert getattr(d, name).device.type == "cpu"
        torch.testing.assert_close(getattr(d, name), getattr(r, name).detach())
    assert not d.aux["x"].requires_grad
    assert d.requested.tolist() == [3, 2] and d.top_k is None
    assert d.by_expert().counts.tolist() == [2, 2]
    d.check()


def test_reassigning_a_field_invalidates_the_cached_order():
    # A composite layer may rescale the combine weights after a look at the load; the cached
    # expert order must not keep serving the old weights.
    bank = moelab.ExpertBank(3, 4, 4)
    x = torch.randn(5, 4)
    r = _routing(5, 3, 8, 0)
    r.by_expert()
    r.weight = r.weight * 3.0
    torch.testing.assert_close(moelab.ops.moe_sorted(x, r, bank), moelab.ops.moe_reference(x, r, bank))
    r.expert_index = (r.expert_index + 1) % 3
    assert r.by_expert().counts.tolist() == torch.bincount(r.expert_index, minlength=3).tolist()
    torch.testing.assert_close(moelab.ops.moe_sorted(x, r, bank), moelab.ops.moe_reference(x, r, bank))
