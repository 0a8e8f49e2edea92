"""``moelab compare``: train the same ``MoELM`` with several routers and compare them.

Every router gets the same model shape, the same data (same windows in the same order), the
same step budget and the same seed: with one seed the initial weights are identical too (the
routers of this comparison share one gate shape, ``[E, d]``, drawn at the same point of the
RNG stream). Each router runs with its paper's settings (``PAPER_SETTINGS``, overridable with
``router_kwargs``/``aux_losses``): that is the comparison a reader of the papers expects.

Outputs, under ``out/<name>/``: ``report.md``, ``results.json``, ``loss_curves.png``,
``expert_load.png`` and each router's final model (``<router>/final``, loadable with
``MoELM.from_pretrained``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelab.data import Data, load_data
from moelab.models.config import MoELMConfig
from moelab.train.trainer import TrainConfig, Trainer, TrainResult

DEFAULT_ROUTERS = ("topk", "sigmoid_topk", "expert_choice")

# Per-router settings from each paper; anything else uses the model's defaults.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    # Switch Transformer: capacity factor 1.25, load-balance loss 1e-2; ST-MoE router z-loss 1e-3.
    "topk": {"router_kwargs": {"capacity_factor": 1.25}, "aux_losses": {"load_balance": 1e-2, "z": 1e-3}},
    # DeepSeek-V3: dropless, aux-loss-free bias balancing plus a tiny sequence-wise loss (1e-4).
    "sigmoid_topk": {"router_kwargs": {}, "aux_losses": {"load_balance_seq": 1e-4}},
    # Expert choice: capacity factor c = 2 (= top_k), balanced by construction, no auxiliary loss.
    "expert_choice": {"router_kwargs": {}, "aux_losses": {}},
}

NONCAUSAL = {"expert_choice"}


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
    router_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per router, over the paper's
    aux_losses: dict[str, dict[str, float]] = field(default_factory=dict)  # per router, replaces the paper's
    # Per arm, MoELMConfig fields over ``model`` (``moelab repro`` arms that differ in architecture,
    # e.g. shared experts); arms with different shapes no longer share their initial weights.
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    save_models: bool = True


def base_router(label: str, s: CompareSettings) -> str:
    """The registered router an arm trains (its label, unless ``variants`` maps it)."""
    return s.variants.get(label, label)


def router_setup(label: str, s: CompareSettings) -> tuple[dict[str, Any], dict[str, float]]:
    """An arm's router kwargs (paper settings, then the user's) and its auxiliary losses."""
    paper = PAPER_SETTINGS.get(base_router(label, s), {})
    kw = {**paper.get("router_kwargs", {}), **s.router_kwargs.get(label, {})}
    default_aux = s.model.get("aux_losses", MoELMConfig().aux_losses)
    aux = s.aux_losses.get(label, paper.get("aux_losses", default_aux))
    return kw, dict(aux)


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
) -> dict[str, Any]:
    """Train ``router``'s model of the comparison; the result as plain data."""
    mcfg, tcfg = router_configs(router, s, data.vocab_size)
    out = Path(s.out) / s.name / router if s.save_models else None
    trainer = Trainer(mcfg, tcfg, out, data=data, progress=progress, description=router, console=console)
    res: TrainResult = trainer.train(callback=callback)
    return {"model_config": mcfg.to_dict(), **res.to_dict(), **row_metrics(res)}


def _worker(router: str, settings: dict[str, Any], threads: int, queue: Any) -> None:
    """One router in its own process (``spawn``), ``threads`` intra-op threads; reports via ``queue``."""
    try:
        torch.set_num_threads(threads)
        s = CompareSettings(**settings)
        data = _load(TrainConfig.from_dict(s.train))
        res = train_one(router, s, data, callback=lambda rep: queue.put(("progress", router, rep)))
        queue.put(("done", router, res))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        queue.put(("error", router, traceback.format_exc()))


