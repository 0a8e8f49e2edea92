"""Router evaluation metrics: RouteLLM's sweep, AUC, APGR and CPT; the oracle curves; RouterBench's
AIQ; PGR. Pure functions on numpy arrays, torch-free.

Definitions follow RouteLLM ``routellm/evals/evaluate.py`` and ``benchmarks.py`` (Ong et al. 2024,
arXiv 2406.18665) as written down in the data's README (``moelab/gateway/data/README.md``), and
RouterBench ``evaluation/AIQ.py`` (Hu et al. 2024, arXiv 2403.12031):

- sweep: thresholds are the 11 edges of the 10-quantile split of the router's strong-win scores
  (duplicate edges dropped, as ``pd.qcut(..., duplicates="drop")``); at each edge ``t`` a prompt goes
  strong when ``score >= t``, at the last edge when ``score > t``; one point per edge:
  ``x`` = % of prompts sent strong, ``y`` = mean quality of the routed answers;
- ``AUC`` = trapezoid of ``y`` over ``x / 100``; ``APGR = (AUC - AUC_weak) / (AUC_strong - AUC_weak)``;
- ``CPT(p)`` = the % strong calls at which the curve reaches ``w + p (s - w)`` (RouteLLM:
  ``np.interp`` with quality as the x-axis, which assumes a rising curve; here: undefined, with the
  reason, when the curve meets that level more than once);
- ``AIQ`` = area under the non-decreasing convex hull of (cost, quality) points over a cost range,
  divided by the range's width.

Quality units are the table's (0/1 correctness averaged: a fraction, not a percent; MT-Bench: the
1-10 judge score); APGR, PGR and CPT are unit-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CPT_LEVELS = (0.2, 0.5, 0.8)  # RouteLLM's "20% qual", "50% qual", "80% qual"


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """The trapezoid rule (``np.trapezoid`` is numpy >= 2 only)."""
    y, x = np.asarray(y, dtype=np.float64), np.asarray(x, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _vector(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def _pair(weak: object, strong: object, scores: object | None = None) -> tuple[np.ndarray, ...]:
    w, s = _vector(weak, "weak"), _vector(strong, "strong")
    if w.shape != s.shape:
        raise ValueError(f"weak and strong must have the same length, got {w.size} and {s.size}")
    if scores is None:
        return w, s
    sc = _vector(scores, "scores")
    if sc.shape != w.shape:
        raise ValueError(f"scores must have one entry per prompt ({w.size}), got {sc.size}")
    return w, s, sc


@dataclass(frozen=True)
class Curve:
    """Sweep points sorted by ``x``: ``x`` [K] % of prompts sent to the strong model (0-100),
    ``y`` [K] mean quality of the routed answers, ``thresholds`` [K] (NaN where not a threshold)."""

    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray

    def points(self) -> list[tuple[float, float]]:
        return [(float(a), float(b)) for a, b in zip(self.x, self.y, strict=True)]


def _sorted_curve(x: Sequence[float], y: Sequence[float], t: Sequence[float] | None = None) -> Curve:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    t = np.full_like(x, np.nan) if t is None else np.asarray(t, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    return Curve(x[order], y[order], t[order])


def sweep_thresholds(scores: np.ndarray, num_results: int = 10) -> np.ndarray:
    """The unique bin edges of the ``num_results``-quantile split of ``scores`` (RouteLLM:
    ``pd.qcut(scores, num_results, retbins=True, duplicates="drop")``, linear interpolation)."""
    if isinstance(num_results, bool) or not isinstance(num_results, int) or num_results < 1:
        raise ValueError(f"num_results must be an int >= 1, got {num_results!r}")
    edges = np.quantile(_vector(scores, "scores"), np.linspace(0.0, 1.0, num_results + 1))
    return np.unique(edges)


def router_sweep(scores: object, weak: object, strong: object, num_results: int = 10) -> Curve:
    """RouteLLM's threshold sweep of one router.

    Args:
        scores: ``[N]`` strong-win scores (higher: more likely sent strong).
        weak, strong: ``[N]`` quality of the weak / strong model's answer to each prompt.
        num_results: quantile bins (RouteLLM ``num_results=10``: 11 edges).
    Returns:
        the ``Curve`` (one point per unique edge, sorted by % strong calls).
    """
    w, s, sc = _pair(weak, strong, scores)
    edges = sweep_thresholds(sc, num_results)
    xs, ys = [], []
    for i, t in enumerate(edges):
        to_strong = sc > t if i == len(edges) - 1 else sc >= t  # the last edge sends none strong
        xs.append(100.0 * to_strong.mean())
        ys.append(float(np.where(to_strong, s, w).mean()))
    return _sorted_curve(xs, ys, edges)


def random_sweep(
    weak: object, strong: object, iters: int = 10, seed: int = 0, num_results: int = 10
) -> Curve:
    """RouteLLM's ``random`` router: uniform(0, 1) scores, the sweep repeated ``iters`` times
    (``random_iters=10``), ``y`` averaged over runs at each ``x``."""
    w, s = _pair(weak, strong)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    rng = np.random.default_rng(seed)
    sums: dict[float, list[float]] = {}
    for _ in range(iters):
        c = router_sweep(rng.uniform(0.0, 1.0, w.size), w, s, num_results)
        for x, y in zip(c.x, c.y, strict=True):
            sums.setdefault(round(float(x), 9), []).append(float(y))
    xs = sorted(sums)
    return _sorted_curve(xs, [float(np.mean(sums[x])) for x in xs])


def auc(curve: Curve) -> float:
    """Trapezoid area under ``y`` over ``x / 100`` (points sorted by ``x``)."""
    return float(_trapezoid(curve.y, curve.x / 100.0))


def apgr(curve: Curve, weak_quality: float, strong_quality: float) -> float:
    """``(AUC - AUC_weak) / (AUC_strong - AUC_weak)``: the constant lines ``y = w`` and ``y = s``
    integrated over the curve's own ``x``-range (RouteLLM ``evaluate.py``)."""
    width = (curve.x[-1] - curve.x[0]) / 100.0
    if width <= 0:
        raise ValueError("the curve spans no range of strong calls: APGR is undefined")
    if strong_quality == weak_quality:
        raise ValueError("strong and weak quality are equal: APGR is undefined")
    a_weak, a_strong = weak_quality * width, strong_quality * width
    return (auc(curve) - a_weak) / (a_strong - a_weak)


