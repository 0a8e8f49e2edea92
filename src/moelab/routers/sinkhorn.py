"""Sinkhorn balancing: routing as entropy-regularised optimal transport of tokens to experts.

Papers and code:
- Clark et al. *Unified Scaling Laws for Routed Language Models* (2022), S-BASE; Megatron-LM's
  ``moe_router_load_balancing_type="sinkhorn"`` (``megatron/core/transformer/moe/router.py``,
  ``moe_utils.sinkhorn``): in training the top-k of the Sinkhorn-balanced scores picks the
  experts, computed without gradient, while the gates are the raw router scores at those
  experts (softmax for k > 1, sigmoid for k = 1, not renormalised); at inference the top-k of
  the raw scores picks them. No auxiliary loss.
- *Selective Sinkhorn Routing* (SSR, v2, Eq. 3-6 and Alg. 2): the same transport problem with an
  explicit temperature ``xi``, ``Pi = argmax <Pi, C> - xi <Pi, log Pi>`` with rows summing to 1 and
  columns to ``T / E``, used only on a random fraction ``p`` of training steps (per layer); the
  other steps, and inference, are plain softmax top-k. Gates on a Sinkhorn step are the top-k
  plan values renormalised. No auxiliary loss.

``sinkhorn`` below solves the problem in the log domain (stable for any ``xi``); Megatron's
multiplicative form is the case ``xi = 1`` with other marginals (each token ``1 / T``, each expert
``1 / E``), which selects the same experts since top-k per row ignores a per-row scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.checks import float_in, positive_float, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.routers.topk import softmax_topk

COST_TYPES = ("linear", "softmax")


def sinkhorn(
    cost_TE: Tensor,
    *,
    xi: float = 1.0,
    tol: float = 1e-4,
    max_iter: int = 100,
    expert_mass: float | None = None,
) -> Tensor:
    """The entropy-regularised transport plan ``Pi [T, E]`` maximising ``<Pi, C> + xi H(Pi)``.

    Marginals: every row (token) sums to 1 and every column (expert) to ``expert_mass``
    (default ``T / E``: a perfectly balanced load). Log-domain Sinkhorn iterations
    ``f = -logsumexp(C/xi + g, 1)``, ``g = log(m) - logsumexp(C/xi + f, 0)`` alternate until the
    rows are within ``tol`` of 1 (the columns are exact after each ``g`` update) or ``max_iter``.
    ``Pi = exp(C/xi + f + g)``.

    Args:
        cost_TE: ``[T, E]`` scores to transport along (logits, or probabilities).
        xi: entropy temperature (> 0); smaller is closer to the unregularised assignment.
        tol: stopping tolerance on the largest row-sum error.
        max_iter: at most this many iteration pairs.
        expert_mass: each column's sum (default ``T / E``).
    Returns:
        ``[T, E]`` fp32 plan. Differentiable through the iterations (detach the cost for the
        plain Megatron behaviour). ``T = 0`` gives an empty plan.
    """
    if not isinstance(cost_TE, Tensor) or cost_TE.dim() != 2:
        got = tuple(cost_TE.shape) if isinstance(cost_TE, Tensor) else type(cost_TE).__name__
        raise ValueError(f"cost_TE must be a [T, E] tensor, got {got}")
    xi = positive_float("xi", xi)
    tol = positive_float("tol", tol)
    max_iter = positive_int("max_iter", max_iter)
    t, e = cost_TE.shape
    if t == 0:
        return cost_TE.float().clone()
    mass = t / e if expert_mass is None else positive_float("expert_mass", expert_mass)
    k_TE = cost_TE.float() / xi
    log_mass = torch.log(torch.tensor(mass, dtype=torch.float32, device=cost_TE.device))
    g_E = torch.zeros(e, dtype=torch.float32, device=cost_TE.device)
    for _ in range(max_iter):
        f_T = -torch.logsumexp(k_TE + g_E, dim=1)
        g_E = log_mass - torch.logsumexp(k_TE + f_T[:, None], dim=0)
        row_err = (torch.logsumexp(k_TE + f_T[:, None] + g_E, dim=1).exp() - 1.0).abs().max()
        if row_err.item() < tol:
            break
    return torch.exp(k_TE + f_T[:, None] + g_E)


def sinkhorn_topk(cost_TE: Tensor, top_k: int, *, xi: float = 1.0, tol: float = 1e-4, max_iter: int = 100):
    """Top-k experts per token of the balanced plan. Returns ``(plan [T,E], weight [T,k],
    index [T,k])``, ``weight`` the chosen plan values renormalised to sum to 1 per token (SSR)."""
    plan = sinkhorn(cost_TE, xi=xi, tol=tol, max_iter=max_iter)
    value, index = torch.topk(plan, top_k, dim=-1)
    weight = value / value.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(value.dtype).tiny)
    return plan, weight, index


def raw_scores(logits_TE: Tensor, top_k: int) -> Tensor:
    """Megatron's gate scores for the Sinkhorn router: sigmoid for k = 1, softmax otherwise."""
    return torch.sigmoid(logits_TE) if top_k == 1 else torch.softmax(logits_TE, dim=-1)


