"""Dispatcher ``llep``: expert parallelism that executes LLEP's least-loaded plan (PAPERS.md item 20).

Nguyen et al., "Least-Loaded Expert Parallelism" (code SalesforceAIResearch/LeastLoadedEP). The
experts are sharded as for ``ep`` (``moelab.ops.all_to_all``: rank ``p`` owns the contiguous block
``[p * E_local, (p + 1) * E_local)``). One call, on every rank of the group:

1. ``all_gather`` of every rank's ``[E]`` assignments per expert -> ``counts [P, E]``. Its column
   sums are the global load LLEP plans for; its rows give each rank's offset in the rank-ordered
   concatenation of the routings (the order ``llep_assign`` cuts an expert's tokens in, as the
   official code does), so every rank can work out the whole exchange without a count
   all-to-all. (An ``all_reduce`` of ``[E]`` would give the load but not the offsets.)
2. ``llep_plan`` on the global load (the same plan on every rank: a pure function of ``counts``).
   Below the imbalance threshold ``lambda`` it is plain EP: every chunk on the native rank.
3. Each assignment goes to the rank its chunk names; a rank computes its native experts plus a
   copy of every expert it helps with ("slots": natives first, then the shipped-in experts by id).
4. The shipped experts' weight rows travel owner -> helper in the same differentiable exchange as
   the token rows (counted apart, as ``weights`` / ``weights_backward`` in ``traffic``); in
   backward the helper's gradient for those rows travels back and is summed into the owner's
   parameter (the gather's backward), so every expert's gradient is exact.
5. Outputs return to the tokens' ranks and are combined there with the routing weights.

Requires a bank whose parameters are all expert-major (``[E_local, ...]``, as ``ExpertBank``) and
of one dtype: the rows of one expert are flattened and shipped as one row.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.ops.all_to_all import (
    AllToAllDispatcher,
    check_ep_rows,
    exchange_rows,
    group_rank_and_size,
)
from moelab.ops.dispatchers import register_dispatcher
from moelab.ops.executors import Executor
from moelab.ops.rows import combine, dispatch
from moelab.parallel.llep import CAPACITY_FACTOR, IMBALANCE_THRESHOLD, MIN_CHUNK, LLEPPlan, llep_plan


def llep_exchange_counts(plan: LLEPPlan, counts_PE: Tensor) -> Tensor:
    """``[P, E, P]`` long: ``n[q, e, r]`` = assignments of source rank ``q`` to expert ``e`` that
    rank ``r`` computes under ``plan``.

    Expert ``e``'s assignments are taken in the rank-ordered concatenation (rank 0's first, each
    rank's in its routing order) and cut into ``plan.chunks[e]`` in order, as ``llep_assign`` does
    on the concatenated routing; ``n`` is the overlap of source ``q``'s interval with each chunk."""
    p, e_count = counts_PE.shape
    if tuple(plan.loads) != tuple(counts_PE.sum(0).tolist()):
        raise ValueError("counts_PE's column sums differ from plan.loads: make the plan for these counts")
    counts = counts_PE.tolist()
    out = [[[0] * p for _ in range(e_count)] for _ in range(p)]
    for e, chunks in enumerate(plan.chunks):
        start = 0
        for r, size in chunks:
            stop = start + size
            lo = 0
            for q in range(p):
                hi = lo + counts[q][e]
                out[q][e][r] += max(0, min(hi, stop) - max(lo, start))
                lo = hi
            start = stop
    return torch.tensor(out, dtype=torch.long)


def llep_slots(plan: LLEPPlan, experts_per_rank: int) -> tuple[list[list[int]], Tensor]:
    """Which experts each rank computes, and where they sit in its extended bank.

    Returns ``(slots, slot_of)``: ``slots[r]`` the global experts of rank ``r``'s extended bank in
    slot order (its natives, then the experts shipped to it, by id); ``slot_of [E, P]`` long, the
    slot of expert ``e`` on rank ``r`` (``-1`` where ``r`` does not compute ``e``)."""
    p, e_count = plan.num_ranks, plan.num_experts
    slots = [list(range(r * experts_per_rank, (r + 1) * experts_per_rank)) for r in range(p)]
    for e, _, dst in plan.shipped:  # sorted by expert: shipped-in experts land in id order
        slots[dst].append(e)
    slot_of = torch.full((e_count, p), -1, dtype=torch.long)
    for r, experts in enumerate(slots):
        for s, e in enumerate(experts):
            slot_of[e, r] = s
    return slots, slot_of


