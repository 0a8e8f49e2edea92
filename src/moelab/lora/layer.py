"""``RoutedLoRA``: a frozen ``nn.Linear`` plus a routed mixture of LoRA experts.

    y = W x + b + sum over the routing's entries (e, w) of token x:  w * scaling * B_e A_e x

The LoRA-mixture family (MoLE / MixLoRA, DynMoLE, ...) on the spine: the router maps the
projection's input to a ``Routing``, ``self.routed`` applies routing transforms and tracing, the
layer's dispatcher and executor run the ``LoRABank`` on the routed rows (grouped low-rank GEMMs),
and the result is added to the frozen base projection's output. The router, the losses, the
dispatcher and the executor are ``moelab.MoE``'s own (built by the same helpers), so any
registered router drives it and any registered loss trains it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.checks import top_k_in_range
from moelab.core.context import RoutingContext, check_context
from moelab.core.routed import RoutedLayer
from moelab.core.router import Router
from moelab.core.routing import Routing
from moelab.experts.lora import LoRABank, base_and_rank_dense_lora, rank_dense_lora
from moelab.layers.moe import aux_losses_of, layer_input, layer_router, setup_experts_and_losses
from moelab.lora.presets import resolve_mixture
from moelab.ops.executors import resolve_executor


class AdaptedLinear(RoutedLayer):
    """A routed adapter around a frozen ``nn.Linear`` held as ``self.base`` (``RoutedLoRA``,
    ``FlyLoRALinear``): it reads like the projection it replaces (``in_features``,
    ``out_features``) and ``forward(x, ctx)`` returns ``forward_routed(x, ctx)[0]``."""

    base: nn.Linear

    @property
    def in_features(self) -> int:
        """The base projection's ``in_features`` (code that reads ``nn.Linear`` attributes keeps working)."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """The base projection's ``out_features``."""
        return self.base.out_features

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        return self.forward_routed(x, ctx)[0]

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        raise NotImplementedError


def check_projection_input(x: object, d_in: int) -> None:
    """Raise unless ``x`` is a tensor ``[..., d_in]``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != d_in:
        raise ValueError(f"x must be [..., d_in={d_in}], got shape {tuple(x.shape)}")


