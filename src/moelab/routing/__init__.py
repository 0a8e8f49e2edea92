"""The routing contract (``Routing``, ``RoutingContext``, ``Router``) and the core routers."""

from .capacity import capacity_keep_mask, expert_capacity, token_choice_routing
from .context import RoutingContext
from .expert_choice import ExpertChoiceRouter, expert_choice
from .router import Router, build_router, register_router, step_end
from .routing import ExpertOrder, Routing, cat_routings
from .sigmoid_topk import SigmoidTopKRouter, bias_update, group_limited_mask, sigmoid_topk
from .topk import TopKRouter, sample_second_expert, softmax_topk

__all__ = [
    "ExpertChoiceRouter",
    "ExpertOrder",
    "Router",
    "Routing",
    "RoutingContext",
    "SigmoidTopKRouter",
    "TopKRouter",
    "bias_update",
    "cat_routings",
    "build_router",
    "capacity_keep_mask",
    "expert_capacity",
    "expert_choice",
    "group_limited_mask",
    "register_router",
    "sample_second_expert",
    "sigmoid_topk",
    "softmax_topk",
    "step_end",
    "token_choice_routing",
]
