"""Triton kernels for MoBA block-sparse causal attention: forward, and backward for q, k and v.

MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs"; FlashMoBA, Xiao et
al. 2025, for the small-block recipe) splits the keys of a sequence into ``n = ceil(S / block_size)``
blocks (the last may be partial) and routes every query token to a few of them:

- the gate score of key block ``j`` for the query at position ``t`` (in block ``b_t``) is
  ``q_t . mean(K_j)``, the mean over the block's real keys; the gate has no parameters;
- blocks after ``b_t`` are excluded; the own block ``b_t`` is always selected and counts toward
  ``top_k``; among the past blocks ``j < b_t`` the ``top_k - 1`` best scores are taken. Ties go to
  the later block (flash-moba's reference gate; ``moba_naive`` leaves it to ``torch.topk``);
- the query attends, with softmax scale ``1/sqrt(Dh)`` (or ``scale``), to every key of its selected
  past blocks and to the keys ``s <= t`` of its own block.

This is the gate of the official ``moba_naive`` (MoonshotAI/MoBA): per query *token*, not per query
block. The selection is discrete, so no gradient flows through the gate scores (as in MoBA).

How the work is split:

1. The gate runs in torch (``moba_token_selection``): block means, ``[S, n]`` scores in fp32 per
   row, a stable descending sort, and a ``[B*H, S, n]`` byte mask of the chosen blocks.
2. ``_tile_plan`` turns that mask into work lists at tile granularity: for each ``BLOCK_M`` query
   tile, the ascending list of ``BLOCK_N`` key tiles that hold a key some query of the tile may
   attend to (the union over its queries, pruned by causality), and the transposed lists (for each
   key tile, the query tiles that read it) for the backward.
3. ``_moba_fwd_kernel`` (FlashAttention-2 style): one program per (query tile, batch*head) walks
   its key tiles with an online softmax in fp32 and stores the output and the base-2 logsumexp. The
   per-token selection is applied inside each tile as a mask (``_allowed``): when ``block_size`` is
   a multiple of ``BLOCK_N`` a tile lies in one block and the mask is one byte per query row,
   otherwise it is gathered per (query, key) pair.
4. Backward, FlashAttention-2 style and without atomics (deterministic): ``_moba_bwd_dq_kernel``
   walks the same lists as the forward for ``dq``; ``_moba_bwd_dkdv_kernel`` takes one key tile per
   program and walks the query tiles that read it, accumulating ``dk`` and ``dv`` in registers. Both
   recompute the probabilities from the saved logsumexp; ``delta = rowsum(dO * O)`` comes from torch.

CUDA tensors run compiled. CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1``
set before Triton is first imported), which is how the tests check the kernels without a GPU; as in
``kernels.py``, ``tl.dot`` operands are upcast to fp32 there (``UPCAST``) because the interpreter
mishandles bfloat16 dots.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
# The gate scores query rows in chunks of about this many [B, H, rows, n] elements (our choice).
_GATE_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------- gate (torch)
def moba_token_selection(q_BHSD: Tensor, k_BHSD: Tensor, block_size: int, top_k: int) -> Tensor:
    """MoBA's gate: ``selected [B, H, S, n]`` (bool), True where query ``t`` attends to key block ``j``.

    ``n = ceil(S / block_size)``. Scores ``q_t . mean(K_j)`` in fp32 (mean over the block's real
    keys, so a partial last block is not diluted by padding); future blocks are excluded, the own
    block is forced in, and the other ``top_k - 1`` slots go to the best past blocks, ties to the
    later block (a stable descending sort over the reversed blocks). Queries with fewer than ``top_k`` candidate blocks take
    all of them. Not differentiable (a discrete choice): run it under ``no_grad`` or on detached inputs.
    """
    b, h, s, d = q_BHSD.shape
    n = -(-s // block_size)
    dev = q_BHSD.device
    qblock_S1 = (torch.arange(s, device=dev) // block_size)[:, None]
    kblock_N = torch.arange(n, device=dev)
    if top_k == 1 or top_k >= n:  # no choice to make: own block only, or every block up to it
        keep_SN = kblock_N == qblock_S1 if top_k == 1 else kblock_N <= qblock_S1
        return keep_SN.expand(b, h, s, n).clone()
    k_pad = torch.nn.functional.pad(k_BHSD.float(), (0, 0, 0, n * block_size - s))
    counts_N = (s - kblock_N * block_size).clamp(max=block_size)
    kmean_BHND = k_pad.view(b, h, n, block_size, d).sum(3) / counts_N[:, None].float()
    selected = torch.zeros(b, h, s, n, dtype=torch.bool, device=dev)
    # Query rows in chunks: the scores and the sort's outputs stay bounded at long context.
    rows = max(1, _GATE_CHUNK_ELEMENTS // max(1, b * h * n))
    for r0 in range(0, s, rows):
        qblock_R1 = qblock_S1[r0 : r0 + rows]
        scores_BHRN = q_BHSD[:, :, r0 : r0 + rows].float() @ kmean_BHND.transpose(-1, -2)
        scores_BHRN = scores_BHRN.masked_fill(kblock_N > qblock_R1, float("-inf"))
        scores_BHRN = scores_BHRN.masked_fill(kblock_N == qblock_R1, float("inf"))
        # Stable sort of the reversed blocks: equal scores go to the later (more recent) block, as
        # flash-moba's reference gate and moelab.attention.moba.moba_gate (torch.topk promises no order).
        flipped_BHRK = scores_BHRN.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :top_k]
        chosen_BHRK = (n - 1) - flipped_BHRK
        real_BHRK = chosen_BHRK <= qblock_R1  # drops future blocks picked when b_t + 1 < top_k
        selected[:, :, r0 : r0 + rows].scatter_(-1, chosen_BHRK, real_BHRK)
    return selected


def _sorted_lists(take_XYZ: Tensor) -> tuple[Tensor, Tensor]:
    """For a ``[X, Y, Z]`` bool map: the ascending indices ``z`` with ``take[x, y, z]`` first (int32), and their count."""
    z = take_XYZ.shape[-1]
    idx = torch.where(take_XYZ, torch.arange(z, device=take_XYZ.device, dtype=torch.int32), z)
    return idx.sort(-1).values.to(torch.int32).contiguous(), take_XYZ.sum(-1, dtype=torch.int32).contiguous()


def _tile_plan(selected_XSN: Tensor, s: int, block_size: int, block_m: int, block_n: int) -> Tensor:
    """``take [X, nQ, nK]`` (bool): query tile ``qt`` must visit key tile ``kt`` (``X = B*H``).

    True when some query of the tile selected a block that overlaps the key tile, and the key tile
    starts at or before the tile's last query (causality: a tile of the own block past the queries
    holds only future keys).
    """
    x, _, n = selected_XSN.shape
    dev = selected_XSN.device
    n_qt, n_kt = triton.cdiv(s, block_m), triton.cdiv(s, block_n)
    padded = torch.nn.functional.pad(selected_XSN, (0, 0, 0, n_qt * block_m - s))
    union_XQN = padded.view(x, n_qt, block_m, n).any(2)
    # Blocks lo..hi overlap key tile kt; "any selected among them" from a prefix sum over blocks.
    prefix = torch.nn.functional.pad(union_XQN.to(torch.int32).cumsum(-1), (1, 0))
    kt = torch.arange(n_kt, device=dev)
    lo = (kt * block_n) // block_size
    hi = ((kt * block_n + block_n).clamp(max=s) - 1) // block_size
    overlap_XQK = (prefix[..., hi + 1] - prefix[..., lo]) > 0
    last_query_Q = (torch.arange(n_qt, device=dev) * block_m + block_m).clamp(max=s) - 1
    causal_QK = kt[None, :] * block_n <= last_query_Q[:, None]
    return overlap_XQK & causal_QK


# ---------------------------------------------------------------------------- device code
@triton.jit
def _allowed(
    SEL, sel_base, rows, cols, kt, S, NB, block_size,
    BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """``[BLOCK_M, BLOCK_N]`` mask: key ``cols`` is visible to query ``rows`` (in range, causal, block selected)."""
    visible = (rows[:, None] < S) & (cols[None, :] < S) & (cols[None, :] <= rows[:, None])
    if ALIGNED:  # the whole key tile lies in one block: one selection byte per query row
        blk = (kt * BLOCK_N) // block_size
        picked = tl.load(SEL + sel_base + rows.to(tl.int64) * NB + blk, mask=rows < S, other=0)
        ok = visible & (picked[:, None] != 0)
    else:  # the tile may straddle blocks: gather the byte of each (query, key) pair
        blk2 = cols // block_size
        sel_rows = SEL + sel_base + rows.to(tl.int64) * NB  # S * n may pass 2**31 at long context
        picked2 = tl.load(sel_rows[:, None] + blk2[None, :], mask=visible, other=0)
        ok = visible & (picked2 != 0)
    return ok


@triton.jit
def _moba_fwd_kernel(
    Q, K, V, OUT, LSE, SEL, KT_IDX, KT_CNT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
    H, S, D, NB, NQT, NKT, block_size, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    qt = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    rmask = rows < S
    dmask = dims < D
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd,
        mask=rmask[:, None] & dmask[None, :], other=0.0,
    )  # fmt: skip
    if UPCAST:  # see the module docstring: the interpreter's dot mishandles bf16
        q = q.to(tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    sel_base = bh * S * NB
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    list_base = (bh * NQT + qt) * NKT
    count = tl.load(KT_CNT + bh * NQT + qt)
    for i in range(0, count):
        kt = tl.load(KT_IDX + list_base + i)
        cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < S) & dmask[None, :]
        k = tl.load(k_base + cols[:, None] * sks + dims[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + dims[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # base-2 logits
        ok = _allowed(SEL, sel_base, rows, cols, kt, S, NB, block_size, BLOCK_N, ALIGNED)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # Every real query sees at least itself, so l_i > 0 on real rows; padding rows are not stored.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        OUT + b * sob + h * soh + rows[:, None] * sos + dims[None, :] * sod,
        out.to(OUT.dtype.element_ty), mask=rmask[:, None] & dmask[None, :],
    )  # fmt: skip
    tl.store(LSE + bh * S + rows, m_i + tl.math.log2(l_safe), mask=rmask)


@triton.jit
def _moba_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, SEL, KT_IDX, KT_CNT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdob, sdoh, sdos, sdod,
    sdqb, sdqh, sdqs, sdqd,
    H, S, D, NB, NQT, NKT, block_size, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    qt = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    rmask = rows < S
    dmask = dims < D
    qd_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd, mask=qd_mask, other=0.0)
    do = tl.load(
        DO + b * sdob + h * sdoh + rows[:, None] * sdos + dims[None, :] * sdod, mask=qd_mask, other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh * S + rows, mask=rmask, other=0.0)
    delta = tl.load(DELTA + bh * S + rows, mask=rmask, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    sel_base = bh * S * NB
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    list_base = (bh * NQT + qt) * NKT
    count = tl.load(KT_CNT + bh * NQT + qt)
    for i in range(0, count):
        kt = tl.load(KT_IDX + list_base + i)
        cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_mask = (cols[:, None] < S) & dmask[None, :]
        k = tl.load(k_base + cols[:, None] * sks + dims[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + dims[None, :] * svd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _allowed(SEL, sel_base, rows, cols, kt, S, NB, block_size, BLOCK_N, ALIGNED)
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + rows[:, None] * sdqs + dims[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty), mask=qd_mask,
    )  # fmt: skip


@triton.jit
def _moba_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, SEL, QT_IDX, QT_CNT,
    sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sdob, sdoh, sdos, sdod,
    sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd,
    H, S, D, NB, NQT, NKT, block_size, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    kt = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    cols = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    kv_mask = (cols[:, None] < S) & dmask[None, :]
    k = tl.load(K + b * skb + h * skh + cols[:, None] * sks + dims[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + cols[:, None] * svs + dims[None, :] * svd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    sel_base = bh * S * NB
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    list_base = (bh * NKT + kt) * NQT
    count = tl.load(QT_CNT + bh * NKT + kt)
    for i in range(0, count):
        qt = tl.load(QT_IDX + list_base + i)
        rows = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < S
        qd_mask = rmask[:, None] & dmask[None, :]
        q = tl.load(q_base + rows[:, None] * sqs + dims[None, :] * sqd, mask=qd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdos + dims[None, :] * sdod, mask=qd_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh * S + rows, mask=rmask, other=0.0)
        delta = tl.load(DELTA + bh * S + rows, mask=rmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        ok = _allowed(SEL, sel_base, rows, cols, kt, S, NB, block_size, BLOCK_N, ALIGNED)
        p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
        dv = tl.dot(tl.trans(p).to(do.dtype), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(
        DK + b * sdkb + h * sdkh + cols[:, None] * sdks + dims[None, :] * sdkd,
        dk.to(DK.dtype.element_ty), mask=kv_mask,
    )  # fmt: skip
    tl.store(
        DV + b * sdvb + h * sdvh + cols[:, None] * sdvs + dims[None, :] * sdvd,
        dv.to(DV.dtype.element_ty), mask=kv_mask,
    )  # fmt: skip


# ---------------------------------------------------------------------------- launch config
def _tiles(block_size: int, head_dim: int, kernel: str, ieee: bool = False) -> dict:
    """Tile sizes and launch options for ``kernel`` in ``{"fwd", "dq", "dkdv"}``; 16x16 under the interpreter.

    Our choice, no autotuning (the work lists depend on the tiles): the largest tiles that ptxas
    compiles for sm_90 without register spills (checked offline with ``triton.compile``, see the
    tests). ``BLOCK_N`` shrinks to the largest power of two dividing ``block_size`` (at least 16)
    when that makes the key tiles block-aligned, so the selection mask is one byte per query row;
    unaligned tiles gather a byte per (query, key) pair and get more warps for the extra registers.
    ``ieee``: fp32 dots without TF32 run on CUDA cores, not tensor cores, and need far more
    registers: tiles are capped at 32 (this path is for exactness, not speed; bf16/fp16 or
    ``torch.backends.cuda.matmul.allow_tf32 = True`` take the tensor-core path).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if INTERPRET:
        block_m = block_n = 16
    else:
        wide = block_d > 64
        block_m = 32 if (wide and kernel == "dkdv") else 64
        block_n = 32 if (wide and kernel == "dq") else 64
        if ieee:
            block_m, block_n = min(block_m, 32), min(block_n, 32)
    if block_size % block_n != 0 and block_size % 16 == 0:
        block_n = min(block_n, block_size & -block_size)  # largest power of two dividing block_size
    aligned = block_size % block_n == 0
    if INTERPRET:
        warps, stages = 1, 1
    else:
        warps, stages = (8 if (block_d > 64 or not aligned) else 4), 2
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": block_d,
        "ALIGNED": aligned,
        "num_warps": warps,
        "num_stages": stages,
    }


