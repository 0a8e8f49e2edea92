"""Inference path for small batches (decode): the whole layer in a constant number of ops.

With ``T <= 16`` tokens most experts receive one or two rows, and the work is reading the touched
experts' weights once. The per-expert loop of ``fused`` then spends more time issuing small ops
(about ten microseconds each, seven per expert) than the GEMMs themselves take on a few rows. Here
the layer is one gather, two grouped GEMMs (``torch.nn.functional.grouped_mm``: the loop over
experts runs in C++), one activation, one scale and one scatter: nine ops whatever ``E`` is.

It saves nothing for a backward (it runs only when no gradient is needed) and its transient
buffers grow with ``N``, which is why :mod:`.dispatch` uses it only below a size bound.
"""

from __future__ import annotations

from torch import Tensor

from ...routing.routing import ExpertOrder
from ..grouped_mm import grouped_mm
from .activation import activation_forward


def small_batch_forward(
    x_TD: Tensor,
    order: ExpertOrder,
    w_in_EHD: Tensor,
    w_down_EDH: Tensor,
    activation: str,
    counts_E: list[int] | None = None,
) -> Tensor:
    """``y [T, d]`` for expert-sorted assignments ``order``; no autograd bookkeeping."""
    t, d = x_TD.shape
    y_TD = x_TD.new_zeros(t, d)
    if order.token_index.shape[0] == 0:
        return y_TD
    x_ND = x_TD.index_select(0, order.token_index)
    h_in = grouped_mm(x_ND, w_in_EHD.transpose(1, 2), order.offsets, counts_E)
    a_NH = activation_forward(h_in, activation)
    del h_in
    y_ND = grouped_mm(a_NH, w_down_EDH.transpose(1, 2), order.offsets, counts_E)
    y_ND.mul_(order.weight.unsqueeze(1).to(y_ND.dtype))
    return y_TD.index_add_(0, order.token_index, y_ND)
