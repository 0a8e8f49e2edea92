"""LoRA-Mixer's hard-soft top-k router: a hard top-k selection in the forward pass, soft gradients.

Paper: *LoRA-Mixer: Coordinate Modular LoRA Experts Through Serial Attention Routing* (hustcselwb,
2025; the repository is README-only). The paper describes the router as "hard-soft" (a hard
selection forward, soft gradients backward) without publishing the form; ours is the
straight-through estimator on the renormalised top-k softmax:

    p      = softmax(W_g x)                       [T, E]  fp32
    I      = top-k indices of p                   [T, k]
    s_i    = p_i / sum_{j in I} p_j  (i in I)             the soft weights
    w_i    = 1/k + s_i - sg(s_i)                          forward: exactly 1/k each; backward: ds/dlogits

so every chosen expert contributes equally in the forward pass (the hard selection), while the
router receives the gradient the soft renormalised gates would get. ``hard_weight="ones"`` uses
``w_i = 1 + s_i - sg(s_i)`` instead (our option).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.checks import top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.routers.capacity import token_choice_routing

HARD_WEIGHTS = ("mean", "ones")


def hard_soft_topk(logits_TE: Tensor, top_k: int, hard_weight: str = "mean") -> tuple[Tensor, Tensor, Tensor]:
    """``(probs [T, E], weight [T, k], index [T, k])`` of the hard-soft top-k (module docstring).

    ``weight`` equals ``1/k`` (``hard_weight="mean"``) or ``1`` (``"ones"``) in value, and its
    gradient is that of the renormalised top-k softmax gates.
    """
    if hard_weight not in HARD_WEIGHTS:
        raise ValueError(f"hard_weight must be one of {HARD_WEIGHTS}, got {hard_weight!r}")
    probs = torch.softmax(logits_TE, dim=-1)
    top, index = torch.topk(probs, top_k, dim=-1)
    soft = top / top.sum(dim=-1, keepdim=True)
    hard = 1.0 / top_k if hard_weight == "mean" else 1.0
    return probs, soft - soft.detach() + hard, index


@register_router(
    "hardsoft_topk",
    paper="LoRA-Mixer (hustcselwb 2025): hard-soft top-k routing; the straight-through form is our choice",
    summary="hard top-k forward (equal weights), gradients of the renormalised top-k softmax (straight-through)",
)
class HardSoftTopKRouter(Router):
    """Token-choice top-k with equal forward weights and soft (straight-through) gradients.

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: experts per token (default 2, our choice: the paper does not give ``k``).
        hard_weight: the forward weight of a chosen expert, ``"mean"`` (``1/k``, default) or ``"ones"``.
        bias: a learnable logit bias (default False).
    """

    def __init__(
        self, d_model: int, num_experts: int, top_k: int = 2, *, hard_weight: str = "mean", bias: bool = False
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        if hard_weight not in HARD_WEIGHTS:
            raise ValueError(f"hard_weight must be one of {HARD_WEIGHTS}, got {hard_weight!r}")
        self.hard_weight = hard_weight
        self._init_gate(bias)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits = self.router_logits(x_TD)
        probs, weight, index = hard_soft_topk(logits, self.top_k, self.hard_weight)
        return token_choice_routing(
            index, weight, self.num_experts, logits=logits, probs=probs, capacity_factor=None
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, hard_weight={self.hard_weight!r}"
