"""``RoutedLayer`` and routing transforms: the one place a routing passes between router and executor.

Every routed layer (the MoE layer, and later soft MoE, routed linears, depth routers) calls
``self.routed(routing, ctx, x)`` after its router and before its executor. That call

1. applies the routing transforms installed on the layer (``override_routing``), in order;
2. records the result into an active trace (``moelab.trace``);
3. appends it to ``ctx.history`` (later layers of this forward may read it).

A *routing transform* is ``fn(routing, site) -> Routing``: contrastive decoding's weak routing,
test-time logit offsets, steering towards chosen experts, offload-aware rerouting. ``site`` tells
it where it is (``RoutingSite``). Transforms change what runs, not what trains the router: the
layer's auxiliary losses read the router's own routing.

    with moelab.override_routing(model, lambda r, site: keep_first_expert(r)):
        logits = model(ids)          # every routed layer of model runs the rewritten routing
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from moelab.core.context import RoutingContext
from moelab.core.routing import Routing


@dataclass(frozen=True)
class RoutingSite:
    """Where a transform runs: the layer's name in the model, the layer, the context and its input.

    ``x`` is the layer input flattened to ``[T, d]`` (the tokens the routing indexes).
    """

    name: str
    layer: nn.Module
    ctx: RoutingContext
    x: Tensor

    @property
    def layer_index(self) -> int:
        return self.ctx.layer_index


RoutingTransform = Callable[[Routing, RoutingSite], Routing]


class RoutedLayer(nn.Module):
    """Base class of moelab's routed layers (see the module docstring).

    Subclasses call ``self.routed(routing, ctx, x_TD)`` between routing and execution. Anything
    that finds routed layers (tracing, ``override_routing``, ``aux_loss``) finds instances of this
    class, so a new family is traced and transformable by subclassing it.

    ``routed_kind`` says what the layer routes to: ``"experts"`` (tokens to experts, the default),
    ``"depth"`` (tokens to compute slots or depths: depth routers) or ``"attention"`` (queries to
    heads or key blocks). Expert statistics read only ``"experts"`` layers
    (``moelab.train.monitor.token_routed_layers``); traces record every kind.
    ``accepts_routing_transforms = False`` marks a layer whose routing is traced but cannot be
    rewritten (MoBA's selection is its attention's own): ``override_routing`` leaves it out.
    """

    routed_kind: str = "experts"
    accepts_routing_transforms: bool = True

    def __init__(self) -> None:
        super().__init__()
        # Kept out of the module's state: installed by context managers, removed on exit.
        self.__dict__["_routing_transforms"] = []
        self.__dict__["_trace_to"] = None

    def routed(self, routing: Routing, ctx: RoutingContext, x_TD: Tensor) -> Routing:
        """Transform, trace and carry ``routing`` (see the module docstring). Returns what runs."""
        for fn, name in self.__dict__["_routing_transforms"]:
            out = fn(routing, RoutingSite(name=name, layer=self, ctx=ctx, x=x_TD))
            routing = _checked_transform_output(out, routing, name)
        target = self.__dict__["_trace_to"]
        if target is not None:
            target[0].record(target[1], routing, ctx.token_ids, ctx.batch_shape)
        ctx.history.append(routing)
        counts = self.__dict__.setdefault("_routed_counts", [0, 0])  # read by moelab.core.flops
        counts[0] += routing.num_tokens
        counts[1] += routing.num_assignments
        return routing


def _checked_transform_output(out: Any, before: Routing, name: str) -> Routing:
    if not isinstance(out, Routing):
        raise TypeError(
            f"a routing transform must return a moelab Routing, got {type(out).__name__} (layer {name!r})"
        )
    if out.num_tokens != before.num_tokens or out.num_experts != before.num_experts:
        raise ValueError(
            f"a routing transform must keep num_tokens={before.num_tokens} and "
            f"num_experts={before.num_experts}, got {out.num_tokens} and {out.num_experts} (layer {name!r})"
        )
    return out


def routed_layers(model: nn.Module) -> list[tuple[str, RoutedLayer]]:
    """``(name, layer)`` of every routed layer in ``model`` (``model`` itself included), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return [(n or type(m).__name__, m) for n, m in model.named_modules() if isinstance(m, RoutedLayer)]


@contextmanager
def override_routing(
    model: nn.Module, fn: RoutingTransform, *, layers: Iterable[str] | Callable[[str], bool] | None = None
) -> Iterator[list[str]]:
    """Rewrite the routing of ``model``'s routed layers with ``fn`` while the block runs.

    Args:
        model: any module holding moelab routed layers: ``MoELM``, a ``moelab.MoE``, a transformers
            model after ``moelab.hf.patch``.
        fn: ``fn(routing, site) -> Routing`` with the same ``num_tokens`` and ``num_experts``.
        layers: restrict to these layer names (an iterable of names, or a predicate on names).
            Layers with ``accepts_routing_transforms = False`` (MoBA) are never included.

    Yields the names of the layers it applies to. Contexts nest: an inner transform runs after
    the outer ones. On exit (also on an exception) exactly this transform is removed.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (routing, site) -> Routing, got {type(fn).__name__}")
    found = [(n, m) for n, m in routed_layers(model) if m.accepts_routing_transforms]
    if not found:
        raise ValueError(
            f"override_routing: {type(model).__name__} has no moelab routed layer that accepts routing "
            "transforms (for a transformers model, moelab.hf.patch(model) first)"
        )
    if layers is None:
        chosen = found
    elif callable(layers):
        chosen = [(n, m) for n, m in found if layers(n)]
    else:
        wanted = set(layers)
        unknown = sorted(wanted - {n for n, _ in found})
        if unknown:
            raise ValueError(
                f"layers {unknown} are not routed layers of the model that accept routing transforms; "
                f"those are {[n for n, _ in found]}"
            )
        chosen = [(n, m) for n, m in found if n in wanted]
    entries = []
    for name, layer in chosen:
        entry = (fn, name)
        layer.__dict__["_routing_transforms"].append(entry)
        entries.append((layer, entry))
    try:
        yield [n for n, _ in chosen]
    finally:
        for layer, entry in entries:
            installed = layer.__dict__["_routing_transforms"]
            for i in range(len(installed) - 1, -1, -1):
                if installed[i] is entry:
                    del installed[i]
                    break


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every routed layer's ``aux_loss`` from its last forward (add it to the task loss)."""
    total = None
    for _, m in routed_layers(model):
        value = getattr(m, "aux_loss", None)
        if isinstance(value, Tensor):
            total = value if total is None else total + value
    if total is None:
        raise ValueError("aux_loss(model): the model has no routed layer with an aux_loss")
    return total
