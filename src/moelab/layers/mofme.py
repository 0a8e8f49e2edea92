"""MoFME: a Mixture of Feature-Modulated Experts around one shared expert block.

Paper and code: Zhang et al., *Efficient Deweather Mixture-of-Experts with Uncertainty-aware
Feature-wise Linear Modulation* (MoFME, AAAI 2024, arXiv 2312.16610); official code
RoyZry98/MoFME-Pytorch ``models/moe/film.py`` (``Transformer_MoE_FiLM``), which this file
follows. Per token ``x ∈ R^d``:

    y = GELU(A·LN(x) + a) ⊙ (B·LN(x) + b)              A, B ∈ R^{d×d}: the shared base, once per token
    w = router(x)                                      Linear -> KeepTopK -> softmax (k experts)
    m = Σ_{e ∈ topk(x)} w_e · FME_e(y)                 FME_e(y) = (Γ_e y + γ_e) ⊙ y + Β_e y + β_e
    out = Adaptor(m)                                   Adaptor: Linear(d, mlp_dim) -> GELU -> Linear(mlp_dim, d)

The routed sum ``m`` is an ordinary routed bank (``moelab.experts.film.FiLMBank``, bank
``film``) run through ``Routing`` and the executors, on the shared ``y`` instead of ``x``; the base
and the adaptor are dense and shared by all experts. That is where the savings come from: a
conventional MoE has ``E`` FFNs of width ``mlp_dim``; MoFME has one (the adaptor), one ``2d²``
base and ``E`` modulations (``2d² + 2d`` each in the code's full form, ``4d`` in the diagonal form).

The router is ``moelab.routers.uncertainty.UncertaintyAwareRouter`` (``uar``) by default: MoFME's
router, with Monte-Carlo dropout samples in training (the paper's uncertainty-aware router, made
well defined: see that module). It reads ``x``, the layer input (the official router reads the
block's residual stream, not its normalised copy); the base reads ``LN(x)``.

How this maps onto ``MoELM``, whose block computes ``h + ffn(RMSNorm(h))``: the official block is
``h + Adaptor(...)`` with the LayerNorm inside the FFN, so the layer returns ``Adaptor(m)`` and the
block adds the residual (``keeps_block_residual`` is not set: the block's usual residual). The
layer's input is ``RMSNorm(h)`` rather than ``h``: the router sees the normalised stream, and the
base's LayerNorm (kept by default, ``norm=True``) normalises it again; LayerNorm is
scale-invariant, so at the RMSNorm's unit init ``LN(RMSNorm(h)) = LN(h)`` up to ``eps``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.bank import check_bank
from moelab.core.checks import float_in, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.routed import RoutedLayer
from moelab.core.router import Router
from moelab.core.routing import Routing
from moelab.experts.film import FiLMBank
from moelab.experts.shared import SharedExperts
from moelab.layers.moe import (
    aux_losses_of,
    build_shared_experts,
    layer_input,
    layer_options,
    layer_router,
    setup_experts_and_losses,
)
from moelab.ops.dispatchers import Dispatcher
from moelab.ops.executors import resolve_executor
from moelab.routers.uncertainty import UncertaintyAwareRouter  # noqa: F401  (registers router "uar")

# router_kwargs keys the layer takes for itself; every other key goes to the router


def gated_base(h_TD: Tensor, weight_2DD: Tensor, bias_2D: Tensor | None = None) -> Tensor:
    """MoFME's shared expert block on normalised tokens ``h [T, d]``: ``GELU(A h + a) ⊙ (B h + b)``.

    ``weight_2DD`` is ``[2d, d]``, the rows of ``A`` then of ``B``; ``bias_2D`` is ``[2d]`` (``a``
    then ``b``) or None. Returns ``[T, d]``.
    """
    d = h_TD.shape[-1]
    if weight_2DD.shape != (2 * d, d):
        raise ValueError(f"weight_2DD must be [2d, d] = [{2 * d}, {d}], got {tuple(weight_2DD.shape)}")
    ab = nn.functional.linear(h_TD, weight_2DD, bias_2D)
    return nn.functional.gelu(ab[..., :d]) * ab[..., d:]


class MoFME(RoutedLayer):
    """MoFME as a routed FFN layer (module docstring; docs/methods/mofme.md).

    The constructor takes ``moelab.MoE``'s leading arguments, so ``MoELM`` builds it for
    ``MoELMConfig(router="mofme")``; the layer's own options may come in ``router_kwargs`` (so
    ``MoELMConfig`` reaches them) or as keywords, each in one place only.

    Args:
        d_model: ``d``.
        num_experts: ``E``, feature-modulated experts (default 8; the paper runs 4, 8, 16).
        top_k: experts per token (default 2; the paper runs 2 and 4).
        hidden: the adaptor's width ``mlp_dim`` (default ``4 * d_model``: the official
            ``scale_dim = 4``). ``MoELM`` passes ``expert_hidden`` here.
        router_kwargs: the layer's keys ``router``, ``modulation``, ``rank``, ``norm``,
            ``adaptor_dropout`` (as the keywords below); every other key goes to the router
            (``uar``'s ``samples``, ``dropout``, ``combine``, ...).
        router: a registered router name or a ``Router`` (default ``"uar"``).
        modulation: the experts' form, ``"full"`` (default, the code), ``"low_rank"`` or
            ``"diagonal"`` (``FiLMBank``); ``rank`` for ``"low_rank"``.
        norm: the LayerNorm before the base (default True, the code's ``ff_list[0]``).
        adaptor_dropout: the adaptor's dropout (default 0.0, our choice; the official MoWE uses 0.1).
        experts: a bank with ``d_in = d_out = d`` (default: a ``FiLMBank``).
        shared_experts, shared_hidden: always-on SwiGLU experts on ``x`` added to the output
            (DeepSeekMoE; not in MoFME; default none).
        aux_losses, aux_loss_kwargs, backend, dispatcher, check_finite: as ``moelab.MoE``
            (MoFME trains without an auxiliary loss).

    ``forward(x [B, S, d] or [T, d], ctx=None) -> [..., d]``; ``forward_routed`` also returns the
    routing that ran.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 8,
        top_k: int = 2,
        hidden: int | None = None,
        *,
        router_kwargs: dict[str, Any] | None = None,
        router: str | Router | None = None,
        modulation: str | None = None,
        rank: int | None = None,
        norm: bool | None = None,
        adaptor_dropout: float | None = None,
        experts: nn.Module | None = None,
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
        self.mlp_dim = positive_int("hidden", 4 * d_model if hidden is None else hidden)
        kw, given = layer_options(
            router_kwargs,
            {"router": router, "modulation": modulation, "rank": rank, "norm": norm, "adaptor_dropout": adaptor_dropout},
        )
        norm = True if given["norm"] is None else given["norm"]
        if not isinstance(norm, bool):
            raise TypeError(f"norm must be a bool, got {norm!r}")
        drop = given["adaptor_dropout"]
        self.adaptor_dropout = float_in("adaptor_dropout", 0.0 if drop is None else drop, 0.0, 1.0)
        self.router = layer_router("uar" if given["router"] is None else given["router"], kw, d_model, num_experts, top_k)
        self.top_k = getattr(self.router, "top_k", self.top_k)  # router_kwargs may set the routed k
        if experts is None:
            experts = FiLMBank(
                num_experts, d_model, "full" if given["modulation"] is None else given["modulation"], given["rank"]
            )
        elif given["modulation"] is not None or given["rank"] is not None:
            raise ValueError("modulation and rank describe the default FiLMBank; pass them or experts, not both")
        check_bank(experts)
        if experts.d_out != d_model:
            raise ValueError(f"the experts must map R^d to R^d (d_model={d_model}), got d_out={experts.d_out}")
        self.norm = nn.LayerNorm(d_model) if norm else nn.Identity()
        # A and B fused as one Linear(d, 2d): the same init as two nn.Linear(d, d) (independent
        # draws; the official code deep-copies one Linear, so its A and B start equal)
        self.base = nn.Linear(d_model, 2 * d_model)
        self.adaptor = nn.Sequential(
            nn.Linear(d_model, self.mlp_dim),
            nn.GELU(),
            nn.Dropout(self.adaptor_dropout),
            nn.Linear(self.mlp_dim, d_model),
            nn.Dropout(self.adaptor_dropout),
        )
        shared = build_shared_experts(shared_experts, shared_hidden, False, experts, "swiglu", d_model)
        setup_experts_and_losses(
            self, experts, shared, aux_losses, aux_loss_kwargs, backend, dispatcher, check_finite
        )

    @property
    def causal_at_eval(self) -> bool:
        return self.router.causal_at_eval

    def shared_block(self, x_TD: Tensor) -> Tensor:
        """``y = GELU(A·LN(x) + a) ⊙ (B·LN(x) + b)``, ``[T, d]``: what every expert modulates."""
        return gated_base(self.norm(x_TD), self.base.weight, self.base.bias)

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        return self.forward_routed(x, ctx)[0]

    def forward_routed(self, x: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, Routing]:
        """``(out, routing)``: ``Adaptor(Σ w_e FME_e(y))`` (the block adds the residual) and the routing."""
        x_TD, ctx = layer_input(self, x, ctx)
        routing = self.router(x_TD, ctx)
        self.aux_terms, self.aux_loss = aux_losses_of(self, routing, ctx)  # the router's own routing trains it
        routing = self.routed(routing, ctx, x_TD)
        y_TD = self.shared_block(x_TD)
        executor = resolve_executor(self.backend, x_TD.device, self.experts)
        out = self.adaptor(self.dispatcher(y_TD, routing, self.experts, executor))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_TD)
        return out.view(*x.shape[:-1], self.d_model), routing

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"mlp_dim={self.mlp_dim}, backend={self.backend!r}, dispatcher={self.dispatcher.name!r}"
        )


