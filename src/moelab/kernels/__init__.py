"""Kernels: the leaf of the package. Tensors in, tensors out; they import nothing above ``core``.

- ``grouped_mm``: grouped GEMM over expert-sorted rows (``torch.nn.functional.grouped_mm`` or a loop);
- ``cpu``: the ``fast`` executor's kernels (segmented fused MLP, decode path, skinny GEMM, oneDNN);
- ``triton``: ScatterMoE-style Triton kernels (GPU; ``TRITON_INTERPRET=1`` on CPU for tests).
"""
