"""Metrics over traces: expert load, router entropy, co-activation, layer-to-layer mutual information.

Everything reads ``moelab.Routing`` (one layer) or ``moelab.Trace`` (all layers); definitions are
in ``docs/analysis.md``. Entropies and mutual information are in nats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..routing.routing import Routing
from ..tracing import Trace


def _check_routing(routing: object, name: str = "routing") -> Routing:
    if not isinstance(routing, Routing):
        raise TypeError(f"{name} must be a moelab.Routing, got {type(routing).__name__}")
    return routing


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------
def expert_load(routing: Routing) -> Tensor:
    """``[E]`` float64: the fraction of the layer's assignments each expert received (sums to 1).

    All zeros when the routing has no assignment.
    """
    r = _check_routing(routing)
    counts = torch.bincount(r.expert_index.cpu(), minlength=r.num_experts).double()
    total = counts.sum()
    return counts / total if total > 0 else counts


def load_stats(routing: Routing) -> dict[str, float | int]:
    """Per-layer load summary.

    ``tokens`` T, ``assignments`` N, ``max_over_mean`` = max_e n_e / mean_e n_e,
    ``cv`` = std_e n_e / mean_e n_e (population std), ``min_over_mean``, ``dead_experts``
    (experts with no assignment), ``drop_rate`` (capacity drops / requested), ``entropy``
    (``router_entropy``), ``load_entropy`` (entropy of ``expert_load`` / log E).
    """
    r = _check_routing(routing)
    n = torch.bincount(r.expert_index.cpu(), minlength=r.num_experts).double()
    mean = float(n.mean())
    load = n / n.sum() if n.sum() > 0 else n
    nz = load[load > 0]
    load_h = (
        float(-(nz * nz.log()).sum()) / math.log(r.num_experts)
        if r.num_experts > 1 and nz.numel()
        else float("nan")
    )
    return {
        "tokens": r.num_tokens,
        "assignments": r.num_assignments,
        "max_over_mean": float(n.max()) / mean if mean > 0 else float("nan"),
        "min_over_mean": float(n.min()) / mean if mean > 0 else float("nan"),
        "cv": float(n.std(unbiased=False)) / mean if mean > 0 else float("nan"),
        "dead_experts": int((n == 0).sum()),
        "drop_rate": r.drop_rate(),
        "entropy": router_entropy(r),
        "load_entropy": load_h,
    }


def router_entropy(routing: Routing) -> float:
    """Mean over tokens of ``H(p_t) / log E``, ``p_t`` the router's ``probs`` row renormalised to 1.

    1 = uniform, 0 = one-hot. NaN when the routing carries no ``probs`` (or ``E = 1``).
    """
    r = _check_routing(routing)
    if r.probs is None or r.num_tokens == 0 or r.num_experts < 2:
        return float("nan")
    p = r.probs.detach().double().cpu()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return float(h.mean()) / math.log(r.num_experts)


# --------------------------------------------------------------------------------------------------
# co-activation
# --------------------------------------------------------------------------------------------------
def coactivation(routing: Routing, normalize: str | None = None) -> Tensor:
    """``[E, E]`` float64 expert co-activation of one layer.

    ``C[i, j]`` = number of tokens routed to both ``i`` and ``j`` (the diagonal counts the tokens
    of each expert). ``normalize="row"`` gives ``P(j | i) = C[i, j] / C[i, i]`` (0 where expert
    ``i`` is unused); ``"tokens"`` divides by ``T``.
    """
    r = _check_routing(routing)
    if normalize not in (None, "row", "tokens"):
        raise ValueError(f"normalize must be None, 'row' or 'tokens', got {normalize!r}")
    m = r.mask().cpu().double()
    c = m.T @ m
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
    """``[T]`` long: each token's highest-weight expert (lowest id among ties); -1 if it has none."""
    r = _check_routing(routing)
    w = r.dense().detach().double().cpu()
    assigned = r.mask().cpu()
    w = torch.where(assigned, w, torch.full_like(w, -math.inf))
    top = w.argmax(-1)  # first maximum: the lowest id among ties
    return torch.where(assigned.any(-1), top, torch.full_like(top, -1))


def _entropy_of(p: Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum())


def mutual_information_from_joint(joint: Tensor) -> float:
    """``I(X; Y)`` in nats of a joint distribution ``[A, B]`` (normalised here; plug-in)."""
    if not isinstance(joint, Tensor) or joint.dim() != 2:
        raise ValueError(f"joint must be a 2-D tensor, got {getattr(joint, 'shape', joint)!r}")
    j = joint.double()
    total = j.sum()
    if total <= 0:
        return float("nan")
    j = j / total
    px, py = j.sum(1, keepdim=True), j.sum(0, keepdim=True)
    nz = j > 0
    return float((j[nz] * (j[nz] / (px * py).expand_as(j)[nz]).log()).sum())


