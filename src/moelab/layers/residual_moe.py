"""Residual-MoE: a fixed dense MLP plus a routed MoE, summed or mixed by a learned gate (DeepSpeed-MoE).

Paper and code: Rajbhandari et al., *DeepSpeed-MoE: Advancing Mixture-of-Experts Inference and
Training to Power Next-Generation AI Scale* (ICML 2022, arXiv 2201.05596), section 4.1 (PR-MoE);
official code deepspeedai/DeepSpeed ``deepspeed/moe/layer.py`` (``MoE(use_residual=True)``).

Two ways of combining the fixed MLP and the routed experts, per token ``x``:

    mix="sum"     (the paper):     y = MLP(x) + MoE(x)
    mix="learned" (DeepSpeed):     c = softmax(W_c x + b_c),  W_c [2, d]
                                   y = c_0 MoE(x) + c_1 MLP(x)

The paper's "fixed expert + one routed expert" is ``MoE`` with top-1 routing; here the routed part
is a ``moelab.MoE`` with any router and the layer's ``top_k`` (pass ``top_k=1`` for the paper).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import share
from moelab.core.routing import Routing
from moelab.experts.shared import SharedExperts
from moelab.layers.moe import MoE, MoEWrapper, layer_options
from moelab.ops.dispatchers import Dispatcher

MIXES = ("sum", "learned")


def residual_mix(moe_out: Tensor, mlp_out: Tensor, coef_logits: Tensor | None = None) -> Tensor:
    """Combine the routed and the fixed outputs (both ``[..., d]``).

    ``coef_logits`` None: the paper's sum ``mlp + moe``. Else ``[..., 2]`` logits of DeepSpeed's
    coefficient: ``c = softmax(coef_logits)`` (in fp32), ``c_0 moe + c_1 mlp``.
    """
    if moe_out.shape != mlp_out.shape:
        raise ValueError(
            f"moe_out and mlp_out must have the same shape, got {tuple(moe_out.shape)} and {tuple(mlp_out.shape)}"
        )
    if coef_logits is None:
        return mlp_out + moe_out
    if coef_logits.shape != (*moe_out.shape[:-1], 2):
        raise ValueError(
            f"coef_logits must be [..., 2] = {(*moe_out.shape[:-1], 2)}, got {tuple(coef_logits.shape)}"
        )
    coef = torch.softmax(coef_logits.float(), dim=-1).to(moe_out.dtype)
    return coef[..., 0:1] * moe_out + coef[..., 1:2] * mlp_out


class ResidualMoE(MoEWrapper):
    """Residual-MoE as a routed FFN layer (module docstring; docs/methods/residual_moe.md).

    The routed part is ``self.moe``, a ``moelab.MoE`` (the routed layer that traces, transforms
    and computes the auxiliary losses); this wrapper is not a ``RoutedLayer``, so
    ``moelab.trace`` records each routing once and ``moelab.aux_loss`` counts it once. ``router``,
    ``experts``, ``aux_loss`` and ``aux_terms`` are the inner MoE's (plain references), so
    ``MoELM``, ``moelab compare`` and the monitors find them as on a ``moelab.MoE``.

    The constructor takes ``moelab.MoE``'s leading arguments, so ``MoELM`` builds it for
    ``MoELMConfig(router="residual_moe")`` with its options in ``router_kwargs``.

    Args:
        d_model: ``d``.
        num_experts: ``E`` of the routed part (default 8).
        top_k: experts per token of the routed part (default 1, the paper's top-1).
        hidden: each routed expert's hidden width (default ``4 * d_model // top_k``, as ``moelab.MoE``).
        router_kwargs: the layer's own keys ``router`` (the routed part's router name, default
            ``"topk"``), ``mix`` and ``mlp_hidden`` (as the keywords below; give each in one
            place only) and ``top_k`` (the routed part's ``k`` alone: ``hidden`` still defaults
            from the ``top_k`` argument, so ``MoELM(top_k=2, router_kwargs={"top_k": 1})`` is
            top-1 + MLP at top-2's active width, the paper's comparison); every other key goes
            to the router.
        router: the routed part's router, a registered name or a ``Router`` (default ``"topk"``).
        mix: ``"sum"`` (the paper, default) or ``"learned"`` (DeepSpeed's ``coefficient`` gate).
        mlp_hidden: the fixed MLP's hidden width (default: the routed experts' width, as the
            paper's fixed expert is one more expert; DeepSpeed copies the expert module).
        activation: non-linearity of the experts and the MLP (``swiglu``).
        shared_experts, shared_hidden, aux_losses, aux_loss_kwargs, backend, dispatcher,
        check_finite: passed to the inner ``moelab.MoE``.

    ``forward(x [B, S, d] or [T, d], ctx=None) -> [..., d]``; ``forward_routed`` also returns the
    routing that ran.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 8,
        top_k: int = 1,
        hidden: int | None = None,
        *,
        router_kwargs: dict[str, Any] | None = None,
        router: object = None,
        mix: str | None = None,
        mlp_hidden: int | None = None,
        activation: str = "swiglu",
        shared_experts: int | SharedExperts = 0,
        shared_hidden: int | None = None,
        aux_losses: dict[str, float] | None = None,
        aux_loss_kwargs: dict[str, dict] | None = None,
        backend: str = "auto",
        dispatcher: str | Dispatcher = "local",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        kw, given = layer_options(router_kwargs, {"router": router, "mix": mix, "mlp_hidden": mlp_hidden})
        router = "topk" if given["router"] is None else given["router"]
        mix = "sum" if given["mix"] is None else given["mix"]
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        self.mix = mix
        # router_kwargs["top_k"] sets the routed k alone; the widths stay those of the model's
        # top_k, so top-1 + MLP has the active width of top-2 (the paper's comparison)
        routed_k = kw.pop("top_k", top_k)
        if hidden is None:
            hidden = max(1, 4 * positive_int("d_model", d_model) // top_k_in_range(top_k, num_experts))
        self.moe = MoE(
            d_model,
            num_experts,
            routed_k,
            hidden,
            router=router,
            router_kwargs=kw,
            activation=activation,
            shared_experts=shared_experts,
            shared_hidden=shared_hidden,
            aux_losses=aux_losses,
            aux_loss_kwargs=aux_loss_kwargs,
            backend=backend,
            dispatcher=dispatcher,
            check_finite=check_finite,
        )
        self.d_model, self.num_experts, self.top_k = self.moe.d_model, self.moe.num_experts, self.moe.top_k
        self.d_out = self.moe.d_out
        width = given["mlp_hidden"]
        if width is None:
            width = getattr(self.moe.experts, "hidden", 4 * d_model)
        self.mlp_hidden = positive_int("mlp_hidden", width)
        # the fixed expert: a dense FFN of the experts' activation (SwiGLU by default)
        self.mlp = SharedExperts(
            d_model, self.mlp_hidden, getattr(self.moe.experts, "activation", activation)
        )
        # DeepSpeed: self.coefficient = nn.Linear(hidden_size, 2) (with bias)
        self.coefficient = nn.Linear(d_model, 2) if mix == "learned" else None
        share(self, "router", self.moe.router)
        share(self, "experts", self.moe.experts)

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        """``(y, routing)``: the combined output and the routed part's routing."""
        moe_out, routing = self.moe.forward_routed(x, ctx)  # checks x and ctx
        mlp_out = self.mlp(x)
        coef_logits = self.coefficient(x) if self.coefficient is not None else None
        return residual_mix(moe_out, mlp_out, coef_logits), routing

    def extra_repr(self) -> str:
        return f"mix={self.mix!r}, mlp_hidden={self.mlp_hidden}"


registry.register(
    "layer",
    "residual_moe",
    paper="DeepSpeed-MoE Residual-MoE (Rajbhandari et al. 2022, arXiv 2201.05596); deepspeedai/DeepSpeed use_residual",
    summary="a fixed dense MLP plus a routed MoE: summed (paper) or mixed by a learned softmax gate (DeepSpeed)",
)(ResidualMoE)
