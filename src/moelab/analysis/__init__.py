"""Routing analysis: metrics over traces, local routing consistency, caches, divergence, ARank, plots.

    import moelab.analysis as A
    A.trace_metrics(trace)                                       # load, entropy, MI per layer
    idx = trace.routing(trace.layers[0]).topk_index().view(B, S, k)   # [B, S, k]: one row per sequence
    A.srp(idx, num_experts=8, segment_length=16)
    A.sch(idx, num_experts=8, segment_length=16, cache_size=4)
    A.hit_rate_curve(idx, 8)                                     # LRU / LFU / Belady / lookahead
    A.plot_load(trace, "load.png")                               # matplotlib, imported on use

Per-sequence analyses (SRP, SCH, caches) read ``[B, S, k]`` or a list of ``[T_i, k]``: a flat
``[B S, k]`` index is one long sequence to them. ``moelab analyze TARGET`` runs all of it on a
model or a saved trace and writes a report. Definitions: ``docs/analysis.md``; one page per
registered method in ``docs/methods/``. Importing this package imports neither matplotlib nor
transformers.
"""

from moelab.analysis.arank import arank_per_layer, attention_maps, attention_rank, capture_sdpa_attention
from moelab.analysis.cache import (
    POLICIES,
    CacheResult,
    belady,
    default_cache_sizes,
    hit_rate_curve,
    lfu,
    lookahead,
    lru,
    next_use_table,
    simulate_cache,
)
from moelab.analysis.crosslingual import (
    crosslingual_divergence,
    js_divergence,
    normalized_js,
    parallel_verses,
    read_bible,
    sequence_distribution,
)
from moelab.analysis.intervals import (
    Interval,
    combine,
    difference_label,
    judge,
    paired_interval,
    standard_error,
    t_interval,
)
from moelab.analysis.lrc import (
    SEGMENT_LENGTHS,
    sch,
    sch_ci,
    sch_curve,
    sch_curves,
    srp,
    srp_ci,
    srp_sequences,
    srp_stats,
)
from moelab.analysis.metrics import (
    coactivation,
    expert_load,
    load_matrix,
    load_stats,
    router_entropy,
    routing_mutual_information,
    routing_stats,
    top1_experts,
    trace_metrics,
)
from moelab.analysis.plots import plot_coactivation, plot_load, plot_mutual_information
from moelab.analysis.pregate import (
    find_pregate_router,
    pregate_decisions,
    pregate_lookahead_hit_rate,
    pregate_topk_index,
)
from moelab.analysis.sequences import split_sequences, topk_mask
from moelab.analysis.stats import CI, bootstrap_ci
from moelab.registry import register

_LRC = "Liang et al. 2025, Local Routing Consistency of MoE (ljcleo/moe-lrc)"
register(
    "analysis",
    "srp",
    paper=_LRC,
    summary="segment routing best performance: best F1 of one expert set per L-token window",
)(srp)
register(
    "analysis",
    "sch",
    paper=_LRC,
    summary="segment cache best hit rate: size-m cache ranked by use count in the next L tokens",
)(sch)
register(
    "analysis",
    "lru",
    paper="Eliseev & Mazur 2023, Fast Inference of MoE with Offloading",
    summary="expert cache evicting the least recently used expert",
)(lru)
register(
    "analysis",
    "lfu",
    paper="Eliseev & Mazur 2023 (baseline policy)",
    summary="expert cache evicting the least frequently used expert, ties by LRU",
)(lfu)
register(
    "analysis",
    "belady",
    paper="Belady 1966, A study of replacement algorithms",
    summary="oracle expert cache: evict the expert needed farthest in the future",
)(belady)
register(
    "analysis",
    "lookahead",
    paper="Cai et al. 2024, Read-ME (pre-gating router)",
    summary="expert cache seeing the next W tokens' routing: Belady inside the window, LRU beyond",
)(lookahead)
register(
    "analysis",
    "js_divergence",
    paper="Bandarkar et al. 2025, Multilingual Routing in MoE",
    summary="entropy-normalised Jensen-Shannon divergence of per-sequence routing between parallel sentences",
)(normalized_js)
register(
    "analysis",
    "arank",
    paper="Luo et al. 2024, gamma-MoD",
    summary="mean over heads of rank(tril(attention) with zero diagonal), per layer",
)(attention_rank)

__all__ = [
    "CI",
    "POLICIES",
    "SEGMENT_LENGTHS",
    "CacheResult",
    "Interval",
    "arank_per_layer",
    "attention_maps",
    "attention_rank",
    "belady",
    "bootstrap_ci",
    "capture_sdpa_attention",
    "coactivation",
    "combine",
    "crosslingual_divergence",
    "default_cache_sizes",
    "difference_label",
    "expert_load",
    "find_pregate_router",
    "hit_rate_curve",
    "js_divergence",
    "judge",
    "lfu",
    "load_matrix",
    "load_stats",
    "lookahead",
    "lru",
    "next_use_table",
    "normalized_js",
    "paired_interval",
    "parallel_verses",
    "plot_coactivation",
    "plot_load",
    "plot_mutual_information",
    "pregate_decisions",
    "pregate_lookahead_hit_rate",
    "pregate_topk_index",
    "read_bible",
    "router_entropy",
    "routing_mutual_information",
    "routing_stats",
    "sch",
    "sch_ci",
    "sch_curve",
    "sch_curves",
    "sequence_distribution",
    "simulate_cache",
    "split_sequences",
    "srp",
    "srp_ci",
    "srp_sequences",
    "srp_stats",
    "standard_error",
    "t_interval",
    "top1_experts",
    "topk_mask",
    "trace_metrics",
]