def pgr(quality: float, weak_quality: float, strong_quality: float) -> float:
    """Performance gap recovered, ``(q - w) / (s - w)``."""
    if strong_quality == weak_quality:
        raise ValueError("strong and weak quality are equal: PGR is undefined")
    return (quality - weak_quality) / (strong_quality - weak_quality)


@dataclass(frozen=True)
class CPT:
    """``CPT(p)``: ``value`` (% strong calls) or None with ``reason``.

    ``first_reached``: the smallest % strong calls at which the piecewise-linear curve reaches the
    level (the survey's "minimum strong-call % to reach p PGR"), given even when ``value`` is
    undefined; ``np_interp``: what RouteLLM's ``np.interp`` returns on these points (a number even
    when meaningless; for comparison only).
    """

    p: float
    level: float
    value: float | None
    reason: str | None
    first_reached: float | None
    np_interp: float

    def __str__(self) -> str:
        return f"{self.value:.1f}%" if self.value is not None else f"undefined ({self.reason})"


def _level_crossings(x: np.ndarray, y: np.ndarray, level: float) -> tuple[list[float], bool]:
    """The ``x`` where the piecewise-linear curve through (x, y) equals ``level``; True when it is
    flat at ``level`` along a segment (infinitely many solutions)."""
    d = y - level
    hits: list[float] = []
    flat = False
    for i in range(len(x)):
        if d[i] == 0.0:
            hits.append(float(x[i]))
        if i + 1 < len(x):
            if d[i] == 0.0 and d[i + 1] == 0.0 and x[i + 1] > x[i]:
                flat = True
            elif d[i] * d[i + 1] < 0.0:
                hits.append(float(x[i] + (x[i + 1] - x[i]) * d[i] / (d[i] - d[i + 1])))
    return sorted(set(hits)), flat