def bank_with_rows(bank: nn.Module, tensors: dict[str, Tensor], num_experts: int) -> nn.Module:
    """A shallow copy of ``bank`` whose expert-major parameters are replaced by ``tensors`` (any
    tensors, graph non-leaves included: gradients flow back through them) and holding
    ``num_experts`` experts. Submodules and everything else are shared with ``bank``."""
    out = copy.copy(bank)
    params = dict(bank._parameters)
    for name, t in tensors.items():
        if name not in params:
            raise ValueError(f"{type(bank).__name__} has no direct parameter {name!r}")
        params[name] = t  # nn.Module.__getattr__ reads _parameters, whatever the tensor type
    out.__dict__["_parameters"] = params
    out.num_experts = num_experts
    return out


def flat_expert_rows(bank: nn.Module) -> tuple[Tensor, list[tuple[str, torch.Size]]]:
    """``([E_local, F], layout)``: every expert's parameter rows flattened into one row each."""
    named = list(bank.named_parameters(recurse=False))
    nested = [n for n, _ in bank.named_parameters() if "." in n]
    bad = [n for n, t in named if t.dim() == 0 or t.shape[0] != bank.num_experts] + nested
    if bad or not named or list(bank.named_buffers()):
        raise TypeError(
            f"the llep dispatcher ships experts' weights and needs a bank whose tensors are all its own "
            f"expert-major parameters [E={bank.num_experts}, ...] (as ExpertBank's); "
            f"{type(bank).__name__} has {', '.join(bad) or 'buffers or no parameters'}"
        )
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) != 1:
        raise TypeError(
            f"the bank's parameters must share one dtype to ship as rows, got {sorted(map(str, dtypes))}"
        )
    layout = [(n, t.shape[1:]) for n, t in named]
    return torch.cat([t.reshape(bank.num_experts, -1) for _, t in named], 1), layout


def unflatten_expert_rows(rows_SF: Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, Tensor]:
    sizes = [math.prod(shape) for _, shape in layout]
    parts = rows_SF.split(sizes, 1)
    return {n: part.reshape(rows_SF.shape[0], *shape) for (n, shape), part in zip(layout, parts, strict=True)}


class _SendRowsAndWeights(torch.autograd.Function):
    """Token rows to the ranks that compute them and shipped experts' weight rows to their helpers:
    two ``all_to_all_single`` exchanges, in this order forward and backward on every rank.

    One function for both so that backward runs the two reverse exchanges in a fixed order on every
    rank (two separate autograd nodes could be scheduled differently on different ranks, and gloo
    would pair the wrong collectives). ``anchor`` keeps the outputs requiring grad (see
    ``moelab.ops.all_to_all._SendRows``)."""

    @staticmethod
    def forward(ctx, x_ND, w_KF, anchor, splits, ship, group, rank, traffic):  # noqa: D102
        ctx.args, ctx.ship = (splits, group, rank, traffic), ship
        x_send, x_recv, w_send, w_recv = splits
        x_out = exchange_rows(x_ND, x_send, x_recv, group, rank, traffic, "dispatch")
        if not ctx.ship:  # plain EP: no weight exchange on any rank
            return x_out, w_KF.clone()
        w_out = exchange_rows(w_KF, w_send, w_recv, group, rank, traffic, "weights")
        return x_out, w_out

    @staticmethod
    def backward(ctx, grad_MD, grad_JF):  # noqa: D102
        (x_send, x_recv, w_send, w_recv), group, rank, traffic = ctx.args
        gx = exchange_rows(grad_MD, x_recv, x_send, group, rank, traffic, "dispatch_backward")
        if not ctx.ship:  # decided from the plan, the same on every rank: no collective to pair
            return gx, grad_JF, None, None, None, None, None, None
        gw = exchange_rows(grad_JF, w_recv, w_send, group, rank, traffic, "weights_backward")
        return gx, gw, None, None, None, None, None, None


class _ReturnRows(torch.autograd.Function):
    """Outputs back to the tokens' ranks; backward is the reverse exchange. Gives the received token
    and weight rows a zero gradient so ``_SendRowsAndWeights.backward`` runs on every rank, even
    where the executor touched neither (as ``moelab.ops.all_to_all._ReturnRows``)."""

    @staticmethod
    def forward(ctx, y_MO, x_recv_MD, w_recv_JF, anchor, send_splits, recv_splits, group, rank, traffic):  # noqa: D102
        ctx.args = (send_splits, recv_splits, group, rank, traffic)
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in (x_recv_MD, w_recv_JF)]
        return exchange_rows(y_MO, send_splits, recv_splits, group, rank, traffic, "combine")

    @staticmethod
    def backward(ctx, grad_NO):  # noqa: D102
        send_splits, recv_splits, group, rank, traffic = ctx.args
        grad = exchange_rows(grad_NO, recv_splits, send_splits, group, rank, traffic, "combine_backward")
        zeros = [torch.zeros((), dtype=dt, device=dev).expand(shape) for shape, dt, dev in ctx.shapes]
        return grad, zeros[0], zeros[1], None, None, None, None, None, None


