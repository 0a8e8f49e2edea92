"""Soft MoE: every expert slot takes a softmax-weighted mix of a sequence's tokens (Puigcerver et al. 2023).

Paper and code: Puigcerver, Riquelme, Mustafa, Houlsby, *From Sparse to Soft Mixtures of Experts*
(ICLR 2024, arXiv 2308.00951); official code google-research/vmoe, ``vmoe/projects/soft_moe/router.py``
(``SoftRouter``), which this file follows.

Per sequence ``X [S, d]``, with ``n`` experts of ``p`` slots each and ``Phi [d, n p]``:

    L = scale * l2norm(X) l2norm(Phi)         [S, n p]   (l2norm along d; scale learnable, init 1)
    D = softmax over tokens of L  (dim 0)     each slot's column sums to 1
    C = softmax over slots of L   (dim 1)     each token's row sums to 1
    X~ = D^T X                                 [n p, d]   slot inputs
    Y~[s] = expert_{floor(s / p)}(X~[s])       [n p, d]
    Y = C Y~                                   [S, d]

No token is dropped and every expert processes exactly ``p`` rows per sequence. Each output row
mixes every token of its sequence, later ones included: Soft MoE is not causal (a causal LM's
loss sees the future through it; docs/methods/soft.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.bank import check_bank
from moelab.core.checks import (
    float_in,
    positive_int,
    top_k_in_range,
)
from moelab.core.context import RoutingContext
from moelab.core.routed import RoutedLayer
from moelab.core.router import Router
from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank
from moelab.experts.shared import SharedExperts
from moelab.layers.moe import aux_losses_of, build_shared_experts, layer_input, setup_experts_and_losses
from moelab.ops.dispatchers import Dispatcher, get_dispatcher
from moelab.ops.executors import check_backend_name, resolve_executor

NORM_EPS = 1e-6  # vmoe's normalize: x * rsqrt(sum(x^2) + 1e-6)


def l2_normalize(x: Tensor, dim: int = -1, eps: float = NORM_EPS) -> Tensor:
    """``x / sqrt(sum(x^2, dim) + eps)`` (vmoe's ``normalize``)."""
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + eps)


def soft_moe_logits(
    x_BSD: Tensor, phi_DM: Tensor, scale: Tensor | float = 1.0, *, normalize: bool = True
) -> Tensor:
    """``[B, S, M]`` fp32 slot logits ``scale * l2norm(X) l2norm(Phi)`` (``M = n p`` slots).

    ``normalize=False`` gives the plain ``X Phi`` (times ``scale``). Computed outside autocast.
    """
    if x_BSD.dim() != 3 or phi_DM.dim() != 2 or phi_DM.shape[0] != x_BSD.shape[-1]:
        raise ValueError(
            f"x_BSD must be [B, S, d] and phi_DM [d, M] with the same d, got {tuple(x_BSD.shape)} and {tuple(phi_DM.shape)}"
        )
    with torch.autocast(device_type=x_BSD.device.type, enabled=False):
        x, phi = x_BSD.float(), phi_DM.float()
        if normalize:
            x, phi = l2_normalize(x, -1), l2_normalize(phi, 0)
        scale = scale.float() if isinstance(scale, Tensor) else float(scale)
        return torch.einsum("bsd,dm->bsm", x, phi * scale)


def soft_moe_weights(logits_BSM: Tensor) -> tuple[Tensor, Tensor]:
    """``(dispatch, combine)``, both ``[B, S, M]``: softmax over tokens (dim 1) and over slots (dim 2)."""
    if logits_BSM.dim() != 3:
        raise ValueError(f"logits_BSM must be [B, S, M], got {tuple(logits_BSM.shape)}")
    return torch.softmax(logits_BSM, dim=1), torch.softmax(logits_BSM, dim=2)


def slot_routing(
    num_sequences: int, num_experts: int, slots_per_expert: int, device: torch.device
) -> Routing:
    """The fixed routing of the ``B n p`` slot rows: row ``b n p + s`` goes to expert ``s // p``, weight 1."""
    expert = (
        torch.arange(num_experts, device=device).repeat_interleave(slots_per_expert).repeat(num_sequences)
    )
    weight = torch.ones(expert.shape[0], 1, device=device)
    return Routing.from_topk(expert[:, None], weight, num_experts, validate=False)


