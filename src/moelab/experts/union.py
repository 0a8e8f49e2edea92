"""``UnionBank``: the experts of several banks seen as one bank, the others held by reference.

ReXMoE (``moelab.routers.rexmoe``) lets a layer's router choose among its own experts and those of
adjacent layers. The experts stay where they are: each layer owns its bank, and a layer's
``UnionBank`` registers its own bank (``local``) and refers to the others with
``moelab.core.router.share``, so ``parameters()`` and ``state_dict()`` of a model see every expert
once, under its owner, while the gradient of this layer's tokens reaches the other layers' experts.

Expert ids are the members' ids laid end to end, in member order (``local`` first): member ``m``
holds the ids ``[starts[m], starts[m] + E_m)``. The union follows the bank protocol
(``moelab.core.bank``): ``forward_sorted`` cuts the expert-sorted rows at the members' boundaries
(``split_expert_order``) and runs each member on its own slice; ``expert_forward(e, x)`` runs the
member that holds ``e``. It is not an ``ExpertBank``, so executors that read MLP weights themselves
(``fast``, ``triton``) decline it and ``"auto"`` runs it with ``sorted``, which runs each member
with its own grouped GEMMs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moelab.core.bank import check_bank
from moelab.core.router import share
from moelab.core.routing import ExpertOrder


def split_expert_order(
    order: ExpertOrder, first: int, stop: int, row_start: int, row_stop: int
) -> ExpertOrder:
    """The part of ``order`` for experts ``[first, stop)``, renumbered from 0.

    ``row_start``/``row_stop`` are the sorted rows of those experts (``offsets[first - 1]`` or 0,
    and ``offsets[stop - 1]``): in an ``ExpertOrder`` an expert range is one contiguous run of
    rows. The result's ``counts``/``offsets``/``expert_index`` describe those rows as a bank of
    ``stop - first`` experts; ``perm``, ``token_index`` and ``weight`` are the same rows' entries
    (``perm`` still indexes the full routing's assignments).
    """
    if not 0 <= first <= stop <= order.counts.shape[0]:
        raise ValueError(
            f"expert range [{first}, {stop}) is not inside the order's {order.counts.shape[0]} experts"
        )
    if not 0 <= row_start <= row_stop <= order.perm.shape[0]:
        raise ValueError(
            f"row range [{row_start}, {row_stop}) is not inside the order's {order.perm.shape[0]} rows"
        )
    rows = slice(row_start, row_stop)
    return ExpertOrder(
        perm=order.perm[rows],
        counts=order.counts[first:stop],
        offsets=order.offsets[first:stop] - row_start,  # stays int32 (grouped_mm's offs)
        expert_index=order.expert_index[rows] - first,
        token_index=order.token_index[rows],
        weight=order.weight[rows],
    )


class UnionBank(nn.Module):
    """Several banks as one bank of ``sum E_m`` experts (module docstring).

    Args:
        local: the bank of the layer that holds this union. It is registered (``self.local``):
            the layer's ``state_dict`` keeps it, under ``experts.local.``.
        others: banks owned by other modules (adjacent layers), in the order their ids follow
            ``local``'s. They are held by reference (``share``), never registered: they are
            saved, counted and moved (``.to``) through their owners.

    Every member must have the same ``d_in`` and ``d_out``. ``forward_sorted(x_sorted [N, d_in],
    order) -> [N, d_out]`` and ``expert_forward(e, x [n, d_in]) -> [n, d_out]`` as for any bank.
    """

    def __init__(self, local: nn.Module, others: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        check_bank(local, "local")
        if isinstance(others, nn.Module) or not isinstance(others, Sequence):
            raise TypeError(f"others must be a sequence of banks, got {type(others).__name__}")
        for i, bank in enumerate(others):
            check_bank(bank, f"others[{i}]")
            if bank is local:
                raise ValueError(f"others[{i}] is the local bank itself; each expert must appear once")
            if (bank.d_in, bank.d_out) != (local.d_in, local.d_out):
                raise ValueError(
                    f"others[{i}] maps d_in={bank.d_in} -> d_out={bank.d_out}; the local bank maps "
                    f"d_in={local.d_in} -> d_out={local.d_out}: a union needs one shape"
                )
        self.local = local
        self.num_others = len(others)
        for i, bank in enumerate(others):
            share(self, f"other{i}", bank)
        sizes = [local.num_experts, *(b.num_experts for b in others)]
        # starts[m]: the first id of member m; starts[-1] = num_experts
        self.starts = [0]
        for n in sizes:
            self.starts.append(self.starts[-1] + n)
        self.num_experts = self.starts[-1]
        self.d_in = local.d_in
        self.d_out = local.d_out

    @property
    def members(self) -> list[nn.Module]:
        """The member banks in id order: ``[local, other0, other1, ...]``."""
        return [self.local, *(getattr(self, f"other{i}") for i in range(self.num_others))]

    def member_of(self, e: int) -> tuple[int, int]:
        """``(member, id inside that member)`` of union expert ``e``."""
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.num_experts:
            raise ValueError(f"expert id must be an int in [0, {self.num_experts}), got {e!r}")
        m = bisect.bisect_right(self.starts, e) - 1
        return m, e - self.starts[m]

    def expert_forward(self, e: int, x_nD: Tensor) -> Tensor:
        """Union expert ``e`` on ``x [n, d_in]``: its member's own ``expert_forward``."""
        m, local_e = self.member_of(int(e))
        return self.members[m].expert_forward(local_e, x_nD)

    def forward_sorted(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        """All experts on expert-sorted rows ``[N, d_in] -> [N, d_out]``, each member on its rows."""
        members = self.members
        if len(members) == 1:
            return self.local.forward_sorted(x_sorted_ND, order)
        if order.counts.shape[0] != self.num_experts:
            raise ValueError(f"order has {order.counts.shape[0]} experts, the union has {self.num_experts}")
        # The sorted row where each member's run ends (one host sync for all members); a member
        # with no experts ends where the previous one did.
        ends_idx = torch.tensor([s - 1 for s in self.starts[1:]], device=order.offsets.device)
        ends = order.offsets[ends_idx.clamp_min(0)].tolist()
        outs, row = [], 0
        for m, bank in enumerate(members):
            first, stop = self.starts[m], self.starts[m + 1]
            end = ends[m] if stop > first else row
            sub = split_expert_order(order, first, stop, row, end)
            outs.append(bank.forward_sorted(x_sorted_ND[row:end], sub))
            row = end
        return torch.cat(outs, 0)

    def forward(self, x_sorted_ND: Tensor, order: ExpertOrder) -> Tensor:
        return self.forward_sorted(x_sorted_ND, order)

    def extra_repr(self) -> str:
        sizes = [self.starts[m + 1] - self.starts[m] for m in range(len(self.starts) - 1)]
        return f"num_experts={self.num_experts} (members {sizes}, local first), d_in={self.d_in}, d_out={self.d_out}"
