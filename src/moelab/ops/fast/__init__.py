"""Fast expert execution for CPU (pure PyTorch; it also runs on CUDA).

One op per file:

- ``activation.py``: expert non-linearities with a backward from the pre-activation alone;
- ``fused.py``: segmented gather -> gate+up GEMM -> activation -> down GEMM -> weighted scatter,
  with a custom autograd Function that saves indices and ``h_in`` instead of copies;
- ``small_batch.py``: the decode path, a constant number of ops whatever ``E`` is;
- ``dispatch.py``: backend ``fast``, which picks one of them per call.

See ``docs/methods/fast.md`` and ``docs/performance.md``.
"""

from ..backends import register_backend
from .activation import SUPPORTED_ACTIVATIONS, activation_backward, activation_forward
from .dispatch import SMALL_BATCH_MAX_BYTES, choose_path, moe_fast
from .fused import (
    DEFAULT_MAX_ROWS,
    FusedExperts,
    fused_backward,
    fused_forward,
    moe_fused,
    segments,
    supports_bank,
)
from .small_batch import small_batch_forward

register_backend(
    "fast",
    paper="MegaBlocks (Gale et al. 2023); ScatterMoE (Tan et al. 2024): gather-GEMM-scatter, no padding, no copies",
    summary="CPU fast path: segmented per-expert pipeline with a custom autograd that saves only h_in; "
    "a constant-op grouped path for small inference batches",
    devices=("cpu", "cuda"),
    supports=supports_bank,
)(moe_fast)

__all__ = [
    "DEFAULT_MAX_ROWS",
    "SMALL_BATCH_MAX_BYTES",
    "SUPPORTED_ACTIVATIONS",
    "FusedExperts",
    "activation_backward",
    "activation_forward",
    "choose_path",
    "fused_backward",
    "fused_forward",
    "moe_fast",
    "moe_fused",
    "segments",
    "small_batch_forward",
    "supports_bank",
]
