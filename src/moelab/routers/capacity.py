"""Expert capacity for token-choice routers: how many assignments an expert may take, and which.

Pure functions, plus ``Capacity``: the one place a router's capacity settings (training factor,
evaluation factor, drop policy) are checked and applied. A dropped assignment simply gets no entry
in the ``Routing``; its token rides the residual (Switch Transformer, GShard).

Drop policies (which of an expert's requests survive when it has more than ``C``):

- ``"batch_priority"``: batch-prioritised routing (V-MoE, Riquelme et al. 2021; used by ST-MoE):
  tokens are ranked by their top-1 gate, and every token's first choice is served before any
  token's second choice; within one choice rank, higher-priority tokens first.
- ``"probs"``: Megatron-LM's ``"probs"`` drop policy: every assignment is ranked globally by its
  own gate, so a token's strong second choice can evict another token's weak first choice.
- ``"position"``: GShard's first-come order: every first choice in token order, then every
  second choice, and so on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.core.checks import positive_float
from moelab.core.routing import Routing

DROP_POLICIES = ("batch_priority", "probs", "position")
# ``eval_capacity_factor`` default: evaluate with the training capacity.
SAME_AS_TRAINING = "same"


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """``C = ceil(capacity_factor * T * k / E)`` (Switch eq. 3 with k = 1; GShard's ``2T/E`` is cf = 1, k = 2)."""
    c = capacity_factor * num_tokens * top_k / num_experts
    # Float rounding must not add a slot: 1.1 * 50 is 55.000000000000007, and C is 55.
    return int(math.ceil(c - 1e-9 * max(1.0, c)))


def check_drop_policy(policy: object) -> str:
    if policy == "probability":
        raise ValueError(
            "drop_policy 'probability' was split in two: 'batch_priority' (V-MoE / ST-MoE: first "
            "choices before second choices) or 'probs' (Megatron: one global ranking by gate; v1's rule)"
        )
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {policy!r}")
    return policy  # type: ignore[return-value]


def capacity_keep_mask(
    topk_index_TK: Tensor,
    topk_score_TK: Tensor,
    capacity: int,
    num_experts: int,
    policy: str = "batch_priority",
    valid_TK: Tensor | None = None,
) -> Tensor:
    """``[T, k]`` bool: which assignments survive a per-expert capacity ``C``.

    Each expert keeps at most ``capacity`` of the assignments sent to it, in the priority order
    of ``policy`` (module docstring). Ties keep the earlier slot, then the earlier token.
    ``topk_score_TK`` ranks assignments (``"probs"``) and tokens (``"batch_priority"``: a token's
    priority is its largest valid score). ``valid_TK`` marks assignments that exist; the others
    take no capacity and are never kept.
    """
    check_drop_policy(policy)
    t, k = topk_index_TK.shape
    n = t * k
    if n == 0:
        return torch.ones_like(topk_index_TK, dtype=torch.bool)
    device = topk_index_TK.device
    # Flatten slot-major: position n = slot * T + token.
    expert_N = topk_index_TK.t().reshape(-1)
    if valid_TK is not None:
        # Invalid assignments go to a virtual expert E, whose "capacity" we ignore.
        expert_N = expert_N.masked_fill(~valid_TK.t().reshape(-1), num_experts)
    score = topk_score_TK.float()
    if policy == "probs":
        priority = torch.sort(-score.t().reshape(-1), stable=True).indices
    elif policy == "batch_priority":
        if valid_TK is not None:
            score = score.masked_fill(~valid_TK, float("-inf"))
        token_order = torch.sort(-score.max(dim=1).values, stable=True).indices  # [T]
        priority = (torch.arange(k, device=device).unsqueeze(1) * t + token_order.unsqueeze(0)).reshape(-1)
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


@dataclass(frozen=True)
class Capacity:
    """A token-choice router's capacity settings, checked once.

    Attributes:
        factor: training capacity factor (``C = ceil(factor * T * k / E)``); None is dropless.
        eval_factor: the factor at evaluation; ``"same"`` (default) uses ``factor``, None is
            dropless (causal: each token's routing then depends on that token alone).
        drop_policy: one of ``DROP_POLICIES``.
    """

    factor: float | None = None
    eval_factor: float | None | str = SAME_AS_TRAINING
    drop_policy: str = "batch_priority"

    def __post_init__(self) -> None:
        positive_float("capacity_factor", self.factor, allow_none=True)
        if self.eval_factor != SAME_AS_TRAINING:
            positive_float("eval_capacity_factor", self.eval_factor, allow_none=True)
        check_drop_policy(self.drop_policy)

    def factor_for(self, training: bool) -> float | None:
        if training or self.eval_factor == SAME_AS_TRAINING:
            return self.factor
        return self.eval_factor  # type: ignore[return-value]

    @property
    def dropless_at_eval(self) -> bool:
        return self.factor_for(training=False) is None

    def describe(self) -> str:
        return f"capacity_factor={self.factor}, eval_capacity_factor={self.eval_factor}, drop_policy={self.drop_policy!r}"


def token_choice_routing(
    topk_index_TK: Tensor,
    topk_weight_TK: Tensor,
    num_experts: int,
    *,
    logits: Tensor | None,
    probs: Tensor | None,
    capacity_factor: float | None,
    drop_policy: str = "batch_priority",
    keep_TK: Tensor | None = None,
    priority_TK: Tensor | None = None,
) -> Routing:
    """Build the ``Routing`` of a token-choice router, applying capacity when asked.

    ``keep_TK`` (bool ``[T, k]``) removes assignments before capacity (GShard's sampled second
    expert). ``priority_TK`` ranks assignments for the drop policies (default: the combine
    weight; routers pass their raw score). ``capacity_factor=None`` is dropless. The result stays
    token-major, so a dropless routing keeps ``top_k`` set and combines with a reshape-and-sum.
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
