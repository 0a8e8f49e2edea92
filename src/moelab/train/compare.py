"""``moelab compare``: train the same ``MoELM`` with several routers and compare them.

Every router gets the same model shape, the same data (same windows in the same order), the
same step budget and the same seed: with one seed the initial weights are identical too (the
routers of this comparison share one gate shape, ``[E, d]``, drawn at the same point of the
RNG stream). Each router runs with its paper's settings (``moelab.train.settings.PAPER_SETTINGS``,
the same source as ``moelab train``; overridable with ``router_kwargs``/``aux_losses``/
``aux_overrides``): that is the comparison a reader of the papers expects.

An arm whose router is not causal at evaluation (``Router.causal_at_eval`` of the built router:
expert choice, or a capacity limit at eval) is starred in the table: its val loss sees later
tokens' routing.

Outputs, under ``out/<name>/``: ``report.md``, ``results.json``, ``loss_curves.png``,
``expert_load.png`` (``moelab.train.report``) and each router's final model (``<router>/final``,
loadable with ``MoELM.from_pretrained``).
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelab.data import Data, load_data
from moelab.models.config import MoELMConfig
from moelab.train.config import TrainConfig
from moelab.train.progress import RunProgress
from moelab.train.report import json_default, print_table, row_metrics, write_outputs
from moelab.train.resources import available_cores, resolve_threads
from moelab.train.settings import DEFAULT_ROUTERS, PAPER_SETTINGS, arm_settings, describe_arm
from moelab.train.trainer import Trainer, TrainResult

__all__ = [
    "DEFAULT_ROUTERS",
    "PAPER_SETTINGS",
    "CompareSettings",
    "arm_causal_at_eval",
    "print_table",
    "run_compare",
]


@dataclass
class CompareSettings:
    """One comparison: the routers, the shared model shape and the shared training budget."""

    routers: list[str] = field(default_factory=lambda: list(DEFAULT_ROUTERS))  # labels of the arms
    # An arm's label may differ from its router: ``{"no_lb": "topk"}`` trains ``topk`` under the label
    # ``no_lb``, so one router can run in several arms with different kwargs/losses (``moelab repro``).
    variants: dict[str, str] = field(default_factory=dict)
    name: str = "compare"
    out: str = "runs"
    model: dict[str, Any] = field(default_factory=dict)  # MoELMConfig fields shared by all routers
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    router_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per arm, over the paper's
    aux_losses: dict[str, dict[str, float]] = field(default_factory=dict)  # per arm, replaces the paper's
    # Per arm (key "" = every arm): NAME -> coefficient over the arm's losses (0 removes one).
    aux_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    # Per arm, MoELMConfig fields over ``model`` (``moelab repro`` arms that differ in architecture,
    # e.g. shared experts); arms with different shapes no longer share their initial weights.
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    save_models: bool = True


def base_router(label: str, s: CompareSettings) -> str:
    """The registered router an arm trains (its label, unless ``variants`` maps it)."""
    return s.variants.get(label, label)


def router_setup(label: str, s: CompareSettings) -> tuple[dict[str, Any], dict[str, float]]:
    """An arm's router kwargs and auxiliary losses (``moelab.train.settings.arm_settings``)."""
    overrides = {**s.aux_overrides.get("", {}), **s.aux_overrides.get(label, {})}
    return arm_settings(
        base_router(label, s),
        router_kwargs=s.router_kwargs.get(label),
        aux_losses=s.aux_losses.get(label),
        aux_overrides=overrides,
        model_aux_losses=s.model.get("aux_losses"),
    )


def router_configs(label: str, s: CompareSettings, vocab_size: int) -> tuple[MoELMConfig, TrainConfig]:
    kw, aux = router_setup(label, s)
    mcfg = MoELMConfig.from_dict(
        {
            **s.model,
            **s.model_overrides.get(label, {}),
            "router": base_router(label, s),
            "router_kwargs": kw,
            "aux_losses": aux,
            "vocab_size": vocab_size,
        }
    )
    return mcfg, TrainConfig.from_dict(s.train)


def arm_causal_at_eval(label: str, s: CompareSettings) -> bool:
    """``causal_at_eval`` of the router the arm builds (the router is built to ask it, so bad
    router kwargs fail here, before any training)."""
    from moelab.core.router import build_router

    mcfg, _ = router_configs(label, s, 256)
    with torch.random.fork_rng(devices=[]):  # leaves the RNG stream of the runs untouched
        router = build_router(
            mcfg.router,
            d_model=mcfg.d_model,
            num_experts=mcfg.num_experts,
            **{"top_k": mcfg.top_k, **mcfg.router_kwargs},
        )
    return bool(router.causal_at_eval)


def _load(tcfg: TrainConfig) -> Data:
    src = tcfg.data.split(",") if "," in tcfg.data else tcfg.data
    return load_data(src, tcfg.tokenizer, bpe_vocab_size=tcfg.bpe_vocab_size)


