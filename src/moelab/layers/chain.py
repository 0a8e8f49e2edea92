"""Chain-of-Experts (CoE): one expert bank applied ``C`` times in a chain, each pass with its own router.

Paper and code: Wang et al., *Chain-of-Experts: Unlocking the Communication Power of
Mixture-of-Experts Models* (2025); official code ZihanWang314/CoE,
``config/models/coe_deepseekv2/modeling_coe.py`` (``CoeMoE``, ``CoeDecoderLayer``), which this
file follows. With ``h`` the block's residual stream after attention:

    x_0 = RMSNorm(h)                                   computed once (the block's pre-FFN norm)
    x_{t+1} = x_t + MoE_t(x_t)          t = 0 .. C-1   (official ``residual="inner"``, default)
    MoE_t(x) = sum_{e in topk_t(x)} g_{t,e}(x) E_e(x) + S(x)

``g_t`` is iteration ``t``'s own gate (``use_igate``): DeepSeek-V2 softmax top-k, *not*
renormalised. The routed experts ``E_e`` (one bank) and the shared expert ``S`` are the same
at every iteration; ``S`` is added at every iteration. The official block output is ``x_C``: the
residual ``h`` is not re-added. The ``outer_residual`` ablation (official ``residual="outer"``)
chains without inner residuals, ``x_{t+1} = MoE_t(x_t)``, and outputs ``h + x_C``.

How this maps onto ``MoELM``, whose block computes ``h + ffn(RMSNorm(h))`` (so ``x_0`` is what
the layer receives, normed once by the model, not by the layer):

- ``outer_residual=False`` (paper): the layer returns the chain's increment
  ``x_C - x_0 = sum_t MoE_t(x_t)`` and has ``keeps_block_residual = False``. A block that honours
  that flag adds the increment to ``x_0`` instead of ``h``, giving the official ``x_C`` exactly;
  a block that ignores it gives ``h + x_C - x_0`` (the usual pre-norm residual around the chain).
- ``outer_residual=True`` (ablation): the layer returns ``x_C`` of the residual-free chain and has
  ``keeps_block_residual = True``; ``h + x_C`` is the official output exactly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from moelab import registry
from moelab.core.bank import check_bank
from moelab.core.checks import positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.routed import RoutedLayer
from moelab.core.router import share
from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank
from moelab.experts.shared import SharedExperts
from moelab.layers.moe import aux_losses_of, build_shared_experts, layer_input, setup_experts_and_losses
from moelab.ops.dispatchers import Dispatcher
from moelab.ops.executors import resolve_executor
from moelab.routers.topk import TopKRouter

LAYER_OPTIONS = ("iterations", "shared_gate", "outer_residual")


def chain_of_experts(
    x0_TD: Tensor,
    moe_steps: list,
    *,
    outer_residual: bool = False,
) -> Tensor:
    """The CoE chain on ``x_0 [T, d]``: ``moe_steps[t](x_t) -> MoE_t(x_t) [T, d]``, one per iteration.

    ``outer_residual=False`` (paper): ``x_{t+1} = x_t + MoE_t(x_t)``; returns the increment
    ``x_C - x_0``, summed from the ``MoE_t`` terms (no cancellation of ``x_0``).
    ``outer_residual=True`` (ablation): ``x_{t+1} = MoE_t(x_t)``; returns ``x_C``.
    """
    if not moe_steps:
        raise ValueError("moe_steps must hold at least one iteration")
    x, total = x0_TD, None
    for step in moe_steps:
        y = step(x)
        if outer_residual:
            x = y
        else:
            total = y if total is None else total + y
            x = x + y
    return x if outer_residual else total


class ChainOfExperts(RoutedLayer):
    """Chain-of-Experts as a routed layer (module docstring; docs/methods/coe.md).

    Built by ``MoELM`` for ``MoELMConfig(router="coe")`` with its options in ``router_kwargs``.

    Args:
        d_model: ``d``.
        num_experts: ``E``, routed experts in the one bank shared by all iterations (default 8).
        top_k: experts per token per iteration (``K``; the paper's CoE uses K=4 against MoE K=8).
        hidden: each expert's hidden width (default ``4 * d_model // top_k``, as ``moelab.MoE``).
        router_kwargs: the layer's options ``iterations`` (``C``, default 2, the paper's main
            setting), ``shared_gate`` (one router for every iteration; default False: the paper's
            ``use_igate``), ``outer_residual`` (default False, the paper), and any ``TopKRouter``
            argument for the gates; ``normalize`` defaults to False (DeepSeek-V2, ``norm_topk_prob``
            false in the official config).
        experts: a bank; else an ``ExpertBank`` of ``hidden`` and ``activation``.
        activation: expert non-linearity, ``swiglu`` by default (the official ``silu`` GLU).
        shared_experts: always-on shared experts (an int or a ``SharedExperts``), added at every
            iteration; 0 for none (the paper uses 1).
        aux_losses, aux_loss_kwargs: losses applied to each iteration's routing and summed
            (the paper: ``{"load_balance_seq": 1e-3}``, DeepSeek's sequence loss per iteration).
        backend, dispatcher, check_finite: as ``moelab.MoE``.

    ``forward(x [B, S, d] or [T, d], ctx=None) -> [..., d]`` (see the module docstring for what it
    returns); ``forward_routed`` also returns the list of the ``C`` routings that ran, in
    iteration order (the same order they enter ``ctx.history`` and a trace). After a forward,
    ``aux_loss`` is the sum over iterations and ``aux_terms[name]`` each term summed over
    iterations. ``routers`` holds the ``C`` gates (one with ``shared_gate``); ``router`` is
    iteration 0's gate (a plain reference, for code that reads one router per layer).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 8,
        top_k: int = 2,
        hidden: int | None = None,
        *,
        router_kwargs: dict[str, Any] | None = None,
        experts: nn.Module | None = None,
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
        self.d_model = positive_int("d_model", d_model)
        self.num_experts = positive_int("num_experts", num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        if not isinstance(router_kwargs, (dict, type(None))):
            raise TypeError(f"router_kwargs must be a dict, got {type(router_kwargs).__name__}")
        gate_kw = dict(router_kwargs or {})
        self.iterations = positive_int("iterations", gate_kw.pop("iterations", 2))
        self.shared_gate = _flag("shared_gate", gate_kw.pop("shared_gate", False))
        self.outer_residual = _flag("outer_residual", gate_kw.pop("outer_residual", False))
        # the paper drops the block's residual h; the ablation keeps it (module docstring)
        self.keeps_block_residual = self.outer_residual
        gate_kw.setdefault("normalize", False)
        try:
            gates = [
                TopKRouter(d_model, num_experts, top_k, **gate_kw)
                for _ in range(1 if self.shared_gate else self.iterations)
            ]
        except TypeError as err:
            raise ValueError(
                f"router_kwargs: {err}; CoE takes {', '.join(LAYER_OPTIONS)} and TopKRouter's arguments"
            ) from None
        self.routers = nn.ModuleList(gates)
        share(self, "router", self.routers[0])
        if hidden is None:
            hidden = max(1, 4 * d_model // top_k)
        if experts is None:
            experts = ExpertBank(num_experts, d_model, hidden, activation)
        check_bank(experts)
        if experts.d_out != d_model:
            raise ValueError(f"the experts' d_out must equal d_model={d_model} to chain, got {experts.d_out}")
        shared = build_shared_experts(shared_experts, shared_hidden, False, experts, activation, d_model)
        setup_experts_and_losses(
            self, experts, shared, aux_losses, aux_loss_kwargs, backend, dispatcher, check_finite
        )

    @property
    def causal_at_eval(self) -> bool:
        return all(r.causal_at_eval for r in self.routers)

    def gate(self, iteration: int) -> TopKRouter:
        """The router of iteration ``iteration`` (the one router with ``shared_gate``)."""
        return self.routers[0 if self.shared_gate else iteration]

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        return self.forward_routed(x, ctx)[0]

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, list[Routing]]:
        """``(y, routings)``: the output and the ``C`` routings that ran, in iteration order."""
        x_TD, ctx = layer_input(self, x, ctx)
        routings: list[Routing] = []
        terms: dict[str, Tensor] = {}
        total = x_TD.new_zeros(()).float()

        def moe_step(x_t: Tensor) -> Tensor:
            nonlocal total
            routing = self.gate(len(routings))(x_t, ctx)
            step_terms, step_total = aux_losses_of(self, routing, ctx)  # the gate's own routing trains it
            for name, value in step_terms.items():
                terms[name] = terms[name] + value if name in terms else value
            total = total + step_total
            routing = self.routed(routing, ctx, x_t)
            routings.append(routing)
            executor = resolve_executor(self.backend, x_t.device, self.experts)
            y = self.dispatcher(x_t, routing, self.experts, executor)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x_t)  # the shared expert runs at every iteration
            return y

        y = chain_of_experts(x_TD, [moe_step] * self.iterations, outer_residual=self.outer_residual)
        self.aux_terms, self.aux_loss = terms, total
        return y.view(*x.shape[:-1], self.d_out), routings

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"iterations={self.iterations}, shared_gate={self.shared_gate}, outer_residual={self.outer_residual}, "
            f"backend={self.backend!r}, dispatcher={self.dispatcher.name!r}"
        )


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


registry.register(
    "layer",
    "coe",
    paper="Chain-of-Experts (Wang et al. 2025); ZihanWang314/CoE modeling_coe.py",
    summary="one expert bank run C times in a chain x_{t+1} = x_t + MoE_t(x_t), a gate per iteration",
)(ChainOfExperts)
