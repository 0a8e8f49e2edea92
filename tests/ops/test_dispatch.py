"""``dispatch`` / ``combine`` against loops, and combine's top_k fast path against index_add."""

from __future__ import annotations

import pytest
import torch

from moelab.core import Routing
from moelab.ops import combine, dispatch


def _ragged(t, e, n, seed):
    g = torch.Generator().manual_seed(seed)
    return Routing(
        token_index=torch.randint(0, t, (n,), generator=g),
        expert_index=torch.randint(0, e, (n,), generator=g),
        weight=torch.rand(n, generator=g).requires_grad_(True),
        num_tokens=t,
        num_experts=e,
    )


@pytest.mark.parametrize("seed", range(3))
def test_dispatch_gathers_tokens_in_expert_order(seed):
    r = _ragged(6, 4, 13, seed)
    x = torch.randn(6, 5)
    rows = []
    for e in range(4):
        for j in range(r.num_assignments):  # inside an expert: original entry order
            if int(r.expert_index[j]) == e:
                rows.append(x[int(r.token_index[j])])
    torch.testing.assert_close(dispatch(x, r), torch.stack(rows))


@pytest.mark.parametrize("seed", range(3))
def test_combine_weighted_sum_per_token(seed):
    r = _ragged(7, 3, 12, seed)
    order = r.by_expert()
    y_sorted = torch.randn(12, 4, requires_grad=True)
    out = combine(y_sorted, r)
    ref = torch.zeros(7, 4)
    for j in range(12):  # sorted row j belongs to assignment perm[j]
        a = int(order.perm[j])
        ref[int(r.token_index[a])] += float(r.weight[a].detach()) * y_sorted[j].detach()
    torch.testing.assert_close(out, ref)
    # Tokens without assignments get exactly zero.
    missing = r.experts_per_token() == 0
    assert (out[missing] == 0).all()
    # d out / d weight[a] = <g[token], y_sorted row of a>.
    g = torch.randn(7, 4)
    (out * g).sum().backward()
    inv = torch.empty_like(order.perm)
    inv[order.perm] = torch.arange(12)
    expected = torch.stack([(g[int(r.token_index[a])] * y_sorted[inv[a]].detach()).sum() for a in range(12)])
    torch.testing.assert_close(r.weight.grad, expected)


@pytest.mark.parametrize("t,e,k", [(5, 4, 2), (3, 3, 3), (1, 2, 1), (0, 4, 2), (8, 6, 1)])
def test_top_k_fast_path_equals_index_add_path(t, e, k):
    g = torch.Generator().manual_seed(t * 7 + k)
    idx = (
        torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k).long()
    )
    w = torch.rand(t, k, generator=g)
    w_fast = w.clone().requires_grad_(True)
    w_slow = w.clone().requires_grad_(True)
    fast = Routing.from_topk(idx, w_fast, e)
    slow = Routing(fast.token_index, fast.expert_index, w_slow.reshape(-1), t, e, top_k=None)
    assert fast.top_k == k and slow.top_k is None
    x = torch.randn(t, 6)
    ys = torch.randn(t * k, 6, requires_grad=True)
    out_fast = combine(ys * 1.0, fast)
    out_slow = combine(ys * 1.0, slow)
    torch.testing.assert_close(out_fast, out_slow)
    torch.testing.assert_close(dispatch(x, fast), dispatch(x, slow))
    gy = torch.randn(t, 6)
    gf = torch.autograd.grad((out_fast * gy).sum(), [w_fast, ys], allow_unused=True)
    gs = torch.autograd.grad((out_slow * gy).sum(), [w_slow, ys], allow_unused=True)
    for a, b, like in zip(gf, gs, (w, ys), strict=True):
        z = torch.zeros_like(like)
        torch.testing.assert_close(a if a is not None else z, b if b is not None else z)


def test_combine_casts_weight_to_output_dtype():
    r = _ragged(4, 2, 6, 0)
    out = combine(torch.randn(6, 3, dtype=torch.bfloat16), r)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 3)
