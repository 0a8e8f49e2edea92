"""CPU kernels of the ``fast`` executor (pure PyTorch + one small C kernel; they also run on CUDA).

One op per file, tensors in and tensors out (no ``Routing``, no bank):

- ``fused.py``: segmented gather -> gate+up GEMM -> activation -> down GEMM -> weighted scatter,
  with a custom autograd Function that saves indices and ``h_in`` instead of copies;
- ``small_batch.py``: the decode path, a constant number of ops whatever ``E`` is;
- ``skinny.py`` (+ ``csrc/skinny_gemm.c``): a GEMM for a handful of rows at memory bandwidth;
- ``gemm.py``: ``linear`` on oneDNN's fp32 GEMM.

The executor that picks between them is ``moelab.ops.fast``. See ``docs/methods/fast.md`` and
``docs/performance.md``.
"""

from moelab.kernels.cpu.fused import DEFAULT_MAX_ROWS, FusedExperts, fused_backward, fused_forward, segments
from moelab.kernels.cpu.gemm import linear, uses_onednn
from moelab.kernels.cpu.small_batch import small_batch_forward

__all__ = [
    "DEFAULT_MAX_ROWS",
    "FusedExperts",
    "fused_backward",
    "fused_forward",
    "linear",
    "segments",
    "small_batch_forward",
    "uses_onednn",
]
