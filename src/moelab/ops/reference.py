"""Executor ``reference``: the readable definition, a loop over the experts that received rows.

Every other executor must agree with it. It calls only ``bank.expert_forward`` (so it runs any
bank) and loops over the experts present in the routing, never over all ``E`` (a pool of ~10^6
experts costs what its assignments cost).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.ops.executors import register_executor


@register_executor(
    "reference",
    paper="(moelab) readable loop over experts",
    summary="one expert_forward per expert with rows and an index_add; the definition every executor matches",
)
def moe_reference(x_TD: Tensor, routing: Routing, bank: nn.Module) -> Tensor:
    """``y[t] = sum over assignments (t, e, w) of w * expert_e(x[t])``, one expert at a time."""
    y = x_TD.new_zeros(routing.num_tokens, bank.d_out)
    for e in torch.unique(routing.expert_index).tolist():
        sel = (routing.expert_index == e).nonzero().squeeze(1)
        tok = routing.token_index[sel]
        out = bank.expert_forward(e, x_TD[tok])
        y = y.index_add(0, tok, out * routing.weight[sel].unsqueeze(-1).to(out.dtype))
    return y
