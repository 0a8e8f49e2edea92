"""EPLB-style redundant experts: replicate hot experts and pack the replicas onto GPUs.

DeepSeek's Expert-Parallelism Load Balancer (deepseek-ai/EPLB ``eplb.py::rebalance_experts``;
DeepSeek-V3 technical report, sec. 3.4 "redundant experts"). Given a per-layer load estimate
(tokens per logical expert, e.g. a moving average of recent batches), choose ``R >= E``
*physical* experts (replicas) and where they live, so that the heaviest GPU carries as little
as possible. Unlike LLEP (``moelab.parallel.llep``), placement changes only when the planner is
re-run: no weights travel per step, and a replica serves ``load / count`` of its expert's tokens.

The planner is greedy, in three steps (the hierarchical policy; the global policy is the same
with one group and one node):

1. **Groups to nodes.** The ``E`` experts form ``num_groups`` contiguous groups (DeepSeek-V3's
   group-limited routing); whole groups are packed onto the ``num_nodes`` nodes, the same number
   per node, heaviest group first onto the lightest node that still has room (``balanced_packing``).
   Traffic of a token then stays on few nodes.
2. **Replicate within each node.** Each node's ``E / num_nodes`` experts get
   ``R / num_nodes`` replicas: one each, then every further replica goes to the expert with the
   largest load per replica (``replicate_experts``), which minimises the largest per-replica load.
3. **Replicas to GPUs.** Each node's replicas are packed onto its GPUs, ``R / num_gpus`` each,
   with per-replica load ``load / count``, again heaviest first onto the lightest GPU with room.

Outputs follow the reference: ``phy2log [L, R]`` (the logical expert of each physical slot; slot
``j`` lives on GPU ``j // (R / num_gpus)``), ``log2phy [L, E, X]`` (the slots of each expert,
``-1``-padded, ``X`` = the largest replica count) and ``logcnt [L, E]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab import registry
from moelab.core.routing import Routing


@dataclass(frozen=True)
class EPLBPlan:
    """Replicas and where they live, per layer.

    Attributes:
        phy2log: ``[L, R]`` long, the logical expert held by each physical slot.
        log2phy: ``[L, E, X]`` long, the physical slots of each logical expert in replica order,
            ``-1`` beyond ``logcnt``.
        logcnt: ``[L, E]`` long, replicas per logical expert (``>= 1``; each row sums to ``R``).
        replica_rank: ``[L, R]`` long, which replica of its expert each slot is (0-based).
        num_gpus: GPUs; slot ``j`` lives on GPU ``j // (R // num_gpus)``.
        load: ``[L, E]`` float, the loads the plan was made for.
    """

    phy2log: Tensor
    log2phy: Tensor
    logcnt: Tensor
    replica_rank: Tensor
    num_gpus: int
    load: Tensor

    @property
    def num_replicas(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    def gpu_of_slot(self) -> Tensor:
        """``[R]`` long: the GPU of each physical slot."""
        return torch.arange(self.num_replicas) // self.slots_per_gpu

    def gpu_load(self, load_LE: Tensor | None = None) -> Tensor:
        """``[L, G]`` float: tokens each GPU computes when every expert's load (default: the
        planned ``load``) is split evenly over its replicas."""
        load_LE = self.load if load_LE is None else torch.as_tensor(load_LE, dtype=torch.float64)
        if tuple(load_LE.shape) != tuple(self.logcnt.shape):
            raise ValueError(
                f"load_LE must be [L, E] = {tuple(self.logcnt.shape)}, got {tuple(load_LE.shape)}"
            )
        per_slot = (load_LE.double() / self.logcnt.double()).gather(1, self.phy2log)  # [L, R]
        return per_slot.view(per_slot.shape[0], self.num_gpus, self.slots_per_gpu).sum(-1)


def balanced_packing(weight_XN: Tensor, num_packs: int) -> tuple[Tensor, Tensor]:
    """Pack ``n`` weighted items into ``num_packs`` packs of exactly ``n / num_packs`` items each,
    greedily (heaviest item first, onto the lightest pack that still has room; ties: the lowest
    pack). One packing per row.

    Args:
        weight_XN: ``[X, n]`` item weights.
        num_packs: packs; must divide ``n``.

    Returns:
        ``(pack_XN, slot_XN)``: each item's pack and its position within the pack (order of arrival).
    """
    rows, n = weight_XN.shape
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"num_packs must divide the item count {n}, got {num_packs}")
    per_pack = n // num_packs
    if per_pack == 1:
        return (
            torch.arange(n, dtype=torch.long).expand(rows, n).clone(),
            torch.zeros(rows, n, dtype=torch.long),
        )
    order = torch.sort(weight_XN.double(), dim=-1, descending=True, stable=True).indices
    pack = torch.full((rows, n), -1, dtype=torch.long)
    slot = torch.full((rows, n), -1, dtype=torch.long)
    w = weight_XN.double().tolist()
    for i in range(rows):
        pack_weight = [0.0] * num_packs
        pack_items = [0] * num_packs
        for item in order[i].tolist():
            p = min((q for q in range(num_packs) if pack_items[q] < per_pack), key=pack_weight.__getitem__)
            pack[i, item] = p
            slot[i, item] = pack_items[p]
            pack_weight[p] += w[i][item]
            pack_items[p] += 1
    return pack, slot


def replicate_experts(weight_XE: Tensor, num_physical: int) -> tuple[Tensor, Tensor, Tensor]:
    """Give ``E`` experts ``num_physical`` replicas: one each, then each extra one to the expert with
    the largest load per replica (ties: the lowest expert id). Minimises the largest per-replica load.

    Returns:
        ``(phy2log [X, R], replica_rank [X, R], logcnt [X, E])``; slots ``0..E-1`` are the experts
        themselves, in order; the extra replicas follow in the order they were added.
    """
    rows, num_logical = weight_XE.shape
    if num_physical < num_logical:
        raise ValueError(f"num_physical ({num_physical}) must be >= the expert count ({num_logical})")
    w = weight_XE.double()
    phy2log = torch.arange(num_physical, dtype=torch.long).repeat(rows, 1)
    rank = torch.zeros(rows, num_physical, dtype=torch.long)
    cnt = torch.ones(rows, num_logical, dtype=torch.long)
    row = torch.arange(rows)
    for j in range(num_logical, num_physical):
        pick = (w / cnt).max(dim=-1).indices
        phy2log[:, j] = pick
        rank[:, j] = cnt[row, pick]
        cnt[row, pick] += 1
    return phy2log, rank, cnt


def _inverse(perm_XN: Tensor) -> Tensor:
    inv = torch.empty_like(perm_XN)
    inv.scatter_(1, perm_XN, torch.arange(perm_XN.shape[1]).expand_as(perm_XN).contiguous())
    return inv


def _check_int(value: object, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


@registry.register(
    "placement",
    "eplb",
    paper="DeepSeek-V3 technical report sec. 3.4 (redundant experts); deepseek-ai/EPLB rebalance_experts",
    summary="replicate hot experts into R physical slots and pack them evenly onto GPUs (per-layer loads)",
)
def eplb_plan(
    load_LE: Tensor,
    num_replicas: int,
    num_gpus: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
) -> EPLBPlan:
    """EPLB's plan (module docstring): replicas and their GPUs from a per-layer load matrix.

    Args:
        load_LE: ``[L, E]`` (or ``[E]``, one layer) load per logical expert, ``>= 0``.
        num_replicas: ``R``, physical experts in all; a multiple of ``num_gpus``, ``>= E``.
        num_gpus: GPUs (expert-parallel ranks).
        num_groups: expert groups (contiguous; DeepSeek-V3 uses 8). With ``num_groups`` a multiple
            of ``num_nodes`` the hierarchical policy runs; otherwise the global one (as the
            reference). The default (one group, one node) is the global policy.
        num_nodes: nodes; divides ``num_gpus``. Groups are packed onto nodes first.

    Returns:
        An ``EPLBPlan``.
    """
    if not isinstance(load_LE, Tensor):
        raise TypeError(f"load_LE must be a Tensor [L, E], got {type(load_LE).__name__}")
    if load_LE.dim() == 1:
        load_LE = load_LE.unsqueeze(0)
    if load_LE.dim() != 2 or load_LE.shape[1] < 1:
        raise ValueError(f"load_LE must be [L, E], got shape {tuple(load_LE.shape)}")
    load = load_LE.detach().double().cpu()
    if not torch.isfinite(load).all() or (load < 0).any():
        raise ValueError("load_LE must be finite and >= 0")
    num_layers, num_experts = load.shape
    _check_int(num_replicas, "num_replicas")
    _check_int(num_gpus, "num_gpus")
    _check_int(num_groups, "num_groups")
    _check_int(num_nodes, "num_nodes")
    if num_replicas < num_experts:
        raise ValueError(f"num_replicas must be >= the expert count {num_experts}, got {num_replicas}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if num_groups % num_nodes:  # the reference falls back to the global policy
        num_groups, num_nodes = 1, 1
    if num_experts % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the expert count {num_experts}")
    if num_replicas % num_nodes or num_experts % num_nodes:
        raise ValueError(f"num_nodes ({num_nodes}) must divide num_replicas and the expert count")

    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_experts // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # 1. Groups to nodes. ``log2node_order`` renumbers experts so that node n holds the block
    # [n * experts_per_node, (n + 1) * experts_per_node) ("node-major" ids).
    group_load = load.view(num_layers, num_groups, group_size).sum(-1)
    group_node, group_slot = balanced_packing(group_load, num_nodes)
    first = (group_node * groups_per_node + group_slot) * group_size  # [L, groups]
    log2nm = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(1)  # [L, E]
    nm2log = _inverse(log2nm)

    # 2. Replicate within each node (rows = (layer, node)).
    nm_load = load.gather(1, nm2log).view(num_layers * num_nodes, experts_per_node)
    phy2nm, phy_rank, nm_cnt = replicate_experts(nm_load, num_replicas // num_nodes)

    # 3. Replicas to the node's GPUs, by load per replica.
    per_replica = (nm_load / nm_cnt).gather(1, phy2nm)
    gpu, slot = balanced_packing(per_replica, gpus_per_node)
    phy2pos = gpu * slots_per_gpu + slot  # position of each replica among the node's slots
    pos2phy = _inverse(phy2pos)

    pos2nm = phy2nm.gather(1, pos2phy).view(num_layers, num_nodes, -1)
    pos2nm = (pos2nm + (torch.arange(num_nodes) * experts_per_node).view(1, -1, 1)).flatten(1)
    phy2log = nm2log.gather(1, pos2nm)  # [L, R]
    replica_rank = phy_rank.gather(1, pos2phy).view(num_layers, -1)
    logcnt = nm_cnt.view(num_layers, -1).gather(1, log2nm)  # [L, E]

    width = int(logcnt.max())
    log2phy = torch.full((num_layers, num_experts, width), -1, dtype=torch.long)
    log2phy.view(num_layers, -1).scatter_(
        1, phy2log * width + replica_rank, torch.arange(num_replicas).expand(num_layers, -1).contiguous()
    )
    return EPLBPlan(
        phy2log=phy2log,
        log2phy=log2phy,
        logcnt=logcnt,
        replica_rank=replica_rank,
        num_gpus=num_gpus,
        load=load,
    )


def eplb_assign(plan: EPLBPlan, routing: Routing, layer: int = 0) -> Tensor:
    """``[N]`` long: the physical slot (``plan.phy2log[layer]`` index) that computes each assignment.

    Load-splitting (our choice; the reference leaves it to the serving engine): the assignments of
    expert ``e``, in the routing's order (``Routing.by_expert``, stable), are cut into
    ``logcnt[e]`` contiguous parts of near-equal size (the first ``n % c`` parts one larger), one
    per replica in replica order. Each replica then gets ``load / count`` tokens, the load the
    planner assumed. The GPU of each assignment is ``plan.gpu_of_slot()[slots]``.
    """
    if not isinstance(plan, EPLBPlan):
        raise TypeError(f"plan must be an EPLBPlan, got {type(plan).__name__}")
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moelab Routing, got {type(routing).__name__}")
    num_layers, num_experts = plan.logcnt.shape
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise ValueError(f"layer must be an int in [0, {num_layers}), got {layer!r}")
    if routing.num_experts != num_experts:
        raise ValueError(f"routing has {routing.num_experts} experts, the plan {num_experts}")
    order = routing.by_expert()
    counts = order.counts.cpu()
    cnt = plan.logcnt[layer]
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each expert
    pos = torch.arange(int(counts.sum())) - starts[order.expert_index.cpu()]  # index within the expert
    n = counts[order.expert_index.cpu()]
    c = cnt[order.expert_index.cpu()]
    base, extra = n // c, n % c
    # Parts 0..extra-1 have base+1 items, the rest base: invert that layout.
    big = extra * (base + 1)
    part = torch.where(pos < big, pos // (base + 1), extra + (pos - big) // base.clamp(min=1))
    slots_sorted = plan.log2phy[layer][order.expert_index.cpu(), part]
    out = torch.empty_like(slots_sorted)
    out[order.perm.cpu()] = slots_sorted
    return out.to(routing.device)
