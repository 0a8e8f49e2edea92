"""Auxiliary losses by name: ``fn(routing, *, ctx=None, layer=None) -> scalar``."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from moelab import registry

LossFn = Callable[..., Tensor]


def register_loss(name: str, *, paper: str, summary: str):
    """Decorator: register a loss ``fn(routing, *, ctx=None, layer=None, **params) -> Tensor``.

    ``ctx`` is the layer's ``RoutingContext`` (its ``batch_shape`` gives the sequences), ``layer`` the
    routed layer (for losses that read its router or its experts). A loss with parameters (ERC's
    ``alpha``) takes them as keyword arguments with the paper's defaults; a layer passes the ones
    its ``aux_loss_kwargs`` sets.
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


def loss_parameters(name: str) -> list[str]:
    """The parameters loss ``name`` takes beyond ``routing``, ``ctx`` and ``layer``."""
    import inspect

    sig = inspect.signature(get_loss(name))
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind is p.KEYWORD_ONLY and p.name not in ("ctx", "layer")
    ]


def check_aux_loss_kwargs(
    aux_loss_kwargs: dict[str, dict] | None, aux_losses: dict[str, float]
) -> dict[str, dict]:
    """Validate ``{"loss name": {"param": value}}``: each name must be one of ``aux_losses`` and
    each parameter one the loss takes; anything else is a ``ValueError`` naming it."""
    if aux_loss_kwargs is None:
        return {}
    if not isinstance(aux_loss_kwargs, dict):
        raise TypeError(
            f"aux_loss_kwargs must be a dict loss name -> dict of parameters, got {type(aux_loss_kwargs).__name__}"
        )
    out = {}
    for name, params in aux_loss_kwargs.items():
        if name not in aux_losses:
            raise ValueError(
                f"aux_loss_kwargs[{name!r}]: {name!r} is not one of the layer's aux_losses {sorted(aux_losses)}"
            )
        if not isinstance(params, dict):
            raise TypeError(f"aux_loss_kwargs[{name!r}] must be a dict of parameters, got {type(params).__name__}")
        known = loss_parameters(name)
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"aux_loss_kwargs[{name!r}]: loss {name!r} does not take {unknown}; it takes {known or 'no parameters'}"
            )
        out[name] = dict(params)
    return out