def cpt(curve: Curve, weak_quality: float, strong_quality: float, p: float) -> CPT:
    """RouteLLM's call-performance threshold at ``p`` (0 < p < 1).

    The level is ``w + p (s - w)``. RouteLLM computes ``np.interp(level, y, x)``, which is only
    meaningful when ``y`` rises with ``x`` where the level is met. Here the value is the unique
    ``x`` where the curve meets the level (it then equals ``np.interp`` on a rising curve);
    when the curve meets it more than once, or runs flat at it, or never reaches it, the value
    is None and ``reason`` says why.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    level = weak_quality + p * (strong_quality - weak_quality)
    x, y = curve.x, curve.y
    keep = np.concatenate([[True], np.diff(x) > 0])  # a repeated x is the same routing (nested sets)
    x, y = x[keep], y[keep]
    hits, flat = _level_crossings(x, y, level)
    interp = float(np.interp(level, y, x))
    first = hits[0] if hits else None
    if flat:
        return CPT(p, level, None, "the curve is flat at the target quality", first, interp)
    if not hits:
        return CPT(p, level, None, "the curve never reaches the target quality", None, interp)
    if len(hits) > 1:
        where = ", ".join(f"{h:.1f}%" for h in hits)
        reason = f"non-monotone: the curve meets the target quality {len(hits)} times (at {where})"
        return CPT(p, level, None, reason, first, interp)
    return CPT(p, level, hits[0], None, first, interp)


def oracle_curve(weak: object, strong: object, steps: int = 10) -> Curve:
    """RouteLLM's ``get_optimal_accuracy`` for 0/1 correctness: with a strong-call budget ``f``
    (``x = 100 f``, ``f = 0, 1/steps, ..., 1``), quality ``= (#weak correct + min(f N, #{weak
    wrong, strong right})) / N``: strong calls go only where they fix a weak failure."""
    w, s = _pair(weak, strong)
    if not (np.isin(w, (0.0, 1.0)).all() and np.isin(s, (0.0, 1.0)).all()):
        raise ValueError("oracle_curve needs 0/1 correctness; use oracle_curve_scores for graded scores")
    n = w.size
    fixable = float(np.sum((w == 0) & (s == 1)))
    fs = np.linspace(0.0, 1.0, steps + 1)
    ys = [(w.sum() + min(f * n, fixable)) / n for f in fs]
    return _sorted_curve(100.0 * fs, ys)


def oracle_curve_scores(weak: object, strong: object, steps: int = 10) -> Curve:
    """RouteLLM's MT-Bench oracle: sort prompts by ``strong - weak`` (descending), send the top
    ``floor(f N)`` to strong, only those with a positive gap, and average."""
    w, s = _pair(weak, strong)
    n = w.size
    gap = s - w
    order = np.argsort(-gap, kind="stable")
    fs = np.linspace(0.0, 1.0, steps + 1)
    ys = []
    for f in fs:
        top = order[: int(np.floor(f * n + 1e-9))]
        top = top[gap[top] > 0]
        routed = w.copy()
        routed[top] = s[top]
        ys.append(float(routed.mean()))
    return _sorted_curve(100.0 * fs, ys)


def nondecreasing_hull(costs: object, qualities: object) -> np.ndarray:
    """RouterBench's non-decreasing convex hull of (cost, quality) points: ``[K, 2]`` vertices
    sorted by cost. Between vertices the frontier is linear (mixing two routers at random); past
    the best vertex it stays flat (spending more is never forced)."""
    c, q = _vector(costs, "costs"), _vector(qualities, "qualities")
    if c.shape != q.shape:
        raise ValueError(f"costs and qualities must have the same length, got {c.size} and {q.size}")
    pts = sorted(zip(c.tolist(), q.tolist(), strict=True), key=lambda t: (t[0], -t[1]))
    upper: list[tuple[float, float]] = []  # upper hull, left to right (monotone chain)
    for px, py in pts:
        if upper and upper[-1][0] == px:
            continue  # same cost: the first one seen has the best quality
        while len(upper) >= 2:
            (ax, ay), (bx, by) = upper[-2], upper[-1]
            if (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0:  # b lies on or below a-p
                upper.pop()
            else:
                break
        upper.append((px, py))
    best = max(range(len(upper)), key=lambda i: (upper[i][1], -i))
    return np.asarray(upper[: best + 1], dtype=np.float64)


def aiq(costs: object, qualities: object, cost_range: tuple[float, float] | None = None) -> float:
    """RouterBench's AIQ: ``(1 / (c_max - c_min)) * integral over [c_min, c_max]`` of the
    non-decreasing convex hull of the points.

    ``cost_range`` defaults to the points' own (min, max) cost; pass a common range to compare
    routers. Below the cheapest point nothing is attainable (quality 0 there, as RouterBench's
    code, which integrates from the cheapest point); past the best hull vertex the frontier is flat.
    """
    hull = nondecreasing_hull(costs, qualities)
    lo, hi = (float(hull[0, 0]), float(np.max(_vector(costs, "costs")))) if cost_range is None else cost_range
    if not hi > lo:
        raise ValueError(f"cost_range must have max > min, got ({lo}, {hi}): AIQ needs a cost range")
    start = max(lo, float(hull[0, 0]))  # below the cheapest point the frontier is 0 (a step, not a ramp)
    if start >= hi:
        return 0.0
    xs = np.unique(np.clip(np.concatenate([[start], hull[:, 0], [hi]]), start, hi))
    ys = np.array([_frontier(hull, x) for x in xs])
    return float(_trapezoid(ys, xs) / (hi - lo))


def _frontier(hull: np.ndarray, c: float) -> float:
    if c < hull[0, 0]:
        return 0.0
    if c >= hull[-1, 0]:
        return float(hull[-1, 1])
    return float(np.interp(c, hull[:, 0], hull[:, 1]))


def oracle_multi(quality: np.ndarray, cost: np.ndarray) -> tuple[float, float]:
    """The per-query oracle over ``M`` models: (mean best quality, mean cost), choosing for each
    prompt the cheapest model among those with the best quality. ``quality`` [N, M], ``cost`` [M]."""
    q = np.asarray(quality, dtype=np.float64)
    c = _vector(cost, "cost")
    if q.ndim != 2 or q.shape[1] != c.size:
        raise ValueError(f"quality must be [N, M={c.size}], got {q.shape}")
    best = q.max(axis=1, keepdims=True)
    masked = np.where(q == best, c[None, :], np.inf)
    pick = np.argmin(masked, axis=1)
    return float(best.mean()), float(c[pick].mean())
