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

from moelab import registry
from moelab.core.routing import Routing

# MoBA's defaults (Lu et al. 2025, the paper's long-context setting and MoBAConfig): 512-token
# blocks, top-3 including the query's own block. FlashMoBA's small-block setting is block 128 with
# top_k scaled to keep the same sparsity (7/8 at 32k); see docs/methods/moba.md.
DEFAULT_BLOCK_SIZE = 512
DEFAULT_TOP_K = 3

# Most elements a temporary of the efficient path may have: the gate's [B, H, rows, n_blocks] scores
# and the [tiles, rows, block_size] attention scores are computed in chunks of at most this size, so
# memory stays linear in S (the constant is ~16 MiB of fp32 per buffer). Tests lower them.
_GATE_CHUNK_ELEMENTS = 1 << 22
_SCORE_CHUNK_ELEMENTS = 1 << 22
# Query rows per tile of the efficient path: one GEMM [rows, Dh] x [Dh, block_size] per tile. A key
# block's queries are cut into tiles of this many rows (the last padded).
_TILE_ROWS = 64

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
    pad = nb * block_size - s
    sums = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(b, h, nb, block_size, d).sum(3)
    counts = torch.full((nb,), float(block_size), dtype=k.dtype, device=k.device)
    counts[-1] = s - (nb - 1) * block_size
    return sums / counts[:, None]


