"""The ``fused`` path of backend ``fast``: gather, expert MLP and weighted scatter, one expert at a time.

The ``sorted`` backend materialises ``x_sorted [N, d]``, ``h_in [N, 2h]``, ``act [N, h]`` and
``y_sorted [N, d]`` and lets autograd keep most of them for the backward. Here each expert's rows
go through the whole MLP before the next expert starts, and a custom autograd Function keeps only
what the backward cannot cheaply rebuild (MegaBlocks, Gale et al. 2023, and ScatterMoE, Tan et
al. 2024, make the same trade on GPU):

- saved: the input ``x [T, d]`` (no copy: it is the caller's tensor), the sorted token indices,
  the sorted combine weights and the pre-activation ``h_in`` (``[N, 2h]`` in all, one tensor per
  segment);
- rebuilt in the backward: the gathered rows ``x[tok]`` (a gather), the activation ``a [n, h]``
  (element-wise, from ``h_in``);
- never materialised at all: ``x_sorted``, ``y_sorted``, the weighted copy of either.

The gradient of a combine weight is ``dL/dw_n = <dy[t_n], a_n W_down^T> = <dy[t_n] W_down, a_n>``:
the backward computes ``dy[t_n] W_down`` anyway, so the router's gradient costs one row-wise
dot product and no saved ``y_sorted``.

Rows are processed in segments of at most ``max_rows`` (an expert with more rows is split), so
the transient buffers stay bounded whatever the routing's skew; the saved ``h_in`` is the only
``O(N h)`` tensor that lives across forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from moelab.core.activations import activation_backward, activation_forward
from moelab.kernels.cpu.gemm import linear

# Most rows per GEMM segment: bounds the per-segment buffers whatever the routing's skew, while
# GEMMs of >= 1024 rows run at full speed on CPU; our choice, measured in bench/.
DEFAULT_MAX_ROWS = 2048


def segments(counts_E: list[int], max_rows: int = DEFAULT_MAX_ROWS) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` row ranges of the expert-sorted assignments.

    An expert with more than ``max_rows`` rows is cut into equal pieces (never a tiny remainder:
    a GEMM of a few rows runs at a fraction of the speed of a full one).
    """
    out = []
    start = 0
    for e, c in enumerate(counts_E):
        pieces = max(1, -(-c // max_rows))
        step = -(-c // pieces) if c else 0
        for s in range(start, start + c, max(step, 1)):
            out.append((e, s, min(s + step, start + c)))
        start += c
    return out


def fused_forward(
    x_TD: Tensor,
    token_N: Tensor,
    weight_N: Tensor,
    w_in_EHD: Tensor,
    w_down_EDH: Tensor,
    counts_E: list[int],
    activation: str,
    *,
    save_hidden: bool,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> tuple[Tensor, list[Tensor] | None]:
    """``y [T, d_out] = sum_n weight_n * expert_{e_n}(x[token_n])`` over expert-sorted assignments.

    Args:
        x_TD: ``[T, d]`` tokens.
        token_N, weight_N: ``[N]`` token index and combine weight of each assignment, sorted by
            expert (``Routing.by_expert()``).
        w_in_EHD: ``[E, 2h or h, d]`` input projection (gate rows then up rows when gated).
        w_down_EDH: ``[E, d_out, h]`` output projection.
        counts_E: assignments per expert (Python ints: the loop needs them on the host).
        activation: a ``moelab.core.activations`` name.
        save_hidden: also return the pre-activation ``h_in`` of every segment (together
            ``[N, 2h or h]``, in :func:`segments` order) for the backward.

    Returns ``(y, [h_in per segment] or None)``.
    """
    t, d = x_TD.shape
    d_out, h = w_down_EDH.shape[1:]
    y_TD = x_TD.new_zeros(t, d_out)
    saved: list[Tensor] | None = [] if save_hidden else None
    # Scale whichever of a [n, h] or y [n, d_out] is narrower by the combine weight: same product.
    scale_act = h < d_out
    for e, s, end in segments(counts_E, max_rows):
        tok = token_N[s:end]
        w = weight_N[s:end].unsqueeze(1).to(x_TD.dtype)
        h_e = linear(x_TD.index_select(0, tok), w_in_EHD[e])
        if saved is not None:
            saved.append(h_e)
        a_e = activation_forward(h_e, activation)
        del h_e
        if scale_act:
            a_e.mul_(w)
        y_e = linear(a_e, w_down_EDH[e])
        if not scale_act:
            y_e.mul_(w)
        y_TD.index_add_(0, tok, y_e)
    return y_TD, saved


def fused_backward(
    grad_y_TD: Tensor,
    x_TD: Tensor,
    token_N: Tensor,
    weight_N: Tensor,
    w_in_EHD: Tensor,
    w_down_EDH: Tensor,
    h_in: list[Tensor],
    counts_E: list[int],
    activation: str,
    needs: tuple[bool, bool, bool, bool],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx [T, d], dweight [N], dw_in [E, 2h, d], dw_down [E, d, h])``.

    ``h_in`` is what :func:`fused_forward` saved (one tensor per segment). ``needs`` says which
    of the four gradients are wanted (the others come back as None and cost nothing). Per segment
    of expert ``e`` with rows ``x_e``, pre-activation ``h_e`` and activation ``a_e``:

        g_e      = dy[tok] @ W_down[e]            (gradient of a_e before the weight)
        dweight  = rowsum(g_e * a_e)
        dW_down += (w * dy[tok])^T @ a_e
        dh_e     = act'(h_e, w * g_e)
        dW_in   += dh_e^T @ x_e
        dx[tok] += dh_e @ W_in[e]
    """
    need_x, need_w, need_in, need_down = needs
    dtype = x_TD.dtype
    grad_x = torch.zeros_like(x_TD) if need_x else None
    grad_w = weight_N.new_empty(weight_N.shape) if need_w else None
    grad_in = torch.empty_like(w_in_EHD) if need_in else None
    grad_down = torch.empty_like(w_down_EDH) if need_down else None
    seen = set()
    for (e, s, end), h_e in zip(segments(counts_E, max_rows), h_in, strict=True):
        first = e not in seen
        seen.add(e)
        tok = token_N[s:end]
        w = weight_N[s:end].unsqueeze(1).to(dtype)
        dy_e = grad_y_TD.index_select(0, tok)
        g_e = linear(dy_e, w_down_EDH[e].t())
        if need_w or need_down:
            a_e = activation_forward(h_e, activation)
            if need_down:
                dy_e.mul_(w)
                if first:
                    torch.mm(dy_e.t(), a_e, out=grad_down[e])
                else:
                    grad_down[e].addmm_(dy_e.t(), a_e)
            if need_w:
                grad_w[s:end] = a_e.mul_(g_e).sum(1).to(grad_w.dtype)
            del a_e
        del dy_e
        if not (need_x or need_in):
            continue
        g_e.mul_(w)
        dh_e = activation_backward(h_e, g_e, activation)
        del g_e
        if need_in:
            x_e = x_TD.index_select(0, tok)
            if first:
                torch.mm(dh_e.t(), x_e, out=grad_in[e])
            else:
                grad_in[e].addmm_(dh_e.t(), x_e)
            del x_e
        if need_x:
            grad_x.index_add_(0, tok, linear(dh_e, w_in_EHD[e].t()))
    # Experts that received no rows have zero weight gradients.
    for e, c in enumerate(counts_E):
        if c == 0:
            if grad_in is not None:
                grad_in[e].zero_()
            if grad_down is not None:
                grad_down[e].zero_()
    return grad_x, grad_w, grad_in, grad_down


class FusedExperts(torch.autograd.Function):
    """Autograd wrapper of :func:`fused_forward` / :func:`fused_backward` (saves ``h_in`` only)."""

    @staticmethod
    def forward(ctx, x_TD, weight_N, w_in_EHD, w_down_EDH, token_N, counts_E, activation, max_rows):
        y_TD, h_in = fused_forward(
            x_TD, token_N, weight_N, w_in_EHD, w_down_EDH, counts_E, activation,
            save_hidden=True, max_rows=max_rows,
        )  # fmt: skip
        ctx.save_for_backward(x_TD, weight_N, w_in_EHD, w_down_EDH, token_N, *h_in)
        ctx.counts_E, ctx.activation, ctx.max_rows = counts_E, activation, max_rows
        return y_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_TD):
        x_TD, weight_N, w_in_EHD, w_down_EDH, token_N, *h_in = ctx.saved_tensors
        grads = fused_backward(
            grad_y_TD, x_TD, token_N, weight_N, w_in_EHD, w_down_EDH, h_in, ctx.counts_E,
            ctx.activation, tuple(ctx.needs_input_grad[:4]), max_rows=ctx.max_rows,
        )  # fmt: skip
        return (*grads, None, None, None, None)
