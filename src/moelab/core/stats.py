"""Routing statistics, defined once: traces, analysis reports and the trainer's monitor read these.

- ``load_stats(counts_E)``: balance of an expert-load vector;
- ``router_entropy(routing)``: how spread the router's distribution is per token;
- ``logit_stats(routing)``: ST-MoE's z and the largest router logit;
- ``routing_stats(routing)``: all of it for one layer's routing.

Definitions (also in docs/analysis.md): with ``n_e`` the assignments expert ``e`` received,
``max_over_mean = max_e n_e / mean_e n_e``, ``cv = std_e n_e / mean_e n_e`` (population std),
``load_entropy = H(n / sum n) / log E``; ``entropy`` is the mean over tokens of ``H(p_t) / log E``
with ``p_t`` the router's probabilities renormalised to 1 (1 = uniform, 0 = one-hot).
Entropies are in nats before normalisation. Everything works from the COO entries and ``[E]``
counts; only ``entropy`` and the logit statistics read ``[T, E]`` tensors, and only when the
router provided them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.core.routing import Routing

NAN = float("nan")


def load_stats(counts_E: Tensor) -> dict[str, float | int]:
    """Balance of a load vector ``[E]`` (counts or fractions). For a ``Routing`` use ``routing_stats``."""
    if isinstance(counts_E, Routing):
        raise TypeError("load_stats takes a load vector [E] (e.g. routing.tokens_per_expert()); "
                        "for a Routing use routing_stats(routing)")
    if not isinstance(counts_E, Tensor) or counts_E.dim() != 1:
        raise TypeError(f"counts_E must be a 1-D tensor [E], got {getattr(counts_E, 'shape', type(counts_E).__name__)}")
    n = counts_E.detach().double().cpu()
    e = n.numel()
    mean = float(n.mean()) if e else 0.0
    total = float(n.sum())
    nz = n[n > 0] / total if total > 0 else n[:0]
    return {
        "max_over_mean": float(n.max()) / mean if mean > 0 else NAN,
        "min_over_mean": float(n.min()) / mean if mean > 0 else NAN,
        "cv": float(n.std(unbiased=False)) / mean if mean > 0 else NAN,
        "dead_experts": int((n == 0).sum()),
        "load_entropy": float(-(nz * nz.log()).sum()) / math.log(e) if e > 1 and nz.numel() else NAN,
    }


def router_entropy(routing: Routing) -> float:
    """Mean over tokens of ``H(p_t) / log E``; NaN without ``probs`` (or with ``E = 1``)."""
    r = routing
    if r.probs is None or r.num_tokens == 0 or r.num_experts < 2:
        return NAN
    p = r.probs.detach().double().cpu()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return float(h.mean()) / math.log(r.num_experts)


def logit_stats(routing: Routing) -> dict[str, float]:
    """``z`` (ST-MoE's mean squared log-partition) and ``max_abs_logit``; NaN without logits."""
    if routing.logits is None or routing.num_tokens == 0:
        return {"z": NAN, "max_abs_logit": NAN}
    lg = routing.logits.detach().float()
    return {"z": torch.logsumexp(lg, -1).square().mean().item(), "max_abs_logit": lg.abs().max().item()}


def routing_stats(routing: Routing) -> dict[str, float | int]:
    """One layer's summary: tokens, assignments, load balance, drop rate, entropy, z."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moelab.Routing, got {type(routing).__name__}")
    return {
        "tokens": routing.num_tokens,
        "assignments": routing.num_assignments,
        **load_stats(routing.tokens_per_expert()),
        "drop_rate": routing.drop_rate(),
        "entropy": router_entropy(routing),
        **logit_stats(routing),
    }
