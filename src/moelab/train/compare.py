"""``moelab compare``: train the same ``MoELM`` with several routers and compare them.

Every router gets the same model shape, the same data (same windows in the same order), the
same step budget, and is trained once per seed (``seeds``). On one seed every arm starts from the
same initial weights (the routers of this comparison share one gate shape, ``[E, d]``, drawn at
the same point of the RNG stream) and reads the same batches, so the arms' numbers on a seed are
paired: the table gives each metric's mean with a t-interval over seeds, and each arm's paired
difference from the baseline arm with its interval (``moelab.train.stats``); a difference whose
interval holds 0 is a tie. Each router runs with its paper's settings (``moelab.train.settings.PAPER_SETTINGS``,
the same source as ``moelab train``; overridable with ``router_kwargs``/``aux_losses``/
``aux_overrides``): that is the comparison a reader of the papers expects.

An arm whose router is not causal at evaluation (``Router.causal_at_eval`` of the built router:
expert choice, or a capacity limit at eval) is starred in the table: its val loss sees later
tokens' routing.

Outputs, under ``out/<name>/``: ``report.md``, ``results.json`` (every per-seed number, window
losses included, so any statistic can be recomputed), ``loss_curves.png`` (a band over seeds),
``expert_load.png`` (seed 0's) (``moelab.train.report``) and each run's final model
(``<arm>/seed<k>/final``, loadable with ``MoELM.from_pretrained``).
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
from moelab.data.mixed import is_mixed_source
from moelab.models.config import MoELMConfig
from moelab.train.config import TrainConfig
from moelab.train.progress import RunProgress
from moelab.train.report import json_default, mean_of, print_table, row_metrics, write_outputs
from moelab.train.resources import available_cores, cpu_model, resolve_threads
from moelab.train.settings import DEFAULT_ROUTERS, PAPER_SETTINGS, arm_settings, describe_arm
from moelab.train.stats import arm_statistics, eval_noise
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
    # Every arm trains once per seed (``train["seed"]`` is replaced); default: ``[train["seed"]]``.
    seeds: list[int] | None = None
    baseline: str | None = None  # the arm differences are taken from (default: the first)
    # Per arm, TrainConfig fields over ``train`` (``match_flops`` sets each arm's ``steps``).
    train_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Scale each arm's steps so that every arm spends the baseline arm's training FLOPs
    # (forward FLOPs per token of one training forward x tokens; ``moelab.core.flops``).
    match_flops: bool = False

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds else [int(self.train.get("seed", 0))]

    def baseline_arm(self) -> str:
        return self.baseline if self.baseline is not None else self.routers[0]


def base_router(label: str, s: CompareSettings) -> str:
    """The registered router an arm trains (its label, unless ``variants`` maps it)."""
    return s.variants.get(label, label)


def is_depth_arm(label: str, s: CompareSettings) -> bool:
    """Whether the arm trains a depth router (``moelab list depth``) rather than an expert router."""
    from moelab import registry

    return base_router(label, s) in registry.names("depth")


def expert_router(label: str, s: CompareSettings) -> str:
    """The expert router of the arm's MoE layers: the arm's router, or for a depth arm the model's."""
    if is_depth_arm(label, s):
        return str({**s.model, **s.model_overrides.get(label, {})}.get("router", "topk"))
    return base_router(label, s)


def router_setup(label: str, s: CompareSettings) -> tuple[dict[str, Any], dict[str, float]]:
    """An arm's router kwargs and auxiliary losses (``moelab.train.settings.arm_settings``). For a
    depth arm the kwargs are the depth router's (its paper settings, then the arm's) and the
    losses those of the MoE layers' router."""
    overrides = {**s.aux_overrides.get("", {}), **s.aux_overrides.get(label, {})}
    depth = is_depth_arm(label, s)
    kw, aux = arm_settings(
        expert_router(label, s),
        router_kwargs=None if depth else s.router_kwargs.get(label),
        aux_losses=s.aux_losses.get(label),
        aux_overrides=overrides,
        model_aux_losses=s.model.get("aux_losses"),
    )
    if depth:
        paper = PAPER_SETTINGS.get(base_router(label, s), {}).get("router_kwargs", {})
        kw = {**paper, **(s.router_kwargs.get(label) or {})}
    return kw, aux