@register_dispatcher(
    "llep",
    paper="LLEP: Least-Loaded Expert Parallelism (Nguyen et al., Salesforce AI Research); PAPERS.md item 20",
    summary="ep, but each call plans with llep_plan on the global load: a hot expert's tokens spill to the "
    "least-loaded ranks with a copy of its weights; weight gradients return to the owner",
)
class LLEPDispatcher(AllToAllDispatcher):
    """Expert parallelism executing LLEP's plan (module docstring). Same call and sharding as ``ep``
    (``shard_experts``, then set the layers' dispatcher to this one).

    Args:
        group: the expert-parallel process group (None: the default group, or a world of one).
        imbalance_threshold: ``lambda`` (1.3, the paper): plain EP below it.
        capacity_factor: ``alpha`` (1.1, the code's ``max_tokens_factor``).
        min_chunk: ``m`` (1024, the code's ``min_tokens_per_gemm``).

    After a call: ``last_plan`` (the ``LLEPPlan``), ``last_destination`` (``[N]`` long, the rank
    that computed each assignment of the last routing) and ``last_rows_computed`` (rows this rank
    computed). ``traffic.sent["weights"]`` etc. count the weight rows (``weight_bytes``).
    """

    name = "llep"

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        imbalance_threshold: float = IMBALANCE_THRESHOLD,
        capacity_factor: float = CAPACITY_FACTOR,
        min_chunk: int = MIN_CHUNK,
    ) -> None:
        super().__init__(group)
        llep_plan(
            [1],
            1,
            imbalance_threshold=imbalance_threshold,
            capacity_factor=capacity_factor,
            min_chunk=min_chunk,
        )
        self.imbalance_threshold = imbalance_threshold
        self.capacity_factor = capacity_factor
        self.min_chunk = min_chunk
        self.last_plan: LLEPPlan | None = None
        self.last_destination: Tensor | None = None
        self.last_rows_computed = 0

    @property
    def weight_bytes(self) -> int:
        """Bytes of expert weights (and their gradients) this rank sent since ``reset_traffic()``."""
        return self.traffic.weight_bytes

    def __call__(self, x_TD: Tensor, routing: Routing, bank: nn.Module, executor: Executor) -> Tensor:
        rank, size = group_rank_and_size(self.group)
        check_ep_rows(x_TD, routing, bank, size)
        self.traffic.calls += 1
        device, e_local, e_count = x_TD.device, bank.num_experts, routing.num_experts
        order = routing.by_expert()
        counts_E = order.counts
        # 1. every rank's per-expert counts: the global load and each rank's offsets.
        if size == 1:
            counts_PE = counts_E.cpu().view(1, -1)
        else:
            parts = [torch.empty_like(counts_E) for _ in range(size)]
            dist.all_gather(parts, counts_E.contiguous(), group=self.group)
            counts_PE = torch.stack(parts).cpu()
            nbytes = (size - 1) * e_count * counts_E.element_size()
            self.traffic.add("counts", nbytes, nbytes)
        # 2. the plan (identical on every rank).
        plan = llep_plan(
            counts_PE.sum(0),
            size,
            imbalance_threshold=self.imbalance_threshold,
            capacity_factor=self.capacity_factor,
            min_chunk=self.min_chunk,
        )
        n_QER = llep_exchange_counts(plan, counts_PE)
        slots, slot_of = llep_slots(plan, e_local)
        width = max(len(s) for s in slots)
        # 3. each assignment's computing rank: its position in the concatenation, cut into chunks.
        chunk_rank = [r for cs in plan.chunks for r, _ in cs]
        chunk_end = torch.tensor([n for cs in plan.chunks for _, n in cs], dtype=torch.long).cumsum(0)
        expert_start = counts_PE.sum(0).cumsum(0) - counts_PE.sum(0)
        offset_E = expert_start + counts_PE[:rank].sum(0)  # where this rank's block of e starts
        local_start = counts_E.cpu().cumsum(0) - counts_E.cpu()
        e_sorted = order.expert_index.cpu()
        position = torch.arange(e_sorted.numel()) - local_start[e_sorted] + offset_E[e_sorted]
        dest_sorted = (
            torch.tensor(chunk_rank, dtype=torch.long)[torch.searchsorted(chunk_end, position, right=True)]
            if chunk_rank
            else torch.zeros(0, dtype=torch.long)
        )
        dest = torch.empty_like(dest_sorted)
        dest[order.perm.cpu()] = dest_sorted
        self.last_plan, self.last_destination = plan, dest.to(device)
        # Sort key: computing rank, then its slot of the expert (stable: routing order within).
        key = (dest * width + slot_of[routing.expert_index.cpu(), dest]).to(device)
        placed = Routing(
            token_index=routing.token_index,
            expert_index=key,
            weight=routing.weight,
            num_tokens=routing.num_tokens,
            num_experts=size * width,
            top_k=routing.top_k,
            validate=False,
        )
        x_sorted_ND = dispatch(x_TD, placed)
        send_splits = n_QER[rank].sum(0).tolist()
        recv_splits = n_QER[:, :, rank].sum(1).tolist()
        # 4. weight rows of the experts this rank owns and others help with, by helper then expert.
        outgoing = [(e, dst) for e, src, dst in plan.shipped if src == rank]
        outgoing.sort(key=lambda t: (t[1], t[0]))
        w_send_splits = [sum(1 for _, d in outgoing if d == r) for r in range(size)]
        w_recv_splits = [sum(1 for _, s, d in plan.shipped if s == q and d == rank) for q in range(size)]
        if plan.shipped:  # the same plan everywhere: every rank takes this branch or none does
            w_flat_LF, layout = flat_expert_rows(bank)
            idx = torch.tensor([e - rank * e_local for e, _ in outgoing], dtype=torch.long, device=device)
            w_send_KF = w_flat_LF.index_select(0, idx)
        else:  # plain EP: nothing ships (any bank works)
            w_send_KF = x_TD.new_zeros(0, 1)
        if size == 1:
            x_recv_MD, w_recv_JF = x_sorted_ND, w_send_KF
        else:
            anchor = torch.zeros((), device=device, requires_grad=torch.is_grad_enabled())
            x_recv_MD, w_recv_JF = _SendRowsAndWeights.apply(
                x_sorted_ND,
                w_send_KF,
                anchor,
                (send_splits, recv_splits, w_send_splits, w_recv_splits),
                bool(plan.shipped),
                self.group,
                rank,
                self.traffic,
            )
        # 5. the extended bank: natives, then the shipped-in experts (they arrive in id order).
        mine = slots[rank]
        ext = bank
        if len(mine) > e_local:
            ext = bank_with_rows(
                bank, unflatten_expert_rows(torch.cat([w_flat_LF, w_recv_JF], 0), layout), len(mine)
            )
        local_ids = [
            s for q in range(size) for s, e in enumerate(mine) for _ in range(int(n_QER[q, e, rank]))
        ]
        m = x_recv_MD.shape[0]
        self.last_rows_computed = m
        local = Routing(
            token_index=torch.arange(m, device=device),
            expert_index=torch.tensor(local_ids, dtype=torch.long, device=device),
            weight=torch.ones(
                m, dtype=x_TD.dtype if x_TD.is_floating_point() else torch.float32, device=device
            ),
            num_tokens=m,
            num_experts=len(mine),
            top_k=1,
            validate=False,
        )
        y_recv_MO = executor(x_recv_MD, local, ext)
        if size == 1:
            y_sorted_NO = y_recv_MO
        else:
            y_sorted_NO = _ReturnRows.apply(
                y_recv_MO,
                x_recv_MD,
                w_recv_JF,
                anchor,
                recv_splits,
                send_splits,
                self.group,
                rank,
                self.traffic,
            )
        return combine(y_sorted_NO, placed)

    def __deepcopy__(self, memo: dict) -> LLEPDispatcher:
        return type(self)(
            self.group,
            imbalance_threshold=self.imbalance_threshold,
            capacity_factor=self.capacity_factor,
            min_chunk=self.min_chunk,
        )

    def __repr__(self) -> str:
        group = "default" if self.group is None else self.group
        return (
            f"{type(self).__name__}(group={group}, imbalance_threshold={self.imbalance_threshold}, "
            f"capacity_factor={self.capacity_factor}, min_chunk={self.min_chunk})"
        )
