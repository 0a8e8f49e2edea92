"""Executor ``sorted``: one sort, a gather, the bank's grouped forward, a weighted scatter back.

It runs any bank: the bank's ``forward_sorted`` sees expert-sorted rows and the ``ExpertOrder``
(grouped GEMMs for MLP banks, per-row weight gathers for atomic pools).
"""

from __future__ import annotations

from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.ops.executors import register_executor
from moelab.ops.rows import combine, dispatch


@register_executor(
    "sorted",
    paper="MegaBlocks (Gale et al. 2023) dropless grouped GEMM, via torch grouped_mm",
    summary="sort assignments by expert, gather, the bank's grouped forward (two grouped GEMMs), weighted scatter back",
)
def moe_sorted(x_TD: Tensor, routing: Routing, bank: nn.Module) -> Tensor:
    y_sorted = bank.forward_sorted(dispatch(x_TD, routing), routing.by_expert())
    return combine(y_sorted, routing)
