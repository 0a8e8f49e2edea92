"""The ``Router`` base class and the router registry."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import hidden_states, positive_int
from moelab.core.context import RoutingContext, check_context
from moelab.core.routing import Routing


class Router(nn.Module):
    """Maps hidden states ``x [T, d]`` to a ``Routing``. It never touches expert weights.

    Subclasses implement ``route(x_TD, ctx)``. The base class checks the input and provides the
    linear gate most routers share: ``weight [E, d]`` (transformers' ``gate.weight`` layout).

    Router math runs in fp32 (``router_logits``), as Switch Transformer recommends: bf16 logits
    make the softmax and the top-k unstable.
    """

    name: ClassVar[str] = "router"

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.num_experts = positive_int("num_experts", num_experts)

    # -- the linear gate most routers use ------------------------------------------------------
    def _init_gate(self, bias: bool = False) -> None:
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.d_model))
        self.bias = nn.Parameter(torch.zeros(self.num_experts)) if bias else None
        # nn.Linear's default init (our choice; papers leave the router init to the framework).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def router_logits(self, x_TD: Tensor) -> Tensor:
        """``[T, E]`` fp32 logits of the linear gate, computed outside autocast."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            w = self.weight.float()
            b = None if self.bias is None else self.bias.float()
            return nn.functional.linear(x_TD.float(), w, b)

    # -- the contract --------------------------------------------------------------------------
    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> Routing:
        hidden_states(x_TD, self.d_model, name="x", ranks=(2,))
        return self.route(x_TD, check_context(ctx))

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def causal_at_eval(self) -> bool:
        """Whether, in eval mode, each token's routing depends on that token alone.

        A capacity limit or expert choice makes a token's experts depend on the other tokens of
        the batch, later ones included, so a causal LM's eval loss would see the future. Routers
        with such rules override this; ``moelab compare`` marks their arms.
        """
        return True

    @property
    def needs_token_types(self) -> bool:
        """Whether this router reads ``ctx.token_types`` (modality routers: MoMa, ProMoE). A run
        on data without token types fails before training (``moelab compare`` checks it)."""
        return False

    def step_end(self) -> None:
        """Called once after each optimizer step (``moelab.step_end(model)``). Default: nothing.

        Routers with state updated outside autograd (DeepSeek's expert bias) override it.
        """

    def metrics(self) -> dict[str, float]:
        """Numbers about this router for reports, by name (a dynamic-k router's mean active experts
        in its last forward, ...). ``moelab compare`` records their mean over layers. Default: none."""
        return {}

    def link(self, position: int, layers: Sequence[nn.Module]) -> None:
        """Called once by a model that stacks routed layers (``link_routers``), before training.

        ``layers`` are the model's routed layers in depth order and ``layers[position]`` is this
        router's own. Routers whose state spans layers take it here: RMoE's GRU cell shared by
        every layer, Read-ME's pre-gate run once per forward, ReXMoE's pool of adjacent layers'
        experts. Default: nothing. An unlinked router behaves as the only routed layer.
        """

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}"


def register_router(name: str, *, paper: str, summary: str):
    """Class decorator: register a ``Router`` subclass under ``name``."""
    return registry.register_subclass("router", name, Router, paper=paper, summary=summary)


def build_router(name: str, d_model: int, num_experts: int, **kwargs: Any) -> Router:
    """Build a registered router from a plain config.

    ``build_router("topk", d_model=64, num_experts=8, top_k=2)``. Unknown names and unknown
    keyword arguments raise ``ValueError`` listing what is accepted.
    """
    cls = registry.get("router", name).obj
    accepted = router_arguments(cls)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"router {name!r} does not take {', '.join(map(repr, unknown))}; "
                f"its arguments are: {', '.join(accepted)}"
            )
    return cls(d_model=d_model, num_experts=num_experts, **kwargs)


def router_arguments(cls: type[Router]) -> list[str] | None:
    """The keyword arguments a router class takes beyond ``d_model`` and ``num_experts``
    (None if it takes ``**kwargs``)."""
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind is not p.VAR_POSITIONAL and p.name not in ("self", "d_model", "num_experts"):
            out.append(p.name)
    return out


def link_routers(layers: Sequence[nn.Module]) -> None:
    """Call ``Router.link(position, layers)`` for the router of each routed layer, in depth order.

    A model calls it once after building its layers (``MoELM`` does). Layers without a ``router``
    attribute that is a ``Router`` are skipped but keep their position.
    """
    layers = list(layers)
    for i, layer in enumerate(layers):
        router = getattr(layer, "router", None)
        if isinstance(router, Router):
            router.link(i, layers)


def share(owner: nn.Module, name: str, module: nn.Module) -> None:
    """Make ``owner.name`` refer to ``module``, owned by another module, without registering it.

    Cross-layer state (a GRU cell shared by every layer's router, another layer's experts) is
    owned, saved and counted once, by its first owner; later users hold a plain reference, so
    ``parameters()`` and ``state_dict()`` see it once and ``safetensors`` never sees a shared
    tensor twice. ``model.to(...)`` moves it through its owner.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"share: module must be an nn.Module, got {type(module).__name__}")
    if name in owner._modules or name in owner._parameters:
        raise ValueError(f"share: {type(owner).__name__}.{name} is a registered submodule or parameter")
    object.__setattr__(owner, name, module)


def step_end(model: nn.Module) -> None:
    """Run every router's post-optimizer-step update (e.g. DeepSeek's bias). Call after ``opt.step()``."""
    for m in model.modules():
        if isinstance(m, Router):
            m.step_end()