@register_router(
    "sinkhorn",
    paper="S-BASE (Clark et al. 2022); Megatron-LM load_balancing_type='sinkhorn'",
    summary="experts picked by top-k of the Sinkhorn-balanced plan in training, raw scores at inference",
)
class SinkhornRouter(Router):
    """Megatron-LM's Sinkhorn router (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: experts per token; default 1 (Megatron's and S-BASE's setting).
        xi: Sinkhorn temperature; default 1.0 (Megatron transports ``exp(logits)``).
        tol, max_iter: Sinkhorn stopping rule; defaults 1e-4 (Megatron's tolerance) and 100
            (ours: Megatron iterates without a cap).
        normalize: renormalise the k gates to sum to 1; default False (Megatron gathers the raw
            scores).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        *,
        xi: float = 1.0,
        tol: float = 1e-4,
        max_iter: int = 100,
        normalize: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.xi = positive_float("xi", xi)
        self.tol = positive_float("tol", tol)
        self.max_iter = positive_int("max_iter", max_iter)
        self.normalize = bool(normalize)
        self._init_gate()

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits = self.router_logits(x_TD)
        scores = raw_scores(logits, self.top_k)
        if self.training:
            with torch.no_grad():  # selection only: the gates stay the raw scores
                plan = sinkhorn(logits.detach(), xi=self.xi, tol=self.tol, max_iter=self.max_iter)
                index = torch.topk(plan, self.top_k, dim=-1).indices
        else:
            index = torch.topk(scores, self.top_k, dim=-1).indices
        weight = scores.gather(1, index)
        if self.normalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        probs = scores if self.top_k > 1 else torch.softmax(logits, dim=-1)
        return Routing.from_topk(index, weight, self.num_experts, logits=logits, probs=probs, validate=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, xi={self.xi}"


@register_router(
    "ssr",
    paper="Selective Sinkhorn Routing (SSR, v2 Eq. 3-6, Alg. 2)",
    summary="softmax top-k; on a random fraction p of training steps, top-k of the Sinkhorn plan; no aux loss",
)
class SelectiveSinkhornRouter(Router):
    """Selective Sinkhorn Routing (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: experts per token; default 2.
        p: probability that a training forward (one layer, one step) routes by Sinkhorn;
            default 0.005 (the cheap check's value; sources give 0.001-0.01, our choice inside).
        xi: Sinkhorn temperature; default 0.5 (sources conflict: a reimplementation 0.05, notes
            0.5-1.0; our choice).
        cost: ``"linear"`` (the logits) or ``"softmax"`` (the probabilities); default "linear".
        tol, max_iter: Sinkhorn stopping rule; defaults 1e-4 and 100 (the notes' values).
        detach_cost: compute the plan from detached scores (the reimplementation's choice, and
            ours by default: Sinkhorn steps then give the router no gradient through the gates).
        noise_std: Gaussian noise on the logits on non-Sinkhorn training steps (the "w/ noise"
            variant); default 0.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        p: float = 0.005,
        xi: float = 0.5,
        cost: str = "linear",
        tol: float = 1e-4,
        max_iter: int = 100,
        detach_cost: bool = True,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.p = float_in("p", p, 0.0, 1.0, hi_open=False)
        self.xi = positive_float("xi", xi)
        if cost not in COST_TYPES:
            raise ValueError(f"cost must be one of {COST_TYPES}, got {cost!r}")
        self.cost = cost
        self.tol = positive_float("tol", tol)
        self.max_iter = positive_int("max_iter", max_iter)
        self.detach_cost = bool(detach_cost)
        self.noise_std = float_in("noise_std", noise_std, 0.0, float("inf"))
        self.sinkhorn_steps = 0  # training forwards routed by Sinkhorn (for monitoring)
        self._init_gate()

    def use_sinkhorn(self) -> bool:
        """One Bernoulli(p) draw per training forward; never at inference."""
        return self.training and self.p > 0 and bool(torch.rand(()) < self.p)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits = self.router_logits(x_TD)
        probs = torch.softmax(logits, dim=-1)
        if self.use_sinkhorn():
            self.sinkhorn_steps += 1
            c = logits if self.cost == "linear" else probs
            c = c.detach() if self.detach_cost else c
            _, weight, index = sinkhorn_topk(c, self.top_k, xi=self.xi, tol=self.tol, max_iter=self.max_iter)
        else:
            noisy = logits
            if self.training and self.noise_std > 0:
                noisy = logits + self.noise_std * torch.randn_like(logits)
            _, weight, index = softmax_topk(noisy, self.top_k, normalize=True)
        return Routing.from_topk(index, weight, self.num_experts, logits=logits, probs=probs, validate=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, p={self.p}, xi={self.xi}, cost={self.cost!r}"
