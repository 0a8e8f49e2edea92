"""Helpers shared by ``patch`` and ``upcycle``."""

from __future__ import annotations

from torch import nn

from moelab.ops.executors import check_backend_name


def backend_name(backend: object) -> str:
    """A moelab executor name from ``patch``'s ``backend`` argument (``"moelab"`` means ``"auto"``)."""
    if not isinstance(backend, str):
        raise TypeError(
            f"backend must be a str ('moelab', 'auto' or a moelab executor name), got {type(backend).__name__}"
        )
    return check_backend_name("auto" if backend == "moelab" else backend)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``model``'s submodule path ``name`` (``"model.layers.0.mlp"``)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
