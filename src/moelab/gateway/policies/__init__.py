"""The gateway's request routers, one file per policy; importing this package registers them
(registry kind ``request_router``). Torch-free."""

from moelab.gateway.policies import bandit, baselines, cascade, category, r1, retriever, signals, threshold  # noqa: F401
