"""Hierarchical all-to-all: an intra-group hop, then an inter-group hop (DeepSpeed-MoE, Rajbhandari
et al. 2022, PAPERS.md item 21, "hierarchical all-to-all"; also Tutel's 2D all-to-all).

The ``P`` ranks form ``P / G`` groups of ``G`` consecutive ranks (a node, say): rank
``r = g * G + i`` is member ``i`` of group ``g``. A flat all-to-all makes every rank talk to
``P - 1`` peers. Here:

1. **intra-group**: rank ``(g, i)`` sends to member ``j`` of its own group every row whose
   destination has local index ``j`` (destination ``h * G + j`` for any group ``h``); afterwards
   member ``j`` holds all of group ``g``'s rows for the ranks with local index ``j``;
2. **inter-group**: rank ``(g, j)`` sends to ``(h, j)`` the rows destined to ``h * G + j``.

Each rank talks to ``G - 1`` peers in hop 1 and ``P / G - 1`` in hop 2: ``O(G + P / G)``
messages instead of ``O(P)`` (with ``G = sqrt(P)``, ``2 (sqrt(P) - 1)``), in exchange for sending
most rows twice. The result equals the flat exchange's, rows ordered by source rank. The split
matrix (every rank's send counts) is all-gathered first so each hop's splits are known locally.
Forward only (a tool to measure and compare the exchange; the ``ep`` dispatcher uses the flat one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moelab.ops.all_to_all import group_rank_and_size

HOPS = ("counts", "intra", "inter")


@dataclass
class HopTraffic:
    """Bytes sent to other ranks and distinct peers messaged (non-empty sends), per hop."""

    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOPS, 0))
    peers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOPS, 0))


class HierarchicalAllToAll:
    """``exchange(x [N, ...], send_splits [P]) -> [M, ...]``: the flat ``all_to_all_single`` result
    (rows grouped by source rank), in two hops over groups of ``group_size`` consecutive ranks.

    Construction is collective: every rank of ``group`` must build it (it creates the subgroups).
    ``traffic`` accumulates bytes and peers per hop (``HopTraffic``).
    """

    def __init__(self, group_size: int, group: dist.ProcessGroup | None = None) -> None:
        rank, size = group_rank_and_size(group)
        if (
            isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or group_size < 1
            or size % group_size
        ):
            raise ValueError(
                f"group_size must be an int >= 1 dividing the group size {size}, got {group_size!r}"
            )
        self.group, self.rank, self.size, self.g = group, rank, size, group_size
        self.traffic = HopTraffic()
        self.intra = self.inter = None
        if size > 1:
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
            # new_group is collective over the world: every rank creates every subgroup, same order.
            for k in range(size // group_size):
                sub = dist.new_group([ranks[k * group_size + i] for i in range(group_size)])
                if k == rank // group_size:
                    self.intra = sub
            for i in range(group_size):
                sub = dist.new_group([ranks[k * group_size + i] for k in range(size // group_size)])
                if i == rank % group_size:
                    self.inter = sub

    def _hop(
        self, x: Tensor, blocks: list[list[int]], counts: list[int], recv: list[int], sub, me: int, hop: str
    ):
        """Reorder ``x``'s row blocks (``blocks[k]``: block ids for peer ``k``), exchange over ``sub``."""
        starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
        order = [b for peer in blocks for b in peer]
        idx = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in order]) if order else torch.zeros(0)
        x = x.index_select(0, idx.long().to(x.device))
        send = [sum(counts[b] for b in peer) for peer in blocks]
        out = x.new_empty(sum(recv), *x.shape[1:])
        if len(send) > 1:
            dist.all_to_all_single(out, x.contiguous(), recv, send, group=sub)
        else:
            out = x
        row = math.prod(x.shape[1:]) * x.element_size()
        self.traffic.sent[hop] += (sum(send) - send[me]) * row
        self.traffic.peers[hop] += sum(1 for k, n in enumerate(send) if k != me and n)
        return out

    def __call__(self, x_ND: Tensor, send_splits: list[int]) -> Tensor:
        p, g, r = self.size, self.g, self.rank
        if len(send_splits) != p or sum(send_splits) != x_ND.shape[0]:
            raise ValueError(
                f"send_splits must give {p} counts summing to x's {x_ND.shape[0]} rows, got {send_splits}"
            )
        if p == 1:
            return x_ND.clone()
        mine = torch.tensor(send_splits, dtype=torch.long)
        parts = [torch.empty_like(mine) for _ in range(p)]
        dist.all_gather(parts, mine, group=self.group)
        c = torch.stack(parts).tolist()  # c[src][dst]
        self.traffic.sent["counts"] += (p - 1) * p * mine.element_size()
        self.traffic.peers["counts"] += p - 1
        grp, i = divmod(r, g)
        members = [grp * g + k for k in range(g)]
        # hop 1: my blocks are my rows per destination d (ascending); member j gets d % G == j.
        blocks = [[d for d in range(p) if d % g == j] for j in range(g)]
        recv = [sum(c[src][d] for d in range(p) if d % g == i) for src in members]
        held = self._hop(x_ND, blocks, send_splits, recv, self.intra, i, "intra")
        # now held = for src in my group, for d with d % G == i (ascending): c[src][d] rows.
        dests = [d for d in range(p) if d % g == i]  # = h * G + i for each group h
        labels = [(src, d) for src in members for d in dests]
        counts = [c[src][d] for src, d in labels]
        blocks = [[k for k, (_, d) in enumerate(labels) if d == h * g + i] for h in range(p // g)]
        recv = [sum(c[src][r] for src in range(h * g, (h + 1) * g)) for h in range(p // g)]
        return self._hop(held, blocks, counts, recv, self.inter, grp, "inter")