def _past_selection_chunks(q: Tensor, means: Tensor, offset: int, block_size: int, top_k: int):
    """Yield ``(t0, t1, past)``: ``past [B, H, t1-t0, n_blocks]`` bool, the past blocks each query picks.

    ``q`` is ``[B, H, S_q, Dh]`` at positions ``offset + t``; ``means`` is ``[B, H, n_blocks, Dh]`` (already
    expanded to q's heads), both in the compute dtype. Each query picks ``min(top_k - 1, own)`` of its
    ``own = p // block_size`` past blocks; the own block is not in ``past``. Queries are processed in
    chunks so the ``[B, H, rows, n_blocks]`` scores stay under ``_GATE_CHUNK_ELEMENTS``.
    """
    b, h, s_q, _ = q.shape
    nb = means.shape[2]
    picks = min(top_k - 1, nb - 1)  # past blocks to pick at most
    blocks = torch.arange(nb, device=q.device)
    step = max(1, _GATE_CHUNK_ELEMENTS // max(1, b * h * nb))
    for t0 in range(0, s_q, step):
        t1 = min(s_q, t0 + step)
        own = (offset + torch.arange(t0, t1, device=q.device)) // block_size  # [c]
        eligible = blocks[None, :] < own[:, None]  # [c, nb]: strictly past blocks
        if picks <= 0:
            yield t0, t1, torch.zeros(b, h, t1 - t0, nb, dtype=torch.bool, device=q.device)
            continue
        if int(own.max()) <= picks:  # every query of the chunk has at most `picks` past blocks: all of them
            yield t0, t1, eligible.expand(b, h, -1, -1).clone()
            continue
        scores = torch.matmul(q[:, :, t0:t1], means.transpose(-1, -2))  # [B, H, c, nb]
        scores.masked_fill_(~eligible, float("-inf"))
        kth = scores.topk(picks, dim=-1).values[..., -1:]  # the picks-th best (-inf if fewer are eligible)
        above = scores > kth
        tied = (scores == kth) & eligible
        # Exactly `picks` blocks: all strictly above the threshold, then tied ones from the latest back.
        missing = picks - above.sum(-1, keepdim=True)
        tie_rank = tied.flip(-1).cumsum(-1).flip(-1)  # tied blocks at or after j
        yield t0, t1, above | (tied & (tie_rank <= missing))


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
    selected = torch.empty(b, h, s_q, nb, dtype=torch.bool, device=q.device)
    for t0, t1, past in _past_selection_chunks(q.to(ct), means, offset, block_size, top_k):
        selected[:, :, t0:t1] = past
    own = (offset + torch.arange(s_q, device=q.device)) // block_size
    selected[:, :, torch.arange(s_q, device=q.device), own] = True
    return selected


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
    """Which query rows meet which key block, cut into tiles of ``rows`` queries against one block.

    ``tile_rows [n_tiles, rows]``: flat query index (``(b*H + h)*S_q + t``), padded with the dummy
    index ``NQ``; ``tile_block [n_tiles]``: flat key block (``(b*H_kv + h_kv)*n_blocks + j``);
    ``q_pos [NQ + 1]``: each query's position (the dummy's is past every key, so it masks nothing).
    """

    tile_rows: Tensor
    tile_block: Tensor
    q_pos: Tensor
    block_size: int
    n_blocks: int
    scale: float


def _plan(q: Tensor, k: Tensor, block_size: int, top_k: int, scale: float, include_own: bool = True) -> _Plan:
    """Build the tiles: the gate's selected past blocks of every query, and its own block if ``include_own``."""
    b, h, s_q, _ = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    group = h // h_kv
    offset = s - s_q
    nb = -(-s // block_size)
    dev = q.device
    nq = b * h * s_q
    means = _expand_heads(moba_block_means(k, block_size), h)
    # (query, key block) entries: every query's own block (if asked), then the gate's past blocks.
    query, block = [], []
    if include_own:
        every = torch.arange(nq, device=dev)
        bh_of = every // s_q
        kv_row = (bh_of // h) * h_kv + (bh_of % h) // group  # flat key head of each query
        query.append(every)
        block.append(kv_row * nb + (offset + every % s_q) // block_size)
    for t0, _t1, past in _past_selection_chunks(q, means, offset, block_size, top_k):
        bb, hh, tt, jj = past.nonzero(as_tuple=True)
        query.append((bb * h + hh) * s_q + t0 + tt)
        block.append((bb * h_kv + hh // group) * nb + jj)
    query_e = torch.cat(query) if query else torch.zeros(0, dtype=torch.long, device=dev)
    block_e = torch.cat(block) if block else torch.zeros(0, dtype=torch.long, device=dev)
    # Group entries by key block, queries ascending inside a block (one sort of a unique key).
    order = torch.sort(block_e * (nq + 1) + query_e).values
    block_e, query_e = order // (nq + 1), order % (nq + 1)
    # Tiles: each block's entries cut into runs of `rows`; the last run of a block is padded.
    rows = min(_TILE_ROWS, s_q * group)
    n_kv_blocks = b * h_kv * nb
    counts = torch.bincount(block_e, minlength=n_kv_blocks)
    tiles = (counts + rows - 1) // rows
    first_tile = torch.cumsum(tiles, 0) - tiles
    first_entry = torch.cumsum(counts, 0) - counts
    rank = torch.arange(block_e.numel(), device=dev) - first_entry[block_e]
    n_tiles = int(tiles.sum())
    tile_rows = torch.full((n_tiles * rows,), nq, dtype=torch.long, device=dev)
    tile_rows[(first_tile[block_e] + rank // rows) * rows + rank % rows] = query_e
    tile_block = torch.repeat_interleave(torch.arange(n_kv_blocks, device=dev), tiles)
    q_pos = torch.cat([offset + torch.arange(s_q, device=dev).repeat(b * h), torch.tensor([2**62], device=dev)])
    return _Plan(tile_rows.view(n_tiles, rows), tile_block, q_pos, block_size, nb, scale)


def _blocks(x: Tensor, block_size: int, n_blocks: int) -> Tensor:
    """``[B, H_kv, S, Dh] -> [B*H_kv*n_blocks, block_size, Dh]``, the last block zero-padded."""
    b, h, s, d = x.shape
    pad = n_blocks * block_size - s
    return torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(b * h * n_blocks, block_size, d)


def _tile_scores(plan: _Plan, q_ext: Tensor, k_blk: Tensor, rows: Tensor, blk: Tensor) -> Tensor:
    """Scaled scores of a chunk of tiles, ``[c, rows, block_size]``, causally masked by position."""
    scores = torch.bmm(q_ext[rows], k_blk[blk].transpose(1, 2)).mul_(plan.scale)
    key_pos = (blk % plan.n_blocks)[:, None] * plan.block_size + torch.arange(plan.block_size, device=blk.device)
    # Only the own block can hold keys after the query (and the padding of a partial last block).
    return scores.masked_fill_(key_pos[:, None, :] > plan.q_pos[rows][:, :, None], float("-inf"))


def _chunks(plan: _Plan):
    n_tiles, rows = plan.tile_rows.shape
    step = max(1, _SCORE_CHUNK_ELEMENTS // (rows * plan.block_size))
    for c0 in range(0, n_tiles, step):
        yield plan.tile_rows[c0 : c0 + step], plan.tile_block[c0 : c0 + step]


class _MoBAFunction(torch.autograd.Function):
    """Block-gathered MoBA attention with a flash-style backward (recomputes scores, saves ``out, lse``).

    Forward: for each chunk of tiles, scores against the tile's key block, masked by position; an
    online softmax merged into per-query running max / sum / accumulator with scatter-adds (a query
    meets its blocks in different tiles). Memory: ``O(S_q * top_k)`` indices, ``O(S * Dh)``
    accumulators, plus chunks of at most ``_SCORE_CHUNK_ELEMENTS`` scores.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan) -> Tensor:
        b, h, s_q, d = q.shape
        nq = b * h * s_q
        q_ext = torch.cat([q.reshape(nq, d), q.new_zeros(1, d)])  # row NQ: the padding rows' dummy
        k_blk = _blocks(k, plan.block_size, plan.n_blocks)
        v_blk = _blocks(v, plan.block_size, plan.n_blocks)
        run_max = q.new_full((nq + 1,), float("-inf"))
        run_sum = q.new_zeros(nq + 1)
        acc = q.new_zeros(nq + 1, d)
        for rows, blk in _chunks(plan):
            scores = _tile_scores(plan, q_ext, k_blk, rows, blk)
            flat = rows.reshape(-1)
            touched, inverse = torch.unique(flat, return_inverse=True)
            chunk_max = scores.amax(-1).reshape(-1)
            new_max = run_max[touched].scatter_reduce_(0, inverse, chunk_max, "amax")
            # Rescale what the touched rows accumulated so far to the new max (0 where nothing yet).
            alpha = torch.exp(run_max[touched] - new_max).nan_to_num_(0.0)
            run_sum[touched] = run_sum[touched] * alpha
            acc[touched] = acc[touched] * alpha[:, None]
            run_max[touched] = new_max
            probs = torch.exp(scores.sub_(new_max[inverse].view_as(rows)[..., None]))
            run_sum.index_add_(0, flat, probs.sum(-1).reshape(-1))
            acc.index_add_(0, flat, torch.bmm(probs, v_blk[blk]).reshape(-1, d))
        out = (acc[:nq] / run_sum[:nq, None]).view(b, h, s_q, d)
        lse = run_max[:nq] + run_sum[:nq].log()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, h, s_q, d = q.shape
        nq = b * h * s_q
        q_ext = torch.cat([q.reshape(nq, d), q.new_zeros(1, d)])
        k_blk = _blocks(k, plan.block_size, plan.n_blocks)
        v_blk = _blocks(v, plan.block_size, plan.n_blocks)
        g = grad_out.reshape(nq, d).to(q.dtype)
        g_ext = torch.cat([g, q.new_zeros(1, d)])
        # lse = +inf on the dummy row: its probabilities are exactly 0 and it contributes nothing.
        lse_ext = torch.cat([lse, lse.new_full((1,), float("inf"))])
        delta = torch.cat([(g * out.reshape(nq, d)).sum(-1), q.new_zeros(1)])  # rowsum(dO * O)
        dq = torch.zeros_like(q_ext)
        dk = torch.zeros_like(k_blk)
        dv = torch.zeros_like(v_blk)
        for rows, blk in _chunks(plan):
            scores = _tile_scores(plan, q_ext, k_blk, rows, blk)
            probs = torch.exp(scores.sub_(lse_ext[rows][..., None]))  # the final attention weights
            g_t = g_ext[rows]
            dv.index_add_(0, blk, torch.bmm(probs.transpose(1, 2), g_t))
            dscores = torch.bmm(g_t, v_blk[blk].transpose(1, 2)).sub_(delta[rows][..., None]).mul_(probs)
            dscores.mul_(plan.scale)
            dq.index_add_(0, rows.reshape(-1), torch.bmm(dscores, k_blk[blk]).reshape(-1, d))
            dk.index_add_(0, blk, torch.bmm(dscores.transpose(1, 2), q_ext[rows]))
        s = k.shape[2]
        unblock = lambda x: x.view(k.shape[0], k.shape[1], -1, d)[:, :, :s]  # noqa: E731
        return dq[:nq].view_as(q), unblock(dk), unblock(dv), None


# The CPU flash-attention kernels behind scaled_dot_product_attention, called directly because they also
# return the log-sum-exp (needed to merge a query's blocks) and their backward accepts the merged
# output and log-sum-exp. Private ATen ops, present in every torch this project supports (>= 2.8);
# the math path above is the fallback (other devices, or if the ops disappear).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_USE_CPU_FLASH = _CPU_FLASH is not None and _CPU_FLASH_BWD is not None
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@dataclass
class _OwnSegments:
    """The own-block attention of queries at positions ``offset..S-1`` as two flash calls.

    head: the queries in the first own block ``b0`` (rows ``0..head_rows-1``) against its keys
    ``b0*bs .. b0*bs + head_keys - 1``, with an explicit causal mask (``None`` when no key is after any
    query, e.g. one decoded token); body: the remaining queries, which start at a block boundary, as
    ``body_blocks`` blocks of ``bs`` queries against the same ``bs`` keys, causal (top-left aligned).
    """

    head_rows: int
    head_key0: int
    head_keys: int
    head_mask: Tensor | None
    body_key0: int
    body_blocks: int


def _own_segments(offset: int, s_q: int, s: int, block_size: int, dtype: torch.dtype, device) -> _OwnSegments:
    b0 = offset // block_size
    key0 = b0 * block_size
    head_end = min(s, key0 + block_size)  # first position after the head block's queries and keys
    head_rows = head_end - offset
    head_keys = head_end - key0
    mask = None
    if head_rows > 1:  # with one query (the last key), no key is after it
        q_pos = offset + torch.arange(head_rows, device=device)
        k_pos = key0 + torch.arange(head_keys, device=device)
        mask = torch.zeros(head_rows, head_keys, dtype=dtype, device=device)
        mask.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
        mask = mask[None, None]
    body_key0 = head_end
    return _OwnSegments(head_rows, key0, head_keys, mask, body_key0, -(-(s - body_key0) // block_size))


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """Zero-pad dim 1 of ``[N, L, ...]`` to ``rows``."""
    pad = rows - x.shape[1]
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)


class _MoBACPUFlash(torch.autograd.Function):
    """MoBA on CPU with ATen's flash-attention kernels, as MoBA's own efficient implementation does
    with FlashAttention: the own block (causal) in one call, the selected past blocks as tiles of
    queries sharing a key block (gathered, non-causal), merged per query by log-sum-exp. Backward:
    the flash backward of every piece with the merged output and log-sum-exp.

    Attention runs in the input dtype (fp32, fp64, bf16) with fp32 softmax statistics, as
    ``scaled_dot_product_attention``'s CPU kernel; merging is in fp32 (fp64 for fp64).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: _Plan) -> Tensor:
        b, h, s_q, d = q.shape
        s = k.shape[2]
        bs, scale = plan.block_size, plan.scale
        nq = b * h * s_q
        acc_dtype = _compute_dtype(q.dtype)
        seg = _own_segments(s - s_q, s_q, s, bs, q.dtype, q.device)
        q3 = q.reshape(b * h, s_q, d)
        kq = _expand_heads(k, h).reshape(b * h, s, d)
        vq = _expand_heads(v, h).reshape(b * h, s, d)
        outs, lses = [], []
        hk = slice(seg.head_key0, seg.head_key0 + seg.head_keys)
        o, lse = _CPU_FLASH(
            q3[:, None, : seg.head_rows], kq[:, None, hk], vq[:, None, hk], 0.0, False,
            attn_mask=seg.head_mask, scale=scale,
        )
        outs.append(o[:, 0])
        lses.append(lse[:, 0])
        if seg.body_blocks:
            rows = seg.body_blocks * bs
            shape = (b * h * seg.body_blocks, 1, bs, d)
            o, lse = _CPU_FLASH(
                _pad_rows(q3[:, seg.head_rows :], rows).reshape(shape),
                _pad_rows(kq[:, seg.body_key0 :], rows).reshape(shape),
                _pad_rows(vq[:, seg.body_key0 :], rows).reshape(shape),
                0.0, True, scale=scale,
            )
            outs.append(o.view(b * h, rows, d)[:, : s_q - seg.head_rows])
            lses.append(lse.view(b * h, rows)[:, : s_q - seg.head_rows])
        # Running (output, log-sum-exp) per query, from the own block; row NQ is the padding dummy.
        out_run = torch.cat([torch.cat(outs, 1).reshape(nq, d).to(acc_dtype), q.new_zeros(1, d, dtype=acc_dtype)])
        lse_run = torch.cat([torch.cat(lses, 1).reshape(nq).to(acc_dtype), q.new_full((1,), float("-inf"), dtype=acc_dtype)])
        q_ext = torch.cat([q.reshape(nq, d), q.new_zeros(1, d)])
        k_blk = _blocks(k, bs, plan.n_blocks)
        v_blk = _blocks(v, bs, plan.n_blocks)
        for rows, blk in _chunks(plan):
            o, lse = _CPU_FLASH(q_ext[rows][:, None], k_blk[blk][:, None], v_blk[blk][:, None], 0.0, False, scale=scale)
            flat = rows.reshape(-1)
            touched, inverse = torch.unique(flat, return_inverse=True)
            lse_e = lse.reshape(-1).to(acc_dtype)
            old = lse_run[touched]
            top = old.scatter_reduce(0, inverse, lse_e, "amax")
            w_old = torch.exp(old - top)
            w_e = torch.exp(lse_e - top[inverse])
            total = w_old.index_add(0, inverse, w_e)
            merged = torch.zeros(touched.numel(), d, dtype=acc_dtype, device=q.device)
            merged.index_add_(0, inverse, o.reshape(-1, d).to(acc_dtype) * w_e[:, None])
            out_run[touched] = (out_run[touched] * w_old[:, None] + merged) / total[:, None]
            lse_run[touched] = top + total.log()
        out = out_run[:nq].to(q.dtype).view(b, h, s_q, d)
        ctx.save_for_backward(q, k, v, out, lse_run[:nq])
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, h, s_q, d = q.shape
        h_kv, s = k.shape[1], k.shape[2]
        bs, scale = plan.block_size, plan.scale
        nq = b * h * s_q
        acc_dtype = _compute_dtype(q.dtype)
        seg = _own_segments(s - s_q, s_q, s, bs, q.dtype, q.device)
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
        hk = slice(seg.head_key0, seg.head_key0 + seg.head_keys)
        dq_, dk_, dv_ = _CPU_FLASH_BWD(
            g3[:, None, :hr], q3[:, None, :hr], kq[:, None, hk], vq[:, None, hk], o3[:, None, :hr],
            l2[:, None, :hr], 0.0, False, attn_mask=seg.head_mask, scale=scale,
        )
        dq3[:, :hr] += dq_[:, 0]
        dkq[:, hk] += dk_[:, 0]
        dvq[:, hk] += dv_[:, 0]
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
        q_ext = torch.cat([q.reshape(nq, d), q.new_zeros(1, d)])
        g_ext = torch.cat([g3.reshape(nq, d), q.new_zeros(1, d)])
        o_ext = torch.cat([o3.reshape(nq, d), q.new_zeros(1, d)])
        l_ext = torch.cat([l2.reshape(nq), l2.new_zeros(1)])
        k_blk = _blocks(k, bs, plan.n_blocks)
        v_blk = _blocks(v, bs, plan.n_blocks)
        dq_ext = torch.zeros(nq + 1, d, dtype=acc_dtype, device=q.device)
        dk_blk = torch.zeros(k_blk.shape, dtype=acc_dtype, device=q.device)
        dv_blk = torch.zeros(v_blk.shape, dtype=acc_dtype, device=q.device)
        for rows, blk in _chunks(plan):
            dq_, dk_, dv_ = _CPU_FLASH_BWD(
                g_ext[rows][:, None], q_ext[rows][:, None], k_blk[blk][:, None], v_blk[blk][:, None],
                o_ext[rows][:, None], l_ext[rows][:, None], 0.0, False, scale=scale,
            )
            dq_ext.index_add_(0, rows.reshape(-1), dq_.reshape(-1, d).to(acc_dtype))
            dk_blk.index_add_(0, blk, dk_[:, 0].to(acc_dtype))
            dv_blk.index_add_(0, blk, dv_[:, 0].to(acc_dtype))
        group = h // h_kv

        def to_kv(x_q: Tensor, x_blk: Tensor) -> Tensor:
            x = x_q.view(b, h_kv, group, s, d).sum(2) + x_blk.view(b, h_kv, -1, d)[:, :, :s]
            return x.to(k.dtype)

        dq = (dq3.reshape(nq, d) + dq_ext[:nq]).view_as(q).to(q.dtype)
        return dq, to_kv(dkq, dk_blk), to_kv(dvq, dv_blk), None


def _moba_torch(q: Tensor, k: Tensor, v: Tensor, block_size: int, top_k: int, scale: float) -> Tensor:
    flash = _USE_CPU_FLASH and q.device.type == "cpu" and q.dtype in _CPU_FLASH_DTYPES
    ct = _compute_dtype(q.dtype)
    with torch.no_grad():
        plan = _plan(q.detach().to(ct), k.detach().to(ct), block_size, top_k, scale, include_own=not flash)
    if flash:
        return _MoBACPUFlash.apply(q, k, v, plan)
    return _MoBAFunction.apply(q.to(ct), k.to(ct), v.to(ct), plan).to(q.dtype)


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
class MoBAAttention(nn.Module):
    """MoBA's options as a module: ``forward(q, k, v) -> out`` (registered as attention ``moba``).

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

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``q [B, H, S, Dh]``, ``k, v [B, H_kv, S, Dh]`` (raw keys) -> ``[B, H, S, Dh]``."""
        return moba_attention(q, k, v, self.block_size, self.top_k, self.key_conv, self.scale, self.backend)

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
