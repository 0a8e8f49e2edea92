"""``product_key_topk`` against brute force over all n^2 pair sums, with random and tied scores."""

from __future__ import annotations

import pytest
import torch

from moelab.routers.product_key import product_key_topk


def brute_force(a_TN, b_TN, k):
    """All n^2 sums, ordered by (value descending, flat index ascending), one token at a time."""
    n = a_TN.shape[1]
    values, indices = [], []
    for t in range(a_TN.shape[0]):
        pairs = [(float(a_TN[t, i] + b_TN[t, j]), i * n + j) for i in range(n) for j in range(n)]
        pairs.sort(key=lambda p: (-p[0], p[1]))
        values.append([p[0] for p in pairs[:k]])
        indices.append([p[1] for p in pairs[:k]])
    return torch.tensor(values, dtype=a_TN.dtype).view(-1, k), torch.tensor(indices).view(-1, k)


SHAPES = [
    (1, 1, 1),
    (3, 4, 1),
    (5, 4, 3),
    (4, 4, 4),
    (4, 3, 5),
    (3, 3, 9),
    (6, 8, 16),
    (2, 16, 7),
    (7, 5, 20),
]


@pytest.mark.parametrize("t,n,k", SHAPES)
def test_equals_brute_force_on_random_scores(t, n, k):
    g = torch.Generator().manual_seed(t * 100 + n * 10 + k)
    a, b = (
        torch.randn(t, n, generator=g, dtype=torch.float64),
        torch.randn(t, n, generator=g, dtype=torch.float64),
    )
    values, index = product_key_topk(a, b, k)
    ref_values, ref_index = brute_force(a, b, k)
    assert values.shape == (t, k) and index.dtype == torch.long
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(index, ref_index)


@pytest.mark.parametrize("seed", range(12))
def test_equals_brute_force_with_adversarial_ties(seed):
    """Integer scores in {0, 1, 2}: many equal sums (exact in float), the order must still match."""
    g = torch.Generator().manual_seed(seed)
    n = 2 + seed % 5
    k = 1 + (seed * 7) % (n * n)
    a = torch.randint(0, 3, (4, n), generator=g).float()
    b = torch.randint(0, 3, (4, n), generator=g).float()
    values, index = product_key_topk(a, b, k)
    ref_values, ref_index = brute_force(a, b, k)
    assert torch.equal(values, ref_values) and torch.equal(index, ref_index)


def test_all_equal_scores_give_the_lowest_indices():
    values, index = product_key_topk(torch.zeros(2, 6), torch.zeros(2, 6), 8)
    assert torch.equal(index, torch.arange(8).expand(2, 8)) and torch.equal(values, torch.zeros(2, 8))


def test_gradient_reaches_both_sides_at_the_chosen_pairs():
    torch.manual_seed(0)
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    values, index = product_key_topk(a, b, 4)
    w = torch.randn(3, 4, dtype=torch.float64)
    (values * w).sum().backward()
    # d/da[t, i] = sum of w over chosen pairs with first index i; likewise for b.
    ga, gb = torch.zeros_like(a), torch.zeros_like(b)
    for t in range(3):
        for s in range(4):
            i, j = divmod(int(index[t, s]), 5)
            ga[t, i] += w[t, s]
            gb[t, j] += w[t, s]
    torch.testing.assert_close(a.grad, ga)
    torch.testing.assert_close(b.grad, gb)
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_no_tokens():
    values, index = product_key_topk(torch.zeros(0, 4), torch.zeros(0, 4), 5)
    assert values.shape == (0, 5) and index.shape == (0, 5) and index.dtype == torch.long


def test_large_n_never_needs_the_full_product():
    """n = 1024 (N = 2^20 pairs): matches brute force over the full [T, n^2] sum, built only here."""
    torch.manual_seed(1)
    a, b = torch.randn(8, 1024), torch.randn(8, 1024)
    values, index = product_key_topk(a, b, 16)
    full = (a.unsqueeze(2) + b.unsqueeze(1)).reshape(8, -1)
    ref_values, ref_index = full.topk(16, dim=-1)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(index, ref_index)  # random floats: no ties, topk's order is unambiguous


