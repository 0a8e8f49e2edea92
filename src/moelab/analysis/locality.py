"""A layer's local routing consistency and expert-cache hit rates, in a handful of numbers.

``moelab analyze`` draws whole curves (SRP and SCH over segment lengths and cache sizes, four
cache policies over cache sizes). Training runs and ``moelab repro`` need one comparable point per
layer instead: this module reads one segment length ``L`` and one cache size, ``2k``: the LRC
paper (Liang et al. 2025) finds that a cache of about twice the active experts suffices. It
returns

- ``srp``: SRP(L), pooled over sequences (``lrc.srp_sequences``);
- ``sch_k``, ``sch_2k``: SCH(L) with caches of ``k`` and ``2k`` experts (mean over sequences);
- ``lru``, ``lfu``, ``belady``, ``lookahead``: cold-start hit rates of the four cache policies
  (``cache.hit_rate_curve``) with a cache of ``2k`` experts (at least ``max_t |S_t|``).

``k`` is the routing's experts per token (``round(mean |S_t|)`` for ragged routings: capacity
drops, expert choice). ``L = 16`` is our choice (the middle of the paper's {4, 16, 64, 256} that
fits 128-token training windows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from moelab.analysis.cache import DEFAULT_LOOKAHEAD, POLICIES, first_tokens, hit_rate_curve
from moelab.analysis.lrc import sch_curve, srp_sequences
from moelab.analysis.sequences import nominal_k, split_sequences
from moelab.core.routing import Routing

SEGMENT_LENGTH = 16  # our choice; see the module docstring
CACHE_MULTIPLE = 2  # cache = 2k experts (LRC paper: "about twice the active experts")
MAX_CACHE_TOKENS = 4096  # tokens per layer fed to the pure-Python cache simulators; ours
KEYS = ("srp", "sch_k", "sch_2k", *POLICIES)


def layer_locality(
    routing: Routing,
    lengths: Sequence[int],
    *,
    segment_length: int = SEGMENT_LENGTH,
    cache_multiple: int = CACHE_MULTIPLE,
    lookahead: int = DEFAULT_LOOKAHEAD,
    max_cache_tokens: int = MAX_CACHE_TOKENS,
    k: int | None = None,
) -> dict[str, float]:
    """The numbers of the module docstring for one layer's ``routing``, cut into sequences of
    ``lengths`` tokens (in order). ``k``: the experts per token the cache sizes scale with
    (default: the routing's own, ``round(mean |S_t|)``; pass the router's ``top_k`` so that
    capacity drops do not shrink the cache). NaN where a number is undefined (no sequence as
    long as ``segment_length`` for SRP; a layer where no token reached an expert gives all NaN).
    Raises ``ValueError`` (naming SRP) when a sequence's ``T x E`` exceeds the dense-view limit."""
    nan = {key: math.nan for key in KEYS}
    topk = split_sequences(routing, lengths)
    if topk is None:
        return {**nan, "k": 0, "cache_size": 0, "segment_length": segment_length}
    E = routing.num_experts
    per_tok = routing.experts_per_token().cpu()
    k = nominal_k(per_tok) if k is None else k
    long_enough = [s for s in topk if s.shape[0] >= segment_length]
    out = dict(nan)
    if long_enough:
        out["srp"] = srp_sequences(long_enough, E, segment_length)
    curve = sch_curve(topk, E, segment_length)
    out["sch_k"] = float(curve[min(k, E) - 1])
    out["sch_2k"] = float(curve[min(cache_multiple * k, E) - 1])
    size = min(E, max(cache_multiple * k, int(per_tok.max())))
    seqs = first_tokens(topk, max_cache_tokens)
    rates = hit_rate_curve(seqs, E, cache_sizes=[size], policies=POLICIES, lookahead=lookahead)
    out.update({p: float(rates[p][0]) for p in POLICIES})
    return {**out, "k": k, "cache_size": size, "segment_length": segment_length}
