"""The MoE layer: ``Router -> Routing -> dispatch -> ExpertBank -> combine`` (+ shared experts)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._checks import finite, hidden_states, positive_int, same_device_dtype, top_k_in_range
from ..experts.bank import ExpertBank, SharedExperts
from ..losses.registry import check_aux_losses, get_loss
from ..ops.backends import get_backend, resolve_backend
from ..routing.context import RoutingContext
from ..routing.router import Router, build_router
from ..routing.routing import Routing


class MoE(nn.Module):
    """A mixture-of-experts feed-forward layer.

    Args:
        d_model: ``d``.
        num_experts: ``E`` (default 8).
        top_k: experts per token for token-choice routers (default 2).
        hidden: each expert's hidden width (default ``4 * d_model // top_k``, our choice: keeps the
            active FFN width near a dense ``4d`` FFN).
        router: a registered router name (``moelab list``) or a ``Router`` instance.
        router_kwargs: extra arguments for a router built by name.
        experts: an ``ExpertBank`` to use (else one is built with ``activation``).
        activation: expert non-linearity, ``swiglu`` by default.
        shared_experts: number of always-on shared experts (DeepSeekMoE), or a ``SharedExperts``
            module; 0 for none.
        shared_gate: scale the shared output by ``sigmoid(w . x)`` (Qwen2-MoE).
        aux_losses: ``{"load_balance": 1e-2, "z": 1e-3}``: losses by name and their coefficients.
        backend: ``"auto"`` or a registered backend (``moelab.ops.backend_names()``).
        check_finite: raise on NaN/Inf inputs (one reduction over ``x``).

    ``forward(x [B, S, d] or [T, d], ctx=None) -> same shape``. After each forward,
    ``aux_loss`` holds the weighted sum of the auxiliary losses (a scalar tensor, 0 if none) and
    ``aux_terms`` each unweighted term.
    """

    _moelab_traceable = True

    def __init__(
        self,
        d_model: int,
        num_experts: int = 8,
        top_k: int = 2,
        hidden: int | None = None,
        *,
        router: str | Router = "topk",
        router_kwargs: dict[str, Any] | None = None,
        experts: ExpertBank | None = None,
        activation: str = "swiglu",
        shared_experts: int | SharedExperts = 0,
        shared_hidden: int | None = None,
        shared_gate: bool = False,
        aux_losses: dict[str, float] | None = None,
        backend: str = "auto",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.num_experts = positive_int("num_experts", num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        if hidden is None:
            hidden = max(1, 4 * d_model // top_k)
        if isinstance(router, str):
            kw = dict(router_kwargs or {})
            kw.setdefault("top_k", top_k)
            router = build_router(router, d_model=d_model, num_experts=num_experts, **kw)
        elif not isinstance(router, Router):
            raise TypeError(
                f"router must be a registered name or a moelab Router, got {type(router).__name__}"
            )
        if router.d_model != d_model or router.num_experts != num_experts:
            raise ValueError(
                f"router has d_model={router.d_model}, num_experts={router.num_experts}; "
                f"the layer has d_model={d_model}, num_experts={num_experts}"
            )
        self.router = router
        if experts is None:
            experts = ExpertBank(num_experts, d_model, hidden, activation)
        elif not isinstance(experts, nn.Module):
            raise TypeError(f"experts must be an ExpertBank, got {type(experts).__name__}")
        if experts.num_experts != num_experts or experts.d_model != d_model:
            raise ValueError(
                f"experts has num_experts={experts.num_experts}, d_model={experts.d_model}; "
                f"the layer has num_experts={num_experts}, d_model={d_model}"
            )
        self.experts = experts
        if isinstance(shared_experts, SharedExperts):
            self.shared_experts: SharedExperts | None = shared_experts
        elif isinstance(shared_experts, int) and not isinstance(shared_experts, bool) and shared_experts >= 0:
            width = shared_hidden if shared_hidden is not None else shared_experts * experts.hidden
            self.shared_experts = (
                SharedExperts(d_model, width, experts.activation, gate=shared_gate)
                if shared_experts
                else None
            )
        else:
            raise ValueError(
                f"shared_experts must be an int >= 0 or a SharedExperts module, got {shared_experts!r}"
            )
        self.aux_coefficients = check_aux_losses(aux_losses)
        self.backend = backend
        if backend != "auto":
            get_backend(backend)  # unknown names fail here, not at the first forward
        self.check_finite = bool(check_finite)
        self.aux_loss: Tensor = torch.zeros(())
        self.aux_terms: dict[str, Tensor] = {}
        self._moelab_trace = None

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        hidden_states(x, self.d_model, name="x")
        same_device_dtype(x, self.experts.w_in, name="x", what="the MoE layer's parameters")
        if self.check_finite:
            finite(x, "x")
        shape = x.shape
        ctx = ctx if ctx is not None else RoutingContext()
        if x.dim() == 3:
            ctx.seq_len = shape[1]
        x_TD = x.reshape(-1, self.d_model)
        if not x_TD.is_contiguous():
            x_TD = x_TD.contiguous()
        routing = self.router(x_TD, ctx)
        y = self.run_experts(x_TD, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        self._aux(routing, ctx)
        rec = self._moelab_trace
        if rec is not None:
            rec[0].record(rec[1], routing, ctx.token_ids)
        elif ctx.recorder is not None:
            ctx.recorder.record(f"layer{ctx.layer_index}", routing, ctx.token_ids)
        return y.view(shape)

    def run_experts(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """``dispatch -> ExpertBank -> combine`` with this layer's backend."""
        return resolve_backend(self.backend, x_TD.device, self.experts)(x_TD, routing, self.experts)

    def _aux(self, routing: Routing, ctx: RoutingContext) -> None:
        terms = {
            name: get_loss(name)(routing, seq_len=ctx.seq_len, layer=self) for name in self.aux_coefficients
        }
        terms.update(routing.aux)
        total = routing.weight.new_zeros(()).float()
        for name, value in terms.items():
            total = total + self.aux_coefficients.get(name, 1.0) * value
        self.aux_terms = terms
        self.aux_loss = total

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, backend={self.backend!r}"


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every MoE layer's ``aux_loss`` from its last forward (add it to the task loss)."""
    total = None
    for m in model.modules():
        if isinstance(m, MoE):
            total = m.aux_loss if total is None else total + m.aux_loss
    if total is None:
        raise ValueError("aux_loss(model): the model has no MoE layers")
    return total
