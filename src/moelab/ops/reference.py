"""The readable reference: a loop over experts. Every other backend must agree with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..routing.routing import Routing

if TYPE_CHECKING:
    from ..experts.bank import ExpertBank


def moe_reference(x_TD: Tensor, routing: Routing, bank: ExpertBank) -> Tensor:
    """``y[t] = sum over assignments (t, e, w) of w * expert_e(x[t])``, one expert at a time."""
    y = x_TD.new_zeros(routing.num_tokens, x_TD.shape[-1])
    for e in range(routing.num_experts):
        sel = (routing.expert_index == e).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        tok = routing.token_index[sel]
        out = bank.expert_forward(e, x_TD[tok])
        y = y.index_add(0, tok, out * routing.weight[sel].unsqueeze(-1).to(out.dtype))
    return y
