"""``DepthRouter``: the base of the depth-routing family, and how ``MoELM`` runs its blocks.

A depth router owns the *schedule* of a model's blocks, not the blocks: ``MoELM`` keeps its
blocks in ``model.blocks`` (so checkpoints keep their names) and, when ``config.depth`` names a
registered depth method, hands them to the router each forward:

    x = model.depth(x, model.blocks, rope, ctx, positions)

The router decides which tokens each block processes and how often (mixture-of-depths: a top-k
subset; recursion: a shared block N_r times; layer routers: skip / run / repeat; pruning: tokens
dropped). Each decision is a ``Routing`` passed through ``self.routed(...)``, so traces,
``ctx.history`` and routing transforms see it: tokens -> "experts" that are compute slots (one
"compute" expert for MoD, the recursion depths for MoR).

Decoding: with a ``Session`` in the context, every block call gets its ``KVCache`` from
``block_cache(ctx, block, key)``; a router that runs a block more than once per forward (MoR)
uses one key per application.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.context import RoutingContext
from moelab.core.routed import RoutedLayer
from moelab.models.blocks import Rope, block_cache


def run_blocks(
    x: Tensor,
    blocks: nn.ModuleList,
    rope: Rope,
    ctx: RoutingContext,
    positions: Tensor | None,
    layers: range | list[int] | None = None,
) -> Tensor:
    """Every block (or those of ``layers``) on every token, in order: the plain schedule."""
    for i in range(len(blocks)) if layers is None else layers:
        blk = blocks[i]
        x = blk(x, rope, ctx, positions=positions, cache=block_cache(ctx, blk))
    return x


class DepthRouter(RoutedLayer):
    """Base class of depth routers (module docstring). Subclasses implement
    ``forward(x [B, S, d], blocks, rope, ctx, positions [B, S] | None) -> [B, S, d]`` and set
    ``aux_loss`` (a scalar, 0 without auxiliary losses) each forward.

    ``from_config(config, **depth_kwargs)`` builds one for a ``MoELMConfig`` (what
    ``MoELM`` calls when ``config.depth`` names it).
    """

    routed_kind = "depth"

    def __init__(self) -> None:
        super().__init__()
        self.aux_loss: Tensor = torch.zeros(())
        self.flops = 0.0  # the routers' own forward FLOPs (moelab.core.flops)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> DepthRouter:
        raise NotImplementedError(f"{cls.__name__} does not build from a MoELMConfig")

    @property
    def causal_at_eval(self) -> bool:
        """Whether the evaluation forward decides each token from it and earlier tokens only."""
        return True
