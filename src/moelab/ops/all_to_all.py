"""Dispatcher ``ep``: expert parallelism with two all-to-alls (GShard, Lepikhin et al. 2020;
DeepSpeed-MoE, Rajbhandari et al. 2022, PAPERS.md item 21).

The ``E`` experts are sharded over the ``P`` ranks of a process group in contiguous blocks: rank
``p`` owns the global experts ``[p * E_local, (p + 1) * E_local)`` with ``E_local = E / P``, and
holds a bank of just those. Every rank routes its own tokens over the global ``E``. One call:

1. sort this rank's assignments by global expert (hence by owner rank) and gather their rows;
2. exchange the per-expert counts (one ``all_to_all_single`` of ``[P, E_local]`` longs): each
   rank learns how many rows every source sends to each of its experts;
3. send the rows (``all_to_all_single`` with uneven splits);
4. run the executor on the local bank with a routing of the received rows (one assignment per
   row, weight 1, the local expert ids rebuilt from the counts);
5. send the outputs back (the reverse all-to-all) and combine them locally with the routing
   weights, so the router's gradient never leaves the rank.

Both all-to-alls are differentiable: the backward of a row exchange is the same exchange with
the splits swapped. Bytes that cross the wire (rows to other ranks; a rank's own rows are a
local copy) are counted per phase in ``dispatcher.traffic``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.ops.dispatchers import Dispatcher, register_dispatcher
from moelab.ops.executors import Executor
from moelab.ops.rows import combine, dispatch

PHASES = (
    "counts",
    "dispatch",
    "combine",
    "dispatch_backward",
    "combine_backward",
    "weights",
    "weights_backward",
)


@dataclass
class Traffic:
    """Bytes this rank sent to and received from other ranks, by phase (``PHASES``).

    ``dispatch``: token rows to the experts' owners; ``combine``: expert outputs back; the
    ``*_backward`` phases: their gradients (counted when backward runs); ``counts``: the
    ``[P, E_local]`` count exchange; ``weights`` / ``weights_backward``: expert weight rows shipped
    to other ranks and their gradients sent back (the ``llep`` dispatcher; 0 under plain ``ep``). A
    rank's rows for its own experts never cross the wire and are not counted.
    """

    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    received: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    calls: int = 0

    def add(self, phase: str, sent: int, received: int) -> None:
        self.sent[phase] += int(sent)
        self.received[phase] += int(received)

    def reset(self) -> None:
        self.sent = dict.fromkeys(PHASES, 0)
        self.received = dict.fromkeys(PHASES, 0)
        self.calls = 0

    @property
    def bytes_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def bytes_received(self) -> int:
        return sum(self.received.values())

    @property
    def weight_bytes(self) -> int:
        """Bytes of expert weights and their gradients sent (``weights`` + ``weights_backward``)."""
        return self.sent["weights"] + self.sent["weights_backward"]


def local_expert_count(num_experts: int, world_size: int) -> int:
    """``E_local = E / P``; a ``ValueError`` when ``P`` does not divide ``E``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_experts % world_size:
        raise ValueError(
            f"expert parallelism shards experts in equal contiguous blocks: num_experts={num_experts} "
            f"must be divisible by the group size {world_size}"
        )
    return num_experts // world_size


def send_counts(tokens_per_expert_E: Tensor, world_size: int) -> Tensor:
    """``[P, E_local]`` long: row ``q`` = this rank's assignments to each of rank ``q``'s experts.

    Row sums are the uneven send splits of the row all-to-all."""
    e = tokens_per_expert_E.shape[0]
    return tokens_per_expert_E.view(world_size, local_expert_count(e, world_size))


