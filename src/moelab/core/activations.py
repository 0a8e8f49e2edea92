"""The expert non-linearities: one table that banks, kernels and integrations all read.

An expert maps its input projection ``h_in [n, 2h or h]`` to ``a [n, h]``: ``act(gate) * up`` for
gated activations (SwiGLU, GeGLU: Shazeer 2020, *GLU Variants Improve Transformer*; gate rows
first), ``act(h_in)`` otherwise. Each entry names its element-wise base function (what a kernel
implements) and its backward from the pre-activation alone (ATen's own backward kernels, so a
hand-written backward is bit-for-bit what autograd gives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Activation:
    """``name``: moelab's name; ``base``: the element-wise function; ``gated``: ``act(gate) * up``."""

    name: str
    base: str
    gated: bool


_BASE: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]] = {
    # base -> (forward, backward(grad_out, pre_activation))
    "silu": (F.silu, lambda g, x: torch.ops.aten.silu_backward(g, x)),
    "gelu": (F.gelu, lambda g, x: torch.ops.aten.gelu_backward(g, x)),
    "relu": (F.relu, lambda g, x: g * (x > 0).to(g.dtype)),
}

ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("swiglu", "silu", True),
        Activation("geglu", "gelu", True),
        Activation("gelu", "gelu", False),
        Activation("relu", "relu", False),
        Activation("silu", "silu", False),
    )
}


def get_activation(name: object, argument: str = "activation") -> Activation:
    """The entry for ``name``; anything else raises ``ValueError`` naming ``argument``."""
    act = ACTIVATIONS.get(name) if isinstance(name, str) else None
    if act is None:
        raise ValueError(f"{argument} must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return act


def base_function(activation: str) -> Callable[[Tensor], Tensor]:
    """The element-wise function of ``activation`` (``F.silu`` for ``"swiglu"``)."""
    return _BASE[get_activation(activation).base][0]


def activation_for(base: str, gated: bool) -> str | None:
    """moelab's name for ``base`` (``"silu"``), gated or plain, or None if there is none."""
    for a in ACTIVATIONS.values():
        if a.base == base and a.gated == gated:
            return a.name
    return None


def activation_forward(h_in_NH: Tensor, activation: str) -> Tensor:
    """``[n, 2h or h] -> [n, h]``: ``act(gate) * up`` (gated) or ``act(h_in)``. A new tensor."""
    act = get_activation(activation)
    fn = _BASE[act.base][0]
    if not act.gated:
        return fn(h_in_NH)
    h = h_in_NH.shape[-1] // 2
    a, up = fn(h_in_NH[..., :h]), h_in_NH[..., h:]
    # In place when nothing records it (the kernels' own forward): one [n, h] buffer less.
    return a * up if a.requires_grad else a.mul_(up)


def activation_backward(h_in_NH: Tensor, grad_a_NH: Tensor, activation: str) -> Tensor:
    """``d loss / d h_in`` (``[n, 2h or h]``) from the pre-activation and ``d loss / d a``.

    Gated: ``d gate = act'(gate) * (grad_a * up)`` and ``d up = act(gate) * grad_a``.
    """
    act = get_activation(activation)
    fn, bwd = _BASE[act.base]
    if not act.gated:
        return bwd(grad_a_NH, h_in_NH)
    h = h_in_NH.shape[-1] // 2
    gate, up = h_in_NH[:, :h], h_in_NH[:, h:]
    out = torch.empty_like(h_in_NH)
    out[:, :h] = bwd(grad_a_NH * up, gate)
    torch.mul(fn(gate), grad_a_NH, out=out[:, h:])
    return out