def default_jobs(settings: CompareSettings) -> int:
    """Parallel worker processes: one per router on CPU (each single-threaded), 1 on a GPU."""
    if str(settings.train.get("device", "cpu")) != "cpu":
        return 1
    return max(1, min(len(settings.routers), max(os.cpu_count() or 1, 3), 8))


def run_compare(
    settings: CompareSettings, *, jobs: int | None = None, progress: bool = True, console: Any = None
) -> dict[str, Any]:
    """Train one model per router; write the report, JSON and plots. Returns the results dict.

    ``jobs > 1`` trains the routers in parallel worker processes with one intra-op thread each
    (the default on CPU): a 2-core machine then runs at full use without the thread
    oversubscription that makes multi-threaded small-matrix PyTorch crawl on a busy machine.
    Throughput is then measured per core, as tokens per second of each worker's CPU time, which
    running side by side or other load on the machine skews far less than wall-clock time.
    ``jobs=1`` trains them one after the other in this process, with its threads, and reports
    wall-clock tokens/s.
    """
    if not settings.routers:
        raise ValueError("routers must name at least one router")
    if len(set(settings.routers)) != len(settings.routers):
        raise ValueError(f"routers must be distinct, got {settings.routers}")
    import moelab

    known = moelab.registry.names("router")
    unknown = [base_router(r, settings) for r in settings.routers if base_router(r, settings) not in known]
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; registered routers: {known}")
    jobs = default_jobs(settings) if jobs is None else max(1, min(int(jobs), len(settings.routers)))
    tcfg = TrainConfig.from_dict(settings.train)
    for router in settings.routers:  # bad configs fail here, before any training
        router_configs(router, settings, 256)
    out_dir = Path(settings.out) / settings.name
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = _load(tcfg)  # also trains and caches a BPE once, before workers look for it
    if jobs == 1:
        results = {
            r: train_one(r, settings, data, progress=progress, console=console) for r in settings.routers
        }
    else:
        results = _run_parallel(settings, jobs, progress=progress, console=console)
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
            "threads": 1 if jobs > 1 else torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "routers": {r: results[r] for r in settings.routers},
    }
    write_outputs(summary, out_dir)
    summary["wall_time_s"] = time.perf_counter() - t0
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    return summary


