"""Running reproductions: a reproduction's arms are trained on every seed (one ``moelab compare``
with ``seeds``, or its own runner per seed), each seed's rows are judged by the claim's paired
intervals (``Reproduction.judge``), and the record goes to ``OUT/NAME/repro.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from moelab.analysis.locality import KEYS as LOCALITY_KEYS
from moelab.repro.claims import REPRODUCTIONS, Reproduction, Rows
from moelab.train.compare import CompareSettings, run_compare
from moelab.train.report import mean_of


def missing_prerequisites(names: list[str]) -> dict[str, str]:
    """``{name: why}`` for the reproductions among ``names`` that cannot run on this machine
    (missing programs or data), checked without training anything."""
    out = {}
    for name in names:
        rep = REPRODUCTIONS[name]
        why = rep.requires() if rep.requires is not None else None
        if why:
            out[name] = why
    return out


def run_rows(run: dict[str, Any]) -> dict[str, float]:
    """One run's numbers; with ``TrainConfig.locality``, also the means over MoE layers of
    ``moelab.analysis.locality.KEYS`` (SRP, SCH, cache hit rates); the routers' own metrics
    (``router_metrics``); with token types, ``val_loss_<type>`` (``val_loss_text``, ...)."""
    row = {
        "val_loss": float(run["val_loss"]),
        "val_loss_se": float(run.get("val_loss_se", float("nan"))),
        "max_over_mean": float(run["max_over_mean"]),
        "drop_rate": float(run["drop_rate"]),
        "entropy": float(run["entropy"]),
        "experts_per_token": float(run.get("experts_per_token", float("nan"))),
        "params": float(run.get("params", float("nan"))),
        "active_params": float(run.get("active_params", float("nan"))),
        "nmi_consecutive": float(run.get("nmi_consecutive", float("nan"))),
        "z": mean_of(run["routing"], "z"),
        "max_abs_logit": mean_of(run["routing"], "max_abs_logit"),
        "flops_per_token": float(run.get("flops_per_token", float("nan"))),
        "eval_flops_per_token": float(run.get("eval_flops_per_token", float("nan"))),
        "steps": float(run.get("step", float("nan"))),
    }
    if run.get("locality"):
        row.update({key: mean_of(run["locality"], key) for key in LOCALITY_KEYS})
    row.update({key: float(v) for key, v in run.get("router_metrics", {}).items()})
    row.update({f"val_loss_{kind}": float(v) for kind, v in run.get("val_loss_by_type", {}).items()})
    return row


def seed_rows(summary: dict[str, Any]) -> list[Rows]:
    """Per seed (in order), each arm's ``run_rows`` from a ``run_compare`` summary."""
    return [
        {label: run_rows(r["seeds"][str(seed)]) for label, r in summary["routers"].items()}
        for seed in summary["seeds"]
    ]


def settings_for(
    rep: Reproduction, *, seeds: list[int], model: dict[str, Any], train: dict[str, Any], out: str
) -> CompareSettings:
    """The ``CompareSettings`` of ``rep``: one labelled arm per variant, trained on every seed."""
    return CompareSettings(
        routers=list(rep.arms),
        variants={label: arm.router for label, arm in rep.arms.items()},
        name=rep.name,
        out=out,
        model={**model, **rep.model},
        model_overrides={label: dict(arm.model) for label, arm in rep.arms.items() if arm.model},
        train={**train, **rep.train, "seed": seeds[0]},
        router_kwargs={label: dict(arm.router_kwargs) for label, arm in rep.arms.items()},
        aux_losses={label: dict(arm.aux_losses) for label, arm in rep.arms.items()},
        save_models=False,
        seeds=list(seeds),
        match_flops=rep.match_flops,
    )


def mean_rows(per_seed: list[Rows]) -> Rows:
    """Each arm's numbers averaged over seeds."""
    return {
        label: {m: sum(p[label][m] for p in per_seed) / len(per_seed) for m in per_seed[0][label]}
        for label in per_seed[0]
    }


def run_repro(
    name: str,
    *,
    seeds: list[int],
    model: dict[str, Any],
    train: dict[str, Any],
    out: str = "runs/repro",
    jobs: int | None = None,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Run every arm of reproduction ``name`` on each seed; judge by paired intervals. Returns a record.

    ``train["threads"]``: intra-op threads per arm (0 or absent: ``DEFAULT_THREADS``). Check
    ``missing_prerequisites`` first: a reproduction whose data is absent fails here otherwise.
    """
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; known: {sorted(REPRODUCTIONS)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    rep = REPRODUCTIONS[name]
    t0 = time.perf_counter()
    if rep.runner is not None:
        per_seed = [
            rep.runner(
                seed=seed,
                model={**model, **rep.model},
                train={**train, **rep.train},
                out=Path(out) / rep.name / f"seed{seed}",
                progress=progress,
                console=console,
            )
            for seed in seeds
        ]
    else:
        s = settings_for(rep, seeds=seeds, model=model, train=train, out=out)
        per_seed = seed_rows(run_compare(s, jobs=jobs, progress=progress, console=console))
    rows = mean_rows(per_seed)
    record = {
        "name": rep.name,
        "method": rep.method,
        "paper": rep.paper,
        "claim": rep.claim,
        **rep.judge(per_seed),
        "measured": rep.describe(rows),
        "seeds": seeds,
        "steps": {**train, **rep.train}.get("steps"),  # a reproduction may fix its own budget
        "arms": {
            label: {
                "router": a.router,
                "router_kwargs": a.router_kwargs,
                "aux_losses": a.aux_losses,
                "model": {**rep.model, **a.model},
            }
            for label, a in rep.arms.items()
        },
        "rows": rows,
        "per_seed": per_seed,
        "wall_time_s": time.perf_counter() - t0,
    }
    path = Path(out) / rep.name / "repro.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=lambda o: None) + "\n")
    return record
