"""Dispatcher ``eplb``: expert parallelism over EPLB's replicas (DeepSeek-V3 sec. 3.4; deepseek-ai/EPLB).

``eplb_plan`` (``moelab.parallel.eplb``) turns ``E`` logical experts into ``R`` physical slots;
slot ``j`` lives on rank ``j // (R / P)``. ``shard_experts_eplb(module, plan)`` gives each rank a
bank of its ``R / P`` slots, each a copy of its logical expert's rows (made once, at shard time:
unlike LLEP no weights travel per step), and an ``EPLBDispatcher``. Per call the dispatcher maps
every assignment to the replica ``eplb_assign`` picks and runs the ``ep`` exchange over the ``R``
physical experts (``moelab.ops.all_to_all``), so the output is exactly the single-process one.

Replicas of one expert receive different tokens and so different gradients. After backward,
``sync_replica_grads(module)`` sums them (an ``all_reduce`` of an ``[E, ...]`` buffer per
parameter) and gives every replica the logical expert's full gradient; replicas that start equal
and take the same optimizer step stay equal (our choice over re-broadcasting weights: one
collective per step, no drift for deterministic optimizers). ``gather_logical_experts`` is the
inverse of the sharding, for a checkpoint one process can load.

Which replica an assignment goes to (our choice): each rank splits its own assignments of an
expert over the replicas with ``eplb_assign`` (contiguous near-equal parts, in routing order);
no extra collective, each replica gets ``load / count`` up to one assignment per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.ops.all_to_all import AllToAllDispatcher, group_rank_and_size
from moelab.ops.dispatchers import LocalDispatcher
from moelab.ops.executors import Executor
from moelab.parallel.eplb import EPLBPlan, eplb_assign
from moelab.parallel.sharding import all_gather_rows, expert_major_tensors, moe_layers, rebuilt_bank


class EPLBDispatcher(AllToAllDispatcher):
    """``ep`` over the ``R`` physical slots of ``plan`` (layer ``layer``); see the module docstring.

    Not registered by name (``get_dispatcher``): it is bound to a plan and to a bank of replicas
    that ``shard_experts_eplb`` builds.

    Args:
        plan: an ``EPLBPlan`` whose ``num_gpus`` is the group size.
        layer: which of the plan's layers this dispatcher serves.
        group: the expert-parallel process group (None: the default group or a world of one).

    Call: ``dispatcher(x [T, d_in], routing over the E logical experts, bank of this rank's R / P
    slots, executor) -> y [T, d_out]``. ``last_slots``: the physical slot of each assignment of the
    last call.
    """

    name = "eplb"
    contiguous_blocks = False

    def __init__(self, plan: EPLBPlan, layer: int = 0, group: dist.ProcessGroup | None = None) -> None:
        if not isinstance(plan, EPLBPlan):
            raise TypeError(f"plan must be an EPLBPlan, got {type(plan).__name__}")
        num_layers = plan.logcnt.shape[0]
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"layer must be an int in [0, {num_layers}), got {layer!r}")
        super().__init__(group)
        self.plan, self.layer = plan, layer
        self.last_slots: Tensor | None = None

    def slots_of_rank(self, rank: int) -> Tensor:
        """``[R / P]`` long: the logical expert of each slot rank ``rank`` holds."""
        spg = self.plan.slots_per_gpu
        return self.plan.phy2log[self.layer, rank * spg : (rank + 1) * spg]

    def __call__(self, x_TD: Tensor, routing: Routing, bank: nn.Module, executor: Executor) -> Tensor:
        _, size = group_rank_and_size(self.group)
        if size != self.plan.num_gpus:
            raise ValueError(f"the plan is for {self.plan.num_gpus} ranks, the group has {size}")
        num_experts = self.plan.logcnt.shape[1]
        if routing.num_experts != num_experts:
            raise ValueError(
                f"routing has {routing.num_experts} experts, the plan {num_experts} logical experts"
            )
        slots = eplb_assign(self.plan, routing, self.layer)
        self.last_slots = slots
        physical = Routing(
            token_index=routing.token_index,
            expert_index=slots,
            weight=routing.weight,
            num_tokens=routing.num_tokens,
            num_experts=self.plan.num_replicas,
            top_k=routing.top_k,
            validate=False,
        )
        return super().__call__(x_TD, physical, bank, executor)

    def __deepcopy__(self, memo: dict) -> EPLBDispatcher:
        return type(self)(self.plan, self.layer, self.group)

    def __repr__(self) -> str:
        group = "default" if self.group is None else self.group
        return f"{type(self).__name__}(R={self.plan.num_replicas}, layer={self.layer}, group={group})"


def shard_experts_eplb(
    module: nn.Module, plan: EPLBPlan, group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Shard every ``MoE`` layer of ``module`` onto ``plan``'s replicas, in place; returns ``module``.

    The ``l``-th layer (``moe_layers`` order) uses the plan's layer ``l``: this rank's bank becomes
    its ``R / P`` slots (copies of the logical experts' rows) and its dispatcher an
    ``EPLBDispatcher``. Every rank must hold the same global weights before the call."""
    if not isinstance(plan, EPLBPlan):
        raise TypeError(f"plan must be an EPLBPlan, got {type(plan).__name__}")
    layers = moe_layers(module)
    if not layers:
        raise ValueError(f"shard_experts_eplb found no moelab.MoE layer in {type(module).__name__}")
    rank, size = group_rank_and_size(group)
    num_layers, num_experts = plan.logcnt.shape
    if len(layers) != num_layers:
        raise ValueError(
            f"the plan has {num_layers} layers, {type(module).__name__} {len(layers)} MoE layers"
        )
    if plan.num_gpus != size:
        raise ValueError(f"the plan is for {plan.num_gpus} ranks, the group has {size}")
    for name, layer in layers:
        if not isinstance(layer.dispatcher, LocalDispatcher):
            raise ValueError(f"MoE layer {name or '<root>'}: only 'local' layers can be sharded")
        if layer.num_experts != num_experts or layer.experts.num_experts != num_experts:
            raise ValueError(
                f"MoE layer {name or '<root>'} has {layer.num_experts} experts, the plan {num_experts}"
            )
        expert_major_tensors(layer.experts)
    for index, (_, layer) in enumerate(layers):
        dispatcher = EPLBDispatcher(plan, index, group)
        logical = dispatcher.slots_of_rank(rank)
        bank = layer.experts
        rows = {n: t.detach().index_select(0, logical).clone() for n, t in expert_major_tensors(bank).items()}
        layer.experts = rebuilt_bank(bank, rows, len(logical))
        layer.dispatcher = dispatcher
    return module


