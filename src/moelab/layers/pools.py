"""Product-key pools of single-neuron experts: PEER and OmniMoE as routed FFN layers.

Papers and code:
- He, *Mixture of A Million Experts* (PEER, 2024); lucidrains/PEER-pytorch ``PEER.py``: ``N = n^2``
  atomic experts ``act(u_e . x) v_e`` (exact GELU), retrieved per head by product keys over a
  BatchNorm'd query, softmax over each head's ``k``; heads summed; no dense branch:

      y = sum_h sum_{e in topk_h(x)} softmax_k(s_h)_e * gelu(u_e . x) v_e

- OmniMoE, flash-algo/omni-moe ``omni_moe/modules/omni_moe.py`` (``OmniMoE_Pytorch``): the same
  atomic experts (silu) routed by the Cartesian product of two BatchNorm'd softmaxes, weights
  the pair probabilities (not renormalised), plus an always-on dense SwiGLU branch, unweighted:

      y = sum_{e = (i, j) in topK(x)} p_x(x)_i p_y(x)_j * silu(u_e . x) v_e + SwiGLU(x)

Both layers are a ``moelab.MoE`` (subclasses): the router (``moelab.routers.product_key``:
``PEERRouter``, ``OmniRouter``) returns a COO ``Routing`` over ``N`` experts, and the executor
(``backend``, default ``"auto"``) runs it on an ``AtomicBank``; so tracing, routing transforms,
auxiliary losses and the monitors see them as any MoE layer. Nothing has a ``[T, N]`` shape.
"""

from __future__ import annotations

from typing import Any

from moelab import registry
from moelab.core.activations import activation_for, get_activation
from moelab.core.checks import positive_int
from moelab.core.router import router_arguments
from moelab.experts.atomic import AtomicBank
from moelab.experts.shared import SharedExperts
from moelab.layers.moe import MoE, layer_options
from moelab.ops.dispatchers import Dispatcher
from moelab.routers.product_key import OmniRouter, PEERRouter

LAYER_KEYS = ("activation",)  # router_kwargs keys the layers take for themselves


def _split_options(
    layer: str, router_cls: type, router_kwargs: dict[str, Any] | None, top_k: int, activation: str | None
) -> tuple[dict[str, Any], int, str | None]:
    """``(router kwargs, top_k, activation)`` from the layer's ``router_kwargs``: ``top_k`` and
    ``activation`` there override the arguments (each given once); the rest must be the router's."""
    kw, options = layer_options(router_kwargs, {"activation": activation})
    activation = options["activation"]
    top_k = kw.pop("top_k", top_k)
    accepted = [a for a in router_arguments(router_cls) if a != "top_k"]
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(
            f"router_kwargs: layer {layer!r} does not take {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(accepted + ['top_k', *LAYER_KEYS])}"
        )
    return kw, top_k, activation