def router_configs(
    label: str, s: CompareSettings, vocab_size: int, seed: int | None = None
) -> tuple[MoELMConfig, TrainConfig]:
    kw, aux = router_setup(label, s)
    fields_ = {**s.model, **s.model_overrides.get(label, {}), "aux_losses": aux, "vocab_size": vocab_size}
    if is_depth_arm(label, s):
        expert_kw, _ = arm_settings(expert_router(label, s))
        fields_.update(
            router=expert_router(label, s),
            router_kwargs={**expert_kw, **fields_.get("router_kwargs", {})},
            depth=base_router(label, s),
            depth_kwargs=kw,
        )
    else:
        fields_.update(router=base_router(label, s), router_kwargs=kw)
    mcfg = MoELMConfig.from_dict(fields_)
    train = {**s.train, **s.train_overrides.get(label, {})}
    if seed is not None:
        train["seed"] = int(seed)
    return mcfg, TrainConfig.from_dict(train)


def arm_flops_per_token(label: str, s: CompareSettings, vocab_size: int) -> float:
    """Forward FLOPs per token of one training forward of the arm's model on a batch of the
    comparison's shape (``MoELM.flops_per_token``; built and run under a forked RNG, so the runs'
    random streams are untouched)."""
    from moelab.models.lm import MoELM

    mcfg, tcfg = router_configs(label, s, vocab_size)
    with torch.random.fork_rng(devices=[]):
        model = MoELM(mcfg).train()
        ids = torch.randint(0, vocab_size, (tcfg.batch_size, tcfg.seq_len))
        with torch.no_grad():
            model(ids)
        return model.flops_per_token()


def match_flops_steps(s: CompareSettings, vocab_size: int) -> dict[str, dict[str, float]]:
    """Each arm's steps for equal training FLOPs: ``round(steps x F_baseline / F_arm)``, with F the
    forward FLOPs per token (training costs about 3F per token for every arm alike). Returns
    ``{label: {"flops_per_token": F, "steps": n}}`` and sets ``s.train_overrides``."""
    flops = {label: arm_flops_per_token(label, s, vocab_size) for label in s.routers}
    base = flops[s.baseline_arm()]
    steps = int(s.train.get("steps", TrainConfig().steps))
    out = {}
    for label, f in flops.items():
        n = max(1, round(steps * base / f))
        over = s.train_overrides.setdefault(label, {})
        over["steps"] = n
        over["warmup_steps"] = min(int(s.train.get("warmup_steps", 0)), n)
        out[label] = {"flops_per_token": f, "steps": n}
    return out


def arm_causal_at_eval(label: str, s: CompareSettings) -> bool:
    """``causal_at_eval`` of the router the arm builds (the router is built to ask it, so bad
    router kwargs fail here, before any training, and so does a router that needs token types on
    data without them)."""
    from moelab import registry
    from moelab.core.router import build_router
    from moelab.models.lm import routed_ffn

    mcfg, _ = router_configs(label, s, 256)
    if mcfg.depth is not None:  # a depth arm: its depth router and its MoE routers answer
        from moelab.models.lm import MoELM
        from moelab.train.monitor import causal_at_eval

        with torch.random.fork_rng(devices=[]):
            return causal_at_eval(MoELM(mcfg))
    with torch.random.fork_rng(devices=[]):  # leaves the RNG stream of the runs untouched
        if mcfg.router != "moe" and mcfg.router in registry.names("layer"):
            router = routed_ffn(mcfg).router  # a routed layer (Soft MoE): its router answers
        else:
            router = build_router(
                mcfg.router,
                d_model=mcfg.d_model,
                num_experts=mcfg.num_experts,
                **{"top_k": mcfg.top_k, **mcfg.router_kwargs},
            )
    if getattr(router, "needs_token_types", False) and not is_mixed_source(s.train.get("data", "stdlib")):
        raise ValueError(
            f"arm {label!r}: router {mcfg.router!r} routes by token type; train it on data with token "
            "types (--data mixed)"
        )
    return bool(router.causal_at_eval)


def _load(tcfg: TrainConfig) -> Data:
    src = tcfg.data.split(",") if "," in tcfg.data else tcfg.data
    return load_data(src, tcfg.tokenizer, bpe_vocab_size=tcfg.bpe_vocab_size)


def run_dir(label: str, seed: int, s: CompareSettings) -> Path:
    """Where run ``(label, seed)`` keeps its model: ``out/name/<label>/seed<k>``."""
    return Path(s.out) / s.name / label / f"seed{seed}"


