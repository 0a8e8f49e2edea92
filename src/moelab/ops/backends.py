"""A string-keyed registry of interchangeable expert-execution backends.

A backend is ``fn(x [T, d], routing, bank) -> y [T, d]`` and must equal the reference
(``moe_reference``) within tolerance, forward and backward. ``"auto"`` picks, per device, the
first available backend in ``AUTO_PREFERENCE`` that supports the bank; the order is set by
``bench/moe_layer.py`` measurements, fastest first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import registry
from ..routing.routing import Routing
from .reference import moe_reference
from .sorted import moe_sorted

if TYPE_CHECKING:
    from ..experts.bank import ExpertBank

BackendFn = Callable[[Tensor, Routing, "ExpertBank"], Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: BackendFn
    devices: tuple[str, ...]  # device types it runs on
    available: Callable[[], bool]  # importable / built here
    supports: Callable[[ExpertBank], bool]  # which banks it can run

    def usable(self, device: torch.device, bank: ExpertBank) -> bool:
        return device.type in self.devices and self.available() and self.supports(bank)

    def __call__(self, x_TD: Tensor, routing: Routing, bank: ExpertBank) -> Tensor:
        return self.fn(x_TD, routing, bank)


def _always() -> bool:
    return True


def _any_bank(bank: ExpertBank) -> bool:
    return True


def register_backend(
    name: str,
    *,
    paper: str,
    summary: str,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    available: Callable[[], bool] = _always,
    supports: Callable[[ExpertBank], bool] = _any_bank,
):
    """Decorator: register ``fn(x, routing, bank) -> y`` as backend ``name``."""

    def deco(fn: BackendFn) -> BackendFn:
        registry.register("backend", name, paper=paper, summary=summary)(
            Backend(name=name, fn=fn, devices=devices, available=available, supports=supports)
        )
        return fn

    return deco


# Fastest first, per device type; measured by bench/moe_layer.py.
AUTO_PREFERENCE: dict[str, list[str]] = {"cpu": ["fast", "sorted"], "cuda": ["triton", "sorted"]}


def get_backend(name: str) -> Backend:
    if name == "auto":
        raise ValueError("resolve 'auto' with resolve_backend(name, device, bank)")
    return registry.get("backend", name).obj


def resolve_backend(name: str, device: torch.device, bank: ExpertBank) -> Backend:
    """The backend to run: ``name`` itself, or for ``"auto"`` the best usable one."""
    if name != "auto":
        b = get_backend(name)
        if not b.usable(device, bank):
            raise ValueError(
                f"backend {name!r} cannot run a {type(bank).__name__} on {device.type} "
                f"(devices={b.devices}, available={b.available()})"
            )
        return b
    for cand in AUTO_PREFERENCE.get(device.type, []) + ["sorted", "reference"]:
        b = registry.get("backend", cand).obj
        if b.usable(device, bank):
            return b
    raise ValueError(f"no backend can run a {type(bank).__name__} on {device.type}")


def backend_names() -> list[str]:
    return registry.names("backend")


register_backend(
    "reference",
    paper="(moelab) readable loop over experts",
    summary="one F.linear chain per expert and an index_add; the definition every backend must match",
)(moe_reference)

register_backend(
    "sorted",
    paper="MegaBlocks (Gale et al. 2023) dropless grouped GEMM, via torch grouped_mm",
    summary="sort assignments by expert, gather, two grouped GEMMs, weighted scatter back",
)(moe_sorted)