def received_expert_ids(recv_counts_PL: Tensor) -> Tensor:
    """``[M]`` long: the local expert of each received row.

    Rows arrive grouped by source rank, and within one source sorted by expert (the sender sorted
    them), so ``recv_counts_PL`` (row ``q``: what source ``q`` sent to each local expert) is all
    the receiver needs: no per-row ids travel."""
    p, e_local = recv_counts_PL.shape
    ids = torch.arange(e_local, device=recv_counts_PL.device).repeat(p)
    return ids.repeat_interleave(recv_counts_PL.reshape(-1))


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(rank, size)`` in ``group``; ``(0, 1)`` when ``group`` is None and no process group is
    initialised (a single-process world: the exchanges are the identity)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _SendRows(torch.autograd.Function):
    """Dispatch: ``all_to_all_single`` of rows with uneven splits; backward is the reverse exchange.

    ``anchor`` is a throwaway leaf that requires grad whenever grad mode is on, so the output
    always requires grad and every rank runs this backward (it is a collective: a rank that skipped
    it, say one whose experts received nothing, would leave the others waiting)."""

    @staticmethod
    def forward(ctx, x_ND, anchor, send_splits, recv_splits, group, rank, traffic):  # noqa: D102
        ctx.args = (send_splits, recv_splits, group, rank, traffic)
        return exchange_rows(x_ND, send_splits, recv_splits, group, rank, traffic, "dispatch")

    @staticmethod
    def backward(ctx, grad_MD):  # noqa: D102
        send_splits, recv_splits, group, rank, traffic = ctx.args
        grad = exchange_rows(grad_MD, recv_splits, send_splits, group, rank, traffic, "dispatch_backward")
        return (grad if ctx.needs_input_grad[0] else None), None, None, None, None, None, None


class _ReturnRows(torch.autograd.Function):
    """Combine: expert outputs back to their tokens' ranks; backward is the reverse exchange.

    It also takes the received rows ``x_recv`` (unused forward) and gives them a zero gradient
    (stride 0, no allocation): the dispatch's backward then always runs after this one, on every
    rank, even where the executor never touched ``x_recv`` (nothing arrived)."""

    @staticmethod
    def forward(ctx, y_MO, x_recv_MD, anchor, send_splits, recv_splits, group, rank, traffic):  # noqa: D102
        ctx.args = (send_splits, recv_splits, group, rank, traffic)
        ctx.x_recv = (x_recv_MD.shape, x_recv_MD.dtype, x_recv_MD.device)
        return exchange_rows(y_MO, send_splits, recv_splits, group, rank, traffic, "combine")

    @staticmethod
    def backward(ctx, grad_NO):  # noqa: D102
        send_splits, recv_splits, group, rank, traffic = ctx.args
        grad = exchange_rows(grad_NO, recv_splits, send_splits, group, rank, traffic, "combine_backward")
        shape, dtype, device = ctx.x_recv
        zero_x = (
            torch.zeros((), dtype=dtype, device=device).expand(shape) if ctx.needs_input_grad[1] else None
        )
        return (grad if ctx.needs_input_grad[0] else None), zero_x, None, None, None, None, None, None


def exchange_rows(
    x_ND: Tensor,
    send_splits: list[int],
    recv_splits: list[int],
    group: dist.ProcessGroup | None,
    rank: int,
    traffic: Traffic,
    phase: str,
) -> Tensor:
    """``all_to_all_single`` of rows with uneven splits over ``group``; counts the bytes that cross
    the wire (not this rank's own block) under ``phase`` in ``traffic``."""
    x_ND = x_ND.contiguous()
    out = x_ND.new_empty(sum(recv_splits), *x_ND.shape[1:])
    dist.all_to_all_single(out, x_ND, recv_splits, send_splits, group=group)
    row_bytes = math.prod(x_ND.shape[1:]) * x_ND.element_size()
    traffic.add(
        phase,
        (sum(send_splits) - send_splits[rank]) * row_bytes,
        (sum(recv_splits) - recv_splits[rank]) * row_bytes,
    )
    return out