def train_one(
    router: str,
    s: CompareSettings,
    data: Data,
    *,
    seed: int | None = None,
    progress: bool = False,
    console: Any = None,
    callback: Any = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Train arm ``router`` of the comparison on ``seed`` (default: ``train["seed"]``); the result
    as plain data."""
    seed = s.seed_list()[0] if seed is None else int(seed)
    mcfg, tcfg = router_configs(router, s, data.vocab_size, seed)
    out = run_dir(router, seed, s) if s.save_models else None
    trainer = Trainer(
        mcfg, tcfg, out, data=data, progress=progress, description=description or router, console=console
    )
    res: TrainResult = trainer.train(callback=callback)
    return {"seed": seed, "model_config": mcfg.to_dict(), **res.to_dict(), **row_metrics(res)}


def unit_name(label: str, seed: int, s: CompareSettings) -> str:
    """The progress label of run ``(label, seed)``: the arm, with its seed when there are several."""
    return label if len(s.seed_list()) == 1 else f"{label} s{seed}"


def _worker(settings: dict[str, Any], tasks: Any, queue: Any) -> None:
    """A worker process (``spawn``): trains the runs ``(label, seed)`` it takes from ``tasks`` until
    ``None``, reporting via ``queue``; one process serves several runs, so the import and the data
    loading are paid once per worker. Threads: ``TrainConfig.threads``."""
    s = CompareSettings(**settings)
    data = None
    while (unit := tasks.get()) is not None:
        key = tuple(unit)
        try:
            queue.put(("start", key, None))
            data = data if data is not None else _load(TrainConfig.from_dict(s.train))
            res = train_one(
                key[0], s, data, seed=key[1], callback=lambda rep, key=key: queue.put(("progress", key, rep))
            )
            queue.put(("done", key, res))
        except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
            queue.put(("error", key, traceback.format_exc()))
            return


def default_jobs(settings: CompareSettings) -> int:
    """Parallel worker processes: one per run (arm x seed) on CPU, each single-threaded, up to
    the cores; 1 on a GPU.

    At least 3 on CPU even with fewer cores, so the three default arms progress together."""
    if str(settings.train.get("device", "cpu")) != "cpu":
        return 1
    runs = len(settings.routers) * len(settings.seed_list())
    return max(1, min(runs, max(available_cores(), 3), 8))


def check_settings(settings: CompareSettings) -> None:
    """Names, seeds and the baseline, checked before anything trains."""
    if not settings.routers:
        raise ValueError("routers must name at least one router")
    if len(set(settings.routers)) != len(settings.routers):
        raise ValueError(f"routers must be distinct, got {settings.routers}")
    from moelab import registry

    known = (
        registry.names("router")
        + [n for n in registry.names("layer") if n != "moe"]
        + registry.names("depth")
    )
    unknown = [base_router(r, settings) for r in settings.routers if base_router(r, settings) not in known]
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; registered routers: {known}")
    seeds = settings.seed_list()
    if any(isinstance(x, bool) or not isinstance(x, int) for x in seeds):
        raise TypeError(f"seeds must be integers, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if settings.baseline is not None and settings.baseline not in settings.routers:
        raise ValueError(f"baseline must be one of the arms {settings.routers}, got {settings.baseline!r}")


def run_compare(
    settings: CompareSettings,
    *,
    jobs: int | None = None,
    progress: bool = True,
    console: Any = None,
    echo: bool | None = None,
) -> dict[str, Any]:
    """Train one model per arm and seed; write the report, JSON and plots. Returns the results dict.

    ``jobs > 1`` trains the runs (arm x seed) in parallel worker processes with ``train["threads"]``
    intra-op threads each (default 1; the default on CPU): a 2-core machine then runs at full use
    without the thread oversubscription that makes multi-threaded small-matrix PyTorch crawl on a
    busy machine. Throughput is then measured per core (``tok/s/core``), as tokens per second of
    each worker's CPU time, which running side by side or other load on the machine skews far
    less than wall-clock time. ``jobs=1`` trains them one after the other in this process and
    reports wall-clock tokens/s (``tok/s (wall)``). ``echo`` (default: ``progress``) prints each
    arm's effective settings before training.

    The result: ``routers[label]`` holds the arm's mean over seeds of every table metric,
    ``stats`` (mean and interval per metric), ``diff`` (paired difference from the baseline) and
    ``seeds`` (each seed's full result, keyed by the seed as a string); ``eval_noise`` says how
    much of the val loss is window noise (``moelab.train.stats``).
    """
    check_settings(settings)
    seeds = settings.seed_list()
    units = [(r, seed) for seed in seeds for r in settings.routers]
    jobs = default_jobs(settings) if jobs is None else max(1, min(int(jobs), len(units)))
    tcfg = TrainConfig.from_dict({**settings.train, "seed": seeds[0]})
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
    matched = match_flops_steps(settings, data.vocab_size) if settings.match_flops else {}
    if echo and matched:
        display.console.print(
            "equal training FLOPs: "
            + ", ".join(
                f"{k} {v['flops_per_token'] / 1e6:.2f} MFLOP/tok x {v['steps']} steps"
                for k, v in matched.items()
            ),
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if echo:
        display.console.print(
            f"set-up: {data.corpus.describe()}, loaded in {time.perf_counter() - t0:.1f} s; "
            f"{len(settings.routers)} arm(s) x {len(seeds)} seed(s) = {len(units)} run(s), {jobs} at a time",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if jobs == 1:
        results = {}
        for i, (r, seed) in enumerate(units):
            name = unit_name(r, seed, settings)
            label = name if len(units) == 1 else f"{name} ({i + 1}/{len(units)})"
            results[(r, seed)] = train_one(
                r, settings, data, seed=seed, progress=progress, console=display.console, description=label
            )
    else:
        results = _run_parallel(settings, units, jobs, display)
    throughput = "cpu" if jobs > 1 else "wall"
    for res in results.values():
        res["throughput"] = res["tokens_per_cpu_s"] if throughput == "cpu" else res["tokens_per_s"]
    runs = {r: {seed: results[(r, seed)] for seed in seeds} for r in settings.routers}
    baseline = settings.baseline_arm()
    statistics = arm_statistics(runs, seeds, baseline)
    first = results[units[0]]
    summary = {
        "name": settings.name,
        "settings": asdict(settings),
        "train_config": asdict(tcfg),
        "seeds": seeds,
        "baseline": baseline,
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
            "cpu": cpu_model(),
            "threads": first["threads"],
            "machine": platform.machine(),
        },
        "eval_noise": eval_noise(runs, seeds, baseline),
        "match_flops": matched,
        "routers": {r: arm_record(runs[r], seeds, statistics[r]) for r in settings.routers},
    }
    write_outputs(summary, out_dir)
    summary["wall_time_s"] = time.perf_counter() - t0
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=json_default) + "\n")
    return summary


# what an arm's record shows at top level: the mean over seeds (the full runs are under "seeds")
MEAN_KEYS = (
    "val_loss",
    "val_ppl",
    "val_loss_se",
    "throughput",
    "max_over_mean",
    "worst_layer_max_over_mean",
    "drop_rate",
    "no_expert_rate",
    "entropy",
    "train_drop_rate",
    "train_time_s",
    "train_cpu_time_s",
    "flops_per_token",
    "eval_flops_per_token",
)


def arm_record(
    by_seed: dict[int, dict[str, Any]], seeds: list[int], statistics: dict[str, Any]
) -> dict[str, Any]:
    """One arm of the summary: means over seeds, the seed-independent facts (config, params,
    causality), the statistics, and every seed's result."""
    first = by_seed[seeds[0]]
    rec: dict[str, Any] = {k: mean_of([by_seed[s] for s in seeds], k) for k in MEAN_KEYS}
    rec.update(
        {
            "model_config": first["model_config"],
            "params": first["params"],
            "active_params": first["active_params"],
            "causal_at_eval": first["causal_at_eval"],
            "threads": first["threads"],
            **statistics,
            "seeds": {str(s): by_seed[s] for s in seeds},
        }
    )
    return rec


def _run_parallel(
    settings: CompareSettings, units: list[tuple[str, int]], jobs: int, display: RunProgress
) -> dict[tuple[str, int], Any]:
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    q, tasks = ctx.Queue(), ctx.Queue()
    for unit in units:
        tasks.put(unit)
    for _ in range(jobs):
        tasks.put(None)
    results: dict[tuple[str, int], Any] = {}
    steps = int(settings.train.get("steps", TrainConfig().steps))
    sd = asdict(settings)
    sd["train"] = {**sd["train"], "threads": resolve_threads(sd["train"].get("threads", 0))}
    names = {u: unit_name(*u, settings) for u in units}
    workers = [ctx.Process(target=_worker, args=(sd, tasks, q), daemon=True) for _ in range(jobs)]
    try:
        with display:
            for p in workers:
                p.start()
            while len(results) < len(units):
                try:
                    kind, key, payload = q.get(timeout=1.0)
                except queue_mod.Empty:
                    dead = [p for p in workers if not p.is_alive() and p.exitcode not in (0, None)]
                    if dead:
                        raise RuntimeError(f"a compare worker died (exit code {dead[0].exitcode})") from None
                    if not any(p.is_alive() for p in workers):
                        raise RuntimeError("the compare workers ended before every run finished") from None
                    continue
                unit = tuple(key)
                if kind == "start":
                    display.add(
                        names[unit], int(settings.train_overrides.get(unit[0], {}).get("steps", steps))
                    )
                elif kind == "progress":
                    # one core per worker: its CPU-time throughput is the comparable number
                    display.update(names[unit], {**payload, "tokens_per_s": payload.get("tokens_per_cpu_s")})
                elif kind == "done":
                    results[unit] = payload
                    display.finish(names[unit], payload["val_loss"])
                else:
                    raise RuntimeError(f"compare worker for {names[unit]!r} failed:\n{payload}")
            for p in workers:
                p.join()
    finally:
        for p in workers:
            if p.is_alive():
                p.terminate()
                p.join()
    return results
