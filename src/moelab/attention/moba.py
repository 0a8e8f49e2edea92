"""MoBA: Mixture of Block Attention, with FlashMoBA's key convolution.

Papers and code: Lu et al. 2025, *MoBA: Mixture of Block Attention for Long-Context LLMs*
(MoonshotAI/MoBA, ``moba/moba_naive.py`` is the definition followed here); Xiao et al. 2025,
*Optimizing Mixture of Block Attention* (FlashMoBA, mit-han-lab/flash-moba: small blocks and a short
causal convolution on keys).

The keys of a sequence are cut into blocks of ``block_size`` (the last one may be partial). Every
query token ``t`` (position ``p``, own block ``i = p // block_size``) scores each key block by
``q_t · mean(K_j)`` and attends, causally, to ``top_k`` blocks:

- its own block is always chosen (it counts toward ``top_k``) and is attended with a token-level
  causal mask;
- the other ``top_k - 1`` are the highest-scoring *past* blocks ``j < i`` (future blocks are never
  candidates); ties keep exactly ``top_k`` blocks, preferring the later (more recent) block, as
  flash-moba's stable reference top-k does;
- the gate is per query **token**, as both official references (``moba_naive``, flash-moba's
  ``moba_fused_topk_ref``) do, not per query block.

Functions (tensors are ``[B, H, S, Dh]``; keys and values may have fewer heads ``H_kv`` dividing
``H``, grouped-query attention):

- :func:`moba_gate` — the selection, ``[B, H, S_q, n_blocks]`` bool;
- :func:`moba_attention_reference` — dense scores with the mask; the definition;
- :func:`moba_attention` — the efficient CPU path (never forms ``S x S``), or the Triton kernel on CUDA;
- :func:`moba_decode` — new tokens against a KV cache; equals the last rows of a full recomputation;
- :func:`causal_key_conv`, :class:`KeyConv` — FlashMoBA's causal depthwise convolution on keys;
- :func:`moba_routing` — the selection as a :class:`moelab.Routing` (query tokens or query blocks ->
  key blocks) for tracing and analysis;
- :class:`MoBAAttention` — a small module holding the options (registered as attention ``moba``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from moelab import registry
from moelab.core.context import RoutingContext, check_context
from moelab.core.routed import RoutedLayer
from moelab.core.routing import Routing

# MoBA's experiments (Lu et al. 2025): 512-token blocks, top-3 including the query's own block.
# FlashMoBA's small-block setting is block 128 with top_k scaled by 512/128 to keep the attended keys
# (the sparsity) fixed; see docs/methods/moba.md.
DEFAULT_BLOCK_SIZE = 512
DEFAULT_TOP_K = 3

# Most elements a temporary of the efficient path may have: the gate's [B, H, rows, n_blocks] scores
# and each batch of key blocks (gathered queries, scores) are computed in pieces of about this size,
# so memory stays linear in S (~16 MiB of fp32 per buffer; our choice). Tests lower them.
_GATE_CHUNK_ELEMENTS = 1 << 22
_SCORE_CHUNK_ELEMENTS = 1 << 22

BACKENDS = ("auto", "torch", "reference", "triton")


# ---------------------------------------------------------------------------- checks
def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, *, same_length: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, Dh], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, s_q, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k must be [B={b}, H_kv, S, Dh={d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if k.shape[1] < 1 or h % k.shape[1]:
        raise ValueError(f"k's heads ({k.shape[1]}) must divide q's heads ({h})")
    if s_q < 1 or k.shape[2] < 1:
        raise ValueError(f"sequences must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if same_length and k.shape[2] != s_q:
        raise ValueError(
            f"q and k must have the same length for causal self-attention, got {s_q} and {k.shape[2]} "
            "(use moba_decode for new tokens against a cache)"
        )
    if not same_length and k.shape[2] < s_q:
        raise ValueError(f"the cache (k, {k.shape[2]} positions) must hold the {s_q} new tokens")


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, bf16, fp16) runs gate and softmax in fp32 (MoBA does)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------- key convolution
def causal_key_conv(k: Tensor, weight: Tensor, prefix: Tensor | None = None) -> Tensor:
    """FlashMoBA's short causal depthwise convolution over the sequence, on keys.

    ``out[..., t, c] = sum_d weight[h, c, K-1-d] * k[..., t-d, c]`` for ``d = 0..K-1``: the last tap
    multiplies the current key, tap ``K-1-d`` the key ``d`` positions back. Positions before the start
    read ``prefix`` (the ``K-1`` raw keys that precede ``k``, for decoding) or zeros.

    Args:
        k: ``[B, H_kv, S, Dh]`` raw keys.
        weight: ``[H_kv, Dh, K]`` one kernel per head and channel (depthwise). The identity is
            ``weight[..., -1] = 1``, the rest 0.
        prefix: ``[B, H_kv, K-1, Dh]`` raw keys before ``k``, or None (zeros: the sequence starts).

    Returns:
        ``[B, H_kv, S, Dh]`` convolved keys, ``k``'s dtype.
    """
    if not isinstance(k, Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a [B, H_kv, S, Dh] Tensor, got {getattr(k, 'shape', type(k).__name__)}")
    if not isinstance(weight, Tensor) or weight.dim() != 3 or tuple(weight.shape[:2]) != (k.shape[1], k.shape[3]):
        raise ValueError(
            f"key_conv weight must be [H_kv={k.shape[1]}, Dh={k.shape[3]}, kernel_size], "
            f"got {getattr(weight, 'shape', type(weight).__name__)}"
        )
    size = weight.shape[2]
    if size < 1:
        raise ValueError("key_conv weight's kernel_size must be >= 1")
    b, h, s, d = k.shape
    if prefix is None:
        prefix = k.new_zeros(b, h, size - 1, d)
    elif not isinstance(prefix, Tensor) or tuple(prefix.shape) != (b, h, size - 1, d):
        raise ValueError(
            f"prefix must be [B={b}, H_kv={h}, kernel_size-1={size - 1}, Dh={d}], "
            f"got {getattr(prefix, 'shape', type(prefix).__name__)}"
        )
    padded = torch.cat([prefix.to(k.dtype), k], dim=2)  # [B, H, K-1+S, D]
    w = weight.to(k.dtype)
    out = padded[:, :, size - 1 :] * w[None, :, None, :, size - 1]
    for back in range(1, size):  # K is 3 or 5: a few fused multiply-adds beat conv1d's transposes
        out = out + padded[:, :, size - 1 - back : size - 1 - back + s] * w[None, :, None, :, size - 1 - back]
    return out


class KeyConv(nn.Module):
    """Learnable :func:`causal_key_conv`, initialised to the identity (so a model starts as plain MoBA).

    Args:
        num_heads: key heads ``H_kv``.
        head_dim: ``Dh``.
        kernel_size: taps over the sequence; FlashMoBA uses 3 or 5.
    """

    def __init__(self, num_heads: int, head_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.num_heads = _check_int("num_heads", num_heads)
        self.head_dim = _check_int("head_dim", head_dim)
        self.kernel_size = _check_int("kernel_size", kernel_size)
        weight = torch.zeros(num_heads, head_dim, kernel_size)
        weight[..., -1] = 1.0
        self.weight = nn.Parameter(weight)

    def forward(self, k: Tensor, prefix: Tensor | None = None) -> Tensor:
        """``[B, H_kv, S, Dh] -> [B, H_kv, S, Dh]``; ``prefix`` as in :func:`causal_key_conv`."""
        return causal_key_conv(k, self.weight, prefix)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, kernel_size={self.kernel_size}"


def _apply_key_conv(k: Tensor, key_conv: object) -> Tensor:
    if key_conv is None:
        return k
    if isinstance(key_conv, KeyConv):
        return key_conv(k)
    if isinstance(key_conv, Tensor):
        return causal_key_conv(k, key_conv)
    raise TypeError(f"key_conv must be None, a [H_kv, Dh, K] weight Tensor or a KeyConv, got {type(key_conv).__name__}")


# ---------------------------------------------------------------------------- gate
def moba_block_means(k: Tensor, block_size: int) -> Tensor:
    """Mean key of every block: ``[B, H_kv, S, Dh] -> [B, H_kv, ceil(S / block_size), Dh]``.

    A partial last block is the mean over its real keys (as ``moba_naive``), not over zero padding.
    """
    block_size = _check_int("block_size", block_size)
    b, h, s, d = k.shape
    nb = -(-s // block_size)
    sums = _pad_seq(k, nb * block_size).reshape(b, h, nb, block_size, d).sum(3)
    counts = torch.full((nb,), float(block_size), dtype=k.dtype, device=k.device)
    counts[-1] = s - (nb - 1) * block_size
    return sums / counts[:, None]


def _pad_seq(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim 2 of ``[B, H, S, Dh]`` to ``length`` (no copy when it already has it)."""
    return x if x.shape[2] == length else torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[2]))


