"""Read-ME's system side: pre-gated routing is known before the backbone runs, so an expert cache
can plan with it.

    ids = torch.randint(0, 256, (4, 64))                  # [B, S] token ids
    experts = pregate_decisions(model, ids)               # [B, S]: the expert of every token
    pregate_lookahead_hit_rate(model, ids, cache_size=2)  # {"lru": ..., "lookahead": ..., "belady": ...}

``pregate_decisions`` runs only the model's pre-gate (``moelab.routers.pregate``), never the
backbone, and gives exactly the experts the model's routed layers then use (the same in every
layer). ``pregate_topk_index`` is the same for ``top_k > 1`` as ``[B, S, k]``, the input of
``moelab.analysis.cache``. ``pregate_lookahead_hit_rate`` runs ``cache.simulate_cache`` on that
sequence with the ``lookahead`` policy (the next ``window`` tokens' experts are known: Read-ME's
pre-gating), LRU (no lookahead) and Belady (the whole future), each row of ``ids`` one sequence
starting with an empty cache. Since every layer uses the same experts, one layer's cache stands
for all of them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.analysis.cache import DEFAULT_LOOKAHEAD, simulate_cache
from moelab.routers.pregate import PreGateRouter


def find_pregate_router(model: nn.Module) -> PreGateRouter:
    """The pre-gate router of ``model`` that owns the pre-gate (the first one in module order).

    ``model``: a ``MoELM`` built with ``router="pregate"``, a lone ``moelab.MoE``, or the router.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    routers = [m for m in model.modules() if isinstance(m, PreGateRouter)]
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no pregate router: build it with router='pregate' "
            "(MoELMConfig(router='pregate') or moelab.MoE(..., router='pregate'))"
        )
    return next((r for r in routers if r.owns_pregate), routers[0])


def _check_input_ids(input_ids: object) -> Tensor:
    if not isinstance(input_ids, Tensor):
        raise TypeError(
            f"input_ids must be a torch.Tensor [B, S] of token ids, got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be [B, S] (one sequence per row), got shape {tuple(input_ids.shape)}"
        )
    return input_ids


@torch.no_grad()
def pregate_topk_index(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``[B, S, k]`` long: the experts every token of ``input_ids [B, S]`` is routed to, from the
    ids alone (the pre-gate runs; the backbone does not). On the pre-gate's device."""
    router = find_pregate_router(model)
    ids = _check_input_ids(input_ids)
    b, s = ids.shape
    return router.pregate.decide(ids).index.view(b, s, router.pregate.top_k)


def pregate_decisions(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``[B, S]`` long: the expert each token of ``input_ids [B, S]`` will use in every routed
    layer, computed from the ids alone (Read-ME's top-1; ``pregate_topk_index`` for ``k > 1``)."""
    router = find_pregate_router(model)
    _check_input_ids(input_ids)
    if router.pregate.top_k != 1:
        raise ValueError(
            f"pregate_decisions gives one expert per token; this pre-gate has top_k={router.pregate.top_k}: "
            "use pregate_topk_index (-> [B, S, k])"
        )
    return pregate_topk_index(model, input_ids)[..., 0]


def pregate_lookahead_hit_rate(
    model: nn.Module, input_ids: Tensor, cache_size: int, window: int = DEFAULT_LOOKAHEAD
) -> dict[str, float]:
    """Expert-cache hit rates on the pre-gated expert sequence of ``input_ids [B, S]``.

    Returns ``{"lru": ..., "lookahead": ..., "belady": ...}``: a cache of ``cache_size`` experts
    (``top_k <= cache_size <= E``) per layer, evicting the least recently used expert, the one
    needed farthest within the next ``window`` tokens (``moelab.analysis.cache``'s ``lookahead``,
    default window 8), or the one needed farthest in the whole sequence. Hits and requests are
    pooled over the ``B`` sequences, each starting with an empty cache.
    """
    index = pregate_topk_index(model, input_ids).cpu()
    num_experts = find_pregate_router(model).num_experts
    return {
        policy: simulate_cache(index, num_experts, cache_size, policy, window).hit_rate
        for policy in ("lru", "lookahead", "belady")
    }
