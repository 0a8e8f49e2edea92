"""Dispatchers: they move rows to where their experts are, hand them to an executor, and bring
the results back.

The spine's middle step: ``Routing --Dispatcher--> rows at their experts --Executor(Bank)--> ...``.
A dispatcher is an object ``dispatcher(x [T, d_in], routing, bank, executor) -> y [T, d_out]``.

- ``local`` (this module): the experts live here, with the tokens. It checks that ``x``, the
  routing and the bank agree, and hands all three to the executor, whose own gather (fused or
  not) moves the rows.
- later: all-to-all (expert parallelism: rows travel to the rank that owns their expert, the
  executor runs on a routing of the received rows, results travel back) and offload (the
  touched experts' weights are fetched before the executor runs). Executors are unchanged.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from moelab import registry
from moelab.core.routing import Routing
from moelab.ops.executors import Executor


class Dispatcher:
    """Base class: ``__call__(x, routing, bank, executor) -> y`` (see the module docstring)."""

    name: ClassVar[str] = "dispatcher"

    def __call__(self, x_TD: Tensor, routing: Routing, bank: nn.Module, executor: Executor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def example(cls) -> Dispatcher:
        """An instance usable in one process (the property tests build every registered kind)."""
        return cls()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def register_dispatcher(name: str, *, paper: str, summary: str):
    """Class decorator: register a ``Dispatcher`` subclass under ``name``."""
    return registry.register_subclass("dispatcher", name, Dispatcher, paper=paper, summary=summary)


def check_rows(x_TD: Tensor, routing: Routing, bank: nn.Module) -> None:
    """Raise if ``x``, ``routing`` and ``bank`` do not describe the same rows and experts."""
    if x_TD.dim() != 2 or x_TD.shape[1] != bank.d_in:
        raise ValueError(f"x must be [T, d_in={bank.d_in}], got shape {tuple(x_TD.shape)}")
    if routing.num_tokens != x_TD.shape[0]:
        raise ValueError(f"routing.num_tokens={routing.num_tokens} but x has {x_TD.shape[0]} rows")
    if routing.num_experts != bank.num_experts:
        raise ValueError(f"routing.num_experts={routing.num_experts} but the bank has {bank.num_experts} experts")
    if routing.device != x_TD.device:
        raise ValueError(f"the routing is on {routing.device} but x is on {x_TD.device}")


@register_dispatcher(
    "local",
    paper="(moelab) single-device dispatch",
    summary="experts live with the tokens: check x, routing and bank agree and hand them to the executor",
)
class LocalDispatcher(Dispatcher):
    def __call__(self, x_TD: Tensor, routing: Routing, bank: nn.Module, executor: Executor) -> Tensor:
        check_rows(x_TD, routing, bank)
        return executor(x_TD, routing, bank)


def get_dispatcher(dispatcher: str | Dispatcher, argument: str = "dispatcher") -> Dispatcher:
    """A dispatcher instance from a registered name or an instance."""
    if isinstance(dispatcher, Dispatcher):
        return dispatcher
    if not isinstance(dispatcher, str):
        raise TypeError(f"{argument} must be a registered name or a Dispatcher, got {type(dispatcher).__name__}")
    try:
        return registry.get("dispatcher", dispatcher).obj()
    except ValueError as e:
        raise ValueError(f"{argument}: {e}") from None


def dispatcher_names() -> list[str]:
    return registry.names("dispatcher")
