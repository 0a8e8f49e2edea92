"""Backend ``fast``: pick the quickest exact path for the call at hand.

- a gradient is needed (training): :func:`.fused.moe_fused` (segmented per-expert pipeline with a
  custom autograd Function that saves only ``h_in``);
- no gradient and a small batch (decode): :func:`.small_batch.small_batch_forward`, nine ops
  whatever the number of experts;
- no gradient and a large batch: the fused forward without saving anything, whose buffers stay
  bounded by one segment.

"Small" means the small-batch path's largest transient buffer, ``N x max(2h, d)`` elements,
fits in ``SMALL_BATCH_MAX_BYTES``; every decode shape of ``bench/moe_layer.py`` (``T <= 16``) is
small, every ``T = 4096`` shape is not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...routing.routing import Routing
from .fused import DEFAULT_MAX_ROWS, bank_operands, moe_fused
from .small_batch import small_batch_forward

if TYPE_CHECKING:
    from ...experts.bank import ExpertBank

# Largest transient of the small-batch path; our choice (it keeps decode-sized calls in L2/L3).
SMALL_BATCH_MAX_BYTES = 32 * 1024 * 1024


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_path(x_TD: Tensor, routing: Routing, bank: ExpertBank) -> str:
    """``"fused"`` or ``"small_batch"``: which path :func:`moe_fast` runs for these arguments."""
    if needs_grad(x_TD, routing.weight, bank.w_in, bank.down_proj):
        return "fused"
    width = max(bank.w_in.shape[1], bank.d_model)
    size = routing.num_assignments * width * x_TD.element_size()
    return "small_batch" if size <= SMALL_BATCH_MAX_BYTES else "fused"


def moe_fast(x_TD: Tensor, routing: Routing, bank: ExpertBank, *, max_rows: int = DEFAULT_MAX_ROWS) -> Tensor:
    """Backend ``fast``: equal to ``moe_reference`` forward and backward; see the module docstring."""
    if torch.compiler.is_compiling():
        return _run_eagerly(x_TD, routing, bank, max_rows)
    return _run(x_TD, routing, bank, max_rows)


def _run(x_TD: Tensor, routing: Routing, bank: ExpertBank, max_rows: int) -> Tensor:
    if choose_path(x_TD, routing, bank) == "fused":
        return moe_fused(x_TD, routing, bank, max_rows=max_rows)
    order = routing.by_expert()
    x, w_in, w_down = bank_operands(x_TD, bank)
    with torch.autocast(x_TD.device.type, enabled=False):
        return small_batch_forward(x, order, w_in, w_down, bank.activation)


# Under torch.compile the backend runs eagerly (a graph break around it): its loop over experts
# depends on the routing's counts, its GEMMs call oneDNN and a C kernel directly, and its autograd
# Function saves what it chooses; the rest of the model still compiles. The disabled wrapper is
# only entered while compiling: calling it costs ~20 us, a lot for a decode step.
_run_eagerly = torch.compiler.disable(_run)
