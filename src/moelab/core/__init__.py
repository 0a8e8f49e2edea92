"""The contract every family shares: ``Routing``, ``RoutingContext``, ``Router``, the bank
protocol, routed layers with their transforms, and traces. Imports nothing above itself."""

from moelab.core.bank import Bank, check_bank, example_bank
from moelab.core.context import RoutingContext, Session, check_context
from moelab.core.routed import (
    RoutedLayer,
    RoutingSite,
    RoutingTransform,
    aux_loss,
    override_routing,
    routed_layers,
)
from moelab.core.router import (
    Router,
    build_router,
    link_routers,
    register_router,
    router_arguments,
    share,
    step_end,
)
from moelab.core.routing import MAX_DENSE_ELEMENTS, ExpertOrder, Routing, cat_routings
from moelab.core.stats import load_stats, logit_stats, router_entropy, routing_stats
from moelab.core.tracing import Trace, Tracer, register_tracer, trace

__all__ = [
    "MAX_DENSE_ELEMENTS",
    "Bank",
    "ExpertOrder",
    "RoutedLayer",
    "Router",
    "Routing",
    "RoutingContext",
    "RoutingSite",
    "RoutingTransform",
    "Session",
    "Trace",
    "Tracer",
    "aux_loss",
    "build_router",
    "cat_routings",
    "check_bank",
    "check_context",
    "example_bank",
    "link_routers",
    "load_stats",
    "logit_stats",
    "override_routing",
    "register_router",
    "register_tracer",
    "routed_layers",
    "router_arguments",
    "router_entropy",
    "routing_stats",
    "share",
    "step_end",
    "trace",
]
