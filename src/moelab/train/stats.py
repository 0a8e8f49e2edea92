"""Statistics of a comparison over seeds: each arm's mean +- interval per metric, its paired
difference from the baseline arm, and the evaluation noise (``moelab compare --seeds``).

Works on plain data: ``runs[label][seed]`` is one training run's result (``TrainResult.to_dict``
plus ``row_metrics``). The method is ``moelab.analysis.intervals``' t-interval over seeds (of the
paired differences for ``diff``); the arms of one seed share their initial weights and data order,
so their differences are paired.
"""

from __future__ import annotations

import math
from typing import Any

from moelab.analysis.intervals import (
    CONFIDENCE,
    TIE,
    difference_label,
    paired_differences,
    paired_interval,
    standard_error,
    student_t_ppf,
    t_interval,
)

# metric -> lower is better (True), higher is better (False), no direction (None)
METRICS: dict[str, bool | None] = {
    "val_loss": True,
    "val_ppl": True,
    "throughput": False,
    "max_over_mean": None,
    "worst_layer_max_over_mean": None,
    "drop_rate": None,
    "no_expert_rate": None,
    "entropy": None,
    "experts_per_token": None,
    "nmi_consecutive": None,
    "train_drop_rate": None,
    "flops_per_token": None,
    "eval_flops_per_token": None,
}


def _values(runs: dict[int, dict[str, Any]], seeds: list[int], metric: str) -> list[float] | None:
    vals = [runs[s].get(metric) for s in seeds]
    if any(v is None or not math.isfinite(float(v)) for v in vals):
        return None
    return [float(v) for v in vals]


def arm_statistics(
    runs: dict[str, dict[int, dict[str, Any]]],
    seeds: list[int],
    baseline: str,
    confidence: float = CONFIDENCE,
) -> dict[str, dict[str, Any]]:
    """Per arm: ``stats[metric]`` (mean and t-interval over seeds) and, for every arm but the
    baseline, ``diff[metric]`` (the paired interval of ``arm - baseline``, with its reading:
    ``tie``, ``better``/``worse`` or ``lower``/``higher``). Metrics missing or not finite on some
    seed are left out."""
    if baseline not in runs:
        raise ValueError(f"baseline must be one of the arms {list(runs)}, got {baseline!r}")
    out: dict[str, dict[str, Any]] = {}
    for label, by_seed in runs.items():
        stats, diff = {}, {}
        for metric, lower_better in METRICS.items():
            vals = _values(by_seed, seeds, metric)
            if vals is None:
                continue
            stats[metric] = t_interval(vals, confidence).to_dict()
            base = _values(runs[baseline], seeds, metric)
            if label != baseline and base is not None:
                d = paired_interval(vals, base, confidence)
                reading = difference_label(d, lower_better) if d.defined else None
                diff[metric] = {**d.to_dict(), "reading": reading}
        out[label] = {"stats": stats, "diff": diff}
    return out


def eval_noise(runs: dict[str, dict[int, dict[str, Any]]], seeds: list[int], baseline: str) -> dict[str, Any]:
    """How much of a val-loss number is evaluation noise (the finite set of val windows):

    - ``val_loss_se``: mean over runs of one run's standard error over its windows;
    - ``paired_se[label]``: mean over seeds of the standard error of ``arm - baseline`` computed
      window by window (the same windows for both), the eval noise of a paired difference;
    - ``windows``: val windows per evaluation.
    Empty when the runs did not record window losses."""
    ses = [r.get("val_loss_se") for by_seed in runs.values() for r in by_seed.values()]
    ses = [float(x) for x in ses if x is not None and math.isfinite(float(x))]
    if not ses:
        return {}
    windows = len(next(iter(runs[baseline].values())).get("val_window_losses") or [])
    paired: dict[str, float] = {}
    for label, by_seed in runs.items():
        if label == baseline:
            continue
        per_seed = []
        for s in seeds:
            a, b = by_seed[s].get("val_window_losses"), runs[baseline][s].get("val_window_losses")
            if a and b and len(a) == len(b):
                per_seed.append(standard_error(paired_differences(a, b)))
        if per_seed:
            paired[label] = sum(per_seed) / len(per_seed)
    return {"windows": windows, "val_loss_se": sum(ses) / len(ses), "paired_se": paired}


def interval_method(n_seeds: int, confidence: float = CONFIDENCE) -> str:
    """One sentence naming the method, for tables and reports."""
    if n_seeds < 2:
        return "one seed: no interval (a difference cannot be told from noise; run --seeds 0,1,2)"
    t = student_t_ppf(0.5 + confidence / 2.0, n_seeds - 1)
    return (
        f"{100 * confidence:.0f}% t-interval over {n_seeds} seeds (t = {t:.2f}, {n_seeds - 1} df); "
        f"differences are paired by seed (same init and data order), and one whose interval holds 0 "
        f"is a {TIE}"
    )
