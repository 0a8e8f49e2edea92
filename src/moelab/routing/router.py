"""The ``Router`` base class and the router registry."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import registry
from .._checks import hidden_states, positive_int
from .context import RoutingContext
from .routing import Routing


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
        return self.route(x_TD, ctx if ctx is not None else RoutingContext())

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def step_end(self) -> None:
        """Called once after each optimizer step (``moelab.step_end(model)``). Default: nothing.

        Routers with state updated outside autograd (DeepSeek's expert bias) override it.
        """

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}"


def register_router(name: str, *, paper: str, summary: str):
    """Class decorator: register a ``Router`` subclass under ``name``."""

    def deco(cls: type[Router]) -> type[Router]:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"register_router expects a Router subclass, got {cls!r}")
        cls.name = name
        return registry.register("router", name, paper=paper, summary=summary)(cls)

    return deco


def build_router(name: str, d_model: int, num_experts: int, **kwargs: Any) -> Router:
    """Build a registered router from a plain config.

    ``build_router("topk", d_model=64, num_experts=8, top_k=2)``. Unknown names and unknown
    keyword arguments raise ``ValueError`` listing what is accepted.
    """
    cls = registry.get("router", name).obj
    try:
        return cls(d_model=d_model, num_experts=num_experts, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            import inspect

            params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
            raise ValueError(f"router {name!r} got {e}; it accepts {params}") from None
        raise


def step_end(model: nn.Module) -> None:
    """Run every router's post-optimizer-step update (e.g. DeepSeek's bias). Call after ``opt.step()``."""
    for m in model.modules():
        if isinstance(m, Router):
            m.step_end()
