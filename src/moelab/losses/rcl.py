"""ProMoE's routing contrastive loss ``rcl`` (ali-vilab/ProMoE, ``compute_routing_contrastive_loss``).

Each prototype should be closest to the mean of the tokens routed to it: an InfoNCE over the
prototypes that received tokens, logits ``cos(P_i, m_j) / tau``. The router (``promoe``,
``moelab.routers.promoe``) leaves its input in ``ctx.slot(router)[X_KEY]`` for this loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.core.checks import positive_float
from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.losses.registry import register_loss

X_KEY = "x_TD"  # where the router leaves its input in ``ctx.slot(router)`` for ``rcl``


def routing_contrastive_loss(
    x_TD: Tensor, prototypes_PD: Tensor, token_index_N: Tensor, expert_index_N: Tensor, tau: float = 0.07
) -> Tensor:
    """ProMoE's routing contrastive loss over the assignments ``(token, expert)`` with ``expert < P``.

    ``m_e`` = mean of ``x`` over the tokens assigned to prototype ``e`` (entries to other experts,
    the unconditional one, are ignored); over the ``V`` prototypes with tokens,
    ``L = mean_i -log softmax_j(cos(P_i, m_j) / tau)[i]``. Returns 0 (with a zero gradient) when
    ``V < 2``, as the official code does. Gradients reach the prototypes and ``x``.
    """
    tau = positive_float("tau", tau)
    p, d = prototypes_PD.shape
    keep = expert_index_N < p
    tok, exp = token_index_N[keep], expert_index_N[keep]
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        counts = torch.bincount(exp, minlength=p)
        sums = x_TD.new_zeros(p, d, dtype=torch.float32).index_add(0, exp, x_TD[tok].float())
        valid = (counts > 0).nonzero().squeeze(1)
        if valid.shape[0] < 2:
            return prototypes_PD.float().sum() * 0.0
        means = sums[valid] / counts[valid].unsqueeze(1).float()
        sim = F.normalize(prototypes_PD[valid].float(), dim=-1) @ F.normalize(means, dim=-1).t()
        return F.cross_entropy(sim / tau, torch.arange(valid.shape[0], device=sim.device))



# --------------------------------------------------------------------------------- the loss
@register_loss(
    "rcl",
    paper="ProMoE routing contrastive loss (ali-vilab/ProMoE, compute_routing_contrastive_loss)",
    summary="InfoNCE of each prototype against the mean of its routed tokens (tau 0.07); needs the promoe router",
)
def rcl(routing: Routing, *, ctx: RoutingContext | None = None, layer=None, tau: float = 0.07) -> Tensor:
    """ProMoE's RCL for ``layer``'s routing (``routing_contrastive_loss``).

    Reads the prototypes from ``layer.router`` (a ``ProMoERouter``, or any router with ``prototypes [P, d]``) and the router's input of this
    forward from ``ctx.slot(layer.router)``, where the router left it.
    """
    router = getattr(layer, "router", None)
    prototypes = getattr(router, "prototypes", None)
    if not isinstance(prototypes, Tensor) or prototypes.dim() != 2:
        got = (
            type(router).__name__ if router is not None else f"layer {type(layer).__name__} without a router"
        )
        raise ValueError(f"rcl needs a layer whose router is 'promoe' (it reads the prototypes), got {got}")
    x_TD = None if ctx is None else ctx.slot(router).get(X_KEY)
    if x_TD is None or x_TD.shape[0] != routing.num_tokens:
        raise ValueError(
            "rcl needs the router's input of this forward in ctx.slot(layer.router); pass the ctx "
            "the router ran with (the MoE layer does)"
        )
    return routing_contrastive_loss(
        x_TD, prototypes, routing.token_index, routing.expert_index, tau=tau
    )
