"""``grouped_mm`` (native kernel and loop fallback) against one matmul per group."""

from __future__ import annotations

import pytest
import torch

from moelab.kernels.grouped_mm import can_use_grouped_mm, grouped_mm, grouped_mm_loop


def loop_reference(x, w, counts):
    """Row block ``e`` times ``w[e]``, one plain matmul per group, written out."""
    rows, start = [], 0
    for e, c in enumerate(counts):
        for r in range(start, start + c):
            rows.append(x[r] @ w[e])
        start += c
    return torch.stack(rows) if rows else x.new_zeros(0, w.shape[-1])


def _case(counts, k, m, dtype=torch.float32, transposed_w=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    x = torch.randn(n, k, generator=g).to(dtype).requires_grad_(True)
    if transposed_w:  # [E, M, K] stored, used as [E, K, M]: the bank's layout
        base = torch.randn(len(counts), m, k, generator=g).to(dtype).requires_grad_(True)
        w = base.transpose(1, 2)
    else:
        base = torch.randn(len(counts), k, m, generator=g).to(dtype).requires_grad_(True)
        w = base
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    return x, base, w, offs


@pytest.mark.parametrize(
    "counts,k,m,transposed",
    [
        ([3, 0, 5, 2], 8, 16, False),  # native-eligible, an empty group
        ([3, 0, 5, 2], 8, 16, True),
        ([0, 0, 4], 4, 4, True),
        ([4, 1, 0], 6, 5, True),  # 24-byte strides: loop fallback
        ([2, 2], 3, 7, False),
        ([1], 16, 8, True),
        ([0, 0, 0], 8, 8, True),  # no rows at all
    ],
)
def test_grouped_mm_matches_loop_forward_and_backward(counts, k, m, transposed):
    x, base, w, offs = _case(counts, k, m, transposed_w=transposed)
    y = grouped_mm(x, w, offs)
    ref = loop_reference(x.detach(), w.detach(), counts)
    assert y.shape == (sum(counts), m)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad((y * gy).sum(), [x, base], allow_unused=True)
    x2, base2, w2, _ = _case(counts, k, m, transposed_w=transposed)
    y2 = loop_reference(x2, w2, counts)
    if y2.requires_grad:
        gx2, gw2 = torch.autograd.grad((y2 * gy).sum(), [x2, base2], allow_unused=True)
    else:
        gx2, gw2 = None, None
    zx, zw = torch.zeros_like(x), torch.zeros_like(base)
    torch.testing.assert_close(
        gx if gx is not None else zx, gx2 if gx2 is not None else zx, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        gw if gw is not None else zw, gw2 if gw2 is not None else zw, rtol=1e-5, atol=1e-5
    )


def test_native_and_fallback_paths_are_both_exercised_and_agree():
    x, _, w, offs = _case([2, 3, 0, 1], 8, 8, transposed_w=True)
    assert can_use_grouped_mm(x, w)
    y_native = grouped_mm(x, w, offs)
    y_loop = grouped_mm_loop(x, w, [2, 3, 0, 1])
    torch.testing.assert_close(y_native, y_loop, rtol=1e-5, atol=1e-5)
    x6, _, w6, _ = _case([2, 3], 6, 6, transposed_w=True)
    assert not can_use_grouped_mm(x6, w6)  # 24-byte row stride


def test_can_use_grouped_mm_rules():
    x = torch.randn(4, 8)
    w = torch.randn(2, 8, 8)
    assert can_use_grouped_mm(x, w)
    assert not can_use_grouped_mm(x.double(), w.double())  # dtype not supported
    assert not can_use_grouped_mm(x, w.bfloat16())  # mismatched dtypes
    assert not can_use_grouped_mm(torch.randn(4, 5), torch.randn(2, 5, 8))  # 20-byte stride
    assert can_use_grouped_mm(x.bfloat16(), w.bfloat16())
    assert not can_use_grouped_mm(torch.randn(4, 4).bfloat16(), torch.randn(2, 4, 4).bfloat16())  # 8 bytes


def test_zero_stride_upstream_gradient():
    # y.sum() gives an expanded (stride-0) gradient, which the native kernel's backward rejects.
    x, base, w, offs = _case([2, 0, 3], 8, 8, transposed_w=True)
    assert can_use_grouped_mm(x, w)
    grouped_mm(x, w, offs).sum().backward()
    ref_gx = torch.stack([w.detach()[0].sum(-1)] * 2 + [w.detach()[2].sum(-1)] * 3)
    torch.testing.assert_close(x.grad, ref_gx, rtol=1e-5, atol=1e-5)
    assert base.grad[1].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    x, _, w, offs = _case([3, 1, 4], 8, 16, dtype=dtype, transposed_w=True)
    y = grouped_mm(x, w, offs)
    assert y.dtype == dtype
    ref = loop_reference(x.detach().double(), w.detach().double(), [3, 1, 4])
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-10
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol)


def test_unaligned_output_width_falls_back_so_backward_works():
    # K = 4 floats (16 bytes) is aligned, M = 6 (24 bytes) is not: the forward kernel would accept
    # it but its backward multiplies the [N, 6] output gradient and rejects the stride.
    x, base, w, offs = _case([2, 3], 4, 6, transposed_w=True)
    assert not can_use_grouped_mm(x, w)
    y = grouped_mm(x, w, offs)
    y.backward(torch.randn(5, 6))
    assert x.grad.shape == (5, 4) and base.grad.shape == (2, 6, 4)