def soft_moe(
    x_BSD: Tensor,
    logits_BSM: Tensor,
    bank: nn.Module,
    slots_per_expert: int,
    *,
    backend: str = "auto",
    dispatcher: str | Dispatcher = "local",
) -> tuple[Tensor, Tensor, Tensor]:
    """Soft MoE on each sequence: ``(y [B, S, d_out], dispatch [B, S, M], combine [B, S, M])``.

    ``X~ = D^T X`` per sequence; the ``B M`` slot rows run through ``bank`` with the fixed
    ``slot_routing`` on any executor (``backend``) and dispatcher; ``Y = C Y~``. ``M`` must be
    ``bank.num_experts * slots_per_expert``. The mixing runs in ``x``'s dtype.
    """
    check_bank(bank, "bank")
    p = positive_int("slots_per_expert", slots_per_expert)
    b, s, d = x_BSD.shape
    m = bank.num_experts * p
    if tuple(logits_BSM.shape) != (b, s, m):
        raise ValueError(
            f"logits_BSM must be [B, S, n p] = [{b}, {s}, {m}] for {bank.num_experts} experts of {p} slots, "
            f"got {tuple(logits_BSM.shape)}"
        )
    dispatch, combine = soft_moe_weights(logits_BSM)
    slots_BMD = torch.einsum("bsm,bsd->bmd", dispatch.to(x_BSD.dtype), x_BSD)
    rows = slots_BMD.reshape(b * m, d)
    routing = slot_routing(b, bank.num_experts, p, x_BSD.device)
    executor = resolve_executor(check_backend_name(backend), x_BSD.device, bank)
    out_rows = get_dispatcher(dispatcher)(rows, routing, bank, executor)
    out_BMD = out_rows.reshape(b, m, bank.d_out)
    y = torch.einsum("bsm,bmd->bsd", combine.to(out_BMD.dtype), out_BMD)
    return y, dispatch, combine


def token_expert_routing(logits_TM: Tensor, num_experts: int, slots_per_expert: int) -> Routing:
    """The token -> expert view of Soft MoE, for losses, tracing and analysis.

    Dense (``N = T E``, ``top_k = E``): ``weight[t, e] = sum over expert e's slots of C[t, s]``, the
    share of token ``t``'s output that expert ``e`` produced (rows sum to 1). ``logits[t, e] =
    logsumexp`` of ``L[t, s]`` over ``e``'s slots, so ``probs = softmax(logits) = weight``.
    """
    t, m = logits_TM.shape
    if m != num_experts * slots_per_expert:
        raise ValueError(f"logits_TM must have n p = {num_experts * slots_per_expert} columns, got {m}")
    logits_TE = torch.logsumexp(logits_TM.reshape(t, num_experts, slots_per_expert), dim=-1)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    index = torch.arange(num_experts, device=logits_TM.device).expand(t, num_experts)
    return Routing.from_topk(index, probs_TE, num_experts, logits=logits_TE, probs=probs_TE, validate=False)


def sequences(num_tokens: int, batch_shape: tuple[int, int] | None) -> tuple[int, int]:
    """``(B, S)`` of ``num_tokens`` flat tokens: ``batch_shape`` when it matches, else one sequence."""
    if batch_shape is not None and batch_shape[0] * batch_shape[1] == num_tokens:
        return batch_shape
    return 1, num_tokens


