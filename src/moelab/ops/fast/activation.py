"""Expert non-linearities with a hand-written backward that needs only the pre-activation.

``ExpertBank.activate`` maps the input projection ``h_in [n, 2h or h]`` to ``a [n, h]``:
``act(gate) * up`` for gated banks (SwiGLU: Shazeer 2020, *GLU Variants Improve Transformer*),
``act(h_in)`` otherwise. Autograd would save ``act(gate)`` and ``a`` beside ``h_in``; the fast
backends save ``h_in`` alone and call :func:`activation_backward`, which recomputes the cheap
element-wise parts (one pass over ``h_in``) instead of keeping two more ``[N, h]`` tensors alive.

Derivatives use ATen's own backward kernels (``silu_backward``, ``gelu_backward``), so the result
is bit-for-bit what autograd would produce for the same forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# name -> (gated, forward of the non-linearity, its backward(grad, pre_activation))
_ACTS = {
    "swiglu": (True, F.silu, torch.ops.aten.silu_backward),
    "geglu": (True, F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x)),
    "gelu": (False, F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x)),
    "silu": (False, F.silu, torch.ops.aten.silu_backward),
    "relu": (False, F.relu, lambda g, x: g * (x > 0).to(g.dtype)),
}

SUPPORTED_ACTIVATIONS = tuple(sorted(_ACTS))


def _lookup(activation: str):
    try:
        return _ACTS[activation]
    except KeyError:
        raise ValueError(f"activation must be one of {SUPPORTED_ACTIVATIONS}, got {activation!r}") from None


def activation_forward(h_in_NH: Tensor, activation: str) -> Tensor:
    """``[n, 2h or h] -> [n, h]``: ``act(gate) * up`` (gated) or ``act(h_in)``. New tensor."""
    gated, fn, _ = _lookup(activation)
    if not gated:
        return fn(h_in_NH)
    h = h_in_NH.shape[-1] // 2
    a = fn(h_in_NH[:, :h])
    return a.mul_(h_in_NH[:, h:])


def activation_backward(h_in_NH: Tensor, grad_a_NH: Tensor, activation: str) -> Tensor:
    """``d loss / d h_in`` (``[n, 2h or h]``) from the pre-activation and ``d loss / d a``.

    Gated: ``d gate = act'(gate) * (grad_a * up)`` and ``d up = act(gate) * grad_a``.
    """
    gated, fn, bwd = _lookup(activation)
    if not gated:
        return bwd(grad_a_NH, h_in_NH)
    h = h_in_NH.shape[-1] // 2
    gate, up = h_in_NH[:, :h], h_in_NH[:, h:]
    out = torch.empty_like(h_in_NH)
    out[:, :h] = bwd(grad_a_NH * up, gate)
    torch.mul(fn(gate), grad_a_NH, out=out[:, h:])
    return out