def _past_selection_chunks(q: Tensor, means: Tensor, offset: int, block_size: int, top_k: int):
    """Yield ``(t0, t1, picked)``: ``picked [B, H, t1-t0, w]`` long, the past blocks each query picks.

    ``q`` is ``[B, H, S_q, Dh]`` at positions ``offset + t``; ``means`` is ``[B, H, n_blocks, Dh]`` (already
    expanded to q's heads), both in the compute dtype. Each query picks ``min(top_k - 1, own)`` of its
    ``own = p // block_size`` past blocks (slots beyond that hold -1); the own block is not in
    ``picked``. Ties at the threshold keep exactly ``top_k - 1``, the later blocks first. Queries are
    processed in chunks so the ``[B, H, rows, n_blocks]`` scores stay under ``_GATE_CHUNK_ELEMENTS``.
    """
    b, h, s_q, _ = q.shape
    nb = means.shape[2]
    picks = min(top_k - 1, nb - 1)  # past blocks to pick at most
    step = max(1, _GATE_CHUNK_ELEMENTS // max(1, b * h * nb))
    for t0 in range(0, s_q, step):
        t1 = min(s_q, t0 + step)
        own = (offset + torch.arange(t0, t1, device=q.device)) // block_size  # [c]
        n_past = int(own.max())  # blocks 0..n_past-1 are past for some query of the chunk
        if min(picks, n_past) <= 0:
            yield t0, t1, torch.zeros(b, h, t1 - t0, 0, dtype=torch.long, device=q.device)
            continue
        candidates = torch.arange(n_past, device=q.device)
        eligible = candidates[None, :] < own[:, None]  # [c, n_past]: strictly past blocks
        if n_past <= picks:  # no query of the chunk has more past blocks than it picks: all of them
            yield t0, t1, torch.where(eligible, candidates, -1).expand(b, h, -1, -1)
            continue
        scores = torch.matmul(q[:, :, t0:t1], means[:, :, :n_past].transpose(-1, -2))  # [B, H, c, n_past]
        scores.masked_fill_(~eligible, float("-inf"))
        values, picked = scores.topk(picks, dim=-1)
        picked.masked_fill_(values == float("-inf"), -1)  # a query with fewer past blocks than picks
        kth = values[..., -1:]
        tied_rows = ((scores >= kth) & eligible).sum(-1) > picks  # [B, H, c]: a tie at the threshold
        if bool(tied_rows.any()):  # rare (equal means, zero queries): settle it deterministically
            where = tied_rows.nonzero(as_tuple=True)
            row_scores, row_kth = scores[where], kth[where]
            above = row_scores > row_kth
            tied = row_scores == row_kth
            missing = picks - above.sum(-1, keepdim=True)
            tie_rank = tied.flip(-1).cumsum(-1).flip(-1)  # tied blocks at or after j
            chosen = above | (tied & (tie_rank <= missing))
            picked[where] = torch.where(chosen, candidates, -1).sort(-1, descending=True).values[:, :picks]
        yield t0, t1, picked


def _expand_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, H_kv, ...] -> [B, heads, ...]``: each key head serves ``heads // H_kv`` query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def moba_gate(q: Tensor, k: Tensor, block_size: int = DEFAULT_BLOCK_SIZE, top_k: int = DEFAULT_TOP_K) -> Tensor:
    """MoBA's block selection, per query token.

    Key block ``j``'s score for query ``t`` is ``q_t · mean(K_j)`` (fp32, fp64 for fp64 inputs). The
    query's own block is always selected and counts toward ``top_k``; future blocks are excluded;
    the other ``top_k - 1`` are the best past blocks (ties: exactly ``top_k``, later blocks first).

    Args:
        q: ``[B, H, S_q, Dh]``, the last ``S_q`` positions of the sequence (``S_q = S`` in prefill).
        k: ``[B, H_kv, S, Dh]`` keys (after the key convolution, when one is used).
        block_size: tokens per key block (MoBA: 512).
        top_k: blocks per query, own block included (MoBA: 3).

    Returns:
        ``[B, H, S_q, ceil(S / block_size)]`` bool; row ``t`` has ``min(top_k, own + 1)`` True.
    """
    block_size = _check_int("block_size", block_size)
    top_k = _check_int("top_k", top_k)
    _check_qkv(q, k, k, same_length=False)
    ct = _compute_dtype(q.dtype)
    b, h, s_q, _ = q.shape
    s = k.shape[2]
    offset = s - s_q
    means = _expand_heads(moba_block_means(k.to(ct), block_size), h)
    nb = means.shape[2]
    # One spare column takes the -1 (empty) slots.
    selected = torch.zeros(b, h, s_q, nb + 1, dtype=torch.bool, device=q.device)
    for t0, t1, picked in _past_selection_chunks(q.to(ct), means, offset, block_size, top_k):
        selected[:, :, t0:t1].scatter_(-1, torch.where(picked < 0, nb, picked), True)
    own = (offset + torch.arange(s_q, device=q.device)) // block_size
    selected[:, :, torch.arange(s_q, device=q.device), own] = True
    return selected[..., :nb]