class PEER(MoE):
    """PEER as a routed FFN layer (module docstring; docs/methods/peer.md).

    Built by ``MoELM`` for ``MoELMConfig(router="peer", router_kwargs={...})``.

    Args:
        d_model: ``d``.
        num_experts: ``N = n^2`` single-neuron experts (default 1024; the paper uses 1024^2).
        top_k: experts retrieved **per head** (default 16, the paper); a token gets
            ``heads * top_k`` assignments.
        hidden: must be None (or 1): an atomic expert has one hidden neuron. It is an argument only
            so ``MoELM`` builds the layer as any routed FFN.
        router_kwargs: ``PEERRouter``'s options (``heads``, ``d_key``, ``query_batchnorm``,
            ``non_competing_scores``), ``top_k`` (overrides the argument) and the layer's
            ``activation``.
        activation: the neurons' non-linearity, default ``"gelu"`` (exact; lucidrains' ``nn.GELU``).
        shared_experts, shared_hidden, aux_losses, aux_loss_kwargs, backend, dispatcher,
        check_finite: as ``moelab.MoE`` (PEER has no shared experts and no auxiliary loss; the
            balance and z losses need dense probabilities, which this router never forms).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 1024,
        top_k: int = 16,
        hidden: int | None = None,
        *,
        router_kwargs: dict[str, Any] | None = None,
        activation: str | None = None,
        shared_experts: int | SharedExperts = 0,
        shared_hidden: int | None = None,
        aux_losses: dict[str, float] | None = None,
        aux_loss_kwargs: dict[str, dict] | None = None,
        backend: str = "auto",
        dispatcher: str | Dispatcher = "local",
        check_finite: bool = True,
    ) -> None:
        if hidden is not None and hidden != 1:
            raise ValueError(
                f"hidden must be None for PEER (each expert is one neuron; the layer's width is heads * "
                f"top_k active neurons), got {hidden}"
            )
        kw, top_k, activation = _split_options("peer", PEERRouter, router_kwargs, top_k, activation)
        router = PEERRouter(d_model, num_experts, top_k, **kw)
        experts = AtomicBank(num_experts, d_model, activation="gelu" if activation is None else activation)
        super().__init__(
            d_model,
            num_experts,
            top_k,
            router=router,
            experts=experts,
            shared_experts=shared_experts,
            shared_hidden=shared_hidden,
            aux_losses=aux_losses,
            aux_loss_kwargs=aux_loss_kwargs,
            backend=backend,
            dispatcher=dispatcher,
            check_finite=check_finite,
        )
        self.heads = router.heads
        # every head retrieves top_k experts (MoELM.num_parameters(active=True) reads this)
        self.experts_per_token = self.heads * self.top_k

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k} per head, "
            f"heads={self.heads}, backend={self.backend!r}, dispatcher={self.dispatcher.name!r}"
        )


class OmniMoE(MoE):
    """OmniMoE as a routed FFN layer (module docstring; docs/methods/omni.md).

    Built by ``MoELM`` for ``MoELMConfig(router="omni", router_kwargs={...})``.

    Args:
        d_model: ``d``.
        num_experts: ``N`` atomic experts (default 4096, the official README). ``n = floor(sqrt(N))``
            as the official code: with a non-square ``N`` the experts from ``n^2`` on are never
            routed to (use a square ``N``).
        top_k: ``K`` experts per token (default 16, the README's ``num_experts_per_token``).
        hidden: the dense SwiGLU branch's width (default ``4 * d_model``: the README's
            ``intermediate_size`` 4096 at ``hidden_size`` 1024).
        router_kwargs: ``top_k`` (overrides the argument) and the layer's ``activation``;
            ``OmniRouter`` has no other option.
        activation: the atomic neurons' non-linearity, default ``"silu"`` (the README's
            ``hidden_act``); the dense branch is its gated form (silu -> SwiGLU, gelu -> GeGLU), as
            the official code uses one ``act_fn`` for both.
        shared_experts: must be 0: the dense branch is OmniMoE's shared expert (set ``hidden``).
        aux_losses, aux_loss_kwargs, backend, dispatcher, check_finite: as ``moelab.MoE``.

    ``self.shared_experts`` is the dense branch (``SharedExperts``, no gate), added unweighted by
    ``moelab.MoE``'s forward.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int = 4096,
        top_k: int = 16,
        hidden: int | None = None,
        *,
        router_kwargs: dict[str, Any] | None = None,
        activation: str | None = None,
        shared_experts: int = 0,
        aux_losses: dict[str, float] | None = None,
        aux_loss_kwargs: dict[str, dict] | None = None,
        backend: str = "auto",
        dispatcher: str | Dispatcher = "local",
        check_finite: bool = True,
    ) -> None:
        if shared_experts != 0:
            raise ValueError(
                f"shared_experts must be 0 for OmniMoE: its dense SwiGLU branch is the shared expert "
                f"(set its width with hidden), got {shared_experts!r}"
            )
        kw, top_k, activation = _split_options("omni", OmniRouter, router_kwargs, top_k, activation)
        activation = "silu" if activation is None else activation
        act = get_activation(activation)
        dense_activation = activation_for(act.base, gated=True)
        if act.gated or dense_activation is None:
            raise ValueError(
                f"activation must be a plain activation with a gated form for the dense branch "
                f"(silu -> swiglu, gelu -> geglu), got {activation!r}"
            )
        d_model = positive_int("d_model", d_model)
        dense_hidden = positive_int("hidden", 4 * d_model if hidden is None else hidden)
        router = OmniRouter(d_model, num_experts, top_k, **kw)
        experts = AtomicBank(num_experts, d_model, activation=activation)
        dense = SharedExperts(d_model, dense_hidden, dense_activation)
        super().__init__(
            d_model,
            num_experts,
            top_k,
            router=router,
            experts=experts,
            shared_experts=dense,
            aux_losses=aux_losses,
            aux_loss_kwargs=aux_loss_kwargs,
            backend=backend,
            dispatcher=dispatcher,
            check_finite=check_finite,
        )
        self.dense_hidden = dense_hidden

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dense_hidden={self.dense_hidden}"


registry.register(
    "layer",
    "peer",
    paper="He 2024, Mixture of A Million Experts (PEER); lucidrains/PEER-pytorch PEER.py",
    summary="N = n^2 single-neuron experts retrieved per head by product keys (BatchNorm'd query, softmax over "
    "each head's k), heads summed; a moelab.MoE with PEERRouter and AtomicBank",
)(PEER)
registry.register(
    "layer",
    "omni",
    paper="OmniMoE (flash-algo/omni-moe, OmniMoE_Pytorch)",
    summary="atomic experts routed by the Cartesian product of two BatchNorm'd softmaxes (weights not "
    "renormalised) plus an always-on dense SwiGLU branch; a moelab.MoE with OmniRouter and AtomicBank",
)(OmniMoE)
