"""Executors: a string-keyed registry of interchangeable ways to compute the experts.

An executor is ``fn(x [T, d_in], routing, bank) -> y [T, d_out]`` with
``y[t] = sum over assignments (t, e, w) of w * expert_e(x[t])``; it must equal ``reference``
within tolerance, forward and backward. Each lives in its own module (``reference``, ``sorted``,
``fast``, ``triton``) and registers itself here. ``"auto"`` picks, per device, the first usable
executor in ``AUTO_PREFERENCE`` that supports the bank; the order is set by ``bench/moe_layer.py``
measurements, fastest first. Layers and ``transformers`` call the chosen name their ``backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.routing import Routing

ExecutorFn = Callable[[Tensor, Routing, nn.Module], Tensor]


@dataclass(frozen=True)
class Executor:
    """A registered executor: its function and where it can run."""

    name: str
    fn: ExecutorFn
    devices: tuple[str, ...]  # device types it runs on
    available: Callable[[], bool]  # importable / built here
    supports: Callable[[nn.Module], bool]  # which banks it can run

    def usable(self, device: torch.device, bank: nn.Module) -> bool:
        return device.type in self.devices and self.available() and self.supports(bank)

    def __call__(self, x_TD: Tensor, routing: Routing, bank: nn.Module) -> Tensor:
        return self.fn(x_TD, routing, bank)


def _always() -> bool:
    return True


def _any_bank(bank: nn.Module) -> bool:
    return True


def register_executor(
    name: str,
    *,
    paper: str,
    summary: str,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    available: Callable[[], bool] = _always,
    supports: Callable[[nn.Module], bool] = _any_bank,
):
    """Decorator: register ``fn(x, routing, bank) -> y`` as executor ``name``."""

    def deco(fn: ExecutorFn) -> ExecutorFn:
        registry.register("executor", name, paper=paper, summary=summary)(
            Executor(name=name, fn=fn, devices=devices, available=available, supports=supports)
        )
        return fn

    return deco


# Fastest first, per device type; measured by bench/moe_layer.py (bench/pools.py for "atomic",
# which supports only AtomicBank pools: other banks skip it).
AUTO_PREFERENCE: dict[str, list[str]] = {
    "cpu": ["atomic", "fast", "sorted"],
    "cuda": ["atomic", "triton", "sorted"],
}


def check_backend_name(name: object, argument: str = "backend") -> str:
    """``name`` if it is ``"auto"`` or a registered executor, else a clear error naming ``argument``."""
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be 'auto' or an executor name (str), got {type(name).__name__}")
    if name != "auto" and name not in registry.names("executor"):
        raise ValueError(f"{argument} must be 'auto' or one of {executor_names()}, got {name!r}")
    return name


def get_executor(name: str) -> Executor:
    if name == "auto":
        raise ValueError("resolve 'auto' with resolve_executor(name, device, bank)")
    return registry.get("executor", name).obj


def resolve_executor(name: str, device: torch.device, bank: nn.Module) -> Executor:
    """The executor to run: ``name`` itself, or for ``"auto"`` the best usable one."""
    if name != "auto":
        ex = get_executor(name)
        if not ex.usable(device, bank):
            raise ValueError(
                f"executor {name!r} cannot run a {type(bank).__name__} on {device.type} "
                f"(devices={ex.devices}, available={ex.available()}, supports this bank={ex.supports(bank)})"
            )
        return ex
    for cand in AUTO_PREFERENCE.get(device.type, []) + ["sorted", "reference"]:
        ex = registry.get("executor", cand).obj
        if ex.usable(device, bank):
            return ex
    raise ValueError(f"no executor can run a {type(bank).__name__} on {device.type}")


def executor_names() -> list[str]:
    return registry.names("executor")