class RoutedLoRA(AdaptedLinear):
    """A routed mixture of ``E`` LoRA experts beside a frozen ``nn.Linear`` (module docstring).

    Args:
        base: the projection to adapt. Kept as ``self.base`` (the same object, weights not
            copied) and frozen (``requires_grad_(False)`` on its parameters).
        num_experts: ``E``.
        rank: each expert's ``r``.
        alpha: PEFT's ``lora_alpha`` (``scaling = alpha / rank``); default 8, PEFT's default.
        dropout: PEFT's ``lora_dropout`` on each expert's input in training; default 0.
        router: a registered router name or a ``Router``. Default (None): the method's, else
            ``"topk"``.
        top_k: experts per token for token-choice routers. Default (None): the method's, else 2.
        router_kwargs: arguments of a router built by name (default: the method's, else none).
        aux_losses: ``{"load_balance": 1e-2}``: losses by name and coefficient (default: the
            method's, else none).
        aux_loss_kwargs: parameters of those losses (default: the method's, else the papers').
        method: a mixture preset (``moelab.lora.MIXTURE_PRESETS``: ``"mole"``, ``"dynmole"``)
            whose paper defaults fill the routing arguments left None.
        backend: the executor, ``"auto"`` or a registered name (as ``moelab.MoE``).
        dispatcher: a registered dispatcher name or a ``Dispatcher`` (default ``"local"``).
        check_finite: raise on NaN/Inf inputs (one reduction and a host sync per call). Default
            False: the layer sits on every adapted projection of a model (our choice).

    The bank and the router are created on the base weight's device and in its dtype.

    ``forward(x [..., d_in], ctx=None) -> [..., d_out]``. A transformers model calls the layer
    with ``x`` alone: the context is then ``self.context`` when set (``moelab.lora.use_context``)
    or a fresh ``RoutingContext``, carrying ``layer_index`` and, for a ``[B, S, d]`` input, the
    batch shape. After each forward ``aux_loss`` holds the weighted auxiliary losses and
    ``aux_terms`` each unweighted term, as ``moelab.MoE``.
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        router: str | Router | None = None,
        top_k: int | None = None,
        router_kwargs: dict[str, Any] | None = None,
        aux_losses: dict[str, float] | None = None,
        aux_loss_kwargs: dict[str, dict] | None = None,
        method: str | None = None,
        backend: str = "auto",
        dispatcher: Any = "local",
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch nn.Linear, got {type(base).__name__}")
        chosen = resolve_mixture(method, router, top_k, router_kwargs, aux_losses, aux_loss_kwargs)
        weight = base.weight
        self.d_model = base.in_features
        self.num_experts = num_experts
        shape = (num_experts, base.in_features, base.out_features, rank)
        bank = LoRABank(*shape, alpha, dropout, device=weight.device, dtype=weight.dtype)
        self.top_k = top_k_in_range(chosen["top_k"], num_experts)
        built = layer_router(chosen["router"], chosen["router_kwargs"], self.d_model, num_experts, self.top_k)
        self.base = base
        self.router = built.to(device=weight.device, dtype=weight.dtype)
        losses = (chosen["aux_losses"], chosen["aux_loss_kwargs"])
        setup_experts_and_losses(self, bank, None, *losses, backend, dispatcher, check_finite)
        base.requires_grad_(False)
        self.method = method
        self.layer_index = 0
        self.context: RoutingContext | None = None

    @property
    def bank(self) -> LoRABank:
        """The LoRA experts (``self.experts``, the name ``moelab.MoE`` and the executors use)."""
        return self.experts

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        """``(y, routing)``: the output and the routing that ran (after any routing transform)."""
        check_projection_input(x, self.d_model)
        if ctx is None:  # called as a projection inside a model: the layer's own context
            ctx = self._own_context()
        # layer_input reads [T, d] or [B, S, d]; nn.Linear takes any [..., d_in].
        flat = x if x.dim() in (2, 3) else x.reshape(-1, self.d_model)
        x_TD, ctx = layer_input(self, flat, check_context(ctx))
        routing = self.router(x_TD, ctx)
        self.aux_terms, self.aux_loss = aux_losses_of(self, routing, ctx)  # the router's own routing
        routing = self.routed(routing, ctx, x_TD)
        out_shape = (*x.shape[:-1], self.d_out)
        bank = self.experts
        rank_dense = self._rank_dense(routing)
        if rank_dense and self._fusable(x_TD):
            # W x and every A_e x from one GEMM; B accumulated into its output (bench/lora.py).
            base = self.base
            out = base_and_rank_dense_lora(
                x_TD, base.weight, base.bias, bank.lora_A, bank.lora_B, routing.dense(), bank.scaling
            )
            return out.view(out_shape), routing
        y = self.base(x)
        if rank_dense and y.dtype == x_TD.dtype:
            out = rank_dense_lora(
                x_TD,
                bank.lora_A,
                bank.lora_B,
                routing.dense(),
                bank.scaling,
                add_to=y.reshape(-1, self.d_out),
            )
            return out.view(y.shape), routing
        executor = resolve_executor(self.backend, x_TD.device, self.experts)
        delta = self.dispatcher(x_TD, routing, self.experts, executor)
        return y + delta.view(y.shape).to(y.dtype), routing

    def _fusable(self, x_TD: Tensor) -> bool:
        """Whether the base projection can join the rank-dense GEMM (``base_and_rank_dense_lora``):
        a plain ``nn.Linear`` without hooks, frozen, in ``x``'s dtype, outside autocast."""
        base = self.base
        return (
            type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and base.weight.dtype == x_TD.dtype == self.experts.lora_A.dtype
            and not torch.is_autocast_enabled(x_TD.device.type)
        )

    def _rank_dense(self, routing: Routing) -> bool:
        """Whether ``backend="auto"`` runs every expert in rank space (``rank_dense_lora``): a
        local dispatcher, no dropout, and ``E r`` at most a quarter of the narrower projection
        width, where the dense low-rank GEMMs cost less than gathering rows (``bench/lora.py``)."""
        bank = self.experts
        width = min(bank.d_in, bank.d_out)
        return (
            self.backend == "auto"
            and self.dispatcher.name == "local"
            and not (bank.dropout and bank.training)
            and 4 * bank.num_experts * bank.rank <= width
            and routing.num_tokens > 0
        )

    def _own_context(self) -> RoutingContext:
        """``self.context`` (set by ``use_context``) at this layer's index, else a fresh context."""
        if self.context is None:
            return RoutingContext(layer_index=self.layer_index)
        ctx = check_context(self.context, "RoutedLoRA.context")
        return ctx if ctx.layer_index == self.layer_index else ctx.replace(layer_index=self.layer_index)

    def extra_repr(self) -> str:
        method = f", method={self.method!r}" if self.method else ""
        return (
            f"d_in={self.d_model}, d_out={self.d_out}, num_experts={self.num_experts}, "
            f"rank={self.experts.rank}, top_k={self.top_k}{method}, backend={self.backend!r}"
        )
