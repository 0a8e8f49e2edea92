"""``moelab.hf.trace``: record every MoE layer's ``Routing`` of a transformers model, with token ids.

    with moelab.hf.trace(model) as tr:          # or moelab.trace(model)
        model(input_ids)
    tr.routing("model.layers.0.mlp"), tr.tokens("model.layers.0.mlp")

Works on unpatched models (a forward hook on each block's router module rebuilds the ``Routing``
the model used: its top-k ids and weights, logits and probabilities) and on patched ones
(``HFMoE`` layers record themselves), or a mix. Layers are named by the block's module name in
both cases, so traces of a model before and after ``patch`` line up. Everything lands in one
``moelab.Trace``, the format all analysis code reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from torch import nn

from ..routing.routing import Routing
from ..tracing import Trace, traceable_layers
from ..tracing import trace as moelab_trace
from .families import FAMILIES, Family, find_blocks
from .layer import ContextFeeder


def routing_from_gate_output(output: Any, family: Family) -> Routing:
    """The ``Routing`` a transformers router module produced: ``(logits [T,E], weights [T,k], index [T,k])``."""
    if not isinstance(output, (tuple, list)) or len(output) < 3:
        raise ValueError(
            f"{family.name} router output must be (router_logits, top_k_weights, top_k_index), got {type(output).__name__}"
        )
    logits, weight, index = output[0], output[1], output[2]
    logits = logits.reshape(-1, logits.shape[-1])
    return Routing.from_topk(
        index.reshape(logits.shape[0], -1),
        weight.reshape(logits.shape[0], -1),
        logits.shape[-1],
        logits=logits.float(),
        probs=family.probs(logits),
        validate=False,
    )


@contextmanager
def trace(model: nn.Module, trace: Trace | None = None) -> Iterator[Trace]:
    """Record the ``Routing`` of every MoE layer of a (patched or unpatched) transformers model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    tr = trace if trace is not None else Trace()
    blocks = find_blocks(model)
    patched = traceable_layers(model)
    if not blocks and not patched:
        raise ValueError(
            f"trace(model): {type(model).__name__} has neither moelab routed layers nor an MoE block of a "
            f"supported family ({sorted(f.block_class for f in FAMILIES.values())})"
        )
    with ExitStack() as stack:
        if patched:
            # Patched layers record themselves, with token ids from their RoutingContext.
            stack.enter_context(moelab_trace(model, tr))
        if blocks:
            feeder = ContextFeeder()  # token ids of the current forward, for the hooks below
            feeder.attach(model)
            stack.callback(feeder.detach)
            for name, block, fam in blocks:
                gate = fam.gate(block)
                handle = gate.register_forward_hook(_recorder(tr, name, fam, feeder))
                stack.callback(handle.remove)
        yield tr


def _recorder(tr: Trace, name: str, fam: Family, feeder: ContextFeeder):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        routing = routing_from_gate_output(output, fam)
        ctx = feeder.current
        tr.record(name, routing, None if ctx is None else ctx.token_ids)

    return hook
