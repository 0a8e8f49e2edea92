"""Argument checks shared by routers and layers: clear errors that name the argument."""

from __future__ import annotations

import torch
from torch import Tensor


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def top_k_in_range(top_k: object, num_experts: int, name: str = "top_k") -> int:
    positive_int(name, top_k)
    if top_k > num_experts:  # type: ignore[operator]
        raise ValueError(f"{name} must be <= num_experts ({num_experts}), got {top_k}")
    return top_k  # type: ignore[return-value]


def positive_float(name: str, value: object, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "a positive number or None" if allow_none else "a positive number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
    return float(value)


def hidden_states(x: object, d_model: int, *, name: str = "x", ranks: tuple[int, ...] = (2, 3)) -> Tensor:
    """Check a layer/router input: a floating tensor of rank in ``ranks`` whose last dim is d_model."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        shapes = " or ".join({2: "[T, d]", 3: "[B, S, d]"}[r] for r in ranks)
        raise ValueError(f"{name} must be {shapes} with d={d_model}, got shape {tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(f"{name} must have last dimension d_model={d_model}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x


def finite(x: Tensor, name: str = "x") -> None:
    """Raise on NaN/Inf. One fused reduction: cheap next to the expert GEMMs."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); routing them would propagate silently")


def same_device_dtype(x: Tensor, ref: Tensor, name: str = "x", what: str = "the layer's parameters") -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {what} are on {ref.device}; move one of them")
    if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"{name} has dtype {x.dtype} but {what} are {ref.dtype}; cast one of them or run under autocast"
        )


def float_in(name: str, value: object, lo: float, hi: float, *, hi_open: bool = True) -> float:
    """A real number in ``[lo, hi)`` (or ``[lo, hi]``), else a clear error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
    return float(value)
