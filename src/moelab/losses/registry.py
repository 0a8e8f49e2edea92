"""Auxiliary losses by name: ``fn(routing, *, ctx=None, layer=None) -> scalar``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from moelab import registry

LossFn = Callable[..., Tensor]


def register_loss(name: str, *, paper: str, summary: str):
    """Decorator: register a loss ``fn(routing, *, ctx=None, layer=None) -> Tensor``.

    ``ctx`` is the layer's ``RoutingContext`` (its ``batch_shape`` gives the sequences), ``layer`` the
    routed layer (for losses that read its router).
    """
    return registry.register("loss", name, paper=paper, summary=summary)


def get_loss(name: str) -> LossFn:
    return registry.get("loss", name).obj


def check_aux_losses(aux_losses: dict[str, float] | None) -> dict[str, float]:
    """Validate a ``{"name": coefficient}`` mapping; unknown names raise ``ValueError``."""
    if aux_losses is None:
        return {}
    if not isinstance(aux_losses, dict):
        raise TypeError(f"aux_losses must be a dict name -> coefficient, got {type(aux_losses).__name__}")
    out = {}
    for name, coef in aux_losses.items():
        try:
            get_loss(name)
        except ValueError as e:  # name the argument, keep the list of known losses
            raise ValueError(f"aux_losses: {e}") from None
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
            raise ValueError(f"aux_losses[{name!r}] must be a number >= 0, got {coef!r}")
        out[name] = float(coef)
    return out
