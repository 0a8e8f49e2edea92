"""Triton kernels for the ``triton`` backend: scatter2scatter grouped GEMMs and a grouped weight gradient.

Design after ScatterMoE (Tan et al. 2024, "Scattered Mixture-of-Experts Implementation"): rows are
never gathered into a padded ``[E, C, d]`` buffer. Each program takes one block of *expert-sorted*
assignments of one expert, reads the input rows it needs straight from their source (through the
token index, "gather in"), runs the GEMM against that expert's weight tile, and writes each output
row either in sorted order or straight to its unsorted position (``perm``, "scatter out").

Kernels (all accumulate in fp32):

- ``_up_kernel``: ``a[j] = act(x[tok[j]] @ W_in[e].T)``; gated banks run the gate and up tiles of
  the fused ``[E, 2h, d]`` weight against the same ``x`` tile (two accumulators) and apply
  ``act(gate) * up`` in the epilogue. Optionally stores the pre-activation for backward.
- ``_s2s_kernel``: the generic scatter2scatter GEMM ``out[o(j)] = s[j] * (in[i(j)] @ W[e].T)`` with
  optional gather-in, scatter-out and per-row scale. Forward down projection (scale = combine
  weight, scatter to ``perm``) and backward input gradient (``dh @ W_in[e]``).
- ``_down_bwd_kernel``: ``g[j] = gy[tok[j]] @ W_down[e]`` gathered from the output gradient, fused
  with the activation's backward and the row-wise dot product that is the combine weight's
  gradient (``dw[j] = <g[j], a[j]>``; ``a`` is recomputed from the saved pre-activation).
- ``_wgrad_kernel``: the grouped weight gradient ``dW[e] = A_e.T @ B_e`` over the rows of expert
  ``e``, with either operand optionally gathered through the token index.

Block scheduling needs no host sync: every program recomputes, from the ``[E]`` counts, how many
``BLOCK_M`` row blocks each expert has (a cumulative sum over a ``[E_P2]`` vector) and finds its own
expert. The grid is the upper bound ``cdiv(N, BLOCK_M) + E``; programs past the last block exit.

``TRITON_INTERPRET=1`` must be set before this module is imported to run on CPU tensors; the
kernels are then decorated as interpreted functions. The interpreter's ``tl.dot`` mishandles
bfloat16 operands (it multiplies their raw uint16 storage), so under the interpreter operands are
upcast to fp32 first (``UPCAST``): bf16 x bf16 products are exact in fp32, so the math is the same
as the tensor-core path.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Activation ids (constexpr): 0 silu, 1 gelu (erf form, as F.gelu), 2 relu.
ACT_IDS = {"silu": 0, "gelu": 1, "relu": 2}

# Smallest N tile of ``_down_bwd_kernel``: sizes the buffer of per-tile partial row dots.
_MIN_BLOCK_H = 16


# ---------------------------------------------------------------------------- configs
def _configs(shapes: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)`` tuples; one small tile when interpreting."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


# Candidate tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) for H100-class GPUs: our choice,
# autotuned per shape at the first call. Each list keeps the configurations that ptxas compiles
# for sm_90 with no or little register spilling (checked offline, see docs/methods/triton.md).
_GEMM_TILES = [
    (128, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 5),
]
# The gated up kernel keeps two accumulators, the backward one a wide epilogue: narrow N tiles.
_UP_TILES = [
    (128, 64, 64, 8, 3),
    (128, 64, 32, 8, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 4),
]
_WGRAD_TILES = [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (128, 64, 64, 8, 3),
    (64, 64, 64, 4, 4),
]


# ---------------------------------------------------------------------------- device helpers
@triton.jit
def _expert_block(pid, counts_ptr, offsets_ptr, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Map a program id to (expert, first sorted row, end of the expert's rows).

    Experts own ``cdiv(count_e, BLOCK_M)`` consecutive program ids, in expert order. An id past
    the last block yields ``e == E`` (the caller skips it).
    """
    e_ids = tl.arange(0, E_P2)
    counts = tl.load(counts_ptr + e_ids, mask=e_ids < E, other=0).to(tl.int32)
    nblocks = (counts + BLOCK_M - 1) // BLOCK_M
    before = tl.cumsum(nblocks, 0) <= pid  # experts whose blocks all come before this program
    e = tl.sum(before.to(tl.int32), 0)
    first_block = tl.sum(tl.where(before, nblocks, 0), 0)
    e_safe = tl.minimum(e, E - 1)
    rows_end = tl.load(offsets_ptr + e_safe).to(tl.int32)
    rows_start = rows_end - tl.load(counts_ptr + e_safe).to(tl.int32)
    row0 = rows_start + (pid - first_block) * BLOCK_M
    return e, row0, rows_end


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        y = z * tl.sigmoid(z)
    elif ACT == 1:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        y = tl.maximum(z, 0.0)
    return y


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """d act / dz."""
    if ACT == 0:
        s = tl.sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        g = (z > 0).to(tl.float32)
    return g


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _up_kernel(
    X, stride_xt, stride_xd,  # [T, D]
    TOK,  # [N] sorted token index
    W, stride_we, stride_wr, stride_wd,  # [E, R, D], R = 2H (gated) or H
    A, stride_an, stride_ah,  # [N, H] out: activated
    HPRE, stride_pn, stride_pr,  # [N, R] out: pre-activation (SAVE_PRE)
    COUNTS, OFFSETS, E, H, D,
    E_P2: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    e, row0, rows_end = _expert_block(tl.program_id(0), COUNTS, OFFSETS, E, E_P2, BLOCK_M)
    if e < E:
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < rows_end
        rows64 = rows.to(tl.int64)
        tok = tl.load(TOK + rows64, mask=row_ok, other=0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        w_base = W + e.to(tl.int64) * stride_we
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            # Gather in: rows of x come straight from their token, never through a copy.
            x = tl.load(
                X + tok[:, None] * stride_xt + ks[None, :] * stride_xd,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            wmask = k_ok[:, None] & col_ok[None, :]
            w_g = tl.load(w_base + cols[None, :] * stride_wr + ks[:, None] * stride_wd, mask=wmask, other=0.0)
            if UPCAST:  # see the module docstring: the interpreter's dot mishandles bf16
                x = x.to(tl.float32)
                w_g = w_g.to(tl.float32)
            acc_g = tl.dot(x, w_g, acc_g, input_precision=PRECISION)
            if GATED:
                w_u = tl.load(
                    w_base + (cols + H)[None, :] * stride_wr + ks[:, None] * stride_wd, mask=wmask, other=0.0
                )
                if UPCAST:
                    w_u = w_u.to(tl.float32)
                acc_u = tl.dot(x, w_u, acc_u, input_precision=PRECISION)
        omask = row_ok[:, None] & col_ok[None, :]
        if SAVE_PRE:
            p_ptr = HPRE + rows64[:, None] * stride_pn + cols[None, :] * stride_pr
            tl.store(p_ptr, acc_g.to(HPRE.dtype.element_ty), mask=omask)
            if GATED:
                tl.store(p_ptr + H * stride_pr, acc_u.to(HPRE.dtype.element_ty), mask=omask)
        a = _act(acc_g, ACT)
        if GATED:
            a = a * acc_u
        tl.store(
            A + rows64[:, None] * stride_an + cols[None, :] * stride_ah, a.to(A.dtype.element_ty), mask=omask
        )


@triton.jit
def _s2s_kernel(
    IN, stride_in, stride_ik,  # [*, K]
    IN_IDX,  # [N] row of IN for sorted row j (GATHER_IN), else row j
    W, stride_we, stride_wn, stride_wk,  # W[e] is [NOUT, K] through these strides
    OUT, stride_on, stride_oc,  # [*, NOUT]
    OUT_IDX,  # [N] row of OUT for sorted row j (SCATTER_OUT), else row j
    SCALE,  # [N] per-row factor (HAS_SCALE), applied in fp32
    COUNTS, OFFSETS, E, NOUT, K,
    E_P2: tl.constexpr, GATHER_IN: tl.constexpr, SCATTER_OUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    e, row0, rows_end = _expert_block(tl.program_id(0), COUNTS, OFFSETS, E, E_P2, BLOCK_M)
    if e < E:
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < rows_end
        rows64 = rows.to(tl.int64)
        if GATHER_IN:
            in_rows = tl.load(IN_IDX + rows64, mask=row_ok, other=0)
        else:
            in_rows = rows64
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < NOUT
        w_base = W + e.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(
                IN + in_rows[:, None] * stride_in + ks[None, :] * stride_ik,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_base + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_SCALE:
            s = tl.load(SCALE + rows64, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * s[:, None]
        if SCATTER_OUT:
            out_rows = tl.load(OUT_IDX + rows64, mask=row_ok, other=0)
        else:
            out_rows = rows64
        tl.store(
            OUT + out_rows[:, None] * stride_on + cols[None, :] * stride_oc,
            acc.to(OUT.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


@triton.jit
def _down_bwd_kernel(
    GY, stride_gt, stride_gd,  # [T, D] gradient of the layer output
    TOK,  # [N] sorted token index
    W, stride_we, stride_wd, stride_wh,  # W_down [E, D, H]
    HPRE, stride_pn, stride_pr,  # [N, R] saved pre-activation
    WEIGHT,  # [N] sorted combine weight
    DH, stride_dn, stride_dr,  # [N, R] out: gradient of the pre-activation (weighted)
    AW, stride_an, stride_ah,  # [N, H] out: weight * act, the down projection's GEMM operand
    DWP, stride_qn, stride_qt,  # [N, >= cdiv(H, BLOCK_N)] fp32 out: partial row dots per H tile
    COUNTS, OFFSETS, E, H, D,
    E_P2: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    e, row0, rows_end = _expert_block(tl.program_id(0), COUNTS, OFFSETS, E, E_P2, BLOCK_M)
    if e < E:
        pid_n = tl.program_id(1)
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < rows_end
        rows64 = rows.to(tl.int64)
        tok = tl.load(TOK + rows64, mask=row_ok, other=0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        w_base = W + e.to(tl.int64) * stride_we
        # g = gy[tok] @ W_down[e]: the gradient of the unweighted expert activation.
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            gy = tl.load(
                GY + tok[:, None] * stride_gt + ks[None, :] * stride_gd,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_base + ks[:, None] * stride_wd + cols[None, :] * stride_wh,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                gy = gy.to(tl.float32)
                w = w.to(tl.float32)
            g = tl.dot(gy, w, g, input_precision=PRECISION)
        omask = row_ok[:, None] & col_ok[None, :]
        p_ptr = HPRE + rows64[:, None] * stride_pn + cols[None, :] * stride_pr
        z = tl.load(p_ptr, mask=omask, other=0.0).to(tl.float32)
        act = _act(z, ACT)
        dact = _act_grad(z, ACT)
        if GATED:
            up = tl.load(p_ptr + H * stride_pr, mask=omask, other=0.0).to(tl.float32)
            a = act * up
        else:
            a = act
        # The combine weight's gradient: <gy[tok], y_e(x)> = <gy[tok] @ W_down, a>, summed over H.
        part = tl.sum(tl.where(omask, g * a, 0.0), 1)
        tl.store(DWP + rows64 * stride_qn + pid_n * stride_qt, part, mask=row_ok)
        wrow = tl.load(WEIGHT + rows64, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(
            AW + rows64[:, None] * stride_an + cols[None, :] * stride_ah,
            (a * wrow[:, None]).to(AW.dtype.element_ty),
            mask=omask,
        )
        ga = g * wrow[:, None]
        d_ptr = DH + rows64[:, None] * stride_dn + cols[None, :] * stride_dr
        if GATED:
            tl.store(d_ptr, (ga * up * dact).to(DH.dtype.element_ty), mask=omask)
            tl.store(d_ptr + H * stride_dr, (ga * act).to(DH.dtype.element_ty), mask=omask)
        else:
            tl.store(d_ptr, (ga * dact).to(DH.dtype.element_ty), mask=omask)


@triton.jit
def _wgrad_kernel(
    A, stride_an, stride_ap,  # [*, P]
    B, stride_bn, stride_bq,  # [*, Q]
    TOK,  # [N] sorted token index, for the gathered operand
    OFFSETS,  # [E] int32 cumulative row ends
    DW, stride_de, stride_dp, stride_dq,  # [E, P, Q] out
    P, Q,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``dW[e] = sum over rows j of e of A[j]^T B[j]``; BLOCK_M tiles P, BLOCK_N tiles Q, BLOCK_K rows."""
    e = tl.program_id(0)
    num_q = tl.cdiv(Q, BLOCK_N)
    pid_p = tl.program_id(1) // num_q
    pid_q = tl.program_id(1) % num_q
    end = tl.load(OFFSETS + e).to(tl.int32)
    start = tl.load(OFFSETS + e - 1, mask=e > 0, other=0).to(tl.int32)
    ps = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    qs = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    p_ok = ps < P
    q_ok = qs < Q
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < end
        rows64 = rows.to(tl.int64)
        if GATHER_A or GATHER_B:
            tok = tl.load(TOK + rows64, mask=r_ok, other=0)
        if GATHER_A:
            a_rows = tok
        else:
            a_rows = rows64
        if GATHER_B:
            b_rows = tok
        else:
            b_rows = rows64
        # A^T tile [BLOCK_M, BLOCK_K], loaded transposed.
        a_t = tl.load(
            A + a_rows[None, :] * stride_an + ps[:, None] * stride_ap,
            mask=p_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            B + b_rows[:, None] * stride_bn + qs[None, :] * stride_bq,
            mask=r_ok[:, None] & q_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a_t = a_t.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a_t, b, acc, input_precision=PRECISION)
    tl.store(
        DW + e.to(tl.int64) * stride_de + ps[:, None] * stride_dp + qs[None, :] * stride_dq,
        acc.to(DW.dtype.element_ty),
        mask=p_ok[:, None] & q_ok[None, :],
    )


_up = triton.autotune(_configs(_UP_TILES), key=["H", "D", "GATED"])(_up_kernel)
_s2s = triton.autotune(_configs(_GEMM_TILES), key=["NOUT", "K", "GATHER_IN", "SCATTER_OUT"])(_s2s_kernel)
_down_bwd = triton.autotune(_configs(_UP_TILES), key=["H", "D", "GATED"], reset_to_zero=["DWP"])(
    _down_bwd_kernel
)
_wgrad = triton.autotune(_configs(_WGRAD_TILES), key=["P", "Q", "GATHER_A", "GATHER_B"])(_wgrad_kernel)


# ---------------------------------------------------------------------------- launchers
def _dot_flags(dtype: torch.dtype) -> dict:
    # fp32 stays IEEE unless the user allowed TF32 for matmuls (torch's default is off).
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": INTERPRET, "PRECISION": "tf32" if tf32 else "ieee"}


def _row_grid(n: int, e: int, ncols: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]) + e, triton.cdiv(ncols, meta["BLOCK_N"]))


def up_proj(
    x_TD: Tensor,
    tok_N: Tensor,
    w_in_ERD: Tensor,
    counts_E: Tensor,
    offsets_E: Tensor,
    act: str,
    gated: bool,
    save_pre: bool,
) -> tuple[Tensor, Tensor | None]:
    """``a [N, H] = act(x[tok] @ W_in[e].T)`` (gated: ``act(gate) * up``), and the pre-activation ``[N, R]``."""
    n, (e, r, d) = tok_N.shape[0], w_in_ERD.shape
    h = r // 2 if gated else r
    a_NH = x_TD.new_empty(n, h)
    pre_NR = x_TD.new_empty(n, r) if save_pre else a_NH
    _up[_row_grid(n, e, h)](
        x_TD, *x_TD.stride(), tok_N, w_in_ERD, *w_in_ERD.stride(), a_NH, *a_NH.stride(),
        pre_NR, pre_NR.stride(0), pre_NR.stride(1), counts_E, offsets_E, e, h, d,
        E_P2=triton.next_power_of_2(e), GATED=gated, ACT=ACT_IDS[act], SAVE_PRE=save_pre,
        **_dot_flags(x_TD.dtype),
    )  # fmt: skip
    return a_NH, (pre_NR if save_pre else None)


def scatter2scatter(
    in_xK: Tensor,
    w_EnK: Tensor,
    counts_E: Tensor,
    offsets_E: Tensor,
    out_rows: int,
    *,
    in_idx_N: Tensor | None = None,
    out_idx_N: Tensor | None = None,
    scale_N: Tensor | None = None,
    num_rows: int,
) -> Tensor:
    """``out[o(j)] = scale[j] * in[i(j)] @ W[e(j)].T`` for the ``num_rows`` expert-sorted rows ``j``.

    ``W`` is any ``[E, NOUT, K]`` view (strides are honoured, so a transposed weight needs no
    copy); ``i = in_idx`` or the identity, ``o = out_idx`` or the identity. Returns ``[out_rows, NOUT]``.
    """
    e, nout, k = w_EnK.shape
    out = in_xK.new_empty(out_rows, nout)
    dummy = counts_E
    _s2s[_row_grid(num_rows, e, nout)](
        in_xK, *in_xK.stride(), in_idx_N if in_idx_N is not None else dummy,
        w_EnK, *w_EnK.stride(), out, *out.stride(),
        out_idx_N if out_idx_N is not None else dummy, scale_N if scale_N is not None else dummy,
        counts_E, offsets_E, e, nout, k,
        E_P2=triton.next_power_of_2(e), GATHER_IN=in_idx_N is not None, SCATTER_OUT=out_idx_N is not None,
        HAS_SCALE=scale_N is not None, **_dot_flags(in_xK.dtype),
    )  # fmt: skip
    return out


def down_bwd(
    gy_TD: Tensor,
    tok_N: Tensor,
    w_down_EDH: Tensor,
    pre_NR: Tensor,
    weight_N: Tensor,
    counts_E: Tensor,
    offsets_E: Tensor,
    act: str,
    gated: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward through combine, the down projection and the activation.

    Returns ``dh [N, R]`` (gradient of the pre-activation, combine weight applied), ``aw [N, H]``
    (``weight * a``, the down projection's weight-gradient operand) and ``dweight [N]`` (fp32).
    """
    n, r = pre_NR.shape
    e, d, h = w_down_EDH.shape
    dh_NR = pre_NR.new_empty(n, r)
    aw_NH = pre_NR.new_empty(n, h)
    # One column per H tile; sized for the smallest tile so any autotuned config fits.
    parts_NP = torch.zeros(n, triton.cdiv(h, _MIN_BLOCK_H), dtype=torch.float32, device=pre_NR.device)
    _down_bwd[_row_grid(n, e, h)](
        gy_TD, *gy_TD.stride(), tok_N, w_down_EDH, *w_down_EDH.stride(), pre_NR, *pre_NR.stride(),
        weight_N, dh_NR, *dh_NR.stride(), aw_NH, *aw_NH.stride(), parts_NP, *parts_NP.stride(),
        counts_E, offsets_E, e, h, d,
        E_P2=triton.next_power_of_2(e), GATED=gated, ACT=ACT_IDS[act], **_dot_flags(gy_TD.dtype),
    )  # fmt: skip
    return dh_NR, aw_NH, parts_NP.sum(1)


def grouped_wgrad(
    a_xP: Tensor,
    b_xQ: Tensor,
    offsets_E: Tensor,
    tok_N: Tensor,
    *,
    gather_a: bool,
    gather_b: bool,
    out_dtype: torch.dtype,
) -> Tensor:
    """``dW [E, P, Q]``: ``dW[e] = sum over sorted rows j of e of A[r_a(j)]^T B[r_b(j)]``.

    ``r = tok[j]`` for a gathered operand, ``j`` otherwise. Experts with no rows get zeros.
    """
    e = offsets_E.shape[0]
    p, q = a_xP.shape[1], b_xQ.shape[1]
    dw = a_xP.new_empty(e, p, q, dtype=out_dtype)
    grid = lambda meta: (e, triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(q, meta["BLOCK_N"]))
    _wgrad[grid](
        a_xP, *a_xP.stride(), b_xQ, *b_xQ.stride(), tok_N, offsets_E, dw, *dw.stride(), p, q,
        GATHER_A=gather_a, GATHER_B=gather_b, **_dot_flags(a_xP.dtype),
    )  # fmt: skip
    return dw
