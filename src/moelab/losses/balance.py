"""Load-balancing and router z-losses: the math as pure functions, registered by name.

- ``load_balance``: Switch Transformer eq. 4 (Fedus et al. 2022) / GShard:
  ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of assignments the router sent to expert i
  (before capacity drops) and ``P_i`` the mean router probability of i. Equals 1 when both are
  uniform. Coefficient 1e-2 in Switch and ST-MoE.
- ``load_balance_seq``: the same per sequence, then averaged (DeepSeek-V3's complementary
  sequence-wise loss, alpha = 1e-4; probabilities renormalised per token, which leaves softmax
  routers unchanged and turns sigmoid scores into a distribution). ``f`` counts the experts the
  router actually selected (biased by DeepSeek's ``e_score_correction_bias``, group-limited), as
  Megatron-LM computes it.
- ``load_balance_seq_unbiased``: DeepSeek-V3's eq. 17-20 as written: ``f`` counts
  ``Topk(s_t, K)`` of the unbiased scores, without the bias and without group limiting.
- ``z``: ST-MoE router z-loss (Zoph et al. 2022) ``mean_t (logsumexp_j z_tj)^2``; coefficient 1e-3.

All of them need the router's dense ``probs``/``logits``; a router that does not form them (a
product-key pool over ~10^6 experts) gets a clear error naming the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.losses.registry import register_loss


# --------------------------------------------------------------------------------- pure functions
def load_balance_loss(probs_TE: Tensor, demand_E: Tensor) -> Tensor:
    """``E * sum_i f_i P_i``: ``f = demand / sum(demand)`` and ``P`` the mean of each row-normalised ``probs``."""
    p = probs_TE.float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    e = p.shape[-1]
    if p.shape[0] == 0:
        return p.sum() * 0.0
    f = demand_E.float() / demand_E.sum().clamp_min(1)
    return e * (f * p.mean(0)).sum()


def load_balance_seq_loss(probs_TE: Tensor, token_index_N: Tensor, expert_index_N: Tensor, seq_len: int) -> Tensor:
    """``mean_b E * sum_i f_{b,i} P_{b,i}`` over sequences of ``seq_len`` consecutive tokens.

    ``f_{b,i}``: the fraction of sequence ``b``'s counted assignments (``token_index``,
    ``expert_index``) that went to ``i``; ``P_{b,i}``: the mean row-normalised probability.
    """
    p = probs_TE.float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    t, e = p.shape
    if t == 0:
        return p.sum() * 0.0
    if t % seq_len:
        raise ValueError(f"seq_len={seq_len} does not divide the {t} routed tokens")
    b = t // seq_len
    seq_of = token_index_N // seq_len
    counts = (
        torch.zeros(b * e, device=p.device)
        .index_add_(0, seq_of * e + expert_index_N, torch.ones_like(seq_of, dtype=torch.float))
        .view(b, e)
    )
    f = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    pm = p.view(b, seq_len, e).mean(1)
    return (e * (f * pm).sum(-1)).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """``mean_t logsumexp(logits_t)^2`` (ST-MoE eq. 5)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


# --------------------------------------------------------------------------------- registered losses
def _probs(routing: Routing, what: str) -> Tensor:
    if routing.probs is None:
        raise ValueError(f"{what} needs routing.probs; this router did not provide them")
    return routing.probs


def _seq_len(routing: Routing, ctx: RoutingContext | None) -> int:
    s = ctx.seq_len if ctx is not None else None
    return routing.num_tokens if s is None else s  # a [T, d] input is one sequence


@register_loss(
    "load_balance",
    paper="Switch Transformers (Fedus et al. 2022), eq. 4; GShard (Lepikhin et al. 2021)",
    summary="E * sum_i f_i P_i over the batch: fraction routed times mean probability",
)
def load_balance(routing: Routing, *, ctx: RoutingContext | None = None, layer=None) -> Tensor:
    demand = routing.requested if routing.requested is not None else routing.tokens_per_expert()
    return load_balance_loss(_probs(routing, "load_balance"), demand)


@register_loss(
    "load_balance_seq",
    paper="DeepSeek-V3 (DeepSeek-AI 2024), complementary sequence-wise balance loss (Megatron-LM's counting)",
    summary="load_balance per sequence, averaged; counts the experts actually selected (needs [B, S, d] input)",
)
def load_balance_seq(routing: Routing, *, ctx: RoutingContext | None = None, layer=None) -> Tensor:
    p = _probs(routing, "load_balance_seq")
    return load_balance_seq_loss(p, routing.token_index, routing.expert_index, _seq_len(routing, ctx))


@register_loss(
    "load_balance_seq_unbiased",
    paper="DeepSeek-V3 (DeepSeek-AI 2024), eq. 17-20 as written: f counts Topk(s_t, K) without the bias",
    summary="load_balance_seq with f from the top-K of the unbiased scores (no bias, no group limit)",
)
def load_balance_seq_unbiased(routing: Routing, *, ctx: RoutingContext | None = None, layer=None) -> Tensor:
    p = _probs(routing, "load_balance_seq_unbiased")
    k = routing.top_k or getattr(getattr(layer, "router", None), "top_k", None) or getattr(layer, "top_k", None)
    if not k:
        raise ValueError("load_balance_seq_unbiased needs K: a top-k routing or a layer with top_k")
    t = routing.num_tokens
    index_TK = torch.topk(p.detach(), k, dim=-1).indices
    token_index = torch.arange(t, device=p.device).repeat_interleave(k)
    return load_balance_seq_loss(p, token_index, index_TK.reshape(-1), _seq_len(routing, ctx))


@register_loss(
    "z",
    paper="ST-MoE (Zoph et al. 2022), router z-loss, eq. 5",
    summary="mean over tokens of logsumexp(logits)^2: keeps router logits small",
)
def z(routing: Routing, *, ctx: RoutingContext | None = None, layer=None) -> Tensor:
    if routing.logits is None:
        raise ValueError("z needs routing.logits; this router did not provide them")
    return z_loss(routing.logits)
