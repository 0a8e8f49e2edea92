"""Routers, one family per file. Importing this package registers them (``moelab list --kind router``).

- ``topk``: softmax top-k (Switch, GShard, Mixtral, DeepSeek-V2);
- ``sigmoid_topk``: DeepSeek-V3's sigmoid scores, aux-loss-free bias, group-limited routing;
- ``expert_choice``: each expert takes its top-C tokens;
- ``sinkhorn``, ``ssr``: Sinkhorn-balanced selection (Megatron / S-BASE; Selective Sinkhorn Routing);
- ``capacity``: expert capacity and drop policies shared by the token-choice routers.
"""

from moelab.routers.capacity import (
    DROP_POLICIES,
    Capacity,
    capacity_keep_mask,
    expert_capacity,
    token_choice_routing,
)
from moelab.routers.expert_choice import ExpertChoiceRouter, expert_choice, expert_choice_capacity
from moelab.routers.sigmoid_topk import SigmoidTopKRouter, bias_update, group_limited_mask, sigmoid_topk
from moelab.routers.sinkhorn import SelectiveSinkhornRouter, SinkhornRouter, sinkhorn, sinkhorn_topk
from moelab.routers.topk import TopKRouter, sample_second_expert, softmax_topk

__all__ = [
    "DROP_POLICIES",
    "Capacity",
    "ExpertChoiceRouter",
    "SelectiveSinkhornRouter",
    "SigmoidTopKRouter",
    "SinkhornRouter",
    "TopKRouter",
    "bias_update",
    "capacity_keep_mask",
    "expert_capacity",
    "expert_choice",
    "expert_choice_capacity",
    "group_limited_mask",
    "sample_second_expert",
    "sigmoid_topk",
    "sinkhorn",
    "sinkhorn_topk",
    "softmax_topk",
    "token_choice_routing",
]
