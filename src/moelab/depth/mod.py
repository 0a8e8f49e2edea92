"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258): a block processes only the top-k
tokens of each sequence; the others ride the residual.

For each routed block, a linear router scores every token, ``r_i = w . x_i`` (paper). In each
sequence the ``k = ceil(C * S)`` highest-scoring tokens (capacity ``C`` = 12.5%, on every other
block: the paper's best setting) are gathered in position order into ``[B, k, d]``, the block
runs on them at their true positions, and

    x_i <- x_i + r_i * f(x_i)      for the chosen i      (f(x) = block(x) - x, attention + MLP)
    x_i <- x_i                      otherwise

so the router learns through ``r_i``. Top-k over a sequence is not causal (a token's selection
depends on later tokens), so sampling needs a causal decision (paper, sec. 3.5):

- ``causal="aux_bce"``: an auxiliary binary cross-entropy on the router logits ``r_i`` with target
  ``1[i in top-k]``; at evaluation a token runs the block iff ``r_i > 0``.
- ``causal="predictor"``: a small MLP on the stop-gradient block input predicts ``1[i in top-k]``
  with the same BCE, leaving the router and the LM untouched; at evaluation a token runs the
  block iff the predictor's logit is > 0.

At evaluation the causal decision is used by default (``eval_selection="causal"``), so the
evaluation forward and cached generation agree token for token; ``eval_selection="topk"`` keeps
the training rule (non-causal, for measuring the predictor's cost). After each evaluation forward
``last_stats`` holds the causal decision's agreement with top-k (``predictor_accuracy``: the
share of tokens on which it agrees, ``topk_recall``: the share of top-k tokens it also picks) and
the fraction of tokens that ran each routed block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import positive_int
from moelab.core.context import RoutingContext
from moelab.depth.base import DepthRouter
from moelab.depth.gather import (
    capacity_count,
    compute_routing,
    gather_tokens,
    gathered_context,
    positions_of,
    ragged_index,
    routing_selection,
    scatter_update,
    topk_per_sequence,
)
from moelab.models.blocks import Rope, block_cache

CAUSAL_OPTIONS = ("aux_bce", "predictor")
GATES = ("linear", "sigmoid")


def mod_topk_targets(scores_BS: Tensor, k: int) -> Tensor:
    """``[B, S]`` float: 1 for each row's top-``k`` tokens, 0 elsewhere (the causal decision's target)."""
    target = torch.zeros_like(scores_BS, dtype=torch.float32)
    if k:
        target.scatter_(1, topk_per_sequence(scores_BS, k), 1.0)
    return target


def mod_update(
    x_BSD: Tensor, index_BK: Tensor, delta_BKD: Tensor, weight_BK: Tensor, valid_BK: Tensor | None = None
) -> Tensor:
    """MoD's residual update: ``x_i + r_i * f(x_i)`` at the chosen positions, ``x_i`` elsewhere."""
    return scatter_update(x_BSD, index_BK, weight_BK[..., None].to(delta_BKD.dtype) * delta_BKD, valid_BK)


class MixtureOfDepths(DepthRouter):
    """Mixture-of-depths over a model's blocks (module docstring).

    Args:
        d_model: width of the residual stream.
        num_layers: blocks in the model.
        capacity: share of each sequence's tokens a routed block processes (paper: 12.5%).
        every: route every ``every``-th block, starting with block ``every - 1`` (paper: 2, i.e.
            blocks 1, 3, 5, ...; 1 routes every block).
        layers: explicit routed block indices (overrides ``every``).
        causal: ``"aux_bce"`` or ``"predictor"`` (module docstring).
        aux_coef: weight of the causal BCE (paper: not given; 1e-2 our choice).
        predictor_hidden: the predictor MLP's width (our choice 64).
        gate: ``"linear"`` (``r = w.x``, paper) or ``"sigmoid"`` (``sigmoid(w.x)``, our option: a
            bounded multiplier).
        eval_selection: ``"causal"`` (default) or ``"topk"``.
    """

    def __init__(
        self,
        d_model: int,
        num_layers: int,
        *,
        capacity: float = 0.125,
        every: int = 2,
        layers: list[int] | None = None,
        causal: str = "aux_bce",
        aux_coef: float = 1e-2,
        predictor_hidden: int = 64,
        gate: str = "linear",
        eval_selection: str = "causal",
    ) -> None:
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("num_layers", num_layers)
        capacity_count(capacity, 1)  # validates capacity
        if causal not in CAUSAL_OPTIONS:
            raise ValueError(f"causal must be one of {CAUSAL_OPTIONS}, got {causal!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if eval_selection not in ("causal", "topk"):
            raise ValueError(f"eval_selection must be 'causal' or 'topk', got {eval_selection!r}")
        if not aux_coef >= 0:
            raise ValueError(f"aux_coef must be >= 0, got {aux_coef}")
        if layers is None:
            positive_int("every", every)
            layers = [i for i in range(num_layers) if (i + 1) % every == 0]
        else:
            layers = sorted({int(i) for i in layers})
            if any(not 0 <= i < num_layers for i in layers):
                raise ValueError(f"layers must be block indices in [0, {num_layers}), got {layers}")
        self.capacity = float(capacity)
        self.layers = layers
        self.causal = causal
        self.aux_coef = float(aux_coef)
        self.gate = gate
        self.eval_selection = eval_selection
        self.routers = nn.ModuleDict({str(i): nn.Linear(d_model, 1, bias=False) for i in layers})
        for r in self.routers.values():
            nn.init.normal_(r.weight, std=d_model**-0.5)
        self.predictors = (
            nn.ModuleDict(
                {
                    str(i): nn.Sequential(
                        nn.Linear(d_model, predictor_hidden), nn.SiLU(), nn.Linear(predictor_hidden, 1)
                    )
                    for i in layers
                }
            )
            if causal == "predictor"
            else None
        )
        self.last_stats: dict[str, float] = {}
        # parameters one token meets in a routed block's router (and predictor): its FLOPs are 2x these
        self.router_params = d_model + (
            0
            if self.predictors is None
            else sum(p.numel() for p in self.predictors[str(layers[0])].parameters())
        )

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> MixtureOfDepths:
        return cls(config.d_model, config.n_layers, **kwargs)

    @property
    def causal_at_eval(self) -> bool:
        return self.eval_selection == "causal"

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, layers={self.layers}, causal={self.causal!r}, gate={self.gate!r}"

    # -- the routing of one block -------------------------------------------------------------------
    def _weights(self, logits_BS: Tensor) -> Tensor:
        return logits_BS if self.gate == "linear" else torch.sigmoid(logits_BS)

    def route_block(self, layer: int, x_BSD: Tensor) -> tuple[Tensor, Tensor | None]:
        """Router logits ``[B, S]`` (fp32) and the predictor's logits (or None) of routed block ``layer``."""
        logits = self.routers[str(layer)](x_BSD).squeeze(-1).float()
        pred = None
        if self.predictors is not None:
            pred = self.predictors[str(layer)](x_BSD.detach()).squeeze(-1).float()
        self.flops += 2.0 * self.router_params * x_BSD.shape[0] * x_BSD.shape[1]
        return logits, pred

    def forward(
        self, x: Tensor, blocks: nn.ModuleList, rope: Rope, ctx: RoutingContext, positions: Tensor | None
    ) -> Tensor:
        if self.layers and self.layers[-1] >= len(blocks):
            raise ValueError(f"routed layers {self.layers} do not fit a model of {len(blocks)} blocks")
        b, s, d = x.shape
        aux = x.new_zeros((), dtype=torch.float32)
        stats: dict[str, list[float]] = {"agree": [], "recall": [], "kept": []}
        routed = set(self.layers)
        for i, blk in enumerate(blocks):
            cache = block_cache(ctx, blk)
            if i not in routed:
                x = blk(x, rope, ctx, positions=positions, cache=cache)
                continue
            logits, pred = self.route_block(i, x)
            decide = pred if pred is not None else logits  # what the causal rule thresholds
            k = capacity_count(self.capacity, s)
            need_topk = self.training or self.eval_selection == "topk" or s > 1
            topk_index = topk_per_sequence(logits, k) if need_topk else None
            in_topk = None
            if topk_index is not None:
                in_topk = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, topk_index, True)
            if self.training or self.eval_selection == "topk":
                selected, index, valid = in_topk, topk_index, None
            else:
                selected = decide > 0
                index, valid = ragged_index(selected)
            if s > 0 and in_topk is not None and (self.training or s > 1):
                target = in_topk.to(logits.dtype)  # 1[i in top-k]
                if self.training and self.aux_coef > 0:
                    aux = aux + self.aux_coef * F.binary_cross_entropy_with_logits(decide, target)
                if not self.training:  # a decoded token alone (s = 1) says nothing about top-k
                    chosen = decide > 0
                    stats["agree"].append(float((chosen == in_topk).float().mean()))
                    stats["recall"].append(float((chosen & in_topk).sum() / in_topk.sum().clamp(min=1)))
                    stats["kept"].append(float(chosen.float().mean()))
            x = self._run_selected(i, blk, x, selected, index, valid, logits, rope, ctx, positions, cache)
        self.aux_loss = aux
        if stats["agree"]:
            n = len(stats["agree"])
            self.last_stats = {
                "predictor_accuracy": sum(stats["agree"]) / n,
                "topk_recall": sum(stats["recall"]) / n,
                "kept_fraction": sum(stats["kept"]) / n,
            }
        return x

    def _run_selected(
        self,
        layer: int,
        blk: nn.Module,
        x: Tensor,
        selected: Tensor,
        index: Tensor,
        valid: Tensor | None,
        logits: Tensor,
        rope: Rope,
        ctx: RoutingContext,
        positions: Tensor | None,
        cache: Any,
    ) -> Tensor:
        b, s, d = x.shape
        weight_BS = self._weights(logits)
        routing = compute_routing(selected, weight_BS, logits.reshape(-1, 1))
        ran = self.routed(routing, ctx.replace(layer_index=layer), x.reshape(-1, d))
        if ran is not routing:  # a routing transform decides what runs
            selected, weight_BS = routing_selection(ran, b, s, weight_BS)
            index, valid = ragged_index(selected)
        weight = weight_BS.gather(1, index)  # [B, K]
        if index.shape[1] == 0:  # no token runs this block (a skipped decode step)
            return x
        x_sel = gather_tokens(x, index)
        pos = positions_of(index, positions)
        out = blk(x_sel, rope, gathered_context(ctx, index, s), positions=pos, valid=valid, cache=cache)
        return mod_update(x, index, out - x_sel, weight, valid)


registry.register(
    "depth",
    "mod",
    paper="Raposo et al. 2024, Mixture-of-Depths: Dynamically allocating compute in transformer-based language models (arXiv 2404.02258)",
    summary="per-sequence top-k tokens (C = 12.5%) run every other block, weighted by the router; causal BCE or predictor for sampling",
)(MixtureOfDepths)
