"""Traces: every routed layer's ``Routing``, recorded while a model runs.

    with moelab.trace(model) as tr:
        model(x)
    tr.summary()        # per-layer load, drop rate, entropy
    tr.routing("layers.0.moe")   # one Routing per layer, all calls concatenated

Routings are stored detached and on CPU, so a trace never keeps a graph or device memory alive.
Traces save to safetensors (tensors) plus JSON metadata, never pickle.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from moelab import registry
from moelab.core.io import save_safetensors
from moelab.core.routed import routed_layers
from moelab.core.routing import Routing, cat_routings
from moelab.core.stats import routing_stats


class Trace:
    """Recorded routings, by layer name, in the order layers first ran."""

    def __init__(self) -> None:
        self.records: dict[str, list[Routing]] = {}
        self.token_ids: dict[str, list[Tensor | None]] = {}
        self.batch_shapes: dict[str, list[tuple[int, int] | None]] = {}

    # -- recording ---------------------------------------------------------------------------------
    def record(
        self,
        layer: str,
        routing: Routing,
        token_ids: Tensor | None = None,
        batch_shape: tuple[int, int] | None = None,
    ) -> None:
        """Store one call of ``layer``: its routing, the token ids and the ``(B, S)`` of its input
        (each kept only when aligned with the routed tokens, e.g. not for a layer routing a subset)."""
        self.records.setdefault(layer, []).append(routing.detach("cpu"))
        ids = None if token_ids is None else token_ids.detach().reshape(-1).to("cpu")
        if ids is not None and ids.shape[0] != routing.num_tokens:
            ids = None
        if batch_shape is not None and batch_shape[0] * batch_shape[1] != routing.num_tokens:
            batch_shape = None
        self.token_ids.setdefault(layer, []).append(ids)
        self.batch_shapes.setdefault(layer, []).append(None if batch_shape is None else tuple(batch_shape))

    # -- reading -------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.records)

    def routing(self, layer: str) -> Routing:
        """All calls of ``layer`` concatenated along tokens."""
        if layer not in self.records:
            raise KeyError(f"layer {layer!r} was not traced; traced layers: {self.layers}")
        return cat_routings(self.records[layer])

    def tokens(self, layer: str) -> Tensor | None:
        """``[T]`` token ids aligned with ``routing(layer)``, or None if any call lacked them."""
        parts = self.token_ids.get(layer, [])
        if not parts or any(p is None for p in parts):
            return None
        return torch.cat(parts)

    def sequence_lengths(self, layer: str) -> list[int] | None:
        """The length of every sequence in ``routing(layer)``, in order (``B`` times ``S`` per call),
        or None if any call's batch shape is unknown (a flat ``[T, d]`` input)."""
        shapes = self.batch_shapes.get(layer, [])
        if not shapes or any(s is None for s in shapes):
            return None
        return [s for b, s in shapes for _ in range(b)]

    def summary(self) -> list[dict[str, float | int | str]]:
        """Per layer: ``moelab.core.stats.routing_stats`` of its routing (tokens, assignments,
        max/mean and min/mean load, coefficient of variation, dead experts, load entropy, drop
        rate, router entropy, ``z`` and ``max_abs_logit``), plus the layer name."""
        return [{"layer": name, **routing_stats(self.routing(name))} for name in self.layers]

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Save to ``path`` (safetensors; metadata as JSON in the header)."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, dict] = {}
        for i, name in enumerate(self.layers):
            r = self.routing(name)
            p = f"l{i}."
            tensors[p + "token_index"] = r.token_index.contiguous()
            tensors[p + "expert_index"] = r.expert_index.contiguous()
            tensors[p + "weight"] = r.weight.float().contiguous()
            for opt in ("logits", "probs", "requested"):
                if getattr(r, opt) is not None:
                    tensors[p + opt] = getattr(r, opt).contiguous()
            ids = self.tokens(name)
            if ids is not None:
                tensors[p + "token_ids"] = ids.long().contiguous()
            meta[str(i)] = {
                "name": name,
                "num_tokens": r.num_tokens,
                "num_experts": r.num_experts,
                "top_k": r.top_k,
                "sequence_lengths": self.sequence_lengths(name),
            }
        save_safetensors(tensors, path, metadata={"moelab_trace": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "moelab_trace" not in header:
            raise ValueError(f"{path} is not a moelab trace (no 'moelab_trace' metadata)")
        meta = json.loads(header["moelab_trace"])
        tensors = load_file(str(path))
        tr = cls()
        for i in sorted(meta, key=int):
            m, p = meta[i], f"l{i}."
            r = Routing(
                token_index=tensors[p + "token_index"],
                expert_index=tensors[p + "expert_index"],
                weight=tensors[p + "weight"],
                num_tokens=m["num_tokens"],
                num_experts=m["num_experts"],
                logits=tensors.get(p + "logits"),
                probs=tensors.get(p + "probs"),
                top_k=m["top_k"],
                requested=tensors.get(p + "requested"),
            )
            tr.records[m["name"]] = [r]
            tr.token_ids[m["name"]] = [tensors.get(p + "token_ids")]
            lengths = m.get("sequence_lengths")
            # Saved as one call: equal lengths keep the (B, S) shape, ragged ones one row per sequence.
            if lengths and len(set(lengths)) == 1:
                tr.batch_shapes[m["name"]] = [(len(lengths), lengths[0])]
            elif lengths:
                tr.batch_shapes[m["name"]] = [(1, n) for n in lengths]
            else:
                tr.batch_shapes[m["name"]] = [None]
        return tr

    def __repr__(self) -> str:
        return f"Trace(layers={len(self.records)}, calls={sum(len(v) for v in self.records.values())})"


@dataclass(frozen=True)
class Tracer:
    """Records routings of layers moelab does not own (an unpatched transformers model's blocks).

    ``claims(model)``: whether it has anything to hook in ``model``; ``attach(model, trace)``: a
    context manager that records into ``trace`` while open. Integrations register theirs.
    """

    name: str
    claims: Callable[[nn.Module], bool]
    attach: Callable[[nn.Module, Trace], AbstractContextManager]
    records: str = ""  # what it records, for error messages


_TRACERS: dict[str, Tracer] = {}


def register_tracer(tracer: Tracer) -> Tracer:
    """Add (or replace, by name) a tracer; ``trace(model)`` asks every registered one."""
    _TRACERS[tracer.name] = tracer
    return tracer


@contextmanager
def trace(model: nn.Module, trace: Trace | None = None) -> Iterator[Trace]:
    """Record the ``Routing`` of every routed layer of ``model`` while the block runs.

    moelab's routed layers record themselves (with the token ids of their ``RoutingContext``);
    layers of other libraries are recorded by the tracers their integration registers (an
    unpatched transformers MoE model: hooks on its router modules). A model may mix both.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    tr = trace if trace is not None else Trace()
    integration = registry.integration_for(model)
    if integration is not None:
        importlib.import_module(integration)  # registers its tracer
    layers = routed_layers(model)
    tracers = [t for t in _TRACERS.values() if t.claims(model)]
    if not layers and not tracers:
        known = "; ".join(f"{t.name}: {t.records or 'its layers'}" for t in _TRACERS.values()) or "none registered"
        raise ValueError(
            f"trace(model): {type(model).__name__} has no moelab routed layer and nothing a registered "
            f"tracer records ({known})"
        )
    with ExitStack() as stack:
        for name, m in layers:
            if m.__dict__["_trace_to"] is not None:
                raise ValueError(f"trace(model): layer {name!r} is already being traced")
            m.__dict__["_trace_to"] = (tr, name)
            stack.callback(m.__dict__.__setitem__, "_trace_to", None)
        for t in tracers:
            stack.enter_context(t.attach(model, tr))
        yield tr
