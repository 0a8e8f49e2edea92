"""Grouped GEMM over expert-sorted rows: ``y[rows of e] = x[rows of e] @ w[e]``.

Uses ``torch.nn.functional.grouped_mm`` when the device, dtype and strides allow it, and a plain
loop over experts otherwise. Both are differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _contiguous_grad(g: Tensor) -> Tensor:
    # grouped_mm's backward rejects zero-stride gradients (e.g. from ``y.sum()``).
    return g.contiguous()


def can_use_grouped_mm(x_NK: Tensor, w_EKM: Tensor) -> bool:
    """Whether the native kernel accepts these operands (dtype, device, 16-byte strides)."""
    if _GROUPED_MM is None or x_NK.dtype != w_EKM.dtype or x_NK.dtype not in _GROUPED_DTYPES:
        return False
    if x_NK.device.type == "cuda":
        if x_NK.dtype == torch.float32 or torch.cuda.get_device_capability(x_NK.device) < (8, 0):
            return False
    elif x_NK.device.type != "cpu":
        return False
    size = x_NK.element_size()
    # Size-1 dims count too: the kernel checks a one-row x's row stride (seen with d=3, N=1).
    strides = [*x_NK.stride(), *w_EKM.stride()]
    if any((s * size) % 16 for s in strides if s != 1):
        return False
    # The backward multiplies the [N, M] output gradient: its rows must be 16-byte aligned too.
    if (w_EKM.shape[-1] * size) % 16:
        return False
    if x_NK.data_ptr() % 16 or w_EKM.data_ptr() % 16:
        return False
    # One of the two inner dims of each operand must be unit-stride (row- or column-major).
    return x_NK.stride(-1) == 1 and 1 in w_EKM.stride()[-2:]


def grouped_mm_loop(x_NK: Tensor, w_EKM: Tensor, counts_E: list[int]) -> Tensor:
    """The readable fallback: one ``mm`` per expert with rows."""
    outs = []
    start = 0
    for e, c in enumerate(counts_E):
        if c:
            outs.append(x_NK[start : start + c] @ w_EKM[e])
        start += c
    if not outs:
        # No rows: an empty product keeps the result connected to the graph (zero gradients).
        return x_NK @ w_EKM[0]
    return torch.cat(outs, 0) if len(outs) > 1 else outs[0]


def grouped_mm(x_NK: Tensor, w_EKM: Tensor, offsets_E: Tensor, counts_E: list[int] | None = None) -> Tensor:
    """``[N, M]``: rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``w[e]`` (``[E, K, M]``, any strides).

    ``offsets_E`` is int32 cumulative row ends and must end at ``N``. ``counts_E`` (a Python list)
    saves a device sync when the caller already has it (loop fallback only).
    """
    n = x_NK.shape[0]
    if n and can_use_grouped_mm(x_NK, w_EKM):
        y = _GROUPED_MM(x_NK, w_EKM, offs=offsets_E)
        if y.requires_grad:
            y.register_hook(_contiguous_grad)
        return y
    if counts_E is None:
        counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
    return grouped_mm_loop(x_NK, w_EKM, counts_E)
