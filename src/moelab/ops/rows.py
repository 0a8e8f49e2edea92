"""``dispatch`` and ``combine``: move tokens into expert-sorted order and back.

``dispatch(x [T, d], routing) -> x_sorted [N, d]`` gathers each assignment's token in expert
order (``routing.by_expert()``); ``combine(y_sorted [N, d], routing) -> y [T, d]`` multiplies each
row by its combine weight and sums the rows of each token. The combine weight is where the
router's gradient enters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.routing import Routing


def dispatch(x_TD: Tensor, routing: Routing) -> Tensor:
    """``[N, d]``: ``x[token]`` for every assignment, sorted by expert."""
    return x_TD.index_select(0, routing.by_expert().token_index)


def combine(y_sorted_ND: Tensor, routing: Routing) -> Tensor:
    """``[T, d]``: ``sum over a token's assignments of weight * y``. Tokens with none get 0."""
    order = routing.by_expert()
    weighted = y_sorted_ND * order.weight.unsqueeze(-1).to(y_sorted_ND.dtype)
    t, d = routing.num_tokens, y_sorted_ND.shape[-1]
    if routing.top_k is not None:
        # Token-major with exactly k per token: undo the sort, then a deterministic sum over k.
        unsorted = torch.empty_like(weighted)
        unsorted[order.perm] = weighted
        return unsorted.view(t, routing.top_k, d).sum(1)
    return weighted.new_zeros(t, d).index_add(0, order.token_index, weighted)
