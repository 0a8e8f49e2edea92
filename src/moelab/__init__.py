"""moelab: routing for PyTorch.

The spine: ``Router -> Routing -> Dispatcher -> Executor(Bank) -> combine``.

    import moelab
    moe = moelab.MoE(d_model=64, num_experts=8, top_k=2, router="topk", aux_losses={"load_balance": 1e-2})
    y = moe(x)                        # x: [B, S, 64] or [T, 64]
    loss = task_loss + moe.aux_loss

``import moelab`` is cheap (PEP 562): it imports neither torch nor any subpackage. Each name below
loads its module on first use, so the registry (``moelab.registry``) and the torch-free parts
work without torch, and triton, transformers and matplotlib load only where they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Bank": "moelab.core.bank",
    "ExpertBank": "moelab.experts.bank",
    "ExpertChoiceRouter": "moelab.routers.expert_choice",
    "ExpertOrder": "moelab.core.routing",
    "LoRABank": "moelab.experts.lora",
    "MoE": "moelab.layers.moe",
    "RoutedLayer": "moelab.core.routed",
    "RoutedLoRA": "moelab.lora.layer",
    "Router": "moelab.core.router",
    "Routing": "moelab.core.routing",
    "RoutingContext": "moelab.core.context",
    "RoutingSite": "moelab.core.routed",
    "Session": "moelab.core.context",
    "SharedExperts": "moelab.experts.shared",
    "SigmoidTopKRouter": "moelab.routers.sigmoid_topk",
    "TopKRouter": "moelab.routers.topk",
    "Trace": "moelab.core.tracing",
    "aux_loss": "moelab.core.routed",
    "build_router": "moelab.core.router",
    "generate": "moelab.models.generate",
    "offload": "moelab.ops.offload",
    "link_routers": "moelab.core.router",
    "override_routing": "moelab.core.routed",
    "register_router": "moelab.core.router",
    "routing_stats": "moelab.core.stats",
    "step_end": "moelab.core.router",
    "trace": "moelab.core.tracing",
}

# subpackages reachable as attributes (``moelab.functional.sinkhorn``, ``moelab.hf.patch``)
_SUBMODULES = {
    "analysis",
    "core",
    "data",
    "experts",
    "functional",
    "hf",
    "integrations",
    "kernels",
    "layers",
    "lora",
    "losses",
    "models",
    "ops",
    "parallel",
    "peft",
    "policies",
    "registry",
    "repro",
    "routers",
    "train",
}


def list_methods(kind: str | None = None) -> list[Any]:
    """Every registered method (optionally of one kind), sorted by kind then name.

    Imports moelab's own method modules first (this imports torch).
    """
    from moelab import registry

    registry.load_builtin()
    return registry.list_methods(kind)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"moelab.{name}")
    else:
        raise AttributeError(f"module 'moelab' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)


__all__ = [
    "Bank",
    "ExpertBank",
    "ExpertChoiceRouter",
    "ExpertOrder",
    "LoRABank",
    "MoE",
    "RoutedLayer",
    "RoutedLoRA",
    "Router",
    "Routing",
    "RoutingContext",
    "RoutingSite",
    "Session",
    "SharedExperts",
    "SigmoidTopKRouter",
    "TopKRouter",
    "Trace",
    "aux_loss",
    "build_router",
    "link_routers",
    "list_methods",
    "override_routing",
    "register_router",
    "routing_stats",
    "step_end",
    "trace",
]

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from moelab.core.bank import Bank
    from moelab.core.context import RoutingContext, Session
    from moelab.core.routed import RoutedLayer, RoutingSite, aux_loss, override_routing
    from moelab.core.router import Router, build_router, link_routers, register_router, step_end
    from moelab.core.routing import ExpertOrder, Routing
    from moelab.core.stats import routing_stats
    from moelab.core.tracing import Trace, trace
    from moelab.experts.bank import ExpertBank
    from moelab.experts.shared import SharedExperts
    from moelab.layers.moe import MoE
    from moelab.routers.expert_choice import ExpertChoiceRouter
    from moelab.routers.sigmoid_topk import SigmoidTopKRouter
    from moelab.routers.topk import TopKRouter
