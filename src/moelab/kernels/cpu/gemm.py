"""``linear(x, w) = x @ w.T`` on the fastest GEMM library PyTorch ships for the dtype.

On CPU, ``torch.mm`` runs fp32 GEMMs through MKL and bf16/fp16 GEMMs through oneDNN. On the AMD
EPYC (Zen 4) machine our benchmarks run on, oneDNN's fp32 GEMM is 10-25% faster than MKL's for
the expert shapes (m = 512-2048 rows) and 1.5-3x faster for the skinny GEMMs of decoding
(m = 1-16 rows), where MKL falls back to a packing GEMM that reads the weights at a third of the
memory bandwidth (``bench/README.md`` has the measurement). PyTorch exposes oneDNN's fp32 linear as
``torch.ops.mkldnn._linear_pointwise`` (the op Inductor emits for CPU linears); it accepts strided
operands, takes no ``out=`` and has no autograd formula, which is fine here: the fast backends call
it only inside their own forward/backward code.

``USE_ONEDNN_FP32`` switches it off (then everything goes through ``torch.mm``); dtypes oneDNN does
not take (float64) and non-CPU tensors always use ``torch.mm``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
ONEDNN_AVAILABLE = bool(_LINEAR is not None and torch.backends.mkldnn.is_available())

# Route fp32 CPU GEMMs through oneDNN (our choice, measured in bench/); set False to use torch.mm.
USE_ONEDNN_FP32 = True


def uses_onednn(x: Tensor) -> bool:
    """Whether :func:`linear` sends ``x``'s GEMMs to oneDNN's fp32 kernel."""
    return USE_ONEDNN_FP32 and ONEDNN_AVAILABLE and x.dtype == torch.float32 and x.device.type == "cpu"


def linear(x_NK: Tensor, w_MK: Tensor) -> Tensor:
    """``[N, M] = x [N, K] @ w [M, K]^T`` (any strides). No autograd."""
    if uses_onednn(x_NK):
        return _LINEAR(x_NK, w_MK, None, "none", [], "")
    return torch.mm(x_NK, w_MK.t())
