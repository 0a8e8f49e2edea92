"""Load-balancing and router z-losses.

- ``load_balance``: Switch Transformer eq. 4 (Fedus et al. 2022) / GShard:
  ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of assignments the router sent to expert i
  (before capacity drops) and ``P_i`` the mean router probability of i. Equals 1 when both are
  uniform. Coefficient 1e-2 in Switch and ST-MoE.
- ``load_balance_seq``: the same per sequence, then averaged (DeepSeek-V3's complementary
  sequence-wise loss, alpha = 1e-4; probabilities renormalised per token, which leaves softmax
  routers unchanged and turns sigmoid scores into a distribution).
- ``z``: ST-MoE router z-loss (Zoph et al. 2022) ``mean_t (logsumexp_j z_tj)^2``; coefficient 1e-3.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..routing.routing import Routing
from .registry import register_loss


def _normalised_probs(routing: Routing, what: str) -> Tensor:
    if routing.probs is None:
        raise ValueError(f"{what} needs routing.probs; this router did not provide them")
    p = routing.probs.float()
    return p / p.sum(-1, keepdim=True).clamp_min(1e-20)


@register_loss(
    "load_balance",
    paper="Switch Transformers (Fedus et al. 2022), eq. 4; GShard (Lepikhin et al. 2021)",
    summary="E * sum_i f_i P_i over the batch: fraction routed times mean probability",
)
def load_balance(routing: Routing, *, seq_len: int | None = None, layer=None) -> Tensor:
    p = _normalised_probs(routing, "load_balance")
    if routing.num_tokens == 0:
        return p.sum() * 0.0
    demand = routing.requested if routing.requested is not None else routing.tokens_per_expert()
    f = demand.float() / demand.sum().clamp_min(1)
    return routing.num_experts * (f * p.mean(0)).sum()


@register_loss(
    "load_balance_seq",
    paper="DeepSeek-V3 (DeepSeek-AI 2024), complementary sequence-wise balance loss",
    summary="load_balance computed per sequence and averaged (needs [B, S, d] input)",
)
def load_balance_seq(routing: Routing, *, seq_len: int | None = None, layer=None) -> Tensor:
    p = _normalised_probs(routing, "load_balance_seq")
    t, e = routing.num_tokens, routing.num_experts
    if seq_len is None:
        seq_len = t  # a [T, d] input is one sequence
    if t == 0:
        return p.sum() * 0.0
    if t % seq_len:
        raise ValueError(f"seq_len={seq_len} does not divide the {t} routed tokens")
    b = t // seq_len
    # Selection counts per (sequence, expert) from the routing's assignments.
    seq_of = routing.token_index // seq_len
    counts = (
        torch.zeros(b * e, device=p.device)
        .index_add_(0, seq_of * e + routing.expert_index, torch.ones_like(seq_of, dtype=torch.float))
        .view(b, e)
    )
    f = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    pm = p.view(b, seq_len, e).mean(1)
    return (e * (f * pm).sum(-1)).mean()


@register_loss(
    "z",
    paper="ST-MoE (Zoph et al. 2022), router z-loss, eq. 5",
    summary="mean over tokens of logsumexp(logits)^2: keeps router logits small",
)
def z_loss(routing: Routing, *, seq_len: int | None = None, layer=None) -> Tensor:
    if routing.logits is None:
        raise ValueError("z needs routing.logits; this router did not provide them")
    if routing.num_tokens == 0:
        return routing.logits.sum() * 0.0
    return torch.logsumexp(routing.logits.float(), dim=-1).square().mean()