# ---------------------------------------------------------------------------- reference
def moba_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    top_k: int = DEFAULT_TOP_K,
    key_conv: Tensor | KeyConv | None = None,
    scale: float | None = None,
) -> Tensor:
    """MoBA by its definition: dense ``S x S`` scores, masked, softmax in fp32 (fp64 for fp64).

    ``mask[t, s] = selected[t, s // block_size] and s <= t`` with ``selected`` from :func:`moba_gate`
    on the (convolved) keys. Memory ``O(S^2)``: for tests and small inputs.

    Args:
        q: ``[B, H, S, Dh]``; k, v: ``[B, H_kv, S, Dh]`` (``H_kv`` divides ``H``).
        block_size, top_k: as :func:`moba_gate`.
        key_conv: None, a ``[H_kv, Dh, K]`` weight or a :class:`KeyConv`, applied to ``k`` first.
        scale: softmax scale, default ``Dh ** -0.5``.

    Returns:
        ``[B, H, S, Dh]`` in q's dtype.
    """
    _check_qkv(q, k, v, same_length=True)
    scale = _check_scale(scale, q.shape[-1])
    k = _apply_key_conv(k, key_conv)
    selected = moba_gate(q, k, block_size, top_k)  # [B, H, S, nb]
    s = q.shape[2]
    ct = _compute_dtype(q.dtype)
    token_mask = selected.repeat_interleave(block_size, dim=-1)[..., :s]  # key block -> its tokens
    token_mask = token_mask & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    kk = _expand_heads(k, q.shape[1]).to(ct)
    vv = _expand_heads(v, q.shape[1]).to(ct)
    scores = torch.matmul(q.to(ct), kk.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~token_mask, float("-inf")).softmax(-1)
    return torch.matmul(probs, vv).to(q.dtype)


# ---------------------------------------------------------------------------- efficient path
@dataclass
class _Plan:
    """Which queries meet which key block: the gate's (query, key block) entries, grouped by block.

    ``query [E]``: flat query index (``(b*H + h)*S_q + t``) of every entry, grouped by flat key block
    (``(b*H_kv + h_kv)*n_blocks + j``) in block order; ``counts``: entries per flat key block (a list);
    ``q_pos [NQ + 1]``: each query's position (row ``NQ`` is the padding dummy, after every key).
    """

    query: Tensor
    counts: list[int]
    q_pos: Tensor
    num_queries: int
    block_size: int
    n_blocks: int
    scale: float