def _run_parallel(settings: CompareSettings, jobs: int, *, progress: bool, console: Any) -> dict[str, Any]:
    import multiprocessing as mp
    import queue as queue_mod

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    pending = list(settings.routers)
    running: dict[str, Any] = {}
    results: dict[str, Any] = {}
    steps = int(settings.train.get("steps", TrainConfig().steps))
    bar = Progress(
        TextColumn("[bold]{task.description:<14}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  val {task.fields[val]:.3f}"),
        TextColumn("max/mean load {task.fields[imb]:.2f}"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    )
    tasks = {
        r: bar.add_task(r, total=steps, start=False, loss=float("nan"), val=float("nan"), imb=float("nan"))
        for r in settings.routers
    }
    sd = asdict(settings)
    try:
        with bar:
            while pending or running:
                while pending and len(running) < jobs:
                    r = pending.pop(0)
                    p = ctx.Process(target=_worker, args=(r, sd, 1, q), daemon=True)
                    p.start()
                    running[r] = p
                    bar.start_task(tasks[r])
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
                    fields = {"loss": payload["loss"], "imb": payload["imbalance"]}
                    if "val_loss" in payload:
                        fields["val"] = payload["val_loss"]
                    bar.update(tasks[r], completed=payload["step"], **fields)
                elif kind == "done":
                    results[r] = payload
                    running.pop(r).join()
                    bar.update(tasks[r], completed=steps, val=payload["val_loss"])
                    if not console.is_terminal and progress:
                        console.print(f"{r}: done, val loss {payload['val_loss']:.4f}")
                else:
                    raise RuntimeError(f"compare worker for {r!r} failed:\n{payload}")
    finally:
        for p in running.values():
            p.terminate()
            p.join()
    return results


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
    return sum(vals) / len(vals) if vals else float("nan")


def row_metrics(res: TrainResult) -> dict[str, float]:
    """The table's numbers: routing stats on the val set, averaged over MoE layers."""
    return {
        "max_over_mean": _mean(res.routing, "max_over_mean"),
        "worst_layer_max_over_mean": max(
            (float(r["max_over_mean"]) for r in res.routing), default=float("nan")
        ),
        "drop_rate": _mean(res.routing, "drop_rate"),
        "entropy": _mean(res.routing, "entropy"),
    }


COLUMNS = [
    ("router", "router"),
    ("val loss", "val_loss"),
    ("ppl", "val_ppl"),
    ("tok/s", "throughput"),
    ("max/mean", "max_over_mean"),
    ("drop %", "drop_rate"),
    ("no-exp %", "no_expert_rate"),
    ("entropy", "entropy"),
]


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for router, r in summary["routers"].items():
        variants = summary["settings"].get("variants", {})
        name = router + ("*" if variants.get(router, router) in NONCAUSAL else "")
        rows.append(
            [
                name,
                f"{r['val_loss']:.4f}",
                f"{r['val_ppl']:.3f}",
                f"{r['throughput']:,.0f}",
                f"{r['max_over_mean']:.2f}",
                f"{100 * r['drop_rate']:.1f}",
                f"{100 * r['no_expert_rate']:.1f}",
                f"{r['entropy']:.3f}",
            ]
        )
    return rows


def print_table(summary: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    tc = summary["train_config"]
    title = (
        f"moelab compare '{summary['name']}': {tc['steps']} steps x {tc['batch_size']} x {tc['seq_len']} tokens, "
        f"seed {tc['seed']}"
    )
    table = Table(title=title)
    for head, _ in COLUMNS:
        table.add_column(head, justify="left" if head == "router" else "right")
    for row in table_rows(summary):
        table.add_row(*row)
    console.print(table)
    console.print(footnote(summary), style="dim")


def footnote(summary: dict[str, Any]) -> str:
    tps = (
        "tok/s: training tokens per second of one core (worker CPU time; routers ran side by side, "
        "one thread each)"
        if summary.get("throughput_measure") == "cpu"
        else "tok/s: training tokens per wall-clock second"
    )
    return (
        "val loss: next-token cross-entropy on held-out files (nats/token), ppl = exp(val loss); "
        f"{tps}; max/mean (expert load), drop %, entropy: on the val set, mean over MoE layers; drop %: "
        "assignments cut by expert capacity; no-exp %: tokens that no expert processed; "
        "entropy: router distribution, / log E (1 = uniform). * non-causal router (a token's routing "
        "sees later tokens): its loss is not a true autoregressive loss."
    )


def write_outputs(summary: dict[str, Any], out_dir: Path) -> None:
    """``report.md``, ``loss_curves.png`` and ``expert_load.png`` (``results.json`` is the caller's)."""
    plot_loss_curves(summary, out_dir / "loss_curves.png")
    plot_expert_load(summary, out_dir / "expert_load.png")
    (out_dir / "report.md").write_text(render_report(summary))


def _ema(xs: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


def plot_loss_curves(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for i, (router, r) in enumerate(summary["routers"].items()):
        h = r["history"]
        color = f"C{i}"
        ax.plot(h["step"], _ema(h["loss"]), color=color, lw=1.4, label=f"{router} train (EMA)")
        if h["eval_step"]:
            ax.plot(h["eval_step"], h["val_loss"], "o--", color=color, ms=4, lw=1, label=f"{router} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"moelab compare '{summary['name']}': loss")
    ax.grid(alpha=0.3)
    losses = [v for r in summary["routers"].values() for v in r["history"]["loss"]]
    if losses:
        lo = min(min(losses), min((r["val_loss"] for r in summary["routers"].values()), default=min(losses)))
        ax.set_ylim(lo - 0.1, min(max(losses), lo + 1.5))
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_expert_load(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    routers = [(n, r) for n, r in summary["routers"].items() if r["load"]]
    n = max(1, len(routers))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1.0, 3.6), dpi=110, squeeze=False, layout="constrained")
    vmax = max([max(max(row) for row in r["load"]) for _, r in routers] + [2.0])
    im = None
    for ax, (router, r) in zip(axes[0], routers, strict=False):
        m = np.asarray(r["load"])
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
        layers = [row["layer"] for row in r["routing"]]
        ax.set_yticks(range(len(layers)), [lbl.replace("blocks.", "L").replace(".ffn", "") for lbl in layers])
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(f"{router}\nmax/mean {r['max_over_mean']:.2f}", fontsize=9)
        for (i, j), v in np.ndenumerate(m):
            ax.text(
                j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="w" if v < vmax / 2 else "k"
            )
    if not routers:
        axes[0][0].text(0.5, 0.5, "no MoE layers", ha="center")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="load / mean load")
    fig.suptitle(f"expert load per layer on the val set ('{summary['name']}')", fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def render_report(summary: dict[str, Any]) -> str:
    tc = summary["train_config"]
    first = next(iter(summary["routers"].values()))
    mc = first["model_config"]
    lines = [
        f"# moelab compare: {summary['name']}",
        "",
        f"Data: {summary['data']} (tokenizer: {summary['tokenizer']}; {summary['train_tokens']:,} train / "
        f"{summary['val_tokens']:,} val tokens).",
        f"Model: MoELM d_model={mc['d_model']}, {mc['n_layers']} layers, {mc['n_heads']} heads, "
        f"{mc['num_experts']} experts, top_k={mc['top_k']}, MoE every {mc['moe_every']} layer(s); "
        f"{first['params']:,} parameters ({first['active_params']:,} active per token).",
        f"Training: {tc['steps']} steps, batch {tc['batch_size']} x {tc['seq_len']} tokens, AdamW lr {tc['lr']} "
        f"(warmup {tc['warmup_steps']}, cosine to {tc['min_lr_ratio']}x), clip {tc['grad_clip']}, "
        f"seed {tc['seed']}, bf16={tc['bf16']}.",
        f"Environment: torch {summary['environment']['torch']}, Python {summary['environment']['python']}, "
        f"{summary['environment']['cpus']} CPUs, {summary['jobs']} router(s) at a time with "
        f"{summary['environment']['threads']} thread(s) each. Wall time {summary['wall_time_s']:.0f} s.",
        "",
        "| " + " | ".join(h for h, _ in COLUMNS) + " |",
        "|" + "|".join("---" if h == "router" else "---:" for h, _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    lines += ["", footnote(summary), "", "## Router settings", ""]
    for router, r in summary["routers"].items():
        m = r["model_config"]
        lines.append(
            f"- `{router}`: router_kwargs={json.dumps(m['router_kwargs'])}, aux_losses={json.dumps(m['aux_losses'])}; "
            f"drop rate during training {100 * r['train_drop_rate']:.1f}%; training took {r['train_time_s']:.0f} s "
            f"wall, {r['train_cpu_time_s']:.0f} s CPU."
        )
    lines += [
        "",
        "## Per layer (val set)",
        "",
        "| router | layer | max/mean | cv | drop % | entropy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for router, r in summary["routers"].items():
        for row in r["routing"]:
            lines.append(
                f"| {router} | {row['layer']} | {row['max_over_mean']:.2f} | {row['cv']:.2f} | "
                f"{100 * row['drop_rate']:.1f} | {row['entropy']:.3f} |"
            )
    lines += ["", "![loss curves](loss_curves.png)", "", "![expert load](expert_load.png)", ""]
    return "\n".join(lines)
