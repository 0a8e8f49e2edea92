"""Scale-out: where experts live across ranks (issue #14).

Placement planners (pure functions of a load, registered under kind ``placement``) and the
helpers that shard a MoE layer's experts over a ``torch.distributed`` process group. The
all-to-all dispatcher itself is ``moelab.ops.all_to_all`` (a dispatcher like ``local``).

- ``llep_plan`` / ``llep_assign`` (``llep``): LLEP's least-loaded plan under imbalance, and which
  rank computes each assignment of a Routing.
- ``eplb_plan`` / ``eplb_assign`` (``eplb``): EPLB's redundant experts (``phy2log``, ``log2phy``,
  counts), and which replica takes each assignment.
- ``shard_experts`` / ``gather_experts`` (``sharding``): every MoE layer of a model to its
  expert-parallel form on this rank (its block of experts, dispatcher ``ep``) and back; with
  ``gathered_state_dict``, ``expert_parameter_names`` and ``clip_grad_norm_`` for training.
"""

import moelab.ops.offload  # noqa: F401  (registers placement "offload": lookups of the kind import this package)
from moelab.parallel.eplb import EPLBPlan, eplb_assign, eplb_plan
from moelab.parallel.llep import LLEPPlan, contiguous_placement, llep_assign, llep_plan
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
    "EPLBPlan",
    "LLEPPlan",
    "clip_grad_norm_",
    "contiguous_placement",
    "eplb_assign",
    "eplb_plan",
    "expert_block",
    "expert_parameter_names",
    "gather_experts",
    "gathered_state_dict",
    "llep_assign",
    "llep_plan",
    "moe_layers",
    "shard_experts",
    "slice_bank",
]
