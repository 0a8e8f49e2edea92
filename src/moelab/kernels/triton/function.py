"""The ``triton`` executor's autograd Function: forward and backward of one MoE expert layer.

Forward (3 launches, plus the ``top_k`` reshape-sum or an ``index_add`` for the combine):

1. ``a [N, h] = act(x[tok] @ W_in[e].T)`` (``_up_kernel``: gather-in, gate and up fused);
2. ``y_rows[perm[j]] = w[j] * a[j] @ W_down[e].T`` (``_s2s_kernel``: scatter-out, weight in the
   epilogue);
3. ``y [T, d] = sum of a token's rows``.

Saved for backward: ``x`` and the weights (which exist anyway), the pre-activation ``[N, 2h]``
(``[N, h]`` for non-gated banks), the sorted token index, ``perm``, counts/offsets and the sorted
combine weight. No ``[N, d]`` gather or output copy is kept.

Backward (4 launches):

1. ``_down_bwd_kernel``: ``g = gy[tok] @ W_down[e]`` (gather-in), then the activation backward
   gives ``dh [N, 2h]``, ``aw = w * a [N, h]`` and the combine weight's gradient
   ``dw[j] = <g[j], a[j]>`` (a row-wise dot product);
2. ``dW_in[e] = dh_e^T x[tok_e]`` and ``dW_down[e] = gy[tok_e]^T aw_e`` (``_wgrad_kernel``, the
   token-indexed operand gathered in-kernel);
3. ``dx_rows[perm[j]] = dh[j] @ W_in[e]`` (``_s2s_kernel``), then the same combine as forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.activations import get_activation
from moelab.kernels.triton import kernels as K


def _sum_rows(rows_ND: Tensor, tok_N: Tensor, num_tokens: int, top_k: int | None) -> Tensor:
    """``[T, d]``: sum each token's rows. ``top_k``: rows are token-major (written through ``perm``)."""
    d = rows_ND.shape[1]
    if top_k is not None:
        return rows_ND.view(num_tokens, top_k, d).sum(1)
    # Rows are in sorted order; accumulate in fp32 so bf16 tokens with many experts round once.
    acc = rows_ND.new_zeros(num_tokens, d, dtype=torch.float32)
    return acc.index_add_(0, tok_N, rows_ND.float()).to(rows_ND.dtype)


class TritonMoEFunction(torch.autograd.Function):
    """``y = sum over assignments j of w[j] * expert_{e(j)}(x[tok[j]])``, with the Triton kernels."""

    @staticmethod
    def forward(
        ctx,
        x_TD: Tensor,
        weight_N: Tensor,
        w_in_ERD: Tensor,
        w_down_EDH: Tensor,
        tok_N: Tensor,
        perm_N: Tensor,
        counts_E: Tensor,
        offsets_E: Tensor,
        top_k: int | None,
        activation: str,
        save_pre: bool,
    ) -> Tensor:
        spec = get_activation(activation)
        act, gated = spec.base, spec.gated
        t, d = x_TD.shape
        n = tok_N.shape[0]
        ctx.meta = (t, top_k, act, gated)
        if n == 0:
            ctx.save_for_backward(x_TD, w_in_ERD, w_down_EDH)
            ctx.empty = True
            return x_TD.new_zeros(t, w_down_EDH.shape[1])
        ctx.empty = False
        # ``save_pre`` is decided by the caller: inside forward grad mode is always off and
        # needs_input_grad ignores an outer no_grad, so neither says whether backward will come.
        a_NH, pre_NR = K.up_proj(x_TD, tok_N, w_in_ERD, counts_E, offsets_E, act, gated, save_pre)
        # Token-major routings scatter to perm (then a reshape-sum); others stay sorted (index_add).
        out_idx = perm_N if top_k is not None else None
        y_rows = K.scatter2scatter(
            a_NH, w_down_EDH, counts_E, offsets_E, n, out_idx_N=out_idx, scale_N=weight_N, num_rows=n
        )
        del a_NH
        if save_pre:
            ctx.save_for_backward(
                x_TD, weight_N, w_in_ERD, w_down_EDH, tok_N, perm_N, counts_E, offsets_E, pre_NR
            )
        return _sum_rows(y_rows, tok_N, t, top_k)

    @staticmethod
    def backward(ctx, gy_TD: Tensor):
        need_x, need_w, need_in, need_down = ctx.needs_input_grad[:4]
        if ctx.empty:
            x_TD, w_in, w_down = ctx.saved_tensors
            return (
                torch.zeros_like(x_TD) if need_x else None,
                None,  # an empty weight has no entries to differentiate
                torch.zeros_like(w_in) if need_in else None,
                torch.zeros_like(w_down) if need_down else None,
                *([None] * 7),
            )
        x_TD, weight_N, w_in, w_down, tok_N, perm_N, counts_E, offsets_E, pre_NR = ctx.saved_tensors
        t, top_k, act, gated = ctx.meta
        n = tok_N.shape[0]
        # The kernels read any strides, including the zero strides of an expanded gradient.
        dh_NR, aw_NH, dweight_N = K.down_bwd(
            gy_TD, tok_N, w_down, pre_NR, weight_N, counts_E, offsets_E, act, gated
        )
        dx = dweight = d_in = d_down = None
        if need_w:
            dweight = dweight_N.to(weight_N.dtype)
        if need_in:
            d_in = K.grouped_wgrad(
                dh_NR, x_TD, offsets_E, tok_N, gather_a=False, gather_b=True, out_dtype=w_in.dtype
            )
        if need_down:
            d_down = K.grouped_wgrad(
                gy_TD, aw_NH, offsets_E, tok_N, gather_a=True, gather_b=False, out_dtype=w_down.dtype
            )
        if need_x:
            # dh [N, R] @ W_in[e] [R, d]: W_in viewed as [E, d, R] through its strides, no copy.
            out_idx = perm_N if top_k is not None else None
            dx_rows = K.scatter2scatter(
                dh_NR, w_in.transpose(1, 2), counts_E, offsets_E, n, out_idx_N=out_idx, num_rows=n
            )
            dx = _sum_rows(dx_rows, tok_N, t, top_k)
        return dx, dweight, d_in, d_down, *([None] * 7)