def routed_parameters(layer: nn.Module) -> int:
    """Parameters of a routed layer (router, experts, base, adaptor, ...), each counted once."""
    return sum(p.numel() for p in layer.parameters())


def compare_with_ffn_moe(
    d_model: int,
    num_experts: int,
    top_k: int,
    *,
    mlp_dim: int | None = None,
    modulation: str = "full",
    tokens: int = 4096,
    repeats: int = 7,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Parameters and forward latency of a MoFME layer against an FFN-expert MoE, same ``E`` and ``k``.

    The FFN-expert MoE is the official conventional MoE's layer (``models/moe/complete.py``: ``E``
    experts ``FeedForward(dim, mlp_dim)``): ``moelab.MoE`` with GELU experts of width
    ``mlp_dim`` (default ``4 d``, the same width as MoFME's adaptor) and the same router form
    (``topk``, renormalised, with a bias). Both run in eval mode (deterministic routing) under
    ``no_grad`` on ``x [tokens, d]``, with the ``auto`` executor; the latency is the median of
    ``repeats`` timed forwards after one warm-up, timed in interleaved rounds (a burst of load on a
    shared machine hits both alike), on ``threads`` intra-op threads (None: as set).

    Returns ``{"mofme_params", "ffn_moe_params", "param_ratio", "mofme_ms", "ffn_moe_ms",
    "latency_ratio"}`` (ratios are MoFME / FFN-MoE).
    """
    from moelab.layers.moe import MoE

    mlp_dim = 4 * positive_int("d_model", d_model) if mlp_dim is None else positive_int("mlp_dim", mlp_dim)
    tokens = positive_int("tokens", tokens)
    repeats = positive_int("repeats", repeats)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(positive_int("threads", threads))
    try:
        torch.manual_seed(seed)
        mofme = MoFME(d_model, num_experts, top_k, mlp_dim, modulation=modulation).eval()
        ffn = MoE(
            d_model, num_experts, top_k, mlp_dim, activation="gelu",
            router="topk", router_kwargs={"normalize": True, "bias": True},
        ).eval()  # fmt: skip
        x = torch.randn(tokens, d_model)
        out = {"mofme_params": float(routed_parameters(mofme)), "ffn_moe_params": float(routed_parameters(ffn))}
        layers = {"mofme": mofme, "ffn_moe": ffn}
        times: dict[str, list[float]] = {name: [] for name in layers}
        with torch.no_grad():
            for layer in layers.values():
                layer(x)  # warm-up: allocator, executor choice
            for r in range(repeats):  # interleaved rounds, alternating order: load hits both alike
                for name in list(layers)[:: 1 if r % 2 == 0 else -1]:
                    t0 = time.perf_counter()
                    layers[name](x)
                    times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            out[f"{name}_ms"] = 1e3 * statistics.median(ts)
    finally:
        torch.set_num_threads(before)
    out["param_ratio"] = out["mofme_params"] / out["ffn_moe_params"]
    out["latency_ratio"] = out["mofme_ms"] / out["ffn_moe_ms"]
    return out


registry.register(
    "layer",
    "mofme",
    paper="MoFME (Zhang et al., AAAI 2024, arXiv 2312.16610); RoyZry98/MoFME-Pytorch models/moe/film.py",
    summary="one shared GELU-gated base, E feature-modulated experts (Γy) ⊙ y + Βy routed by the uncertainty-aware router, a shared adaptor",
)(MoFME)