def train_one(
    router: str,
    s: CompareSettings,
    data: Data,
    *,
    progress: bool = False,
    console: Any = None,
    callback: Any = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Train ``router``'s model of the comparison; the result as plain data."""
    mcfg, tcfg = router_configs(router, s, data.vocab_size)
    out = Path(s.out) / s.name / router if s.save_models else None
    trainer = Trainer(
        mcfg, tcfg, out, data=data, progress=progress, description=description or router, console=console
    )
    res: TrainResult = trainer.train(callback=callback)
    return {"model_config": mcfg.to_dict(), **res.to_dict(), **row_metrics(res)}


def _worker(router: str, settings: dict[str, Any], queue: Any) -> None:
    """One arm in its own process (``spawn``); reports via ``queue``. Threads: ``TrainConfig.threads``."""
    try:
        s = CompareSettings(**settings)
        data = _load(TrainConfig.from_dict(s.train))
        res = train_one(router, s, data, callback=lambda rep: queue.put(("progress", router, rep)))
        queue.put(("done", router, res))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        queue.put(("error", router, traceback.format_exc()))


def default_jobs(settings: CompareSettings) -> int:
    """Parallel worker processes: one per arm on CPU (each single-threaded), 1 on a GPU.

    At least 3 on CPU even with fewer cores, so the three default arms progress together."""
    if str(settings.train.get("device", "cpu")) != "cpu":
        return 1
    return max(1, min(len(settings.routers), max(available_cores(), 3), 8))


def run_compare(
    settings: CompareSettings,
    *,
    jobs: int | None = None,
    progress: bool = True,
    console: Any = None,
    echo: bool | None = None,
) -> dict[str, Any]:
    """Train one model per arm; write the report, JSON and plots. Returns the results dict.

    ``jobs > 1`` trains the arms in parallel worker processes with ``train["threads"]`` intra-op
    threads each (default 1; the default on CPU): a 2-core machine then runs at full use without the
    thread oversubscription that makes multi-threaded small-matrix PyTorch crawl on a busy machine.
    Throughput is then measured per core (``tok/s/core``), as tokens per second of each worker's
    CPU time, which running side by side or other load on the machine skews far less than
    wall-clock time. ``jobs=1`` trains them one after the other in this process and reports
    wall-clock tokens/s (``tok/s (wall)``). ``echo`` (default: ``progress``) prints each arm's
    effective settings before training.
    """
    if not settings.routers:
        raise ValueError("routers must name at least one router")
    if len(set(settings.routers)) != len(settings.routers):
        raise ValueError(f"routers must be distinct, got {settings.routers}")
    from moelab import registry

    known = registry.names("router")
    unknown = [base_router(r, settings) for r in settings.routers if base_router(r, settings) not in known]
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; registered routers: {known}")
    jobs = default_jobs(settings) if jobs is None else max(1, min(int(jobs), len(settings.routers)))
    tcfg = TrainConfig.from_dict(settings.train)
    causal = {r: arm_causal_at_eval(r, settings) for r in settings.routers}  # bad configs fail here
    display = RunProgress(console, enabled=progress, throughput="tok/s/core" if jobs > 1 else "tok/s (wall)")
    echo = progress if echo is None else echo
    if echo:
        for r in settings.routers:
            kw, aux = router_setup(r, settings)
            display.console.print(
                describe_arm(r, base_router(r, settings), kw, aux, causal[r]),
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
    out_dir = Path(settings.out) / settings.name
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = _load(tcfg)  # also trains and caches a BPE once, before workers look for it
    if echo:
        display.console.print(
            f"set-up: {data.corpus.describe()}, loaded in {time.perf_counter() - t0:.1f} s",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if jobs == 1:
        results = {}
        for i, r in enumerate(settings.routers):
            label = r if len(settings.routers) == 1 else f"{r} ({i + 1}/{len(settings.routers)})"
            results[r] = train_one(
                r, settings, data, progress=progress, console=display.console, description=label
            )
    else:
        results = _run_parallel(settings, jobs, display)
    throughput = "cpu" if jobs > 1 else "wall"
    for r in results.values():
        r["throughput"] = r["tokens_per_cpu_s"] if throughput == "cpu" else r["tokens_per_s"]
    summary = {
        "name": settings.name,
        "settings": asdict(settings),
        "train_config": asdict(tcfg),
        "jobs": jobs,
        "throughput_measure": throughput,
        "data": data.corpus.describe(),
        "tokenizer": getattr(data.tokenizer, "name", "bytes"),
        "train_tokens": int(len(data.train_tokens)),
        "val_tokens": int(len(data.val_tokens)),
        "wall_time_s": time.perf_counter() - t0,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "threads": next(iter(results.values()))["threads"] if results else resolve_threads(tcfg.threads),
            "machine": platform.machine(),
        },
        "routers": {r: results[r] for r in settings.routers},
    }
    write_outputs(summary, out_dir)
    summary["wall_time_s"] = time.perf_counter() - t0
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=json_default) + "\n")
    return summary


def _run_parallel(settings: CompareSettings, jobs: int, display: RunProgress) -> dict[str, Any]:
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pending = list(settings.routers)
    running: dict[str, Any] = {}
    results: dict[str, Any] = {}
    steps = int(settings.train.get("steps", TrainConfig().steps))
    sd = asdict(settings)
    sd["train"] = {**sd["train"], "threads": resolve_threads(sd["train"].get("threads", 0))}
    try:
        with display:
            while pending or running:
                while pending and len(running) < jobs:
                    r = pending.pop(0)
                    p = ctx.Process(target=_worker, args=(r, sd, q), daemon=True)
                    p.start()
                    running[r] = p
                    display.add(r, steps)
                try:
                    kind, r, payload = q.get(timeout=1.0)
                except queue_mod.Empty:
                    dead = [r for r, p in running.items() if not p.is_alive() and p.exitcode not in (0, None)]
                    if dead:
                        code = running[dead[0]].exitcode
                        raise RuntimeError(
                            f"compare worker for {dead[0]!r} died (exit code {code})"
                        ) from None
                    continue
                if kind == "progress":
                    # one core per worker: its CPU-time throughput is the comparable number
                    display.update(r, {**payload, "tokens_per_s": payload.get("tokens_per_cpu_s")})
                elif kind == "done":
                    results[r] = payload
                    running.pop(r).join()
                    display.finish(r, payload["val_loss"])
                else:
                    raise RuntimeError(f"compare worker for {r!r} failed:\n{payload}")
    finally:
        for p in running.values():
            p.terminate()
            p.join()
    return results
