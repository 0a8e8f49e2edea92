"""Scale-out: where experts live across ranks (issue #14).

Placement planners (pure functions of a load, registered under kind ``placement``) and the
helpers that shard a MoE layer's experts over a ``torch.distributed`` process group. The
all-to-all dispatcher itself is ``moelab.ops.all_to_all`` (a dispatcher like ``local``).

- ``llep_plan`` / ``llep_assign`` (``llep``): LLEP's least-loaded plan under imbalance, and which
  rank computes each assignment of a Routing.
- ``LLEPDispatcher`` (dispatcher ``llep``): LLEP's plan executed every call, hot experts'
  weights shipped with their spilled tokens, their gradients returned to the owner.
- ``shard_experts_eplb`` / ``EPLBDispatcher``: EPLB's replicas placed and used;
  ``shard_experts_sliced`` / ``ExpertSlicingDispatcher``: DeepSpeed-MoE's expert slicing (more
  ranks than experts); ``HierarchicalAllToAll``: the two-hop exchange, with bytes per hop.
- ``eplb_plan`` / ``eplb_assign`` (``eplb``): EPLB's redundant experts (``phy2log``, ``log2phy``,
  counts), and which replica takes each assignment.
- ``shard_experts`` / ``gather_experts`` (``sharding``): every MoE layer of a model to its
  expert-parallel form on this rank (its block of experts, dispatcher ``ep``) and back; with
  ``gathered_state_dict``, ``expert_parameter_names`` and ``clip_grad_norm_`` for training.
"""

import moelab.ops.offload  # noqa: F401  (registers placement "offload": lookups of the kind import this package)
import moelab.parallel.llep_dispatch  # noqa: F401  (registers dispatcher "llep")
from moelab.parallel.eplb import EPLBPlan, eplb_assign, eplb_plan
from moelab.parallel.eplb_dispatch import (
    EPLBDispatcher,
    gather_logical_experts,
    shard_experts_eplb,
    sync_replica_grads,
)
from moelab.parallel.expert_slicing import ExpertSlicingDispatcher, hidden_slice, shard_experts_sliced
from moelab.parallel.hierarchical import HierarchicalAllToAll
from moelab.parallel.llep import LLEPPlan, contiguous_placement, llep_assign, llep_plan
from moelab.parallel.llep_dispatch import LLEPDispatcher
from moelab.parallel.sharding import (
    clip_grad_norm_,
    expert_block,
    expert_parameter_names,
    gather_experts,
    gathered_state_dict,
    moe_layers,
    shard_experts,
    slice_bank,
)

__all__ = [
    "EPLBDispatcher",
    "EPLBPlan",
    "ExpertSlicingDispatcher",
    "HierarchicalAllToAll",
    "LLEPDispatcher",
    "LLEPPlan",
    "clip_grad_norm_",
    "contiguous_placement",
    "eplb_assign",
    "eplb_plan",
    "expert_block",
    "expert_parameter_names",
    "gather_experts",
    "gather_logical_experts",
    "gathered_state_dict",
    "hidden_slice",
    "llep_assign",
    "llep_plan",
    "moe_layers",
    "shard_experts",
    "shard_experts_eplb",
    "shard_experts_sliced",
    "slice_bank",
    "sync_replica_grads",
]
