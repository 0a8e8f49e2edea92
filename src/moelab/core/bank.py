"""The bank protocol: what the MoE layer, the dispatchers and the executors need from experts.

A *bank* is ``E`` experts, each a map ``R^{d_in} -> R^{d_out}``. The spine never looks inside an
expert; it only needs:

- ``num_experts``, ``d_in``, ``d_out``;
- ``forward_sorted(x_sorted [N, d_in], order) -> [N, d_out]``: every expert on its contiguous
  group of expert-sorted rows (``order`` is the routing's ``ExpertOrder``: per-row expert ids,
  counts and offsets). A grouped-GEMM bank reads ``order.offsets``; a bank of ~10^6 atomic
  experts gathers its weights per row from ``order.expert_index`` (no ``[T, E]`` anywhere);
- ``expert_forward(e, x [n, d_in]) -> [n, d_out]``: one expert, written plainly. The ``reference``
  executor calls it and every other executor must agree with it.

Banks are ``nn.Module``s. ``moelab.ExpertBank`` (gated or plain MLPs in transformers' fused
layout) is one implementation; LoRA, atomic, FiLM and quantised banks are others. A bank whose
weights need another GEMM (a quantised bank) overrides ``ExpertBank.grouped_mm``; executors that
read the weights themselves (``fast``, ``triton``) then decline it through their ``supports``
check and ``sorted`` runs it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from moelab.core.routing import ExpertOrder


@runtime_checkable
class Bank(Protocol):
    """``E`` experts ``R^{d_in} -> R^{d_out}`` (see the module docstring)."""

    num_experts: int
    d_in: int
    d_out: int

    def forward_sorted(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        """``[N, d_out]``: row ``j`` through expert ``order.expert_index[j]``."""
        ...

    def expert_forward(self, e: int, x_nD: Tensor) -> Tensor:
        """``[n, d_out]``: expert ``e`` on ``x [n, d_in]``, the readable definition."""
        ...


def check_bank(bank: object, argument: str = "experts") -> Bank:
    """``bank`` if it is an ``nn.Module`` following the bank protocol, else a clear ``TypeError``."""
    from torch import nn

    missing = [a for a in ("num_experts", "d_in", "d_out", "forward_sorted", "expert_forward")
               if not hasattr(bank, a)]  # fmt: skip
    if not isinstance(bank, nn.Module) or missing:
        what = type(bank).__name__
        detail = f" (missing: {', '.join(missing)})" if missing else " (not an nn.Module)"
        raise TypeError(f"{argument} must be a bank (moelab.core.bank.Bank), got {what}{detail}")
    return bank  # type: ignore[return-value]


def example_bank(name: str, num_experts: int, d_in: int, d_out: int) -> Bank:
    """A small random bank of the registered kind ``name`` (property tests build every kind)."""
    from moelab import registry

    return registry.get("bank", name).obj.example(num_experts, d_in, d_out)


def expert_major_tensors(bank: nn.Module) -> dict[str, torch.Tensor]:
    """The bank's parameters and buffers by name; a ``TypeError`` unless all are ``[E, ...]``
    (then expert ``e`` is row ``e`` of each: what sharding and offloading split)."""
    tensors = dict(bank.named_parameters()) | dict(bank.named_buffers())
    bad = [n for n, t in tensors.items() if t.dim() == 0 or t.shape[0] != bank.num_experts]
    if bad:
        raise TypeError(
            f"cannot split a {type(bank).__name__} by experts (to shard or offload it): {', '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not [E={bank.num_experts}, ...]; give the bank a "
            "slice_experts(start, stop) method"
        )
    return tensors


def rebuilt_bank(bank: nn.Module, new_tensors: dict[str, torch.Tensor], num_experts: int) -> nn.Module:
    """A deep copy of ``bank`` whose expert-major tensors are ``new_tensors`` (no copy of the old ones)."""
    memo: dict[int, object] = {}
    for name, t in expert_major_tensors(bank).items():
        new = new_tensors[name]
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    out = copy.deepcopy(bank, memo)
    out.num_experts = num_experts
    return out
