"""moelab: routing for PyTorch.

The spine: ``Router -> Routing -> dispatch -> ExpertBank -> combine``.

    import moelab
    moe = moelab.MoE(d_model=64, num_experts=8, top_k=2, router="topk", aux_losses={"load_balance": 1e-2})
    y = moe(x)                        # x: [B, S, 64] or [T, 64]
    loss = task_loss + moe.aux_loss
"""

from . import analysis, losses, ops, registry  # noqa: F401  (registers losses, backends, analyses)
from .experts import ExpertBank, SharedExperts
from .layers import MoE, aux_loss
from .registry import MethodInfo, list_methods
from .routing import (
    ExpertChoiceRouter,
    Router,
    Routing,
    RoutingContext,
    SigmoidTopKRouter,
    TopKRouter,
    build_router,
    register_router,
    step_end,
)
from .tracing import Trace, trace

__version__ = "0.1.0"

__all__ = [
    "ExpertBank",
    "ExpertChoiceRouter",
    "MethodInfo",
    "MoE",
    "Router",
    "Routing",
    "RoutingContext",
    "SharedExperts",
    "SigmoidTopKRouter",
    "TopKRouter",
    "Trace",
    "aux_loss",
    "build_router",
    "list_methods",
    "register_router",
    "step_end",
    "trace",
]
