"""The per-sequence gather of depth routing: run a block on k chosen tokens of each sequence.

Depth routers choose, per sequence, which tokens a block processes. The chosen tokens are
gathered into ``[B, k, d]`` in position order (so causal attention among them is the
lower triangle), the block runs on them at their true positions (RoPE and masking read
``positions``), and the block's update is scattered back. When rows choose different counts
(a causal decision at inference, a token-choice depth), the gather is ragged: each row is padded
to the longest with ``valid = False`` entries placed after the real ones, which the block masks
out as keys and whose outputs are dropped.

Pure functions; shapes in the names (``B`` batch, ``S`` sequence, ``K`` chosen per row).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.core.context import RoutingContext
from moelab.core.routing import Routing


def capacity_count(capacity: float, seq_len: int) -> int:
    """Tokens per sequence at capacity ``capacity``: ``ceil(capacity * S)``, at least 1 when S > 0
    (our choice of rounding; MoD's paper states C = 12.5% of the sequence)."""
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must lie in (0, 1], got {capacity}")
    return 0 if seq_len == 0 else max(1, min(seq_len, math.ceil(capacity * seq_len - 1e-9)))


def topk_per_sequence(scores_BS: Tensor, k: int, among_BS: Tensor | None = None) -> Tensor:
    """``[B, k]`` long: each row's ``k`` highest-scoring positions, sorted by position.

    ``among_BS`` (bool): choose only among these (MoR's nested selection); a row with fewer than
    ``k`` of them still returns ``k`` positions, the best excluded ones filling in last, so use
    ``among_BS`` with ``k`` no larger than every row's count."""
    if scores_BS.dim() != 2:
        raise ValueError(f"scores must be [B, S], got {tuple(scores_BS.shape)}")
    if not 0 <= k <= scores_BS.shape[1]:
        raise ValueError(f"k must lie in [0, S={scores_BS.shape[1]}], got {k}")
    s = scores_BS.detach().float()
    if among_BS is not None:
        s = s.masked_fill(~among_BS, float("-inf"))
    idx = torch.topk(s, k, dim=1, sorted=False).indices
    return idx.sort(dim=1).values


def ragged_index(mask_BS: Tensor) -> tuple[Tensor, Tensor]:
    """The chosen positions of each row of ``mask [B, S]`` (bool), padded: ``(index [B, K], valid
    [B, K])`` with K the largest row count, positions ascending, padding (index 0) last."""
    if mask_BS.dim() != 2 or mask_BS.dtype != torch.bool:
        raise ValueError(f"mask must be a [B, S] bool tensor, got {mask_BS.dtype} {tuple(mask_BS.shape)}")
    b, s = mask_BS.shape
    counts = mask_BS.sum(dim=1)
    k = int(counts.max()) if b and s else 0
    pos = torch.arange(s, device=mask_BS.device).expand(b, s)
    # chosen positions first (in order), then the rest: sort by (not chosen, position)
    key = (~mask_BS).long() * s + pos
    idx = key.argsort(dim=1)[:, :k]
    valid = torch.arange(k, device=mask_BS.device)[None, :] < counts[:, None]
    return idx.masked_fill(~valid, 0), valid


def gather_tokens(x_BSD: Tensor, index_BK: Tensor) -> Tensor:
    """``x[b, index[b, j]]`` as ``[B, K, D]``."""
    return x_BSD.gather(1, index_BK[..., None].expand(-1, -1, x_BSD.shape[-1]))


def scatter_update(
    x_BSD: Tensor, index_BK: Tensor, update_BKD: Tensor, valid_BK: Tensor | None = None
) -> Tensor:
    """``x`` with ``update[b, j]`` added at ``index[b, j]`` (rows with ``valid`` False add nothing);
    out of place, differentiable in both."""
    if valid_BK is not None:
        update_BKD = update_BKD * valid_BK[..., None].to(update_BKD.dtype)
    return x_BSD.scatter_add(
        1, index_BK[..., None].expand(-1, -1, x_BSD.shape[-1]), update_BKD.to(x_BSD.dtype)
    )


def positions_of(index_BK: Tensor, positions_BS: Tensor | None) -> Tensor:
    """The true positions of gathered tokens: ``positions[b, index[b, j]]`` (``index`` itself
    when the rows sit at ``0 .. S-1``)."""
    return index_BK if positions_BS is None else positions_BS.gather(1, index_BK)


def gathered_context(ctx: RoutingContext, index_BK: Tensor, seq_len: int) -> RoutingContext:
    """``ctx`` for a block run on gathered tokens: its per-token fields (``token_ids``,
    ``token_types``, ``positions``: ``[B*S]``) gathered like the tokens, so routers inside the block
    (pre-gates over token ids, token-type routers) read each gathered token's own values. Fields of
    another length are left as they are."""
    b = index_BK.shape[0]
    changes = {}
    for name in ("token_ids", "token_types", "positions"):
        t = getattr(ctx, name)
        if isinstance(t, Tensor) and t.numel() == b * seq_len:
            changes[name] = t.reshape(b, seq_len).gather(1, index_BK).reshape(-1)
    return ctx.replace(**changes)


def compute_routing(
    selected_BS: Tensor, weight_BS: Tensor, logits_T1: Tensor | None = None, probs_T1: Tensor | None = None
) -> Routing:
    """A block's routing as a depth router states it: the selected tokens (flattened, ``T = B*S``)
    -> expert 0, "compute", each with its weight; ``logits``/``probs`` ``[T, 1]`` when given."""
    index = selected_BS.reshape(-1).nonzero().squeeze(1)
    return Routing(
        token_index=index,
        expert_index=torch.zeros_like(index),
        weight=weight_BS.reshape(-1)[index],
        num_tokens=selected_BS.numel(),
        num_experts=1,
        logits=logits_T1,
        probs=probs_T1,
        validate=False,
    )


def routing_selection(routing: Routing, b: int, s: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(selected [B, S] bool, weight [B, S])`` of a compute routing: what runs after a routing
    transform rewrote it (``like``: a tensor of the weights' dtype and device)."""
    t = b * s
    sel = torch.zeros(t, dtype=torch.bool, device=like.device)
    sel[routing.token_index] = True
    w = like.new_zeros(t).index_put((routing.token_index,), routing.weight.to(like.dtype))
    return sel.view(b, s), w.view(b, s)