def top1_mutual_information(top1_a: Tensor, top1_b: Tensor, num_experts_a: int, num_experts_b: int) -> float:
    """``I(X; Y)`` (nats) between aligned top-1 experts ``[T]`` of two layers (tokens with -1 skipped)."""
    if top1_a.shape != top1_b.shape or top1_a.dim() != 1:
        raise ValueError(
            f"top1_a and top1_b must be aligned [T] tensors, got {tuple(top1_a.shape)} and {tuple(top1_b.shape)}"
        )
    keep = (top1_a >= 0) & (top1_b >= 0)
    a, b = top1_a[keep].long().cpu(), top1_b[keep].long().cpu()
    joint = torch.zeros(num_experts_a, num_experts_b, dtype=torch.float64)
    joint.index_put_((a, b), torch.ones(a.shape[0], dtype=torch.float64), accumulate=True)
    return mutual_information_from_joint(joint)


def set_joint(mask_a: Tensor, mask_b: Tensor) -> Tensor:
    """``[E_a, E_b]``: ``sum_t [i in S_a(t)] [j in S_b(t)] / (|S_a(t)| |S_b(t)|)`` over tokens with both sets.

    The distribution of ``(X, Y)`` where a token ``t`` is drawn uniformly, then ``X`` uniformly from
    its layer-``l`` experts and ``Y`` uniformly from its layer-``l+1`` experts (independently).
    """
    a, b = mask_a.double().cpu(), mask_b.double().cpu()
    na, nb = a.sum(1, keepdim=True), b.sum(1, keepdim=True)
    keep = ((na > 0) & (nb > 0)).squeeze(1)
    a, b = a[keep] / na[keep], b[keep] / nb[keep]
    return a.T @ b


def routing_mutual_information(
    routing_a: Routing, routing_b: Routing, mode: str = "top1"
) -> dict[str, float]:
    """Mutual information between the routings of two layers over the same tokens.

    ``mode="top1"``: ``X``, ``Y`` = each token's highest-weight expert at the two layers.
    ``mode="set"``: the joint of ``set_joint`` (one expert drawn uniformly from each top-k set).
    Returns ``{"mi": I(X;Y), "nmi": I / sqrt(H(X) H(Y)) (0 if an entropy is 0), "h_x", "h_y"}``.
    """
    ra, rb = _check_routing(routing_a, "routing_a"), _check_routing(routing_b, "routing_b")
    if ra.num_tokens != rb.num_tokens:
        raise ValueError(
            f"routing_a and routing_b must cover the same tokens, got T={ra.num_tokens} and T={rb.num_tokens}"
        )
    if mode == "top1":
        ta, tb = top1_experts(ra), top1_experts(rb)
        keep = (ta >= 0) & (tb >= 0)
        joint = torch.zeros(ra.num_experts, rb.num_experts, dtype=torch.float64)
        joint.index_put_(
            (ta[keep], tb[keep]), torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True
        )
    elif mode == "set":
        joint = set_joint(ra.mask(), rb.mask())
    else:
        raise ValueError(f"mode must be 'top1' or 'set', got {mode!r}")
    mi = mutual_information_from_joint(joint)
    total = joint.sum()
    if total <= 0:
        return {"mi": float("nan"), "nmi": float("nan"), "h_x": float("nan"), "h_y": float("nan")}
    j = joint / total
    hx, hy = _entropy_of(j.sum(1)), _entropy_of(j.sum(0))
    nmi = mi / math.sqrt(hx * hy) if hx > 0 and hy > 0 else 0.0
    return {"mi": mi, "nmi": nmi, "h_x": hx, "h_y": hy}


# --------------------------------------------------------------------------------------------------
# whole traces
# --------------------------------------------------------------------------------------------------
def trace_metrics(trace: Trace) -> list[dict[str, float | int | str]]:
    """One row per traced layer (trace order): ``load_stats`` plus, for every layer but the first,
    the mutual information with the previous layer (``mi_top1``, ``nmi_top1``, ``mi_set``,
    ``nmi_set``; NaN when the two layers saw different tokens)."""
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a moelab.Trace, got {type(trace).__name__}")
    rows: list[dict[str, float | int | str]] = []
    prev: Routing | None = None
    for name in trace.layers:
        r = trace.routing(name)
        row: dict[str, float | int | str] = {"layer": name, **load_stats(r)}
        for mode in ("top1", "set"):
            if prev is not None and prev.num_tokens == r.num_tokens:
                mi = routing_mutual_information(prev, r, mode)
                row[f"mi_{mode}"], row[f"nmi_{mode}"] = mi["mi"], mi["nmi"]
            else:
                row[f"mi_{mode}"], row[f"nmi_{mode}"] = float("nan"), float("nan")
        rows.append(row)
        prev = r
    return rows


def load_matrix(trace: Trace) -> Tensor:
    """``[layers, E_max]`` float64 of ``expert_load`` per traced layer (zero-padded), for heatmaps."""
    loads = [expert_load(trace.routing(n)) for n in trace.layers]
    if not loads:
        raise ValueError("trace has no layers")
    e = max(x.shape[0] for x in loads)
    out = torch.zeros(len(loads), e, dtype=torch.float64)
    for i, x in enumerate(loads):
        out[i, : x.shape[0]] = x
    return out
