"""Skinny GEMM for decoding (a few rows): a small C kernel, built on first use.

``skinny_linear(x [m, k], w [n, k]) -> [m, n] fp32`` streams each row of ``w`` once and dots it
with the ``m`` rows of ``x`` (``csrc/skinny_gemm.c``). With a handful of token rows per expert a
GEMM is a pass over the expert's weights; PyTorch's CPU GEMMs pack the weights first and reach a
third (MKL, fp32) to a half (oneDNN, bf16) of the memory bandwidth on such shapes, the kernel
reaches the bandwidth (``bench/README.md``).

The C file is compiled with the system C compiler (``cc``/``gcc``, ``-O3 -march=native
-fopenmp``) into ``$MOELAB_CACHE`` (default ``~/.cache/moelab``), keyed by a hash of the source,
the compiler and the CPU, and loaded with ``ctypes``; the build takes well under a second and
happens once per machine. OpenMP resolves to the ``libgomp.so.1`` PyTorch has already loaded, so
the kernel shares PyTorch's thread pool and thread count. Anything missing (no compiler, no
AVX-512, no AVX512-BF16 for bf16, odd shapes or strides) makes :func:`can_use` false and the
callers use PyTorch's GEMMs instead; ``MOELAB_SKINNY=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch
from torch import Tensor

from moelab.kernels.cpu.build import build_kernel

KERNEL_MAX_ROWS = 8  # the C kernel's limit per call
# The kernel re-reads the m rows of x for every row of W, so they must stay in L1 (32 KiB per core
# on Zen 4; 24 KiB leaves room for the W stream). Past that, PyTorch's packing GEMM wins. Measured
# on 2 Zen 4 cores (bench/README.md); our choice.
L1_BUDGET_BYTES = 24 * 1024
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _compile() -> ctypes.CDLL | None:
    lib = build_kernel("skinny_gemm")
    if lib is None:
        return None
    lib.skinny_capabilities.restype = ctypes.c_int
    lib.skinny_linear.restype = ctypes.c_int
    lib.skinny_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2
    return lib


def _lib() -> tuple[ctypes.CDLL | None, int]:
    """The loaded kernel and its capability bits (1: fp32, 2: bf16); built on the first call."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                lib = None if os.environ.get("MOELAB_SKINNY", "1") == "0" else _compile()
                _STATE["caps"] = int(lib.skinny_capabilities()) if lib is not None else 0
                _STATE["lib"] = lib
    return _STATE["lib"], _STATE["caps"]  # type: ignore[return-value]


def available(dtype: torch.dtype) -> bool:
    """Whether the kernel is built here and handles ``dtype`` (fp32 or bf16)."""
    bit = {torch.float32: 1, torch.bfloat16: 2}.get(dtype, 0)
    return bool(bit) and bool(_lib()[1] & bit)


def raw_kernel():
    """The C entry point ``skinny_linear(x*, w*, y*, m, n, k, bf16, threads) -> int`` (0 = done).

    For callers that check the operands once and then address rows by pointer; needs
    :func:`available`.
    """
    return _lib()[0].skinny_linear  # type: ignore[union-attr]


def max_rows(k: int, dtype: torch.dtype) -> int:
    """Most rows of ``x [m, k]`` the kernel takes in one call before PyTorch's GEMM is faster."""
    el = {torch.float32: 4, torch.bfloat16: 2}.get(dtype)
    return 0 if el is None else min(KERNEL_MAX_ROWS, L1_BUDGET_BYTES // (k * el))


def can_use(x_MK: Tensor, w_NK: Tensor) -> bool:
    """Whether :func:`skinny_linear` runs these operands (else use a PyTorch GEMM)."""
    if x_MK.device.type != "cpu" or x_MK.dtype != w_NK.dtype or x_MK.dim() != 2 or w_NK.dim() != 2:
        return False
    m, k = x_MK.shape
    if not (1 <= m <= max_rows(k, x_MK.dtype)) or w_NK.shape[1] != k or w_NK.shape[0] < 1:
        return False
    if k % (64 if x_MK.dtype == torch.bfloat16 else 32):
        return False
    return x_MK.is_contiguous() and w_NK.is_contiguous() and available(x_MK.dtype)


def skinny_linear(x_MK: Tensor, w_NK: Tensor, out_MN: Tensor | None = None) -> Tensor:
    """``[m, n] fp32 = x [m, k] @ w [n, k]^T``; requires :func:`can_use`. No autograd.

    ``out_MN``: a contiguous fp32 ``[m, n]`` tensor to write into (e.g. rows of a larger buffer).
    """
    lib, _ = _lib()
    m, k = x_MK.shape
    n = w_NK.shape[0]
    if out_MN is None:
        out_MN = torch.empty(m, n, dtype=torch.float32)
    elif out_MN.dtype != torch.float32 or tuple(out_MN.shape) != (m, n) or not out_MN.is_contiguous():
        raise ValueError(
            f"out_MN must be a contiguous float32 [{m}, {n}] tensor, got {out_MN.dtype} {tuple(out_MN.shape)}"
        )
    rc = lib.skinny_linear(  # type: ignore[union-attr]
        x_MK.data_ptr(), w_NK.data_ptr(), out_MN.data_ptr(), m, n, k,
        int(x_MK.dtype == torch.bfloat16), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError("skinny_linear: the kernel declined operands that can_use() accepted")
    return out_MN
