"""Expert capacity for token-choice routers: how many assignments an expert may take.

Pure functions. A dropped assignment simply gets no entry in the ``Routing``; its token rides
the residual (Switch Transformer, GShard).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .routing import Routing

DROP_POLICIES = ("probability", "position")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """``C = ceil(capacity_factor * T * k / E)`` (Switch eq. 3, GShard)."""
    c = capacity_factor * num_tokens * top_k / num_experts
    # Float rounding must not add a slot: 1.1 * 50 is 55.000000000000007, and C is 55.
    return int(math.ceil(c - 1e-9 * max(1.0, c)))


def capacity_keep_mask(
    topk_index_TK: Tensor,
    topk_score_TK: Tensor,
    capacity: int,
    num_experts: int,
    policy: str = "probability",
    valid_TK: Tensor | None = None,
) -> Tensor:
    """``[T, k]`` bool: which assignments survive a per-expert capacity ``C``.

    Each expert keeps at most ``capacity`` of the assignments sent to it, chosen by ``policy``:

    - ``"probability"``: the ones with the highest router score (batch-prioritised routing,
      V-MoE / ST-MoE); ties go to the earlier slot (a first choice before a second), then
      the earlier token.
    - ``"position"``: first come, first served in the order of GShard's dispatch: every token's
      first choice (in token order) before any token's second choice, and so on.

    ``valid_TK`` marks assignments that exist; the others take no capacity and are never kept.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {policy!r}")
    t, k = topk_index_TK.shape
    n = t * k
    if n == 0:
        return torch.ones_like(topk_index_TK, dtype=torch.bool)
    device = topk_index_TK.device
    # Flatten in priority order, slot-major so position policy is (slot, token).
    expert_N = topk_index_TK.t().reshape(-1)
    if valid_TK is not None:
        # Invalid assignments go to a virtual expert E, whose "capacity" we ignore.
        expert_N = expert_N.masked_fill(~valid_TK.t().reshape(-1), num_experts)
    if policy == "probability":
        priority = torch.sort(-topk_score_TK.t().reshape(-1).float(), stable=True).indices
    else:
        priority = torch.arange(n, device=device)
    # Rank of each assignment among those to the same expert, in priority order.
    e_by_priority = expert_N[priority]
    by_expert = torch.sort(e_by_priority, stable=True).indices
    order = priority[by_expert]  # assignments grouped by expert, each group in priority order
    counts = torch.bincount(expert_N, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long, device=device)
    rank[order] = torch.arange(n, device=device) - starts[expert_N[order]]
    keep_slot_major = (rank < capacity) & (expert_N < num_experts)
    return keep_slot_major.view(k, t).t()


def token_choice_routing(
    topk_index_TK: Tensor,
    topk_weight_TK: Tensor,
    num_experts: int,
    *,
    logits: Tensor | None,
    probs: Tensor | None,
    capacity_factor: float | None,
    drop_policy: str = "probability",
    keep_TK: Tensor | None = None,
    priority_TK: Tensor | None = None,
) -> Routing:
    """Build the ``Routing`` of a token-choice router, applying capacity when asked.

    ``keep_TK`` (bool ``[T, k]``) removes assignments before capacity (GShard's sampled second
    expert). ``priority_TK`` ranks assignments for the "probability" drop policy (default: the
    combine weight; routers pass their raw score). ``capacity_factor=None`` is dropless. The result stays token-major, so a dropless
    routing keeps ``top_k`` set and combines with a reshape-and-sum.
    """
    t, k = topk_index_TK.shape
    if keep_TK is None and capacity_factor is None:
        return Routing.from_topk(
            topk_index_TK, topk_weight_TK, num_experts, logits=logits, probs=probs, validate=False
        )
    keep = torch.ones_like(topk_index_TK, dtype=torch.bool) if keep_TK is None else keep_TK
    requested = None
    if capacity_factor is not None:
        cap = expert_capacity(t, num_experts, k, capacity_factor)
        # Requests that survived sampling compete for capacity; others never asked.
        requested = torch.bincount(topk_index_TK[keep], minlength=num_experts)
        keep = capacity_keep_mask(
            topk_index_TK,
            (topk_weight_TK if priority_TK is None else priority_TK).detach(),
            cap,
            num_experts,
            drop_policy,
            valid_TK=keep,
        )
    flat_keep = keep.reshape(-1)
    token_index = torch.arange(t, device=topk_index_TK.device).repeat_interleave(k)[flat_keep]
    return Routing(
        token_index=token_index,
        expert_index=topk_index_TK.reshape(-1)[flat_keep],
        weight=topk_weight_TK.reshape(-1)[flat_keep],
        num_tokens=t,
        num_experts=num_experts,
        logits=logits,
        probs=probs,
        requested=requested,
        validate=False,
    )
