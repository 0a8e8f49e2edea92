"""Executor ``triton``: ScatterMoE-style fused gather + grouped GEMM + scatter on CUDA.

Importing this module never imports Triton: it registers the executor, and the kernels
(``moelab.kernels.triton``) load at the first call. ``import moelab`` therefore works on machines
without Triton; there the executor reports itself unavailable and ``backend="auto"`` passes over it.

CPU tensors run under Triton's interpreter only (``TRITON_INTERPRET=1`` set before the first call):
that is how the tests check the kernels on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
from functools import cache

import torch
from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.experts.bank import is_plain_mlp_bank
from moelab.ops.dispatchers import check_rows
from moelab.ops.executors import register_executor


@cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or deliberately hidden install
        return False


def supports_bank(bank: nn.Module) -> bool:
    """Plain MLP banks (``is_plain_mlp_bank``) with ``d_out == d_in``.

    A subclass that changes the math (biases, clamps, another layout: e.g. gpt-oss's bank in
    ``moelab.hf``) is not run by kernels that would silently ignore the change. The kernels have
    been checked only for square experts (``d_out == d_in``); other banks go to ``sorted``.
    """
    return is_plain_mlp_bank(bank) and bank.d_out == bank.d_in


def _check(x_TD: Tensor, routing: Routing, bank: nn.Module) -> None:
    check_rows(x_TD, routing, bank)  # a direct call skips the dispatcher's check; kernels would not
    if not supports_bank(bank):
        raise ValueError(
            f"bank {type(bank).__name__} is not a plain square MLP bank; the triton kernels implement only "
            "ExpertBank's own math with d_out == d_in (use executor 'sorted' or 'reference')"
        )
    w = bank.w_in
    # Under autocast moe_triton casts x and the weights to the autocast dtype itself.
    autocast = torch.is_autocast_enabled(x_TD.device.type)
    if not autocast and (x_TD.dtype != w.dtype or bank.down_proj.dtype != w.dtype):
        raise TypeError(
            f"x ({x_TD.dtype}) and the bank's weights ({w.dtype}, {bank.down_proj.dtype}) must share a dtype"
        )
    if x_TD.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x_TD.dtype}")
    if x_TD.device != w.device or routing.device != w.device:
        raise ValueError(
            f"x ({x_TD.device}), routing ({routing.device}) and the bank ({w.device}) must share a device"
        )
    from moelab.kernels.triton import kernels as K

    if x_TD.device.type == "cpu" and not K.INTERPRET:
        raise ValueError(
            "the triton executor runs CUDA tensors; CPU tensors need TRITON_INTERPRET=1 set before "
            "moelab.kernels.triton.kernels is first imported"
        )


@register_executor(
    "triton",
    paper="ScatterMoE (Tan et al. 2024) scatter2scatter: fused gather + grouped GEMM + scatter, no padding",
    summary="Triton kernels: gather-in grouped GEMM with fused activation, scatter-out down projection, "
    "grouped weight-gradient kernel; fp32 accumulation",
    devices=("cuda",),
    available=triton_available,
    supports=supports_bank,
)
def moe_triton(x_TD: Tensor, routing: Routing, bank: nn.Module) -> Tensor:
    """``[T, d]``: the MoE expert layer (dispatch, experts, combine) with the Triton kernels.

    Equals ``moe_reference`` forward and backward (gradients of ``x``, ``routing.weight`` and the
    bank's weights) for any routing: token-choice top-k, capacity-dropped, expert-choice.
    """
    if not triton_available():
        raise ValueError("executor 'triton' needs the triton package: pip install 'moelab[gpu]'")
    _check(x_TD, routing, bank)
    from moelab.kernels.triton.function import TritonMoEFunction

    order = routing.by_expert()
    w_in, w_down = bank.w_in, bank.down_proj
    device_type = x_TD.device.type
    if torch.is_autocast_enabled(device_type):
        # As autocast does for a matmul: run the GEMMs in its dtype; the casts are differentiable,
        # so fp32 master weights still get fp32 gradients.
        dtype = torch.get_autocast_dtype(device_type)
        x_TD, w_in, w_down = x_TD.to(dtype), w_in.to(dtype), w_down.to(dtype)
    tensors = (x_TD, order.weight, w_in, w_down)
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    device = torch.cuda.device(x_TD.device) if x_TD.is_cuda else contextlib.nullcontext()
    with device:  # Triton launches on the current CUDA device
        return TritonMoEFunction.apply(
            x_TD,
            order.weight,
            w_in,
            w_down,
            order.token_index,
            order.perm,
            order.counts,
            order.offsets,
            routing.top_k,
            bank.activation,
            save_pre,
        )
