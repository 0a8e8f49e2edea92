"""Loops for atomic (single-neuron) expert pools: a small C kernel, built on first use.

``csrc/atomic_experts.c`` reads each assignment's ``u``/``v`` row once, straight from the
``[E, d]`` tables, and writes each row of the ``[E, d]`` gradients exactly once (see the C file).
``moelab.ops.atomic`` calls it on CPU for float32/float64 and falls back to its chunked PyTorch
path anywhere else (CUDA, bf16, no compiler, ``MOELAB_ATOMIC_KERNEL=0``).

Built by ``build.py`` (as ``skinny.py``'s kernel): the system C compiler (``cc``/``gcc``, ``-O3 -march=native
-fopenmp``) into ``$MOELAB_CACHE`` (default ``~/.cache/moelab``), keyed by a hash of the source,
the compiler and the CPU, loaded with ``ctypes``; OpenMP is the ``libgomp`` PyTorch has loaded, so
the loops run on PyTorch's thread count. Functions here take tensors the caller has checked
(contiguous, on CPU, one dtype, indices in range) and do no autograd.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch
from torch import Tensor

from moelab.kernels.cpu.build import advise_huge_pages, build_kernel

_DTYPES = {torch.float32: 0, torch.float64: 1}
ACTIVATION_CODES = {"gelu": 0, "relu": 1, "silu": 2}
# gradient tables at least this large ask for transparent huge pages before they are written
HUGE_PAGE_MIN_BYTES = 64 * 1024 * 1024
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def _compile() -> ctypes.CDLL | None:
    lib = build_kernel("atomic_experts", ("-lm",))
    if lib is None:
        return None
    ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.atomic_forward.restype = int_
    lib.atomic_forward.argtypes = [int_] + [ptr] * 7 + [long_] + [ptr] * 2 + [long_] * 3 + [int_] * 2
    lib.atomic_backward_tokens.restype = int_
    lib.atomic_backward_tokens.argtypes = [int_] + [ptr] * 8 + [long_] + [ptr] * 4 + [long_] * 3 + [int_] * 2
    lib.atomic_table_grad.restype = int_
    lib.atomic_table_grad.argtypes = [int_] + [ptr] * 5 + [long_] * 3 + [int_]
    return lib


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"] = None if os.environ.get("MOELAB_ATOMIC_KERNEL", "1") == "0" else _compile()
    return _STATE["lib"]  # type: ignore[return-value]


def can_use(*tensors: Tensor) -> bool:
    """Whether the kernel runs these tensors: all on CPU, one dtype (float32 or float64), built here."""
    dtype = tensors[0].dtype
    if dtype not in _DTYPES or any(t.device.type != "cpu" or t.dtype != dtype for t in tensors):
        return False
    return _lib() is not None


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(rc: int, name: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{name}: the kernel declined operands that can_use() accepted")


def forward(
    x_TD: Tensor,
    u_ED: Tensor,
    v_EO: Tensor,
    expert_index_N: Tensor,
    weight_N: Tensor,
    top_k: int,
    row_start_T1: Tensor | None,
    order_N: Tensor | None,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """``(y [T, d_out], h [N])``. Token ``t``'s assignments: ``t k .. t k + k - 1`` when
    ``top_k > 0``, else ``order[row_start[t] .. row_start[t + 1])``."""
    t, d = x_TD.shape
    o = v_EO.shape[1]
    y = x_TD.new_empty(t, o)
    h = x_TD.new_empty(expert_index_N.shape[0])
    _check(
        _lib().atomic_forward(  # type: ignore[union-attr]
            _DTYPES[x_TD.dtype],
            _p(x_TD),
            _p(u_ED),
            _p(v_EO),
            _p(expert_index_N),
            _p(weight_N),
            _p(row_start_T1),
            _p(order_N),
            top_k,
            _p(h),
            _p(y),
            t,
            d,
            o,
            ACTIVATION_CODES[activation],
            torch.get_num_threads(),
        ),
        "atomic_forward",
    )
    return y, h


def backward_tokens(
    gy_TO: Tensor,
    u_ED: Tensor,
    v_EO: Tensor,
    expert_index_N: Tensor,
    weight_N: Tensor,
    h_N: Tensor,
    top_k: int,
    row_start_T1: Tensor | None,
    order_N: Tensor | None,
    activation: str,
    *,
    need_x: bool,
    need_w: bool,
    need_s: bool,
    need_gh: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """``(grad_x [T, d_in], grad_w [N], s [N], g_h [N])``, each None when not asked for.

    ``s = w act(h)`` and ``g_h = w act'(h) (gy_t . v_e)`` feed :func:`table_grad`."""
    t, o = gy_TO.shape
    d = u_ED.shape[1]
    n = expert_index_N.shape[0]
    grad_x = gy_TO.new_empty(t, d) if need_x else None
    grad_w = gy_TO.new_empty(n) if need_w else None
    s = gy_TO.new_empty(n) if need_s else None
    gh = gy_TO.new_empty(n) if need_gh else None
    _check(
        _lib().atomic_backward_tokens(  # type: ignore[union-attr]
            _DTYPES[gy_TO.dtype],
            _p(gy_TO),
            _p(u_ED),
            _p(v_EO),
            _p(expert_index_N),
            _p(weight_N),
            _p(h_N),
            _p(row_start_T1),
            _p(order_N),
            top_k,
            _p(grad_x),
            _p(grad_w),
            _p(s),
            _p(gh),
            t,
            d,
            o,
            ACTIVATION_CODES[activation],
            torch.get_num_threads(),
        ),
        "atomic_backward_tokens",
    )
    return grad_x, grad_w, s, gh


def table_grad(
    src_TD: Tensor, sorted_e_N: Tensor, token_N: Tensor, coef_N: Tensor, num_experts: int
) -> Tensor:
    """``g [E, d]``: ``g[e] = sum over sorted assignments n of expert e of coef[n] src[token[n]]``.

    ``sorted_e`` ascending; ``token`` and ``coef`` in the same order. Rows of experts without
    assignments are 0; every row is written once (no separate zero fill)."""
    n = sorted_e_N.shape[0]
    d = src_TD.shape[1]
    g = src_TD.new_empty(num_experts, d)
    if g.numel() * g.element_size() >= HUGE_PAGE_MIN_BYTES:  # first touched below, row block by row block
        advise_huge_pages(g.data_ptr(), g.numel() * g.element_size())
    _check(
        _lib().atomic_table_grad(  # type: ignore[union-attr]
            _DTYPES[src_TD.dtype],
            _p(src_TD),
            _p(sorted_e_N),
            _p(token_N),
            _p(coef_N),
            _p(g),
            n,
            num_experts,
            d,
            torch.get_num_threads(),
        ),
        "atomic_table_grad",
    )
    return g
