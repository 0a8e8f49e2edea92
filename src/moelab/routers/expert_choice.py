"""Expert-choice routing: each expert picks its top-C tokens.

Paper: Zhou et al., *Mixture-of-Experts with Expert Choice Routing* (NeurIPS 2022).
``S = softmax_experts(X W^T)`` (``[T, E]``); expert ``e`` takes the ``C = ceil(T * c / E)`` tokens
with the largest ``S[:, e]``; the output is ``sum_(e,t) S[t, e] * E_e(x_t)``. Perfect load balance
by construction, no auxiliary loss; a token may get 0..E experts.

Not causal: a token's routing depends on every other token of the batch, including later ones,
so autoregressive decoding with expert choice does not match training. Use it for encoders,
for comparisons at training time, or with a causal predictor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.core.checks import positive_float, positive_int
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """``C = min(T, ceil(T * c / E))``."""
    c = num_tokens * capacity_factor / num_experts
    # Float rounding must not add a slot (as in ``expert_capacity``).
    return min(num_tokens, int(math.ceil(c - 1e-9 * max(1.0, c))))


def expert_choice(probs_TE: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each expert's top-``capacity`` tokens. Returns ``(token [E*C], expert [E*C], weight [E*C])``,
    expert-major (expert 0's tokens first, best first)."""
    t, e = probs_TE.shape
    weight_EC, token_EC = torch.topk(probs_TE.t(), capacity, dim=-1)
    expert_EC = torch.arange(e, device=probs_TE.device).unsqueeze(1).expand(e, capacity)
    return token_EC.reshape(-1), expert_EC.reshape(-1), weight_EC.reshape(-1)


@register_router(
    "expert_choice",
    paper="Expert Choice routing (Zhou et al. 2022)",
    summary="each expert takes its top-C tokens, C = T*c/E (c=2); balanced by construction; non-causal",
)
class ExpertChoiceRouter(Router):
    """Expert-choice router.

    Args:
        capacity_factor: ``c``, the average number of experts per token (paper: 2).
        top_k: accepted for a uniform config; when given and ``capacity_factor`` is not, it sets
            ``c = top_k`` (the same average number of experts per token).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        capacity_factor: float | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        if top_k is not None:
            positive_int("top_k", top_k)
            if top_k > num_experts:
                raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        if capacity_factor is None:
            capacity_factor = float(top_k) if top_k is not None else 2.0
        self.capacity_factor = positive_float("capacity_factor", capacity_factor)
        self._init_gate(bias=False)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits = self.router_logits(x_TD)
        probs = torch.softmax(logits, dim=-1)
        t = x_TD.shape[0]
        cap = expert_choice_capacity(t, self.num_experts, self.capacity_factor)
        token, expert, weight = expert_choice(probs, cap)
        return Routing(
            token_index=token,
            expert_index=expert,
            weight=weight,
            num_tokens=t,
            num_experts=self.num_experts,
            logits=logits,
            probs=probs,
            validate=False,
        )

    @property
    def causal_at_eval(self) -> bool:
        return False  # each expert ranks the whole batch

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"
