"""``RoutingContext``: what travels along a model's depth for routers that need more than ``x``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class RoutingContext:
    """Per-forward information shared by all routed layers of a model.

    Plain routers ignore it. Routers that carry state across layers (a recurrent router's
    hidden state, a shared expert pool, pre-computed decisions) keep it in ``state`` under a key
    of their own.

    Attributes:
        layer_index: index of the routed layer being run (set by the model before each layer).
        token_types: ``[T]`` long modality / token-type ids, or None.
        token_ids: ``[T]`` long input ids, or None (pre-gating routers and traces read them).
        seq_len: ``S`` when the layer input was ``[B, S, d]`` (per-sequence losses need it).
        step: the training step, for routers with schedules; None at inference.
        state: free-form per-forward state, keyed by the router that owns it.
        recorder: the active trace recorder (``moelab.trace``), or None.
    """

    layer_index: int = 0
    token_types: Tensor | None = None
    token_ids: Tensor | None = None
    seq_len: int | None = None
    step: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    recorder: Any = None