def _eplb_layers(module: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in moe_layers(module) if isinstance(m.dispatcher, EPLBDispatcher)]
    if not layers:
        raise ValueError(f"{what} found no EPLB-sharded MoE layer in {type(module).__name__}")
    return layers


def sync_replica_grads(module: nn.Module) -> None:
    """After backward: every replica's gradient becomes the sum over all replicas of its logical
    expert (the gradient of the unreplicated expert). Collective over each layer's group."""
    for _, layer in _eplb_layers(module, "sync_replica_grads"):
        disp = layer.dispatcher
        rank, size = group_rank_and_size(disp.group)
        logical = disp.slots_of_rank(rank)
        num_experts = disp.plan.logcnt.shape[1]
        for p in layer.experts.parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            total = g.new_zeros(num_experts, *g.shape[1:]).index_add_(0, logical.to(g.device), g)
            if size > 1:
                dist.all_reduce(total, group=disp.group)
            p.grad = total.index_select(0, logical.to(g.device))


def gather_logical_experts(module: nn.Module) -> nn.Module:
    """The inverse of ``shard_experts_eplb``, in place: every rank gets each layer's ``E`` logical
    experts back (from each expert's first replica) and the ``local`` dispatcher. Collective."""
    for _, layer in _eplb_layers(module, "gather_logical_experts"):
        disp, bank = layer.dispatcher, layer.experts
        first = disp.plan.log2phy[disp.layer, :, 0]
        full = {
            n: all_gather_rows(t, disp.group).index_select(0, first)
            for n, t in expert_major_tensors(bank).items()
        }
        layer.experts = rebuilt_bank(bank, full, disp.plan.logcnt.shape[1])
        layer.dispatcher = LocalDispatcher()
    return module