def _dot_flags(dtype: torch.dtype) -> dict:
    # fp32 stays IEEE unless the user allowed TF32 for matmuls (torch's default is off).
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {"UPCAST": INTERPRET, "PRECISION": "tf32" if tf32 else "ieee"}


def _plan_lists(selected_XSN: Tensor, s: int, block_size: int, cfg: dict, transpose: bool):
    take = _tile_plan(selected_XSN, s, block_size, cfg["BLOCK_M"], cfg["BLOCK_N"])
    return _sorted_lists(take.transpose(1, 2) if transpose else take)


# ---------------------------------------------------------------------------- autograd
class _MoBATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_size: int, top_k: int, scale: float):
        b, h, s, d = q.shape
        out = q.new_empty(b, h, s, d)
        lse = torch.empty(b * h, s, dtype=torch.float32, device=q.device)
        with torch.no_grad():
            selected = moba_token_selection(q, k, block_size, top_k)
        sel = selected.view(b * h, s, -1).to(torch.int8).contiguous()
        n = sel.shape[-1]
        flags = _dot_flags(q.dtype)
        cfg = _tiles(block_size, d, "fwd", ieee=flags["PRECISION"] == "ieee")
        kt_idx, kt_cnt = _plan_lists(sel.bool(), s, block_size, cfg, transpose=False)
        n_qt, n_kt = kt_idx.shape[1], kt_idx.shape[2]
        _moba_fwd_kernel[(n_qt, b * h)](
            q, k, v, out, lse, sel, kt_idx, kt_cnt,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            h, s, d, n, n_qt, n_kt, block_size, scale * _LOG2E,
            **cfg, **flags,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse, sel)
        ctx.block_size, ctx.scale = block_size, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, sel = ctx.saved_tensors
        b, h, s, d = q.shape
        n, block_size, scale = sel.shape[-1], ctx.block_size, ctx.scale
        grad_out = grad_out.to(q.dtype)
        delta = (grad_out.float() * out.float()).sum(-1).reshape(b * h, s).contiguous()
        flags = _dot_flags(q.dtype)
        common = (h, s, d, n)
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            dq = q.new_empty(b, h, s, d)
            cfg = _tiles(block_size, d, "dq", ieee=flags["PRECISION"] == "ieee")
            kt_idx, kt_cnt = _plan_lists(sel.bool(), s, block_size, cfg, transpose=False)
            n_qt, n_kt = kt_idx.shape[1], kt_idx.shape[2]
            _moba_bwd_dq_kernel[(n_qt, b * h)](
                q, k, v, grad_out, lse, delta, dq, sel, kt_idx, kt_cnt,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
                *common, n_qt, n_kt, block_size, scale * _LOG2E, scale,
                **cfg, **flags,
            )  # fmt: skip
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dk, dv = k.new_empty(b, h, s, d), v.new_empty(b, h, s, d)
            cfg = _tiles(block_size, d, "dkdv", ieee=flags["PRECISION"] == "ieee")
            qt_idx, qt_cnt = _plan_lists(sel.bool(), s, block_size, cfg, transpose=True)
            n_kt, n_qt = qt_idx.shape[1], qt_idx.shape[2]
            _moba_bwd_dkdv_kernel[(n_kt, b * h)](
                q, k, v, grad_out, lse, delta, dk, dv, sel, qt_idx, qt_cnt,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
                *common, n_qt, n_kt, block_size, scale * _LOG2E, scale,
                **cfg, **flags,
            )  # fmt: skip
        return dq, dk, dv, None, None, None


