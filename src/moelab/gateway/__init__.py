"""moelab.gateway: model-level routing, an OpenAI-compatible gateway in front of LLM endpoints.

Requests (not tokens) are routed across models by a *request router* (registry kind
``request_router``, ``moelab list --kind request_router``). This package imports no torch: the
server, the policies and the evaluation run on numpy and the standard library (plus fastapi,
uvicorn, httpx and pydantic for the server, the ``[gateway]`` extra). Embedding policies load
MiniLM lazily, on first use.

- ``moelab.gateway.policy``: the contract (``ModelInfo``, ``RouteRequest``, ``Decision``,
  ``Feedback``, ``RequestRouter``, ``build_policy``);
- ``moelab.gateway.table``: ``RoutingTable``, per-query quality of each model (offline data);
- ``moelab.gateway.embed``: text embedders (MiniLM, lazily; a torch-free hashing embedder);
- ``moelab.gateway.policies``: one file per policy.
"""