def _plan(q: Tensor, k: Tensor, block_size: int, top_k: int, scale: float, include_own: bool) -> _Plan:
    """The gate's selected past blocks of every query (and its own block if ``include_own``), by key block.

    ``q [B, H, S_q, Dh]`` at positions ``S - S_q + t``, ``k [B, H_kv, S, Dh]``, both in the compute dtype.
    """
    b, h, s_q, _ = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    group = h // h_kv
    offset = s - s_q
    nb = -(-s // block_size)
    dev = q.device
    nq = b * h * s_q
    means = _expand_heads(moba_block_means(k, block_size), h)
    bh = torch.arange(b * h, device=dev).view(b, h, 1, 1)
    kv_of_bh = (bh // h) * h_kv + (bh % h) // group  # flat key head serving each query head
    query, block = [], []
    if include_own:
        query.append(torch.arange(nq, device=dev))
        own = (offset + torch.arange(s_q, device=dev)) // block_size
        block.append((kv_of_bh * nb + own.view(1, 1, -1, 1)).reshape(-1))
    for t0, t1, picked in _past_selection_chunks(q, means, offset, block_size, top_k):
        rows = (bh * s_q + torch.arange(t0, t1, device=dev).view(1, 1, -1, 1)).expand_as(picked)
        blocks = kv_of_bh * nb + picked
        valid = picked >= 0
        if bool(valid.all()):  # the common case: every query has its top_k - 1 past blocks
            query.append(rows.reshape(-1))
            block.append(blocks.reshape(-1))
        else:
            query.append(rows[valid])
            block.append(blocks[valid])
    query_e = torch.cat(query) if query else torch.zeros(0, dtype=torch.long, device=dev)
    block_e = torch.cat(block) if block else torch.zeros(0, dtype=torch.long, device=dev)
    n_kv_blocks = b * h_kv * nb
    # Group by key block (int32 sorts about twice as fast as int64 on CPU).
    key_dtype = torch.int32 if n_kv_blocks < 2**31 else torch.long
    order = torch.argsort(block_e.to(key_dtype), stable=True)
    counts = torch.bincount(block_e, minlength=n_kv_blocks).tolist()
    q_pos = torch.cat([offset + torch.arange(s_q, device=dev).repeat(b * h), torch.tensor([2**62], device=dev)])
    return _Plan(query_e[order], counts, q_pos, nq, block_size, nb, scale)


def _block_batches(plan: _Plan, per_row: int, per_block: int):
    """Yield ``(blocks [n], rows [n, m])``: key blocks batched with their entries' queries.

    Blocks go by decreasing entry count; a batch's blocks are padded to its first (largest) count
    ``m`` with the dummy query ``NQ``. A batch closes before it would exceed ``_SCORE_CHUNK_ELEMENTS``
    (``n * (m * per_row + per_block)`` elements of temporaries; one block alone may exceed it) or take
    a block with fewer than 3/4 of ``m`` entries (padding stays under a quarter). Every block with
    entries is in exactly one batch.
    """
    counts = plan.counts
    starts, total = [], 0
    for n in counts:
        starts.append(total)
        total += n
    dev = plan.query.device

    def emit(batch: list[int]) -> tuple[Tensor, Tensor]:
        m = counts[batch[0]]
        cnt = torch.tensor([counts[i] for i in batch], device=dev)
        first = torch.cumsum(cnt, 0) - cnt
        rank = torch.arange(int(cnt.sum()), device=dev) - torch.repeat_interleave(first, cnt)
        src = torch.repeat_interleave(torch.tensor([starts[i] for i in batch], device=dev), cnt) + rank
        dst = torch.repeat_interleave(torch.arange(len(batch), device=dev) * m, cnt) + rank
        rows = torch.full((len(batch) * m,), plan.num_queries, dtype=torch.long, device=dev)
        rows[dst] = plan.query[src]
        return torch.tensor(batch, device=dev), rows.view(len(batch), m)

    batch: list[int] = []
    for i in sorted((i for i, n in enumerate(counts) if n), key=lambda i: -counts[i]):
        if batch:
            m = counts[batch[0]]
            if (len(batch) + 1) * (m * per_row + per_block) > _SCORE_CHUNK_ELEMENTS or 4 * counts[i] < 3 * m:
                yield emit(batch)
                batch = []
        batch.append(i)
    if batch:
        yield emit(batch)


def _blocks(x: Tensor, block_size: int, n_blocks: int) -> Tensor:
    """``[B, H_kv, S, Dh] -> [B*H_kv*n_blocks, block_size, Dh]``, the last block zero-padded."""
    b, h, _, d = x.shape
    return _pad_seq(x, n_blocks * block_size).reshape(b * h * n_blocks, block_size, d)


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x[index]`` along dim 0 for any index shape (``index_select``: much faster than advanced indexing)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def _extend(x: Tensor, fill: float = 0.0) -> Tensor:
    """Append the dummy row (index ``NQ``) to a ``[NQ, ...]`` tensor."""
    return torch.cat([x, x.new_full((1, *x.shape[1:]), fill)])


class _Softmax:
    """Per-query online softmax over pieces of attention, each ``(out, lse)`` over some of its keys.

    Holds ``acc [NQ+1, Dh]`` = sum of ``exp(lse_i - top) * out_i`` and ``total [NQ+1]`` = sum of
    ``exp(lse_i - top)`` for each query, with ``top [NQ+1]`` the largest ``lse_i`` so far. Folding a
    piece rescales only the queries whose ``top`` rises, so it costs the piece's size, not ``NQ * Dh``
    (a query may appear several times in one piece).
    """

    def __init__(self, rows: int, dim: int, dtype: torch.dtype, device) -> None:
        self.acc = torch.zeros(rows, dim, dtype=dtype, device=device)
        self.total = torch.zeros(rows, dtype=dtype, device=device)
        self.top = torch.full((rows,), float("-inf"), dtype=dtype, device=device)

    def fold(self, index: Tensor, out: Tensor, lse: Tensor) -> None:
        """Fold ``out [n, Dh]``, ``lse [n]`` of queries ``index [n]``."""
        lse = lse.to(self.top.dtype)
        top = self.top.scatter_reduce(0, index, lse, "amax")
        risen = (top > self.top).nonzero().squeeze(1)
        if risen.numel():
            factor = torch.exp(self.top.index_select(0, risen) - top.index_select(0, risen))  # 0: first piece
            self.acc.index_copy_(0, risen, self.acc.index_select(0, risen) * factor[:, None])
            self.total.index_copy_(0, risen, self.total.index_select(0, risen) * factor)
        self.top = top
        weight = torch.exp(lse - top.index_select(0, index))
        self.total.index_add_(0, index, weight)
        self.acc.index_add_(0, index, out.to(self.acc.dtype) * weight[:, None])

    def result(self, nq: int) -> tuple[Tensor, Tensor]:
        """``(out [NQ, Dh], lse [NQ])``."""
        total = self.total[:nq]
        return self.acc[:nq] / total[:, None], self.top[:nq] + total.log()


def _masked_scores(plan: _Plan, q_rows: Tensor, k_b: Tensor, rows: Tensor, blocks: Tensor) -> Tensor:
    """Scaled scores ``[n, m, block_size]`` of batched queries against their blocks, masked by position."""
    scores = torch.bmm(q_rows, k_b.transpose(1, 2)).mul_(plan.scale)
    key_pos = (blocks % plan.n_blocks)[:, None] * plan.block_size + torch.arange(plan.block_size, device=rows.device)
    # Only the own block holds keys after a query (and the zero padding of a partial last block).
    return scores.masked_fill_(key_pos[:, None, :] > _take(plan.q_pos, rows)[:, :, None], float("-inf"))


class _MoBAMath(torch.autograd.Function):
    """MoBA with batched matmuls (any device): every (query, key block) entry, own block included,
    batched by key block; per batch a masked softmax, merged per query by log-sum-exp. Backward
    recomputes the scores from the saved output and log-sum-exp (as flash attention).

    Memory: ``O(S * top_k)`` indices, ``O(S * Dh)`` accumulators and batches of at most
    ``_SCORE_CHUNK_ELEMENTS`` scores. The fallback of :class:`_MoBACPUFlash`.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan) -> Tensor:
        b, h, s_q, d = q.shape
        nq, bs = plan.num_queries, plan.block_size
        q_ext = _extend(q.reshape(nq, d))
        k_blk = _blocks(k, bs, plan.n_blocks)
        v_blk = _blocks(v, bs, plan.n_blocks)
        softmax = _Softmax(nq + 1, d, q.dtype, q.device)
        for blocks, rows in _block_batches(plan, per_row=2 * bs, per_block=2 * bs * d):
            scores = _masked_scores(plan, _take(q_ext, rows), _take(k_blk, blocks), rows, blocks)
            lse = scores.logsumexp(-1)  # [n, m]
            out = torch.bmm(torch.exp(scores.sub_(lse[..., None])), _take(v_blk, blocks))
            softmax.fold(rows.reshape(-1), out.reshape(-1, d), lse.reshape(-1))
        out, lse = softmax.result(nq)
        out = out.view(b, h, s_q, d)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, h, s_q, d = q.shape
        nq, bs = plan.num_queries, plan.block_size
        q_ext = _extend(q.reshape(nq, d))
        k_blk = _blocks(k, bs, plan.n_blocks)
        v_blk = _blocks(v, bs, plan.n_blocks)
        g = grad_out.reshape(nq, d).to(q.dtype)
        g_ext = _extend(g)
        lse_ext = _extend(lse, float("inf"))  # the dummy's probabilities are exactly 0
        delta = _extend((g * out.reshape(nq, d)).sum(-1))  # rowsum(dO * O)
        dq = torch.zeros_like(q_ext)
        dk = torch.zeros_like(k_blk)
        dv = torch.zeros_like(v_blk)
        for blocks, rows in _block_batches(plan, per_row=3 * bs, per_block=4 * bs * d):
            q_rows, g_rows, k_b, v_b = _take(q_ext, rows), _take(g_ext, rows), _take(k_blk, blocks), _take(v_blk, blocks)
            probs = torch.exp(_masked_scores(plan, q_rows, k_b, rows, blocks).sub_(_take(lse_ext, rows)[..., None]))
            dv.index_add_(0, blocks, torch.bmm(probs.transpose(1, 2), g_rows))
            dscores = torch.bmm(g_rows, v_b.transpose(1, 2)).sub_(_take(delta, rows)[..., None]).mul_(probs)
            dscores.mul_(plan.scale)
            dq.index_add_(0, rows.reshape(-1), torch.bmm(dscores, k_b).reshape(-1, d))
            dk.index_add_(0, blocks, torch.bmm(dscores.transpose(1, 2), q_rows))
        s = k.shape[2]
        unblock = lambda x: x.view(k.shape[0], k.shape[1], -1, d)[:, :, :s]  # noqa: E731
        return dq[:nq].view_as(q), unblock(dk), unblock(dv), None


# The CPU flash-attention kernels behind scaled_dot_product_attention, called directly because they
# also return the log-sum-exp (needed to merge a query's blocks) and their backward accepts the merged
# output and log-sum-exp. Private ATen ops, present in every torch this project supports (>= 2.8);
# _MoBAMath is the fallback (other devices, other dtypes, or if the ops disappear).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_USE_CPU_FLASH = _CPU_FLASH is not None and _CPU_FLASH_BWD is not None
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@dataclass
class _OwnSegments:
    """The own-block attention of queries at positions ``offset..S-1`` as two flash calls.

    head: when the queries start inside block ``b0`` (decoding), its queries (rows ``0..head_rows-1``)
    against its keys ``head_key0 .. head_key0 + head_keys - 1``, with an explicit causal mask (None when
    there is one query: the last key is its own); ``head_rows = 0`` otherwise. body: the remaining queries, which start at a block boundary,
    as ``body_blocks`` blocks of ``bs`` queries against the same ``bs`` keys, causal (the kernel's
    top-left alignment is right there); its last block is zero-padded.
    """

    head_rows: int
    head_key0: int
    head_keys: int
    head_mask: Tensor | None
    body_key0: int
    body_blocks: int


def _own_segments(offset: int, s: int, block_size: int, dtype: torch.dtype, device) -> _OwnSegments:
    key0 = offset // block_size * block_size
    # The first own block needs a head call only if the queries start inside it.
    head_end = key0 if offset == key0 else min(s, key0 + block_size)
    head_rows, head_keys = head_end - offset, head_end - key0
    mask = None
    if head_rows > 1:
        q_pos = offset + torch.arange(head_rows, device=device)
        k_pos = key0 + torch.arange(head_keys, device=device)
        mask = torch.zeros(head_rows, head_keys, dtype=dtype, device=device)
        mask = mask.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))[None, None]
    return _OwnSegments(head_rows, key0, head_keys, mask, head_end, -(-(s - head_end) // block_size))


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """Zero-pad dim 1 of ``[N, L, ...]`` to ``rows``."""
    pad = rows - x.shape[1]
    return x if pad == 0 else torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


class _MoBACPUFlash(torch.autograd.Function):
    """MoBA on CPU with ATen's flash-attention kernels, as MoBA's efficient implementation does with
    FlashAttention: the own block (causal) in one call over all blocks, the selected past blocks in
    batches of key blocks with their queries gathered (non-causal), merged per query by log-sum-exp.
    Backward: the flash backward of every piece, given the merged output and log-sum-exp.

    Attention runs in the input dtype (fp32, fp64, bf16) with fp32 softmax statistics, as
    ``scaled_dot_product_attention``'s CPU kernel does; merging is in fp32 (fp64 for fp64).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan) -> Tensor:
        b, h, s_q, d = q.shape
        s = k.shape[2]
        nq, bs, scale = plan.num_queries, plan.block_size, plan.scale
        acc_dtype = _compute_dtype(q.dtype)
        seg = _own_segments(s - s_q, s, bs, q.dtype, q.device)
        q3 = q.reshape(b * h, s_q, d)
        kq = _expand_heads(k, h).reshape(b * h, s, d)
        vq = _expand_heads(v, h).reshape(b * h, s, d)
        outs, lses = [], []
        if seg.head_rows:
            head = slice(seg.head_key0, seg.head_key0 + seg.head_keys)
            out, lse = _CPU_FLASH(
                q3[:, None, : seg.head_rows], kq[:, None, head], vq[:, None, head], 0.0, False,
                attn_mask=seg.head_mask, scale=scale,
            )
            outs.append(out[:, 0])
            lses.append(lse[:, 0])
        if seg.body_blocks:
            rows = seg.body_blocks * bs
            shape = (b * h * seg.body_blocks, 1, bs, d)
            out, lse = _CPU_FLASH(
                _pad_rows(q3[:, seg.head_rows :], rows).reshape(shape),
                _pad_rows(kq[:, seg.body_key0 :], rows).reshape(shape),
                _pad_rows(vq[:, seg.body_key0 :], rows).reshape(shape),
                0.0, True, scale=scale,
            )
            outs.append(out.view(b * h, rows, d)[:, : s_q - seg.head_rows])
            lses.append(lse.view(b * h, rows)[:, : s_q - seg.head_rows])
        # Each query's attention over its own block, then folded with its past blocks batch by batch.
        softmax = _Softmax(nq + 1, d, acc_dtype, q.device)
        softmax.fold(torch.arange(nq, device=q.device), torch.cat(outs, 1).reshape(nq, d), torch.cat(lses, 1).reshape(nq))
        q_ext = _extend(q.reshape(nq, d))
        k_blk = _blocks(k, bs, plan.n_blocks)
        v_blk = _blocks(v, bs, plan.n_blocks)
        for blocks, rows in _block_batches(plan, per_row=2 * d, per_block=2 * bs * d):
            out, lse = _CPU_FLASH(
                _take(q_ext, rows)[:, None], _take(k_blk, blocks)[:, None], _take(v_blk, blocks)[:, None], 0.0, False, scale=scale
            )
            softmax.fold(rows.reshape(-1), out.reshape(-1, d), lse.reshape(-1))
        out, lse = softmax.result(nq)
        out = out.to(q.dtype).view(b, h, s_q, d)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, h, s_q, d = q.shape
        h_kv, s = k.shape[1], k.shape[2]
        nq, bs, scale = plan.num_queries, plan.block_size, plan.scale
        acc_dtype = _compute_dtype(q.dtype)
        seg = _own_segments(s - s_q, s, bs, q.dtype, q.device)
        g3 = grad_out.to(q.dtype).reshape(b * h, s_q, d)
        o3 = out.reshape(b * h, s_q, d)
        l2 = lse.reshape(b * h, s_q).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        q3 = q.reshape(b * h, s_q, d)
        kq = _expand_heads(k, h).reshape(b * h, s, d)
        vq = _expand_heads(v, h).reshape(b * h, s, d)
        dq3 = torch.zeros(b * h, s_q, d, dtype=acc_dtype, device=q.device)
        dkq = torch.zeros(b * h, s, d, dtype=acc_dtype, device=q.device)
        dvq = torch.zeros(b * h, s, d, dtype=acc_dtype, device=q.device)
        hr = seg.head_rows
        if hr:
            head = slice(seg.head_key0, seg.head_key0 + seg.head_keys)
            dq_, dk_, dv_ = _CPU_FLASH_BWD(
                g3[:, None, :hr], q3[:, None, :hr], kq[:, None, head], vq[:, None, head], o3[:, None, :hr],
                l2[:, None, :hr], 0.0, False, attn_mask=seg.head_mask, scale=scale,
            )
            dq3[:, :hr] += dq_[:, 0]
            dkq[:, head] += dk_[:, 0]
            dvq[:, head] += dv_[:, 0]
        if seg.body_blocks:
            rows = seg.body_blocks * bs
            shape = (b * h * seg.body_blocks, 1, bs, d)
            # Padding queries get dO = 0 and O = 0: their gradients and contributions are exactly 0.
            dq_, dk_, dv_ = _CPU_FLASH_BWD(
                _pad_rows(g3[:, hr:], rows).reshape(shape),
                _pad_rows(q3[:, hr:], rows).reshape(shape),
                _pad_rows(kq[:, seg.body_key0 :], rows).reshape(shape),
                _pad_rows(vq[:, seg.body_key0 :], rows).reshape(shape),
                _pad_rows(o3[:, hr:], rows).reshape(shape),
                _pad_rows(l2[:, hr:], rows).reshape(shape[:3]),
                0.0, True, scale=scale,
            )
            dq3[:, hr:] += dq_.view(b * h, rows, d)[:, : s_q - hr]
            dkq[:, seg.body_key0 :] += dk_.view(b * h, rows, d)[:, : s - seg.body_key0]
            dvq[:, seg.body_key0 :] += dv_.view(b * h, rows, d)[:, : s - seg.body_key0]
        # Past blocks: the dummy row has dO = 0 and O = 0, so it contributes exactly nothing.
        q_ext, g_ext, o_ext = _extend(q3.reshape(nq, d)), _extend(g3.reshape(nq, d)), _extend(o3.reshape(nq, d))
        l_ext = _extend(l2.reshape(nq))
        k_blk = _blocks(k, bs, plan.n_blocks)
        v_blk = _blocks(v, bs, plan.n_blocks)
        dq_ext = torch.zeros(nq + 1, d, dtype=acc_dtype, device=q.device)
        dk_blk = torch.zeros(k_blk.shape, dtype=acc_dtype, device=q.device)
        dv_blk = torch.zeros(v_blk.shape, dtype=acc_dtype, device=q.device)
        for blocks, rows in _block_batches(plan, per_row=4 * d, per_block=4 * bs * d):
            dq_, dk_, dv_ = _CPU_FLASH_BWD(
                _take(g_ext, rows)[:, None], _take(q_ext, rows)[:, None], _take(k_blk, blocks)[:, None], _take(v_blk, blocks)[:, None],
                _take(o_ext, rows)[:, None], _take(l_ext, rows)[:, None], 0.0, False, scale=scale,
            )
            dq_ext.index_add_(0, rows.reshape(-1), dq_.reshape(-1, d).to(acc_dtype))
            dk_blk.index_add_(0, blocks, dk_[:, 0].to(acc_dtype))
            dv_blk.index_add_(0, blocks, dv_[:, 0].to(acc_dtype))
        group = h // h_kv

        def to_kv(x_q: Tensor, x_blk: Tensor) -> Tensor:
            x = x_q.view(b, h_kv, group, s, d).sum(2) + x_blk.view(b, h_kv, -1, d)[:, :, :s]
            return x.to(k.dtype)

        dq = (dq3.reshape(nq, d) + dq_ext[:nq]).view_as(q).to(q.dtype)
        return dq, to_kv(dkq, dk_blk), to_kv(dvq, dv_blk), None


def _moba_torch(q: Tensor, k: Tensor, v: Tensor, block_size: int, top_k: int, scale: float) -> Tensor:
    """The efficient path: ATen's CPU flash kernels where they apply, batched matmuls elsewhere."""
    flash = _USE_CPU_FLASH and q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES
    ct = _compute_dtype(q.dtype)
    with torch.no_grad():
        plan = _plan(q.detach().to(ct), k.detach().to(ct), block_size, top_k, scale, include_own=not flash)
    if flash:
        return _MoBACPUFlash.apply(q, k, v, plan)
    return _MoBAMath.apply(q.to(ct), k.to(ct), v.to(ct), plan).to(q.dtype)


def _moba_triton(q: Tensor, k: Tensor, v: Tensor, block_size: int, top_k: int, scale: float) -> Tensor:
    try:
        from moelab.kernels.triton.moba import moba_attention_triton
    except ImportError as e:
        raise ImportError(
            "moba_attention(backend='triton') needs Triton and moelab.kernels.triton.moba "
            f"(pip install 'moelab[gpu]'); import failed: {e}"
        ) from e
    h = q.shape[1]
    return moba_attention_triton(q, _expand_heads(k, h), _expand_heads(v, h), block_size, top_k, scale)


def moba_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    top_k: int = DEFAULT_TOP_K,
    key_conv: Tensor | KeyConv | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """MoBA causal self-attention (Lu et al. 2025), optionally with FlashMoBA's key convolution.

    Each query attends causally to ``top_k`` key blocks: its own and the best past ones by
    ``q · mean(K_j)`` (see :func:`moba_gate`). The ``torch`` backend gathers the selected blocks into
    tiles of queries sharing a key block and merges them with an online softmax: it never forms
    ``S x S``; memory is linear in ``S``, time ``~ S * top_k * block_size * Dh``. Forward and backward
    (a custom autograd function that recomputes the scores).

    Args:
        q: ``[B, H, S, Dh]``; k, v: ``[B, H_kv, S, Dh]`` (``H_kv`` divides ``H``).
        block_size: tokens per key block (MoBA 512; FlashMoBA 128).
        top_k: blocks per query including its own (MoBA 3).
        key_conv: None, a ``[H_kv, Dh, K]`` weight or a :class:`KeyConv`; applied to ``k`` before the
            gate and the attention (gradients flow to it).
        scale: softmax scale, default ``Dh ** -0.5``.
        backend: ``"auto"`` (Triton on CUDA, else ``torch``), ``"torch"``, ``"reference"`` (dense,
            :func:`moba_attention_reference`) or ``"triton"``.

    Returns:
        ``[B, H, S, Dh]`` in q's dtype.
    """
    _check_qkv(q, k, v, same_length=True)
    block_size = _check_int("block_size", block_size)
    top_k = _check_int("top_k", top_k)
    scale = _check_scale(scale, q.shape[-1])
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "reference":
        return moba_attention_reference(q, k, v, block_size, top_k, key_conv, scale)
    k = _apply_key_conv(k, key_conv)
    if backend == "triton":
        return _moba_triton(q, k, v, block_size, top_k, scale)
    return _moba_torch(q, k, v, block_size, top_k, scale)


# ---------------------------------------------------------------------------- decoding
def moba_decode(
    q_new: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    top_k: int = DEFAULT_TOP_K,
    scale: float | None = None,
) -> Tensor:
    """MoBA for new tokens against a KV cache: the last ``T`` rows of the full recomputation.

    The new tokens are the last ``T`` of the ``L`` cached positions (append their keys and values to
    the cache first). Each new query gates over the cache's key blocks exactly as in prefill (its own
    block, possibly partial, always; the best ``top_k - 1`` complete past blocks by mean key), so the
    result equals :func:`moba_attention` on the whole sequence, rows ``L-T..L-1``. (MoBA's official
    wrapper falls back to full attention when decoding; this selects blocks.)

    With the key convolution the cache holds **convolved** keys. The caller keeps the last
    ``kernel_size - 1`` **raw** keys and convolves each new chunk with them as the prefix:
    ``k_new = causal_key_conv(k_raw_new, weight, prefix=raw_tail)`` (or ``KeyConv(k_raw_new, prefix)``);
    then ``raw_tail = torch.cat([raw_tail, k_raw_new], 2)[:, :, -(kernel_size - 1):]``.

    Args:
        q_new: ``[B, H, T, Dh]``.
        k_cache, v_cache: ``[B, H_kv, L, Dh]``, ``L >= T``, the new tokens' keys and values last.
        block_size, top_k, scale: as :func:`moba_attention`.

    Returns:
        ``[B, H, T, Dh]`` in q's dtype. Cost per new token: the block means (``O(L * Dh)``) and
        ``top_k * block_size`` keys.
    """
    _check_qkv(q_new, k_cache, v_cache, same_length=False)
    block_size = _check_int("block_size", block_size)
    top_k = _check_int("top_k", top_k)
    scale = _check_scale(scale, q_new.shape[-1])
    return _moba_torch(q_new, k_cache, v_cache, block_size, top_k, scale)


# ---------------------------------------------------------------------------- routing view
def moba_routing(selected: Tensor, per: str = "token", block_size: int | None = None) -> Routing:
    """The gate's selection as a :class:`moelab.Routing` (query -> key blocks), for tracing and analysis.

    Args:
        selected: ``[B, H, S_q, n_blocks]`` bool from :func:`moba_gate`.
        per: ``"token"``: one routing row per query token (``(b*H + h)*S_q + t``), weight 1 per chosen
            block (the gate is hard); ``top_k`` is set when every row has the same count. ``"block"``:
            one row per query block (``(b*H + h)*n_q_blocks + t // block_size``, queries at positions
            ``0..S_q-1``); weight = the fraction of the block's queries that chose the key block.
        block_size: needed for ``per="block"``.

    Returns:
        A ``Routing`` with ``num_experts = n_blocks``.
    """
    if not isinstance(selected, Tensor) or selected.dim() != 4 or selected.dtype != torch.bool:
        raise ValueError(
            f"selected must be a [B, H, S_q, n_blocks] bool Tensor (moba_gate), "
            f"got {getattr(selected, 'shape', type(selected).__name__)}"
        )
    b, h, s_q, nb = selected.shape
    if per == "token":
        rows = selected.reshape(b * h * s_q, nb)
        token, block = rows.nonzero(as_tuple=True)  # token-major, blocks ascending
        counts = rows.sum(-1)
        uniform = rows.shape[0] > 0 and bool((counts == counts[0]).all()) and int(counts[0]) > 0
        return Routing(
            token, block, torch.ones(token.numel(), device=selected.device), rows.shape[0], nb,
            top_k=int(counts[0]) if uniform else None,
        )
    if per == "block":
        if block_size is None:
            raise ValueError("moba_routing(per='block') needs block_size (the query block length)")
        block_size = _check_int("block_size", block_size)
        nqb = -(-s_q // block_size)
        pad = nqb * block_size - s_q
        per_block = torch.nn.functional.pad(selected.float(), (0, 0, 0, pad)).view(b * h * nqb, block_size, nb)
        sizes = torch.full((nqb,), float(block_size), device=selected.device)
        sizes[-1] = s_q - (nqb - 1) * block_size
        share = per_block.sum(1) / sizes.repeat(b * h)[:, None]  # [B*H*nqb, nb]
        token, block = share.nonzero(as_tuple=True)
        return Routing(token, block, share[token, block], b * h * nqb, nb)
    raise ValueError(f"per must be 'token' or 'block', got {per!r}")


# ---------------------------------------------------------------------------- module
class MoBAAttention(RoutedLayer):
    """MoBA's options as a module: ``forward(q, k, v, ctx=None) -> out`` (registered as attention ``moba``).

    A routed layer for tracing: inside ``moelab.trace(model)`` each forward also records its
    selection as a ``Routing`` from query blocks to key blocks (:func:`moba_routing`, ``per="block"``;
    rows ``(b·H + h)·⌈S/B⌉ + i``), so MoBA's routing is traced and summarised like any layer's.
    Outside a trace nothing extra runs. The selection is the attention's own:
    ``moelab.override_routing`` leaves MoBA out (``accepts_routing_transforms = False``).

    Args:
        block_size: tokens per key block (MoBA 512; FlashMoBA 128).
        top_k: blocks per query including its own (MoBA 3).
        key_conv_size: None (plain MoBA) or FlashMoBA's key convolution width (3 or 5); then
            ``num_kv_heads`` and ``head_dim`` size its :class:`KeyConv` (identity at init).
        num_kv_heads, head_dim: key heads and head size, for the key convolution.
        scale: softmax scale, default ``Dh ** -0.5``.
        backend: as :func:`moba_attention`.
    """

    def __init__(
        self,
        block_size: int = DEFAULT_BLOCK_SIZE,
        top_k: int = DEFAULT_TOP_K,
        key_conv_size: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.block_size = _check_int("block_size", block_size)
        self.top_k = _check_int("top_k", top_k)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        if scale is not None:
            _check_scale(scale, 1)
        self.scale = scale
        self.backend = backend
        self.key_conv: KeyConv | None = None
        if key_conv_size is not None:
            if num_kv_heads is None or head_dim is None:
                raise ValueError("key_conv_size needs num_kv_heads and head_dim (the KeyConv's shape)")
            self.key_conv = KeyConv(num_kv_heads, head_dim, key_conv_size)

    routed_kind = "attention"
    accepts_routing_transforms = False

    def forward(self, q: Tensor, k: Tensor, v: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        """``q [B, H, S, Dh]``, ``k, v [B, H_kv, S, Dh]`` (raw keys) -> ``[B, H, S, Dh]``."""
        out = moba_attention(q, k, v, self.block_size, self.top_k, self.key_conv, self.scale, self.backend)
        if self.__dict__["_trace_to"] is not None:  # a trace is recording: log the selection
            with torch.no_grad():
                routing = self.routing(q.detach(), k.detach(), per="block")
            self.routed(routing, check_context(ctx), q.detach().reshape(-1, q.shape[-1]))
        return out

    def gate(self, q: Tensor, k: Tensor) -> Tensor:
        """The selection for raw keys ``k`` (convolved first when there is a key convolution)."""
        return moba_gate(q, _apply_key_conv(k, self.key_conv), self.block_size, self.top_k)

    def routing(self, q: Tensor, k: Tensor, per: str = "token") -> Routing:
        """:func:`moba_routing` of :meth:`gate`."""
        return moba_routing(self.gate(q, k), per=per, block_size=self.block_size)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, top_k={self.top_k}, backend={self.backend!r}"


registry.register(
    "attention",
    "moba",
    paper="MoBA (Lu et al. 2025, arXiv 2502.13189; MoonshotAI/MoBA moba_naive); FlashMoBA key conv and "
    "small blocks (Xiao et al. 2025, arXiv 2511.11571)",
    summary="per query token: own block (causal) + top_k-1 past key blocks by q . mean(K_j); gathered "
    "blocks, never S x S; optional causal depthwise conv on keys",
)(MoBAAttention)
