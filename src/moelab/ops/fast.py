"""Executor ``fast``: the quickest exact CPU path for the call at hand (it also runs on CUDA).

- a gradient is needed (training): :func:`moe_fused`, the segmented per-expert pipeline of
  ``moelab.kernels.cpu.fused`` with a custom autograd Function that saves only ``h_in``;
- no gradient and a small batch (decode): ``moelab.kernels.cpu.small_batch``, nine ops whatever
  the number of experts;
- no gradient and a large batch: the fused forward without saving anything, whose buffers stay
  bounded by one segment.

"Small" means the small-batch path's largest transient buffer, ``N x max(2h, d)`` elements,
fits in ``SMALL_BATCH_MAX_BYTES``; every decode shape of ``bench/moe_layer.py`` (``T <= 16``) is
small, every ``T = 4096`` shape is not. It runs plain MLP banks (``is_plain_mlp_bank``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank, is_plain_mlp_bank
from moelab.kernels.cpu.fused import DEFAULT_MAX_ROWS, FusedExperts, fused_forward
from moelab.kernels.cpu.small_batch import small_batch_forward
from moelab.ops.executors import register_executor

# Largest transient of the small-batch path; our choice (it keeps decode-sized calls in L2/L3).
SMALL_BATCH_MAX_BYTES = 32 * 1024 * 1024


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_path(x_TD: Tensor, routing: Routing, bank: ExpertBank) -> str:
    """``"fused"`` or ``"small_batch"``: which path :func:`moe_fast` runs for these arguments."""
    if needs_grad(x_TD, routing.weight, bank.w_in, bank.down_proj):
        return "fused"
    width = max(bank.w_in.shape[1], bank.d_in, bank.d_out)
    size = routing.num_assignments * width * x_TD.element_size()
    return "small_batch" if size <= SMALL_BATCH_MAX_BYTES else "fused"


@register_executor(
    "fast",
    paper="MegaBlocks (Gale et al. 2023); ScatterMoE (Tan et al. 2024): gather-GEMM-scatter, no padding, no copies",
    summary="CPU fast path: segmented per-expert pipeline with a custom autograd that saves only h_in; "
    "a constant-op grouped path for small inference batches",
    devices=("cpu", "cuda"),
    supports=is_plain_mlp_bank,
)
def moe_fast(x_TD: Tensor, routing: Routing, bank: ExpertBank, *, max_rows: int = DEFAULT_MAX_ROWS) -> Tensor:
    """Executor ``fast``: equal to ``moe_reference`` forward and backward; see the module docstring."""
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


# Under torch.compile the executor runs eagerly (a graph break around it): its loop over experts
# depends on the routing's counts, its GEMMs call oneDNN and a C kernel directly, and its autograd
# Function saves what it chooses; the rest of the model still compiles. The disabled wrapper is
# built on the first compiled call (``torch.compiler.disable`` imports torch._dynamo, ~1 s, which
# ``import moelab`` must not pay) and only entered while compiling: calling it costs ~20 us, a
# lot for a decode step.
_EAGER: dict[str, object] = {}


def _run_eagerly(x_TD: Tensor, routing: Routing, bank: ExpertBank, max_rows: int) -> Tensor:
    fn = _EAGER.get("run")
    if fn is None:
        fn = _EAGER["run"] = torch.compiler.disable(_run)
    return fn(x_TD, routing, bank, max_rows)


def bank_operands(x_TD: Tensor, bank: ExpertBank) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, w_in, w_down)`` in one compute dtype, applying autocast the way ``F.linear`` would."""
    w_in, w_down = bank.w_in, bank.down_proj
    dev = x_TD.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return x_TD.to(dt), w_in.to(dt), w_down.to(dt)
    if x_TD.dtype != w_in.dtype or w_down.dtype != w_in.dtype:
        raise TypeError(
            f"x has dtype {x_TD.dtype} but the expert weights are {w_in.dtype}/{w_down.dtype}; "
            "cast one of them or run under autocast"
        )
    return x_TD, w_in, w_down


def moe_fused(
    x_TD: Tensor, routing: Routing, bank: ExpertBank, *, max_rows: int = DEFAULT_MAX_ROWS
) -> Tensor:
    """``y [T, d_out]`` through the fused path (training, large batches); equals ``moe_reference``."""
    order = routing.by_expert()
    counts = order.counts.tolist()
    x, w_in, w_down = bank_operands(x_TD, bank)
    weight = order.weight
    with torch.autocast(x_TD.device.type, enabled=False):
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or w_in.requires_grad or w_down.requires_grad
        ):
            y = FusedExperts.apply(
                x, weight, w_in, w_down, order.token_index, counts, bank.activation, max_rows
            )
        else:
            y, _ = fused_forward(
                x, order.token_index, weight, w_in, w_down, counts, bank.activation,
                save_hidden=False, max_rows=max_rows,
            )  # fmt: skip
    return y