class SoftRouter(Router):
    """Soft MoE's router: ``Phi [d, n p]`` and the learnable ``scale`` (init 1, vmoe).

    ``route(x_TD, ctx)`` computes the slot logits of each sequence (``ctx.batch_shape``; a flat
    input without one is one sequence), leaves them in ``ctx.slot(self)["logits"]`` (``[B, S, M]``)
    for its layer, and returns the token -> expert ``Routing`` (``token_expert_routing``). Not a
    registered router: it belongs to ``SoftMoE``. Not causal.

    Args:
        d_model, num_experts: ``d`` and ``n``.
        slots_per_expert: ``p``.
        normalize: l2-normalise ``X`` and ``Phi`` (the paper; vmoe always does).
        noise_std: Gaussian noise on the logits in training (vmoe's option; default 0 as vmoe).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        slots_per_expert: int = 1,
        *,
        normalize: bool = True,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.slots_per_expert = positive_int("slots_per_expert", slots_per_expert)
        self.normalize = bool(normalize)
        self.noise_std = float_in("noise_std", noise_std, 0.0, float("inf"))
        self.num_slots = num_experts * self.slots_per_expert
        # Only Phi's direction matters when normalised; N(0, 1/d) otherwise (vmoe: LeCun normal).
        self.phi = nn.Parameter(torch.randn(d_model, self.num_slots) / d_model**0.5)
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def causal_at_eval(self) -> bool:
        return False  # every slot mixes all tokens of the sequence, later ones included

    def slot_logits(self, x_BSD: Tensor) -> Tensor:
        """``[B, S, n p]`` fp32 logits, with ``noise_std`` noise in training."""
        logits = soft_moe_logits(x_BSD, self.phi, self.scale, normalize=self.normalize)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        b, s = sequences(x_TD.shape[0], ctx.batch_shape)
        logits = self.slot_logits(x_TD.reshape(b, s, self.d_model))
        ctx.slot(self)["logits"] = logits
        return token_expert_routing(
            logits.reshape(b * s, self.num_slots), self.num_experts, self.slots_per_expert
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots_per_expert={self.slots_per_expert}, normalize={self.normalize}"


class SoftMoE(RoutedLayer):
    """Soft MoE as a routed layer (module docstring; docs/methods/soft.md).

    The constructor takes ``moelab.MoE``'s leading arguments, so ``MoELM`` builds it for
    ``MoELMConfig(router="soft")`` with its options in ``router_kwargs``.

    Args:
        d_model: ``d``.
        num_experts: ``n`` (default 8).
        top_k: the default slots per expert (ours: ``top_k = 1`` is the paper's one slot per
            expert). The layer's ``top_k`` attribute is ``n``: every token draws on every expert,
            as in the token -> expert routing it reports (``top_k = n`` there too).
        hidden: each expert's hidden width (default ``4 * d_model // top_k``, as ``moelab.MoE``).
        router_kwargs: ``slots_per_expert`` (``p``, default ``top_k``), ``normalize`` (True),
            ``noise_std`` (0.0).
        experts: a bank; else an ``ExpertBank`` of ``hidden`` and ``activation``.
        activation: expert non-linearity, ``swiglu`` by default.
        shared_experts: always-on shared experts (an int or a ``SharedExperts``), 0 for none.
        aux_losses, aux_loss_kwargs: losses on the token -> expert routing (the paper uses none).
        backend: the executor of the slot rows, ``"auto"`` or a registered name.
        dispatcher: a registered dispatcher name or instance (default ``"local"``).
        check_finite: raise on NaN/Inf inputs.

    ``forward(x [B, S, d] or [T, d], ctx=None) -> [..., d_out]``; a flat input is one sequence
    unless ``ctx.batch_shape`` splits it. ``forward_routed`` also returns the token -> expert
    routing. Routing transforms (``override_routing``) see that routing but cannot change what
    runs: the slots do not read it.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 8,
        top_k: int = 1,
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
        top_k_in_range(top_k, num_experts)
        if not isinstance(router_kwargs, (dict, type(None))):
            raise TypeError(f"router_kwargs must be a dict, got {type(router_kwargs).__name__}")
        kw = dict(router_kwargs or {})
        unknown = sorted(set(kw) - {"slots_per_expert", "normalize", "noise_std"})
        if unknown:
            raise ValueError(
                f"router_kwargs: Soft MoE does not take {', '.join(map(repr, unknown))}; "
                "it takes 'slots_per_expert', 'normalize', 'noise_std'"
            )
        kw.setdefault("slots_per_expert", top_k)
        self.router = SoftRouter(d_model, num_experts, **kw)
        self.slots_per_expert = self.router.slots_per_expert
        self.top_k = num_experts  # what analysis reads: experts per token of the reported routing
        if hidden is None:
            hidden = max(1, 4 * d_model // top_k)
        if experts is None:
            experts = ExpertBank(num_experts, d_model, hidden, activation)
        check_bank(experts)
        shared = build_shared_experts(shared_experts, shared_hidden, False, experts, activation, d_model)
        setup_experts_and_losses(
            self, experts, shared, aux_losses, aux_loss_kwargs, backend, dispatcher, check_finite
        )

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        return self.forward_routed(x, ctx)[0]

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        """``(y, routing)``: the output and the token -> expert routing (``token_expert_routing``)."""
        x_TD, ctx = layer_input(self, x, ctx)
        routing = self.router(x_TD, ctx)
        logits = ctx.slot(self.router).pop("logits")
        self._aux(routing, ctx)
        self.routed(routing, ctx, x_TD)  # traced and kept in ctx.history; the slots do not read it
        b, s, _ = logits.shape
        y, _, _ = soft_moe(
            x_TD.reshape(b, s, self.d_model),
            logits,
            self.experts,
            self.slots_per_expert,
            backend=self.backend,
            dispatcher=self.dispatcher,
        )
        y = y.reshape(b * s, self.d_out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_TD)
        return y.view(*x.shape[:-1], self.d_out), routing

    def _aux(self, routing: Routing, ctx: RoutingContext) -> None:
        self.aux_terms, self.aux_loss = aux_losses_of(self, routing, ctx)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
            f"backend={self.backend!r}, dispatcher={self.dispatcher.name!r}"
        )


registry.register(
    "layer",
    "soft",
    paper="Soft MoE (Puigcerver et al. 2023, From Sparse to Soft Mixtures of Experts); google-research/vmoe",
    summary="each expert slot takes a softmax-over-tokens mix of the sequence; tokens combine slot outputs; not causal",
)(SoftMoE)
