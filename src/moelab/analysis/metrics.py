"""Metrics over traces: expert load, router entropy, co-activation, layer-to-layer mutual information.

Everything reads ``moelab.Routing`` (one layer) or ``moelab.Trace`` (all layers); definitions are
in ``docs/analysis.md``. Entropies and mutual information are in nats.

The per-layer routing statistics (load balance, drop rate, router entropy, z) are defined once,
in ``moelab.core.stats``; ``load_stats``, ``router_entropy`` and ``routing_stats`` here are those
very functions, re-exported. ``trace_metrics`` = ``routing_stats`` per layer (what
``Trace.summary()`` gives) plus the mutual information with the previous layer.

Large E: everything but ``coactivation`` works from the COO entries (``token_index``,
``expert_index``, ``weight``) and ``[E]`` counts, so a routing over 2^20 experts is fine. The
co-activation matrix is ``[E, E]`` and refuses (``ValueError``) beyond
``moelab.core.routing.MAX_DENSE_ELEMENTS`` elements.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.analysis.limits import require_dense
from moelab.core.routing import Routing
from moelab.core.stats import load_stats, router_entropy, routing_stats
from moelab.core.tracing import Trace

__all__ = [
    "coactivation",
    "expert_load",
    "load_matrix",
    "load_stats",
    "mutual_information_from_joint",
    "router_entropy",
    "routing_mutual_information",
    "routing_stats",
    "top1_experts",
    "trace_metrics",
]


def _check_routing(routing: object, name: str = "routing") -> Routing:
    if not isinstance(routing, Routing):
        raise TypeError(f"{name} must be a moelab.Routing, got {type(routing).__name__}")
    return routing


def _distinct_entries(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """``(token [M], expert [M], weight [M])`` on CPU: the distinct (token, expert) pairs sorted by
    token then expert, duplicate entries' weights summed (as ``Routing.dense()`` sums them)."""
    E = routing.num_experts
    key = routing.token_index.cpu() * E + routing.expert_index.cpu()
    uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
    weight = torch.zeros(uniq.shape[0], dtype=torch.float64)
    weight.index_add_(0, inverse, routing.weight.detach().cpu().double())
    return uniq // E, uniq % E, weight


def _pairs_by_token(tok_a: Tensor, exp_a: Tensor, tok_b: Tensor, exp_b: Tensor, num_tokens: int):
    """Every ``(i, j, t)`` with ``i in S_a(t)`` and ``j in S_b(t)``: the join of two entry lists on the
    token. Both lists are sorted by token. ``sum_t |S_a(t)| |S_b(t)|`` pairs, no ``[T, E]`` view."""
    count_b = torch.bincount(tok_b, minlength=num_tokens)
    start_b = torch.cumsum(count_b, 0) - count_b
    partners = count_b[tok_a]  # how many b-entries share each a-entry's token
    a_of_pair = torch.repeat_interleave(torch.arange(tok_a.shape[0]), partners)
    run_start = torch.cumsum(partners, 0) - partners
    b_of_pair = start_b[tok_a[a_of_pair]] + (torch.arange(a_of_pair.shape[0]) - run_start[a_of_pair])
    return exp_a[a_of_pair], exp_b[b_of_pair], tok_a[a_of_pair]


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------
def expert_load(routing: Routing) -> Tensor:
    """``[E]`` float64: the fraction of the layer's assignments each expert received (sums to 1).

    All zeros when the routing has no assignment.
    """
    r = _check_routing(routing)
    counts = r.tokens_per_expert().cpu().double()
    total = counts.sum()
    return counts / total if total > 0 else counts


