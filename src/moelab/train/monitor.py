"""Routing statistics while training: expert loads of every training forward, from router hooks.

Cheap by design: each router's forward hook keeps its ``[E]`` load counts (and the requested vs
kept assignments, for drops); the statistics themselves are ``moelab.core.stats``' definitions,
the same as in traces and analysis reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from moelab.core.routed import routed_layers
from moelab.core.router import Router
from moelab.core.stats import load_stats


def model_routers(model: nn.Module) -> list[tuple[str, Router]]:
    """``(layer name, router)`` of every routed layer of ``model`` that has a moelab ``Router``."""
    out = []
    for name, layer in routed_layers(model):
        router = getattr(layer, "router", None)
        if isinstance(router, Router):
            out.append((name, router))
    return out


def causal_at_eval(model: nn.Module) -> bool:
    """Whether every router of ``model`` routes each token by itself in eval mode (``Router.causal_at_eval``)."""
    return all(r.causal_at_eval for _, r in model_routers(model))


class RoutingMonitor:
    """Per-layer expert loads of every training forward, from a forward hook on each router.

    ``last_imbalance()``: the largest ``max_over_mean`` (``moelab.core.stats.load_stats``) over
    routed layers in the last training forward. ``drop_rate()``: the share of requested
    assignments that capacity limits cut since the last ``reset()``, over all layers.
    """

    def __init__(self, model: nn.Module) -> None:
        self.handles = []
        self.last: dict[str, Tensor] = {}
        self.reset()
        for name, router in model_routers(model):
            self.handles.append(router.register_forward_hook(self._hook(name)))

    def reset(self) -> None:
        self.load: dict[str, Tensor] = {}
        self.requested: dict[str, float] = {}
        self.assigned: dict[str, float] = {}

    def _hook(self, name: str) -> Callable:
        def fn(module: nn.Module, args: Any, routing: Any) -> None:
            if not module.training:
                return
            counts = routing.tokens_per_expert().detach()
            self.last[name] = counts
            self.load[name] = counts.double() if name not in self.load else self.load[name] + counts.double()
            n = float(routing.num_assignments)
            req = float(routing.requested.sum()) if routing.requested is not None else n
            self.requested[name] = self.requested.get(name, 0.0) + req
            self.assigned[name] = self.assigned.get(name, 0.0) + n

        return fn

    def last_imbalance(self) -> float:
        vals = [load_stats(c)["max_over_mean"] for c in self.last.values()]
        vals = [v for v in vals if v == v]  # a layer that saw no token has NaN
        return max(vals) if vals else float("nan")

    def totals(self) -> dict[str, dict[str, float | int]]:
        """``load_stats`` of each layer's loads summed since the last ``reset()``."""
        return {name: load_stats(c) for name, c in self.load.items()}

    def drop_rate(self) -> float:
        req = sum(self.requested.values())
        return 0.0 if req == 0 else 1.0 - sum(self.assigned.values()) / req

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
