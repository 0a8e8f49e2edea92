"""LLEP: least-loaded expert parallelism, the planner (PAPERS.md item 20).

Nguyen et al., "Least-Loaded Expert Parallelism" (Salesforce AI Research; code
SalesforceAIResearch/LeastLoadedEP, ``llep/gpt_oss_llep.py::compute_llep_lpt_plan``). Under plain
expert parallelism (EP) expert ``e`` lives on one rank (its *native* rank) and computes every
token routed to it: one hot expert makes its rank the straggler of the whole layer. LLEP keeps
the native placement but lets a rank that would exceed a capacity ``cap = alpha * total / P``
*spill* part of an expert's tokens to the least-loaded ranks, shipping the expert's weights with
them. The output is exact: every (token, expert) assignment is still computed by that expert's
weights, only on another rank.

The planner (``llep_plan``) is a pure function of the per-expert token counts:

1. If the native placement's imbalance ``max_r load_r / mean_r load_r`` is below ``lambda``,
   use plain EP (planning and shipping weights would cost more than they save).
2. Otherwise go through the experts by descending load (longest-processing-time order). The
   *effective* load of a rank is what it was assigned so far plus its native experts not yet
   visited (so a rank is not chosen as a helper just before its own hot expert arrives). The
   native rank takes ``min(load, cap - effective)``; the rest goes, chunk by chunk, to the other
   ranks by ascending effective load, each chunk filling a helper up to ``cap``. A chunk smaller
   than ``m`` is skipped (a tiny GEMM is not worth a weight transfer) unless it is the remainder.
3. When every rank is full, the remainder is *force-assigned* to the least-loaded helper: the
   plan is then above ``cap``, the only case where ``max load > alpha * mean``.

The tokens of one expert are split over its chunks in token order (``llep_assign``); which
chunk a token falls in is all a dispatcher needs to honour the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab import registry
from moelab.core.routing import Routing

# Defaults of the paper and its code (PAPERS.md item 20 (b)): lambda = 1.3 is the paper's
# imbalance threshold (the code's MOE_ADAPTIVE_LPT_ROUTING_RATIO example); alpha = 1.1 is the
# code's ``max_tokens_factor`` default (the paper's range is 1.0-1.1); m = 1024 is the code's
# ``min_tokens_per_gemm`` default.
IMBALANCE_THRESHOLD = 1.3
CAPACITY_FACTOR = 1.1
MIN_CHUNK = 1024


@dataclass(frozen=True)
class LLEPPlan:
    """Where every expert's tokens are computed.

    Attributes:
        chunks: per expert ``e``, its ``(rank, tokens)`` chunks in token order: the first
            ``chunks[e][0][1]`` tokens of ``e`` go to rank ``chunks[e][0][0]``, and so on. An expert
            with no tokens has no chunk. Under plain EP every expert has one chunk on its native rank.
        native: ``[E]`` the native rank of each expert (where its weights live).
        loads: ``[E]`` the tokens per expert the plan was made for.
        rank_load: ``[P]`` tokens each rank computes under the plan.
        plain_ep: True when the imbalance was below ``lambda`` and plain EP was used.
        shipped: ``(expert, src_rank, dst_rank)`` weight transfers, one per expert and helper
            rank, sorted: the expert's weights travel from its native rank to the helper.
        capacity: ``cap``, the per-rank token budget (``int(alpha * (total // P))``, as the code).
        imbalance: ``max / mean`` of the native placement's rank loads (1.0 when empty).
        forced: True when some tokens were force-assigned above ``cap`` (every rank was full).
    """

    chunks: tuple[tuple[tuple[int, int], ...], ...]
    native: tuple[int, ...]
    loads: tuple[int, ...]
    rank_load: tuple[int, ...]
    plain_ep: bool
    shipped: tuple[tuple[int, int, int], ...]
    capacity: int
    imbalance: float
    forced: bool

    @property
    def num_experts(self) -> int:
        return len(self.native)

    @property
    def num_ranks(self) -> int:
        return len(self.rank_load)

    @property
    def max_over_mean(self) -> float:
        """``max_r rank_load / mean_r rank_load`` under the plan (1.0 when there are no tokens)."""
        total = sum(self.rank_load)
        return max(self.rank_load) * self.num_ranks / total if total else 1.0

    def native_rank_load(self) -> list[int]:
        """``[P]`` tokens each rank would compute under plain EP."""
        out = [0] * self.num_ranks
        for e, n in enumerate(self.loads):
            out[self.native[e]] += n
        return out


def contiguous_placement(num_experts: int, num_ranks: int) -> list[int]:
    """``[E]`` native ranks of plain EP: contiguous blocks of ``E / P`` experts per rank."""
    if num_experts % num_ranks:
        raise ValueError(
            f"contiguous placement needs num_experts divisible by num_ranks, got {num_experts} and {num_ranks}"
        )
    per = num_experts // num_ranks
    return [e // per for e in range(num_experts)]


def _as_counts(loads: Tensor | Sequence[int], name: str) -> list[int]:
    if isinstance(loads, Tensor):
        if loads.dim() != 1:
            raise ValueError(f"{name} must be 1-D [E], got shape {tuple(loads.shape)}")
        if loads.is_floating_point() and not torch.equal(loads, loads.round()):
            raise ValueError(f"{name} must hold whole token counts, got fractional values")
        out = [int(x) for x in loads.tolist()]
    else:
        try:
            out = [int(x) for x in loads]
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} must be a 1-D tensor or sequence of ints, got {type(loads).__name__}"
            ) from exc
        if any(int(x) != x for x in loads):
            raise ValueError(f"{name} must hold whole token counts")
    if not out:
        raise ValueError(f"{name} must name at least one expert")
    if min(out) < 0:
        raise ValueError(f"{name} must be >= 0, got min {min(out)}")
    return out


@registry.register(
    "placement",
    "llep",
    paper="LLEP: Least-Loaded Expert Parallelism (Nguyen et al., Salesforce AI Research); PAPERS.md item 20",
    summary="spill a hot expert's tokens (and ship its weights) to the least-loaded ranks, up to alpha * mean",
)
def llep_plan(
    loads: Tensor | Sequence[int],
    num_ranks: int,
    *,
    native: Sequence[int] | None = None,
    imbalance_threshold: float = IMBALANCE_THRESHOLD,
    capacity_factor: float = CAPACITY_FACTOR,
    min_chunk: int = MIN_CHUNK,
) -> LLEPPlan:
    """LLEP's least-loaded plan for one layer (module docstring; PAPERS.md item 20).

    Args:
        loads: ``[E]`` tokens (token-expert assignments) per expert, summed over all ranks.
        num_ranks: ``P``, the expert-parallel ranks.
        native: ``[E]`` native rank of each expert; default contiguous blocks
            (``contiguous_placement``, needs ``E % P == 0``).
        imbalance_threshold: ``lambda``: plain EP when the native ``max/mean`` is below it (1.3).
        capacity_factor: ``alpha``: per-rank budget ``alpha * total / P`` (1.1, the code's default).
        min_chunk: ``m``: the smallest chunk sent to a helper unless it is the remainder (1024).

    Returns:
        An ``LLEPPlan``.
    """
    counts = _as_counts(loads, "loads")
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks must be an int >= 1, got {num_ranks!r}")
    if not imbalance_threshold > 0:
        raise ValueError(f"imbalance_threshold (lambda) must be > 0, got {imbalance_threshold}")
    if not capacity_factor >= 1.0:
        raise ValueError(f"capacity_factor (alpha) must be >= 1, got {capacity_factor}")
    if isinstance(min_chunk, bool) or not isinstance(min_chunk, int) or min_chunk < 1:
        raise ValueError(f"min_chunk (m) must be an int >= 1, got {min_chunk!r}")
    num_experts = len(counts)
    if native is None:
        native_ranks = contiguous_placement(num_experts, num_ranks)
    else:
        native_ranks = [int(r) for r in native]
        if len(native_ranks) != num_experts:
            raise ValueError(f"native must give one rank per expert ({num_experts}), got {len(native_ranks)}")
        if native_ranks and (min(native_ranks) < 0 or max(native_ranks) >= num_ranks):
            raise ValueError(
                f"native ranks must lie in [0, {num_ranks}), got {min(native_ranks)}..{max(native_ranks)}"
            )

    total = sum(counts)
    native_load = [0] * num_ranks
    for e, n in enumerate(counts):
        native_load[native_ranks[e]] += n
    mean = total / num_ranks
    imbalance = max(native_load) / mean if total else 1.0
    # The code's budget: floor of alpha times the floor of the mean (at least one token).
    balanced = total // num_ranks
    capacity = max(int(capacity_factor * balanced) if balanced > 0 else total, 1)

    if imbalance < imbalance_threshold:
        chunks = tuple(((native_ranks[e], n),) if n else () for e, n in enumerate(counts))
        return LLEPPlan(
            chunks=chunks,
            native=tuple(native_ranks),
            loads=tuple(counts),
            rank_load=tuple(native_load),
            plain_ep=True,
            shipped=(),
            capacity=capacity,
            imbalance=imbalance,
            forced=False,
        )

    pending = list(native_load)  # native experts not visited yet, per rank
    assigned = [0] * num_ranks
    forced = False

    def effective(r: int) -> int:
        return assigned[r] + pending[r]

    def helpers_by_load(home: int) -> list[int]:
        # Ascending effective load; ties by rank id (Python's sort is stable, as the code's).
        return sorted((r for r in range(num_ranks) if r != home), key=effective)

    plan_chunks: list[tuple[tuple[int, int], ...]] = [()] * num_experts
    # Longest processing time first; ties by expert id (stable sort, as the code's).
    for e in sorted(range(num_experts), key=lambda i: -counts[i]):
        n = counts[e]
        if n == 0:
            continue
        home = native_ranks[e]
        pending[home] -= n
        room = capacity - effective(home)
        chunks: list[tuple[int, int]] = []
        if room >= n:  # the native rank computes all of it
            chunks.append((home, n))
            assigned[home] += n
        elif room > 0:  # the native rank fills up; the rest goes to helpers, re-sorted per chunk
            chunks.append((home, room))
            assigned[home] += room
            remaining = n - room
            while remaining > 0:
                helpers = helpers_by_load(home)
                if not helpers:  # one rank: nowhere to spill
                    chunks[0] = (home, chunks[0][1] + remaining)
                    assigned[home] += remaining
                    forced = True
                    break
                for h in helpers:
                    free = capacity - effective(h)
                    if free <= 0:
                        continue
                    take = min(remaining, free)
                    if take < min_chunk and remaining > take:  # too small, and not the remainder
                        continue
                    chunks.append((h, take))
                    assigned[h] += take
                    remaining -= take
                    break
                else:  # every helper is full (or offers only a too-small chunk): force
                    h = helpers[0]
                    chunks.append((h, remaining))
                    assigned[h] += remaining
                    remaining = 0
                    forced = True
        else:  # the native rank is already full: spill everything, one pass over the helpers
            helpers = helpers_by_load(home)
            remaining = n
            for h in helpers:
                if remaining <= 0:
                    break
                free = capacity - effective(h)
                if free <= 0:
                    continue
                take = min(remaining, free)
                if take < min_chunk and remaining > take:
                    continue
                chunks.append((h, take))
                assigned[h] += take
                remaining -= take
            if remaining > 0:
                if helpers:  # force onto the helper that was least loaded when the pass began
                    h = helpers[0]
                    chunks.append((h, remaining))
                    assigned[h] += remaining
                else:
                    chunks.append((home, remaining))
                    assigned[home] += remaining
                forced = True
        plan_chunks[e] = tuple(chunks)

    shipped = sorted(
        {(e, native_ranks[e], r) for e, cs in enumerate(plan_chunks) for r, _ in cs if r != native_ranks[e]}
    )
    return LLEPPlan(
        chunks=tuple(plan_chunks),
        native=tuple(native_ranks),
        loads=tuple(counts),
        rank_load=tuple(assigned),
        plain_ep=False,
        shipped=tuple(shipped),
        capacity=capacity,
        imbalance=imbalance,
        forced=forced,
    )


def llep_assign(plan: LLEPPlan, routing: Routing) -> Tensor:
    """``[N]`` long: the rank that computes each assignment of ``routing`` under ``plan``.

    The assignments of expert ``e`` are taken in the routing's order (``Routing.by_expert`` is a
    stable sort, so token order for a token-major routing) and cut into ``plan.chunks[e]``: the
    first chunk's count go to its rank, the next to the next. ``routing``'s per-expert counts must
    equal ``plan.loads`` (the plan was made for this routing; on several ranks, for the
    concatenation of the ranks' routings in rank order).
    """
    if not isinstance(plan, LLEPPlan):
        raise TypeError(f"plan must be an LLEPPlan, got {type(plan).__name__}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moelab Routing, got {type(routing).__name__}")
    if routing.num_experts != plan.num_experts:
        raise ValueError(f"routing has {routing.num_experts} experts, the plan {plan.num_experts}")
    order = routing.by_expert()
    if order.counts.tolist() != list(plan.loads):
        raise ValueError("routing's tokens per expert differ from plan.loads: make the plan for this routing")
    ranks = [r for cs in plan.chunks for r, _ in cs]
    sizes = [n for cs in plan.chunks for _, n in cs]
    device = routing.device
    sorted_rank = torch.repeat_interleave(
        torch.tensor(ranks, dtype=torch.long, device=device),
        torch.tensor(sizes, dtype=torch.long, device=device),
    )
    out = torch.empty_like(sorted_rank)
    out[order.perm] = sorted_rank
    return out
