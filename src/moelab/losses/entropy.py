"""The Tsallis entropy loss of DynMoLE's router: ``tsallis_entropy`` (``mean_t S_q(p_t)``).

Li et al., *DynMoLE* (2025); official code mikecovlee/DynMoLE ``moe_peft/common/moe_utils.py``
(``tsallis_entropy``) and ``adapters/dynmole/model.py`` (the loss ``dyn_coef * mean S_q``,
``dyn_coef = 1e-2``). The router that uses it, ``tsallis_topp``, is ``moelab.routers.tsallis``;
the loss reads only ``routing.probs``, so it sharpens any router that provides them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.core.checks import float_in, positive_float
from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.losses.registry import register_loss


def tsallis_entropy(p_TE: Tensor, q: float = 1.1, *, normalize: bool = True, eps: float = 1e-5) -> Tensor:
    """``[T]`` Tsallis entropy of each row of ``p_TE`` (DynMoLE's ``tsallis_entropy``).

    ``S_q(p) = (1 - sum_e (p_e + eps)^q) / (q - 1)``; at ``q = 1`` the Shannon entropy
    ``-sum_e (p_e + eps) log(p_e + eps)`` (its limit). ``normalize`` divides by the maximum over
    ``E`` outcomes, ``(1 - E^(1-q)) / (q - 1)`` (``log E`` at ``q = 1``); with ``E = 1`` the
    entropy is 0. ``eps`` (the code's ``1e-5``) keeps ``p^q`` differentiable at ``p = 0`` for
    ``q < 1``; ``eps = 0`` gives the textbook formula.
    """
    if not isinstance(p_TE, Tensor) or p_TE.dim() < 1:
        raise ValueError(f"p_TE must be a [..., E] tensor, got {type(p_TE).__name__}")
    q = positive_float("q", q)
    eps = float_in("eps", eps, 0.0, 1.0)
    e = p_TE.shape[-1]
    p = p_TE.to(torch.promote_types(p_TE.dtype, torch.float32)) + eps  # fp32 at least; fp64 kept
    if q == 1.0:
        s = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0
        top = math.log(e)
    else:
        s = (1.0 - p.pow(q).sum(-1)) / (q - 1.0)
        top = (1.0 - e ** (1.0 - q)) / (q - 1.0)
    if not normalize:
        return s
    if e == 1:  # one outcome: no uncertainty, and the maximum is 0
        return torch.zeros_like(s)
    return s / top


def tsallis_entropy_loss(
    probs_TE: Tensor, q: float = 1.1, *, normalize: bool = True, eps: float = 1e-5
) -> Tensor:
    """``mean_t S_q(p_t)``: DynMoLE's entropy loss (``router_entropy.mean()``). 0 for ``T = 0``."""
    if probs_TE.shape[0] == 0:
        return probs_TE.float().sum() * 0.0
    return tsallis_entropy(probs_TE, q, normalize=normalize, eps=eps).mean()


# --------------------------------------------------------------------------------- the loss
@register_loss(
    "tsallis_entropy",
    paper="DynMoLE (Li et al. 2025), router entropy loss; official code mikecovlee/DynMoLE",
    summary="mean over tokens of the normalised Tsallis entropy S_q(p) (q=1.1): sharpens the router; coef 1e-2",
)
def tsallis_entropy_aux(
    routing: Routing,
    *,
    ctx: RoutingContext | None = None,
    layer=None,
    q: float = 1.1,
    eps: float = 1e-5,
    normalize: bool = True,
) -> Tensor:
    if routing.probs is None:
        raise ValueError("tsallis_entropy needs routing.probs; this router did not provide them")
    return tsallis_entropy_loss(routing.probs, q, normalize=normalize, eps=eps)
