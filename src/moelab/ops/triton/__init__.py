"""The ``triton`` backend: ScatterMoE-style fused gather + grouped GEMM + scatter on CUDA.

Importing this package never imports Triton: it registers the backend, and the kernels
(``kernels.py``) and the autograd Function (``function.py``) load at the first call. ``import
moelab`` therefore works on machines without Triton; there the backend reports itself unavailable
and ``backend="auto"`` passes over it.

CPU tensors run under Triton's interpreter only (``TRITON_INTERPRET=1`` set before the first call):
that is how the tests check the kernels on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import TYPE_CHECKING

from torch import Tensor

from ...routing.routing import Routing
from ..backends import register_backend

if TYPE_CHECKING:
    from ...experts.bank import ExpertBank

# Bank activations the kernels implement (gated: SwiGLU, GeGLU; plain: GELU, ReLU, SiLU).
SUPPORTED_ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")


@cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or deliberately hidden install
        return False


def supports_bank(bank: ExpertBank) -> bool:
    """Banks whose per-expert math is ``ExpertBank``'s own, with a supported activation.

    A subclass that changes the math (biases, clamps, another layout: e.g. gpt-oss's bank in
    ``moelab.hf``) is not run by kernels that would silently ignore the change.
    """
    from ...experts.bank import ExpertBank

    cls = type(bank)
    return (
        isinstance(bank, ExpertBank)
        and getattr(bank, "activation", None) in SUPPORTED_ACTIVATIONS
        and cls.expert_forward is ExpertBank.expert_forward
        and cls.activate is ExpertBank.activate
    )


@register_backend(
    "triton",
    paper="ScatterMoE (Tan et al. 2024) scatter2scatter: fused gather + grouped GEMM + scatter, no padding",
    summary="Triton kernels: gather-in grouped GEMM with fused activation, scatter-out down projection, "
    "grouped weight-gradient kernel; fp32 accumulation",
    devices=("cuda",),
    available=triton_available,
    supports=supports_bank,
)
def moe_triton(x_TD: Tensor, routing: Routing, bank: ExpertBank) -> Tensor:
    """``[T, d]``: dispatch, experts and combine in Triton kernels. See ``function.moe_triton``."""
    if not triton_available():
        raise ValueError("backend 'triton' needs the triton package: pip install 'moelab[gpu]'")
    from .function import moe_triton as run

    return run(x_TD, routing, bank)


__all__ = ["SUPPORTED_ACTIVATIONS", "moe_triton", "supports_bank", "triton_available"]