# ---------------------------------------------------------------------------- entry point
def _check(q: Tensor, k: Tensor, v: Tensor, block_size, top_k, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, Dh], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must have the same shape [B, H, S, Dh] (causal self-attention), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"head dim Dh must be at most {_MAX_HEAD_DIM}, got {q.shape[-1]}")
    for name, val in (("block_size", block_size), ("top_k", top_k)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if scale is not None and not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if q.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "moba_attention_triton runs CUDA tensors; CPU tensors need TRITON_INTERPRET=1 set before "
            "Triton is first imported (tests only)"
        )
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"moba_attention_triton runs CUDA tensors, got device {q.device}")


def moba_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, block_size: int, top_k: int, scale: float | None = None
) -> Tensor:
    """MoBA causal block-sparse attention with Triton kernels (forward and backward).

    ``q, k, v``: ``[B, H, S, Dh]`` (any strides), fp32, fp16 or bf16, on CUDA (or CPU under
    ``TRITON_INTERPRET=1``); ``Dh <= 256``, any ``S``. ``block_size``: keys per block (the last
    block may be partial); ``top_k``: blocks per query, the own block included (``top_k >= n``
    is full causal attention). ``scale``: softmax scale, ``1/sqrt(Dh)`` by default. Returns
    ``out [B, H, S, Dh]`` in the input dtype. Gradients flow to ``q``, ``k`` and ``v`` through the
    attention; the gate is a discrete choice and passes none (as in MoBA, Lu et al. 2025).
    See the module docstring for the gate's exact rule and the kernels.
    """
    _check(q, k, v, block_size, top_k, scale)
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    block_size, top_k = int(block_size), int(top_k)
    if b * h * s * d == 0:  # nothing to attend: an empty (or zero-width) output that still back-propagates
        return q * 0.0 + k.sum() * 0.0 + v.sum() * 0.0
    return _MoBATriton.apply(q, k, v, block_size, top_k, scale)
