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
from moelab.depth.base import DepthRouter


def model_routers(model: nn.Module) -> list[tuple[str, Router]]:
    """``(layer name, router)`` of every routed layer of ``model`` that has a moelab ``Router``."""
    out = []
    for name, layer in routed_layers(model):
        router = getattr(layer, "router", None)
        if isinstance(router, Router):
            out.append((name, router))
    return out


def val_routing(
    tr: Any, lengths: list[int], layers: dict[str, nn.Module], *, locality: bool = False
) -> dict[str, Any]:
    """What a trainer reports of a val-set ``Trace``: ``routing`` (``Trace.summary``, i.e.
    ``moelab.core.stats.routing_stats`` per layer, and from the second layer on ``nmi_set``, the
    normalised mutual information of its expert sets with the previous layer's), ``load`` (``[layers][E]`` load / mean load),
    ``no_expert_rate`` (share of tokens no expert processed) and, with ``locality``, each layer's
    ``moelab.analysis.locality.layer_locality`` on the val windows of ``lengths`` tokens."""
    load, no_expert, ntok = [], 0, 0
    names = [n for n in tr.layers if n in layers]
    for name in names:
        r = tr.routing(name)
        counts = r.tokens_per_expert().double()
        load.append((counts / counts.mean().clamp_min(1e-12)).tolist())
        no_expert += int((r.experts_per_token() == 0).sum())
        ntok += r.num_tokens
    summary = [row for row in tr.summary() if row["layer"] in layers]
    # how much a layer's choice tells about the next layer's (RMoE's claim): NMI of the expert sets
    from moelab.analysis.metrics import routing_mutual_information

    for row, prev, name in zip(summary[1:], names[:-1], names[1:], strict=True):
        a, b = tr.routing(prev), tr.routing(name)
        if a.num_tokens == b.num_tokens and a.num_tokens:
            row["nmi_set"] = routing_mutual_information(a, b, "set")["nmi"]
    res: dict[str, Any] = {"routing": summary, "load": load, "no_expert_rate": no_expert / max(ntok, 1)}
    if locality:
        from moelab.analysis.locality import layer_locality

        # k: the layer's top_k, so that capacity drops do not shrink the simulated caches
        res["locality"] = [
            {"layer": n, **layer_locality(tr.routing(n), lengths, k=getattr(layers.get(n), "top_k", None))}
            for n in names
        ]
    return res


def causal_at_eval(model: nn.Module) -> bool:
    """Whether every router of ``model`` routes each token by itself in eval mode
    (``Router.causal_at_eval``; a depth router's or a routed attention's ``causal_at_eval`` too:
    UoE's selective heads are not causal with a capacity or padding)."""
    others = [m for _, m in routed_layers(model) if m.routed_kind != "experts"]
    return all(r.causal_at_eval for _, r in model_routers(model)) and all(
        getattr(m, "causal_at_eval", True) for m in others
    )


def token_routed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The routed layers of ``model`` that route tokens to experts (``routed_kind == "experts"``):
    depth routers (their "experts" are compute slots) and attention routing (MoBA's key blocks,
    UoE's heads) are left out, so their statistics do not dilute the experts' load numbers."""
    return {n: m for n, m in routed_layers(model) if m.routed_kind == "experts"}


def ep_traffic(model: nn.Module, reset: bool = True) -> dict[str, int]:
    """Bytes this rank's expert-parallel dispatchers (``ep``) sent to and received from other
    ranks since the last reset, over every layer, forward and backward; ``reset`` zeroes them.
    Empty for a model without expert parallelism."""
    sent = received = found = 0
    for module in model.modules():
        traffic = getattr(getattr(module, "dispatcher", None), "traffic", None)
        if traffic is None:
            continue
        found += 1
        sent += traffic.bytes_sent
        received += traffic.bytes_received
        if reset:
            traffic.reset()
    return {"ep_bytes_sent": sent, "ep_bytes_received": received} if found else {}


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
        self.requested: dict[str, float] = {}
        self.assigned: dict[str, float] = {}

    def _hook(self, name: str) -> Callable:
        def fn(module: nn.Module, args: Any, routing: Any) -> None:
            if not module.training:
                return
            counts = routing.tokens_per_expert().detach()
            self.last[name] = counts
            n = float(routing.num_assignments)
            req = float(routing.requested.sum()) if routing.requested is not None else n
            self.requested[name] = self.requested.get(name, 0.0) + req
            self.assigned[name] = self.assigned.get(name, 0.0) + n

        return fn

    def last_imbalance(self) -> float:
        vals = [load_stats(c)["max_over_mean"] for c in self.last.values()]
        vals = [v for v in vals if v == v]  # a layer that saw no token has NaN
        return max(vals) if vals else float("nan")

    def drop_rate(self) -> float:
        req = sum(self.requested.values())
        return 0.0 if req == 0 else 1.0 - sum(self.assigned.values()) / req

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def router_metrics(model: nn.Module, diagnose: tuple[str, ...] | list[str] = ()) -> dict[str, float]:
    """The mean over routed layers of each number the layers report: ``Router.metrics()`` and the
    ``diagnostics(layer)`` of each loss that has one (ERC's coupling dominance), for the layer's own
    losses and for the losses named in ``diagnose`` on every layer they apply to (so that a run
    without the loss has the same numbers to compare). A name reported by only some layers is
    averaged over those."""
    from moelab.losses.registry import get_loss

    sums: dict[str, list[float]] = {}
    for _, layer in routed_layers(model):
        found: dict[str, float] = {}
        router = getattr(layer, "router", None)
        if isinstance(router, Router):
            found.update(router.metrics())
        if isinstance(
            layer, DepthRouter
        ):  # its last evaluation's decision statistics (MoD's predictor accuracy)
            found.update({f"depth_{k}": float(v) for k, v in getattr(layer, "last_stats", {}).items()})
        for name in dict.fromkeys([*getattr(layer, "aux_coefficients", {}), *diagnose]):
            diagnostics = getattr(get_loss(name), "diagnostics", None)
            if diagnostics is None:
                continue
            try:
                found.update(diagnostics(layer))
            except (TypeError, ValueError):  # the loss does not apply to this layer's router or bank
                if name not in diagnose:
                    raise
        for key, value in found.items():
            sums.setdefault(key, []).append(float(value))
    return {key: sum(v) / len(v) for key, v in sums.items()}
