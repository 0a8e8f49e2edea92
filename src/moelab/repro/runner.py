"""Running reproductions: each seed of a reproduction is a small ``moelab compare`` (or its own
runner), the rows are averaged over seeds and judged, and the record goes to ``OUT/NAME/repro.json``.
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


METRICS = ("val_loss", "max_over_mean", "drop_rate", "entropy", "z", "max_abs_logit")


def _arm_rows(summary: dict[str, Any]) -> Rows:
    """Each arm's numbers; with ``TrainConfig.locality``, also the means over MoE layers of
    ``moelab.analysis.locality.KEYS`` (SRP, SCH, cache hit rates)."""
    rows = {}
    for label, r in summary["routers"].items():
        rows[label] = {
            "val_loss": float(r["val_loss"]),
            "max_over_mean": float(r["max_over_mean"]),
            "drop_rate": float(r["drop_rate"]),
            "entropy": float(r["entropy"]),
            "z": mean_of(r["routing"], "z"),
            "max_abs_logit": mean_of(r["routing"], "max_abs_logit"),
        }
        if r.get("locality"):
            rows[label].update({key: mean_of(r["locality"], key) for key in LOCALITY_KEYS})
    return rows


def settings_for(
    rep: Reproduction, *, seed: int, model: dict[str, Any], train: dict[str, Any], out: str
) -> CompareSettings:
    """The ``CompareSettings`` of one seed of ``rep``: one labelled arm per variant."""
    return CompareSettings(
        routers=list(rep.arms),
        variants={label: arm.router for label, arm in rep.arms.items()},
        name=f"{rep.name}/seed{seed}",
        out=out,
        model={**model, **rep.model},
        model_overrides={label: dict(arm.model) for label, arm in rep.arms.items() if arm.model},
        train={**train, **rep.train, "seed": seed},
        router_kwargs={label: dict(arm.router_kwargs) for label, arm in rep.arms.items()},
        aux_losses={label: dict(arm.aux_losses) for label, arm in rep.arms.items()},
        save_models=False,
    )


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
    """Run every arm of reproduction ``name`` for each seed; average; judge. Returns a record.

    ``train["threads"]``: intra-op threads per arm (0 or absent: ``DEFAULT_THREADS``). Check
    ``missing_prerequisites`` first: a reproduction whose data is absent fails here otherwise.
    """
    if name not in REPRODUCTIONS:
        raise ValueError(f"unknown reproduction {name!r}; known: {sorted(REPRODUCTIONS)}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    rep = REPRODUCTIONS[name]
    t0 = time.perf_counter()
    per_seed = []
    for seed in seeds:
        if rep.runner is not None:
            arm_out = Path(out) / rep.name / f"seed{seed}"
            per_seed.append(
                rep.runner(
                    seed=seed,
                    model={**model, **rep.model},
                    train={**train, **rep.train},
                    out=arm_out,
                    progress=progress,
                    console=console,
                )
            )
            continue
        s = settings_for(rep, seed=seed, model=model, train=train, out=out)
        per_seed.append(_arm_rows(run_compare(s, jobs=jobs, progress=progress, console=console)))
    rows = {
        label: {m: sum(p[label][m] for p in per_seed) / len(per_seed) for m in per_seed[0][label]}
        for label in rep.arms
    }
    holds, measured = rep.verdict(rows)
    seed_holds = [rep.verdict(p)[0] for p in per_seed]
    record = {
        "name": rep.name,
        "method": rep.method,
        "paper": rep.paper,
        "claim": rep.claim,
        "holds": holds and all(seed_holds),  # on the seed mean and on every seed
        "seed_holds": seed_holds,
        "measured": measured,
        "seeds": seeds,
        "steps": train.get("steps"),
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
