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
from contextlib import contextmanager
from typing import Any

from torch import nn

from moelab.core.routing import Routing
from moelab.core.tracing import Trace, Tracer, register_tracer
from moelab.core.tracing import trace as moelab_trace
from moelab.integrations.hf.families import FAMILIES, Family, find_blocks
from moelab.integrations.hf.layer import ContextFeeder


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
def _attach(model: nn.Module, tr: Trace) -> Iterator[None]:
    """Hooks on every unpatched block's router module, recording into ``tr`` while open."""
    feeder = ContextFeeder()  # token ids of the current forward, for the hooks below
    feeder.attach(model)
    handles = []
    try:
        for name, block, fam in find_blocks(model):
            handles.append(fam.gate(block).register_forward_hook(_recorder(tr, name, fam, feeder)))
        yield
    finally:
        for h in handles:
            h.remove()
        feeder.detach()


def _recorder(tr: Trace, name: str, fam: Family, feeder: ContextFeeder):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        routing = routing_from_gate_output(output, fam)
        ctx = feeder.current
        if ctx is None:
            tr.record(name, routing)
        else:
            tr.record(name, routing, ctx.token_ids, ctx.batch_shape)

    return hook


register_tracer(
    Tracer(
        "transformers",
        claims=lambda model: bool(find_blocks(model)),
        attach=_attach,
        records=f"an MoE block of a supported family ({', '.join(sorted(f.block_class for f in FAMILIES.values()))})",
    )
)

# ``moelab.hf.trace`` is moelab's one ``trace``: patched layers record themselves, unpatched
# blocks through the tracer registered above.
trace = moelab_trace