@pytest.mark.parametrize(
    "a,b,k,err,match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 3), 10, ValueError, r"k must be <= n \* n = 9"),
        (torch.zeros(2, 3), torch.zeros(2, 3), 0, ValueError, "k must be >= 1"),
        (torch.zeros(2, 3), torch.zeros(2, 3), 2.0, TypeError, "k must be an int"),
        (torch.zeros(2, 3), torch.zeros(2, 4), 2, ValueError, "same shape"),
        (torch.zeros(3), torch.zeros(3), 2, ValueError, "scores_a_TN must be a 2-D float"),
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(2, 3),
            2,
            ValueError,
            "scores_a_TN must be a 2-D float",
        ),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64), 2, ValueError, "share a dtype"),
        (torch.zeros(2, 0), torch.zeros(2, 0), 1, ValueError, "n >= 1"),
        ([[0.0]], torch.zeros(1, 1), 1, TypeError, "scores_a_TN must be a Tensor"),
    ],
)
def test_bad_inputs(a, b, k, err, match):
    with pytest.raises(err, match=match):
        product_key_topk(a, b, k)


@pytest.mark.parametrize("seed", range(8))
def test_wide_rows_with_ties_equal_brute_force(seed):
    """n much larger than k: each side's best are found without a full sort; with many ties (integer
    scores in {0, .., 3}) the order must still be (value descending, flat index ascending)."""
    g = torch.Generator().manual_seed(seed)
    n = 16 + 5 * seed
    k = 1 + seed % 6
    a = torch.randint(0, 4, (5, n), generator=g).double()
    b = torch.randint(0, 4, (5, n), generator=g).double()
    values, index = product_key_topk(a, b, k)
    ref_values, ref_index = brute_force(a, b, k)
    assert torch.equal(values, ref_values) and torch.equal(index, ref_index)


@pytest.mark.parametrize("n,c", [(64, 4), (50, 7), (9, 4), (1024, 16)])
def test_row_selection_equals_a_stable_sort(n, c):
    from moelab.routers.product_key import _sorted_desc, _top_desc

    g = torch.Generator().manual_seed(n + c)
    for scores in (torch.randn(33, n, generator=g), torch.randint(0, 3, (33, n), generator=g).float()):
        values, index = _top_desc(scores, c)
        ref_values, ref_index = _sorted_desc(scores)
        assert torch.equal(values, ref_values[:, :c]) and torch.equal(index, ref_index[:, :c])


def test_no_tokens_on_wide_rows():
    values, index = product_key_topk(torch.zeros(0, 64), torch.zeros(0, 64), 4)
    assert values.shape == (0, 4) and index.shape == (0, 4)


@pytest.mark.parametrize("ties", [False, True])
def test_subkey_topc_equals_dense_scores_forward_and_backward(ties):
    """PEER's per-side selection with its sparse backward against the dense scores written plainly:
    the best c of q . keys per (token, head), and gradients through the chosen scores only."""
    from moelab.routers.product_key import subkey_topc

    g = torch.Generator().manual_seed(3)
    t, h, n, d, c = 7, 3, 64, 5, 4
    q = torch.randn(t, h, d, generator=g, dtype=torch.float64)
    keys = torch.randn(h, n, d, generator=g, dtype=torch.float64)
    if ties:  # equal sub-keys make equal scores: ties broken by lower index, as the stable sort
        keys[:, 10:20] = keys[:, 30:31]
        q = q.round()
        keys = keys.round()
    q1, k1 = q.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    value, index = subkey_topc(q1, k1, c)
    q2, k2 = q.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    scores = torch.einsum("thd,hnd->thn", q2, k2)
    want_index = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[..., :c]
    assert torch.equal(index, want_index)
    want_value = scores.gather(-1, want_index)
    torch.testing.assert_close(value, want_value)
    grad = torch.randn(t, h, c, generator=g, dtype=torch.float64)
    (value * grad).sum().backward()
    (want_value * grad).sum().backward()
    torch.testing.assert_close(q1.grad, q2.grad)
    torch.testing.assert_close(k1.grad, k2.grad)
    with pytest.raises(ValueError, match="c must be"):
        subkey_topc(q, keys, n + 1)
    with pytest.raises(ValueError, match="q_THC"):
        subkey_topc(q[0], keys, c)
