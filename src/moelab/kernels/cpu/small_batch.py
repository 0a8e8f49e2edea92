"""Inference path for small batches (decode): few ops, and GEMMs that read the weights at speed.

With ``T <= 16`` tokens most experts receive one to four rows, and the work is reading the
touched experts' weights once. Two things matter then: how close each skinny GEMM comes to the
memory bandwidth, and the number of ops issued (each costs microseconds, a lot next to a GEMM on
one row). In order of preference:

1. the skinny-GEMM kernel (``skinny.py``; fp32 and bf16 on CPUs with AVX-512) for experts whose
   rows fit its bound (``skinny.max_rows``: up to 8, fewer for long rows), PyTorch's GEMM for the
   others, each expert writing straight into one fp32 buffer; the activation, the combine weights
   and the scatter run once over all rows;
2. fp32 without the kernel: one oneDNN linear per expert (``gemm.linear``, 1.5-3x faster than
   MKL's skinny GEMM on our machine), the rest once over all rows;
3. anything else (bf16 without the kernel, other devices): the layer in nine ops, the two GEMMs
   as grouped GEMMs (``torch.nn.functional.grouped_mm``, whose loop over experts runs in C++).

Path 1 keeps the pre-activation and the expert outputs in fp32 for bf16 inputs (rounded once,
before the second GEMM and at the end), which is at least as accurate as the reference. It saves
nothing for a backward (it runs only when no gradient is needed), and its transient buffers grow
with ``N``, which is why the ``fast`` executor (``moelab.ops.fast``) uses it only below a size bound.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.activations import activation_forward
from moelab.core.routing import ExpertOrder
from moelab.kernels.cpu import skinny
from moelab.kernels.cpu.gemm import linear, uses_onednn
from moelab.kernels.grouped_mm import grouped_mm


def _per_expert(x_ND: Tensor, w_EMK: Tensor, counts_E: list[int]) -> Tensor:
    """Rows of expert ``e`` times ``w[e]^T``, one (oneDNN) linear per expert with rows."""
    parts, start = [], 0
    for e, c in enumerate(counts_E):
        if c:
            parts.append(linear(x_ND[start : start + c], w_EMK[e]))
        start += c
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _per_expert_skinny(x_ND: Tensor, w_EMK: Tensor, counts_E: list[int]) -> Tensor:
    """``[N, M] fp32``: the skinny kernel for experts with few rows, PyTorch's GEMM for the rest.

    Called with operands that passed :func:`_skinny_ok`; the kernel is addressed by raw pointers
    (row ``start`` of x, expert ``e`` of w) so an expert costs one foreign call and no tensor views.
    """
    n, (m_out, k) = x_ND.shape[0], w_EMK.shape[1:]
    out = torch.empty(n, m_out, dtype=torch.float32, device=x_ND.device)
    x_ND = x_ND.contiguous()
    el = x_ND.element_size()
    x_ptr, w_ptr, o_ptr = x_ND.data_ptr(), w_EMK.data_ptr(), out.data_ptr()
    max_rows = skinny.max_rows(k, x_ND.dtype)
    run, bf16, threads = skinny.raw_kernel(), int(x_ND.dtype == torch.bfloat16), torch.get_num_threads()
    start = 0
    for e, c in enumerate(counts_E):
        if 0 < c <= max_rows:
            rc = run(
                x_ptr + start * k * el,
                w_ptr + e * m_out * k * el,
                o_ptr + start * m_out * 4,
                c,
                m_out,
                k,
                bf16,
                threads,
            )
            if rc != 0:
                raise RuntimeError("skinny_linear declined operands _skinny_ok accepted")
        elif c:
            out[start : start + c] = linear(x_ND[start : start + c], w_EMK[e])
        start += c
    return out


def _skinny_ok(x_TD: Tensor, w_in_EHD: Tensor, w_down_EDH: Tensor) -> bool:
    if x_TD.device.type != "cpu" or not skinny.available(x_TD.dtype):
        return False
    step = 64 if x_TD.dtype == torch.bfloat16 else 32
    return (
        x_TD.shape[1] % step == 0
        and w_down_EDH.shape[-1] % step == 0
        and w_in_EHD.is_contiguous()
        and w_down_EDH.is_contiguous()
    )


def small_batch_forward(
    x_TD: Tensor,
    order: ExpertOrder,
    w_in_EHD: Tensor,
    w_down_EDH: Tensor,
    activation: str,
    counts_E: list[int] | None = None,
) -> Tensor:
    """``y [T, d_out]`` for expert-sorted assignments ``order``; no autograd bookkeeping."""
    y_TD = x_TD.new_zeros(x_TD.shape[0], w_down_EDH.shape[1])
    if order.token_index.shape[0] == 0:
        return y_TD
    x_ND = x_TD.index_select(0, order.token_index)
    if _skinny_ok(x_TD, w_in_EHD, w_down_EDH):
        counts = counts_E if counts_E is not None else order.counts.tolist()
        a_NH = activation_forward(_per_expert_skinny(x_ND, w_in_EHD, counts), activation)
        y_ND = _per_expert_skinny(a_NH.to(x_TD.dtype), w_down_EDH, counts)
        y_ND.mul_(order.weight.unsqueeze(1).to(torch.float32))
        return y_TD.index_add_(0, order.token_index, y_ND.to(x_TD.dtype))
    if uses_onednn(x_ND):
        counts = counts_E if counts_E is not None else order.counts.tolist()
        a_NH = activation_forward(_per_expert(x_ND, w_in_EHD, counts), activation)
        y_ND = _per_expert(a_NH, w_down_EDH, counts)
    else:
        h_in = grouped_mm(x_ND, w_in_EHD.transpose(1, 2), order.offsets, counts_E)
        a_NH = activation_forward(h_in, activation)
        del h_in
        y_ND = grouped_mm(a_NH, w_down_EDH.transpose(1, 2), order.offsets, counts_E)
    y_ND.mul_(order.weight.unsqueeze(1).to(y_ND.dtype))
    return y_TD.index_add_(0, order.token_index, y_ND)