@register_dispatcher(
    "ep",
    paper="GShard (Lepikhin et al. 2020) / DeepSpeed-MoE (Rajbhandari et al. 2022): expert parallelism",
    summary="experts sharded by rank; rows travel to their expert's owner and back with two "
    "differentiable all_to_all_single exchanges (uneven splits); any executor on each rank",
)
class AllToAllDispatcher(Dispatcher):
    """Expert-parallel dispatch over ``group`` (see the module docstring).

    Args:
        group: the process group the experts are sharded over; None for the default group, or,
            when no process group is initialised, a single-process world (exchanges are the
            identity, so the dispatcher equals ``local``).

    Call: ``dispatcher(x [T, d_in], routing over the global E, bank of this rank's E_local
    experts, executor) -> y [T, d_out]``. ``T = 0``, empty experts, ranks that receive nothing and
    routings with capacity drops all work; every rank must call it (the exchanges are collective).
    ``traffic`` counts the bytes (``bytes_sent``, ``bytes_received``, ``reset_traffic()``).
    """

    name = "ep"
    # Rank p holds the global experts [p * E_local, (p + 1) * E_local) (what gather_experts and
    # clip_grad_norm_ assume); False for a subclass whose bank holds other rows (EPLB's replicas).
    contiguous_blocks = True

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
            )
        self.group = group
        self.traffic = Traffic()

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to other ranks since the last ``reset_traffic()``, all phases."""
        return self.traffic.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.traffic.bytes_received

    def reset_traffic(self) -> None:
        self.traffic.reset()

    def __call__(self, x_TD: Tensor, routing: Routing, bank: nn.Module, executor: Executor) -> Tensor:
        rank, size = group_rank_and_size(self.group)
        check_ep_rows(x_TD, routing, bank, size)
        self.traffic.calls += 1
        # 1. rows sorted by global expert = grouped by owner rank, experts ascending within one.
        x_sorted_ND = dispatch(x_TD, routing)
        counts_PL = send_counts(routing.by_expert().counts, size)
        if size == 1:
            x_recv_MD, recv_counts_PL = x_sorted_ND, counts_PL
        else:
            # 2. who sends what to whom: one exchange of [P, E_local] counts.
            recv_counts_PL = torch.empty_like(counts_PL)
            dist.all_to_all_single(recv_counts_PL, counts_PL.contiguous(), group=self.group)
            nbytes = (size - 1) * counts_PL.shape[1] * counts_PL.element_size()
            self.traffic.add("counts", nbytes, nbytes)
            send_splits = counts_PL.sum(1).tolist()
            recv_splits = recv_counts_PL.sum(1).tolist()
            # 3. the rows.
            anchor = torch.zeros((), device=x_TD.device, requires_grad=torch.is_grad_enabled())
            x_recv_MD = _SendRows.apply(
                x_sorted_ND, anchor, send_splits, recv_splits, self.group, rank, self.traffic
            )
        # 4. the local experts on what arrived: one assignment per row, weight 1.
        m = x_recv_MD.shape[0]
        local = Routing(
            token_index=torch.arange(m, device=x_TD.device),
            expert_index=received_expert_ids(recv_counts_PL),
            weight=torch.ones(
                m, dtype=x_TD.dtype if x_TD.is_floating_point() else torch.float32, device=x_TD.device
            ),
            num_tokens=m,
            num_experts=bank.num_experts,
            top_k=1,
            validate=False,
        )
        y_recv_MO = executor(x_recv_MD, local, bank)
        # 5. outputs back to the tokens' ranks, then the weighted combine here (router grad local).
        if size == 1:
            y_sorted_NO = y_recv_MO
        else:
            y_sorted_NO = _ReturnRows.apply(
                y_recv_MO, x_recv_MD, anchor, recv_splits, send_splits, self.group, rank, self.traffic
            )
        return combine(y_sorted_NO, routing)

    def __deepcopy__(self, memo: dict) -> AllToAllDispatcher:
        # A process group is a handle to shared communication, not state: a copied layer talks
        # over the same group (and counts its own traffic).
        return type(self)(self.group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group={'default' if self.group is None else self.group})"


def check_ep_rows(x_TD: Tensor, routing: Routing, bank: nn.Module, world_size: int) -> None:
    """Raise unless ``x``, a routing over the global ``E`` and a bank of ``E / P`` experts agree."""
    if x_TD.dim() != 2 or x_TD.shape[1] != bank.d_in:
        raise ValueError(f"x must be [T, d_in={bank.d_in}], got shape {tuple(x_TD.shape)}")
    if routing.num_tokens != x_TD.shape[0]:
        raise ValueError(f"routing.num_tokens={routing.num_tokens} but x has {x_TD.shape[0]} rows")
    if routing.num_experts != bank.num_experts * world_size:
        raise ValueError(
            f"routing.num_experts={routing.num_experts} must equal the local bank's num_experts "
            f"({bank.num_experts}) times the expert-parallel group size ({world_size}); shard the "
            "layer's bank with moelab.parallel.shard_experts"
        )
    if routing.device != x_TD.device:
        raise ValueError(f"the routing is on {routing.device} but x is on {x_TD.device}")
