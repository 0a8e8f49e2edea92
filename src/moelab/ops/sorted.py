"""The ``sorted`` backend: one sort, a gather, grouped GEMMs, a weighted scatter back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..routing.routing import Routing
from .dispatch import combine, dispatch

if TYPE_CHECKING:
    from ..experts.bank import ExpertBank


def moe_sorted(x_TD: Tensor, routing: Routing, bank: ExpertBank) -> Tensor:
    order = routing.by_expert()
    x_sorted = dispatch(x_TD, routing)
    y_sorted = bank(x_sorted, order.offsets)
    return combine(y_sorted, routing)
