"""The MoE layer: ``Router -> Routing -> Dispatcher -> Executor(Bank) -> combine`` (+ shared experts)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.bank import check_bank
from moelab.core.checks import finite, hidden_states, positive_int, same_device_dtype, top_k_in_range
from moelab.core.context import RoutingContext, check_context
from moelab.core.routed import RoutedLayer
from moelab.core.router import Router, build_router
from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank
from moelab.experts.shared import SharedExperts
from moelab.losses.registry import check_aux_loss_kwargs, check_aux_losses, get_loss
from moelab.ops.dispatchers import Dispatcher, get_dispatcher
from moelab.ops.executors import check_backend_name, resolve_executor


class MoE(RoutedLayer):
    """A mixture-of-experts layer (a feed-forward layer, or any ``d_in -> d_out`` projection).

    Args:
        d_model: ``d``, the input width.
        num_experts: ``E`` (default 8).
        top_k: experts per token for token-choice routers (default 2).
        hidden: each expert's hidden width (default ``4 * d_model // top_k``, our choice: keeps the
            active FFN width near a dense ``4d`` FFN).
        d_out: the output width of the default bank (default ``d_model``).
        router: a registered router name (``moelab list --kind router``) or a ``Router`` instance.
        router_kwargs: extra arguments for a router built by name.
        experts: a bank (``moelab.core.bank.Bank``: ``ExpertBank`` or any other kind); else an
            ``ExpertBank`` is built with ``hidden``, ``activation`` and ``d_out``.
        activation: expert non-linearity, ``swiglu`` by default.
        shared_experts: number of always-on shared experts (DeepSeekMoE), or a ``SharedExperts``
            module; 0 for none.
        shared_gate: scale the shared output by ``sigmoid(w . x)`` (Qwen2-MoE).
        aux_losses: ``{"load_balance": 1e-2, "z": 1e-3}``: losses by name and their coefficients.
        aux_loss_kwargs: parameters of those losses, ``{"erc": {"alpha": 0.5}}`` (default: the
            papers' values, in each loss's signature).
        backend: the executor, ``"auto"`` or a registered name (``moelab list --kind executor``).
        dispatcher: a registered dispatcher name (default ``"local"``) or a ``Dispatcher``.
        check_finite: raise on NaN/Inf inputs (one reduction over ``x``).

    ``forward(x [B, S, d] or [T, d], ctx=None) -> [..., d_out]``; ``forward_routed`` also returns
    the routing that ran. After each forward, ``aux_loss`` holds the weighted sum of the auxiliary
    losses (a scalar tensor, 0 if none) and ``aux_terms`` each unweighted term. The layer never
    changes the caller's context; it appends its routing to ``ctx.history``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 8,
        top_k: int = 2,
        hidden: int | None = None,
        *,
        d_out: int | None = None,
        router: str | Router = "topk",
        router_kwargs: dict[str, Any] | None = None,
        experts: nn.Module | None = None,
        activation: str = "swiglu",
        shared_experts: int | SharedExperts = 0,
        shared_hidden: int | None = None,
        shared_gate: bool = False,
        aux_losses: dict[str, float] | None = None,
        aux_loss_kwargs: dict[str, dict] | None = None,
        backend: str = "auto",
        dispatcher: str | Dispatcher = "local",
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.num_experts = positive_int("num_experts", num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        if hidden is None:
            hidden = max(1, 4 * d_model // top_k)
        self.router = layer_router(router, router_kwargs, d_model, num_experts, top_k)
        if experts is None:
            experts = ExpertBank(num_experts, d_model, hidden, activation, d_out=d_out)
        check_bank(experts)
        if d_out is not None and experts.d_out != d_out:
            raise ValueError(f"d_out={d_out} but the experts' d_out is {experts.d_out}")
        shared = build_shared_experts(
            shared_experts, shared_hidden, shared_gate, experts, activation, d_model
        )
        setup_experts_and_losses(
            self, experts, shared, aux_losses, aux_loss_kwargs, backend, dispatcher, check_finite
        )

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        return self.forward_routed(x, ctx)[0]

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        """``(y, routing)``: the output and the routing that ran (after any routing transform)."""
        x_TD, ctx = layer_input(self, x, ctx)
        routing = self.router(x_TD, ctx)
        self._aux(routing, ctx)  # the router's own routing trains the router
        routing = self.routed(routing, ctx, x_TD)
        y = self.run_experts(x_TD, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        return y.view(*x.shape[:-1], self.d_out), routing

    def run_experts(self, x_TD: Tensor, routing: Routing) -> Tensor:
        """``dispatch -> bank -> combine`` with this layer's dispatcher and executor."""
        executor = resolve_executor(self.backend, x_TD.device, self.experts)
        return self.dispatcher(x_TD, routing, self.experts, executor)

    def _aux(self, routing: Routing, ctx: RoutingContext) -> None:
        self.aux_terms, self.aux_loss = aux_losses_of(self, routing, ctx)

    def extra_repr(self) -> str:
        out = f", d_out={self.d_out}" if self.d_out != self.d_model else ""
        return (
            f"d_model={self.d_model}{out}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"backend={self.backend!r}, dispatcher={self.dispatcher.name!r}"
        )


class MoEWrapper(nn.Module):
    """Base of composite layers built around one ``moelab.MoE`` held as ``self.moe`` (Residual-MoE,
    UoE). The wrapper is not a ``RoutedLayer``: the inner MoE is, so tracing records each routing
    once and ``moelab.aux_loss`` counts it once. ``aux_loss``, ``aux_terms`` and ``shared_experts``
    are the inner MoE's, so ``MoELM``, ``moelab compare`` and the monitors read the wrapper as a
    ``moelab.MoE`` (subclasses also ``share`` its ``router`` and ``experts``). Subclasses define
    ``forward_routed(x, ctx) -> (y, routing)``."""

    moe: MoE

    @property
    def aux_loss(self) -> Tensor:
        """The inner MoE's weighted auxiliary loss of the last forward."""
        return self.moe.aux_loss

    @property
    def aux_terms(self) -> dict[str, Tensor]:
        return self.moe.aux_terms

    @property
    def shared_experts(self) -> nn.Module | None:
        return self.moe.shared_experts

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        return self.forward_routed(x, ctx)[0]

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        raise NotImplementedError


def layer_options(router_kwargs: object, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(router kwargs, options)``: a registered layer's own options may come as keywords
    (``given``: name -> value, None when not given) or inside ``router_kwargs`` (how ``MoELM``
    passes them), once each; the rest of ``router_kwargs`` is returned for the router."""
    if not isinstance(router_kwargs, (dict, type(None))):
        raise TypeError(f"router_kwargs must be a dict, got {type(router_kwargs).__name__}")
    kw = dict(router_kwargs or {})
    options = dict(given)
    for key in given:
        if key in kw:
            if options[key] is not None:
                raise ValueError(f"{key} is given both as a keyword and in router_kwargs; give it once")
            options[key] = kw.pop(key)
    return kw, options


def setup_experts_and_losses(
    layer: nn.Module,
    experts: nn.Module,
    shared_experts: nn.Module | None,
    aux_losses: dict[str, float] | None,
    aux_loss_kwargs: dict[str, dict] | None,
    backend: str,
    dispatcher: str | Dispatcher,
    check_finite: bool,
) -> None:
    """What every routed FFN layer holds besides its router (shared by ``MoE`` and Soft MoE): the
    bank (checked against ``layer.num_experts`` and ``layer.d_model``), shared experts, the
    auxiliary losses and their parameters, the executor and dispatcher, and the loss state."""
    check_bank(experts)
    if experts.num_experts != layer.num_experts or experts.d_in != layer.d_model:
        raise ValueError(
            f"experts has num_experts={experts.num_experts}, d_in={experts.d_in}; "
            f"the layer has num_experts={layer.num_experts}, d_model={layer.d_model}"
        )
    layer.experts = experts
    layer.d_out = experts.d_out
    layer.shared_experts = shared_experts
    layer.aux_coefficients = check_aux_losses(aux_losses)
    layer.aux_loss_kwargs = check_aux_loss_kwargs(aux_loss_kwargs, layer.aux_coefficients)
    layer.backend = check_backend_name(backend)
    layer.dispatcher = get_dispatcher(dispatcher)
    layer.check_finite = bool(check_finite)
    layer.aux_loss = torch.zeros(())
    layer.aux_terms = {}


def layer_input(layer: nn.Module, x: Tensor, ctx: RoutingContext | None) -> tuple[Tensor, RoutingContext]:
    """A routed layer's checked input: ``(x_TD, ctx)``, ``x`` flattened to contiguous ``[T, d]`` and
    the context carrying its batch shape. Checks the width, the device and dtype of the layer's
    experts and, with ``layer.check_finite``, NaN/Inf (shared by ``MoE`` and Soft MoE)."""
    hidden_states(x, layer.d_model, name="x")
    ref = next(layer.experts.parameters(), None)
    if ref is not None:
        same_device_dtype(x, ref, name="x", what=f"the {type(layer).__name__} layer's parameters")
    if layer.check_finite:
        finite(x, "x")
    ctx = _layer_context(check_context(ctx), x)
    x_TD = x.reshape(-1, layer.d_model)
    return (x_TD if x_TD.is_contiguous() else x_TD.contiguous()), ctx


def aux_losses_of(
    layer: nn.Module, routing: Routing, ctx: RoutingContext
) -> tuple[dict[str, Tensor], Tensor]:
    """``(terms, total)``: each of ``layer.aux_coefficients``' losses on ``routing`` (with
    ``layer.aux_loss_kwargs``) plus the router's own ``routing.aux`` terms (coefficient 1 unless
    named in ``aux_coefficients``), and their weighted sum."""
    terms = {
        name: get_loss(name)(routing, ctx=ctx, layer=layer, **layer.aux_loss_kwargs.get(name, {}))
        for name in layer.aux_coefficients
    }
    terms.update(routing.aux)
    total = routing.weight.new_zeros(()).float()
    for name, value in terms.items():
        total = total + layer.aux_coefficients.get(name, 1.0) * value
    return terms, total


def layer_router(router: object, router_kwargs: dict | None, d_model: int, num_experts: int, top_k: int) -> Router:
    """A routed layer's router: built by name (with ``router_kwargs``, ``top_k`` by default), or a
    ``Router`` instance as given (then ``router_kwargs`` must be empty); checked against the
    layer's ``d_model`` and ``num_experts``. Shared by ``MoE`` and MoFME."""
    if isinstance(router, str):
        kw = dict(router_kwargs or {})
        kw.setdefault("top_k", top_k)
        router = build_router(router, d_model=d_model, num_experts=num_experts, **kw)
    elif not isinstance(router, Router):
        raise TypeError(f"router must be a registered name or a moelab Router, got {type(router).__name__}")
    elif router_kwargs:
        raise ValueError(
            f"router_kwargs {sorted(router_kwargs)} given with a Router instance; build the router with them"
        )
    if router.d_model != d_model or router.num_experts != num_experts:
        raise ValueError(
            f"router has d_model={router.d_model}, num_experts={router.num_experts}; "
            f"the layer has d_model={d_model}, num_experts={num_experts}"
        )
    return router


def build_shared_experts(
    shared: object, hidden: int | None, gate: bool, experts: nn.Module, activation: str, d_model: int
) -> SharedExperts | None:
    """The always-on shared experts of a layer: ``shared`` itself when it is a ``SharedExperts``,
    none for 0, else ``shared`` experts' worth of width (``hidden``, default ``shared`` times the
    bank's expert width) with the bank's activation (DeepSeekMoE; ``gate``: Qwen2-MoE's sigmoid)."""
    if isinstance(shared, SharedExperts):
        return shared
    if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise ValueError(f"shared_experts must be an int >= 0 or a SharedExperts module, got {shared!r}")
    if shared == 0:
        return None
    width = hidden if hidden is not None else shared * getattr(experts, "hidden", 4 * d_model)
    act = getattr(experts, "activation", activation)
    return SharedExperts(d_model, width, act, gate=gate, d_out=experts.d_out)


def _layer_context(ctx: RoutingContext, x: Tensor) -> RoutingContext:
    """The caller's context, or a derived one carrying this input's batch shape."""
    if x.dim() == 3:
        shape = (x.shape[0], x.shape[1])
        return ctx if ctx.batch_shape == shape else ctx.replace(batch_shape=shape)
    if ctx.batch_shape is not None and ctx.batch_shape[0] * ctx.batch_shape[1] != x.shape[0]:
        return ctx.replace(batch_shape=None)  # a flat input not aligned with the caller's batch
    return ctx
