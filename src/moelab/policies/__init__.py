"""Expert-cache eviction policies, shared by the cache simulator (``moelab.analysis.cache``) and
the offloading runtime (``moelab.ops.offload``): one object per policy, one interface.

- ``policy.on_access(expert)``: a request of ``expert`` (the clock ticks; recency and frequency);
- ``policy.on_load(expert)``: ``expert`` was loaded without a request (a prefetch): recency only;
- ``policy.victim(candidates, step, next_use=None)``: the expert to evict among ``candidates``.

See ``moelab.policies.eviction`` for the rules (Belady 1966; LRU/LFU; a pre-gating lookahead
window as in Read-ME, Cai et al. 2024).
"""

from moelab.policies.eviction import (
    DEFAULT_LOOKAHEAD,
    POLICIES,
    BeladyPolicy,
    CachePolicy,
    LFUPolicy,
    LookaheadPolicy,
    LRUPolicy,
    make_policy,
)

__all__ = [
    "DEFAULT_LOOKAHEAD",
    "POLICIES",
    "BeladyPolicy",
    "CachePolicy",
    "LFUPolicy",
    "LRUPolicy",
    "LookaheadPolicy",
    "make_policy",
]