def load_matrix(trace: Trace) -> Tensor:
    """``[layers, E_max]`` float64 of ``expert_load`` per traced layer (zero-padded), for heatmaps."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a moelab.Trace, got {type(trace).__name__}")
    loads = [expert_load(trace.routing(n)) for n in trace.layers]
    if not loads:
        raise ValueError("trace has no layers")
    e = max(x.shape[0] for x in loads)
    out = torch.zeros(len(loads), e, dtype=torch.float64)
    for i, x in enumerate(loads):
        out[i, : x.shape[0]] = x
    return out


# --------------------------------------------------------------------------------------------------
# co-activation
# --------------------------------------------------------------------------------------------------
def coactivation(routing: Routing, normalize: str | None = None) -> Tensor:
    """``[E, E]`` float64 expert co-activation of one layer.

    ``C[i, j]`` = number of tokens routed to both ``i`` and ``j`` (the diagonal counts the tokens
    of each expert). ``normalize="row"`` gives ``P(j | i) = C[i, j] / C[i, i]`` (0 where expert
    ``i`` is unused); ``"tokens"`` divides by ``T``. Built from the entries (``sum_t |S_t|^2``
    pairs); the ``[E, E]`` result refuses with ``ValueError`` when it would be too large.
    """
    r = _check_routing(routing)
    if normalize not in (None, "row", "tokens"):
        raise ValueError(f"normalize must be None, 'row' or 'tokens', got {normalize!r}")
    E = r.num_experts
    require_dense("coactivation", "[E, E]", E, E)
    tok, exp, _ = _distinct_entries(r)
    i, j, _ = _pairs_by_token(tok, exp, tok, exp, r.num_tokens)
    c = torch.zeros(E * E, dtype=torch.float64)
    c.index_add_(0, i * E + j, torch.ones(i.shape[0], dtype=torch.float64))
    c = c.view(E, E)
    if normalize == "row":
        diag = c.diagonal().clone()
        c = torch.where(diag.unsqueeze(1) > 0, c / diag.clamp_min(1).unsqueeze(1), torch.zeros_like(c))
    elif normalize == "tokens":
        c = c / max(r.num_tokens, 1)
    return c


# --------------------------------------------------------------------------------------------------
# mutual information between layers
# --------------------------------------------------------------------------------------------------
def top1_experts(routing: Routing) -> Tensor:
    """``[T]`` long: each token's highest-weight expert (lowest id among ties); -1 if it has none.

    From the entries (duplicate (token, expert) entries summed first, as in ``Routing.dense()``).
    """
    r = _check_routing(routing)
    out = torch.full((r.num_tokens,), -1, dtype=torch.long)
    if r.num_assignments == 0:
        return out
    tok, exp, w = _distinct_entries(r)  # sorted by token, then expert
    # Stable sorts: by weight (descending), then by token. Within a token the first entry is then
    # the largest weight, ties in ascending expert id (the order the entries started in).
    order = torch.sort(w, descending=True, stable=True).indices
    order = order[torch.sort(tok[order], stable=True).indices]
    tok, exp = tok[order], exp[order]
    first = torch.ones_like(tok, dtype=torch.bool)
    first[1:] = tok[1:] != tok[:-1]
    out[tok[first]] = exp[first]
    return out


def _information(i: Tensor, j: Tensor, mass: Tensor, size_i: int, size_j: int) -> dict[str, float]:
    """``I(X; Y)``, ``H(X)``, ``H(Y)`` (nats) of the joint distribution given by its entries: mass
    ``mass [M]`` at ``(i [M], j [M])`` (duplicates add up; normalised here; plug-in estimate)."""
    total = float(mass.sum()) if mass.numel() else 0.0
    if total <= 0:
        nan = float("nan")
        return {"mi": nan, "h_x": nan, "h_y": nan}
    key = i * size_j + j
    uniq, inverse = torch.unique(key, return_inverse=True)
    p = torch.zeros(uniq.shape[0], dtype=torch.float64).index_add_(0, inverse, mass.double()) / total
    pi, pj = uniq // size_j, uniq % size_j
    px = torch.zeros(size_i, dtype=torch.float64).index_add_(0, pi, p)
    py = torch.zeros(size_j, dtype=torch.float64).index_add_(0, pj, p)
    nz = p > 0
    p, pi, pj = p[nz], pi[nz], pj[nz]
    mi = float((p * (p / (px[pi] * py[pj])).log()).sum())

    def h(q: Tensor) -> float:
        q = q[q > 0]
        return float(-(q * q.log()).sum())

    return {"mi": mi, "h_x": h(px), "h_y": h(py)}


def mutual_information_from_joint(joint: Tensor) -> float:
    """``I(X; Y)`` in nats of a joint distribution ``[A, B]`` (normalised here; plug-in)."""
    if not isinstance(joint, Tensor) or joint.dim() != 2:
        raise ValueError(f"joint must be a 2-D tensor, got {getattr(joint, 'shape', joint)!r}")
    i, j = (joint > 0).nonzero(as_tuple=True)
    return _information(i, j, joint.double()[i, j], joint.shape[0], joint.shape[1])["mi"]


def routing_mutual_information(
    routing_a: Routing, routing_b: Routing, mode: str = "top1"
) -> dict[str, float]:
    """Mutual information between the routings of two layers over the same tokens.

    ``mode="top1"``: ``X``, ``Y`` = each token's highest-weight expert at the two layers.
    ``mode="set"``: a token ``t`` drawn uniformly, then ``X`` uniformly from its layer-``a`` experts
    and ``Y`` uniformly from its layer-``b`` experts (independently):
    ``p(i, j) = sum_t [i in S_a(t)] [j in S_b(t)] / (|S_a(t)| |S_b(t)|)``, normalised.
    Tokens without an expert in either layer are left out.
    Returns ``{"mi": I(X;Y), "nmi": I / sqrt(H(X) H(Y)) (0 if an entropy is 0), "h_x", "h_y"}``.
    Both modes work from the entries (no ``[T, E]`` or ``[E, E]`` view).
    """
    ra, rb = _check_routing(routing_a, "routing_a"), _check_routing(routing_b, "routing_b")
    if ra.num_tokens != rb.num_tokens:
        raise ValueError(
            f"routing_a and routing_b must cover the same tokens, got T={ra.num_tokens} and T={rb.num_tokens}"
        )
    if mode == "top1":
        ta, tb = top1_experts(ra), top1_experts(rb)
        keep = (ta >= 0) & (tb >= 0)
        i, j = ta[keep], tb[keep]
        mass = torch.ones(i.shape[0], dtype=torch.float64)
    elif mode == "set":
        tok_a, exp_a, _ = _distinct_entries(ra)
        tok_b, exp_b, _ = _distinct_entries(rb)
        i, j, t = _pairs_by_token(tok_a, exp_a, tok_b, exp_b, ra.num_tokens)
        size_a = torch.bincount(tok_a, minlength=ra.num_tokens).double()
        size_b = torch.bincount(tok_b, minlength=rb.num_tokens).double()
        mass = 1.0 / (size_a[t] * size_b[t])
    else:
        raise ValueError(f"mode must be 'top1' or 'set', got {mode!r}")
    info = _information(i, j, mass, ra.num_experts, rb.num_experts)
    hx, hy = info["h_x"], info["h_y"]
    if math.isnan(info["mi"]):
        return {"mi": info["mi"], "nmi": float("nan"), "h_x": hx, "h_y": hy}
    nmi = info["mi"] / math.sqrt(hx * hy) if hx > 0 and hy > 0 else 0.0
    return {"mi": info["mi"], "nmi": nmi, "h_x": hx, "h_y": hy}


# --------------------------------------------------------------------------------------------------
# whole traces
# --------------------------------------------------------------------------------------------------
def trace_metrics(trace: Trace) -> list[dict[str, float | int | str]]:
    """One row per traced layer (trace order): ``routing_stats`` (as ``Trace.summary()``) plus, for
    every layer but the first, the mutual information with the previous layer (``mi_top1``,
    ``nmi_top1``, ``mi_set``, ``nmi_set``; NaN when the two layers saw different tokens)."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a moelab.Trace, got {type(trace).__name__}")
    rows: list[dict[str, float | int | str]] = []
    prev: Routing | None = None
    for name in trace.layers:
        r = trace.routing(name)
        row: dict[str, float | int | str] = {"layer": name, **routing_stats(r)}
        for mode in ("top1", "set"):
            if prev is not None and prev.num_tokens == r.num_tokens:
                mi = routing_mutual_information(prev, r, mode)
                row[f"mi_{mode}"], row[f"nmi_{mode}"] = mi["mi"], mi["nmi"]
            else:
                row[f"mi_{mode}"], row[f"nmi_{mode}"] = float("nan"), float("nan")
        rows.append(row)
        prev = r
    return rows
