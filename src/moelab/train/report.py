"""What ``moelab compare`` writes and prints: the table, ``report.md``, ``loss_curves.png``,
``expert_load.png``. Works on the plain-data summary that ``run_compare`` returns."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moelab.train.stats import METRICS, interval_method


def json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def mean_of(rows: list[dict[str, Any]], key: str) -> float:
    """Mean of ``row[key]`` over rows, skipping missing and NaN values (NaN if none)."""
    vals = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
    return sum(vals) / len(vals) if vals else float("nan")


def row_metrics(res: Any) -> dict[str, float]:
    """The table's numbers: routing stats on the val set, averaged over MoE layers."""
    return {
        "max_over_mean": mean_of(res.routing, "max_over_mean"),
        "worst_layer_max_over_mean": max(
            (float(r["max_over_mean"]) for r in res.routing), default=float("nan")
        ),
        "drop_rate": mean_of(res.routing, "drop_rate"),
        "entropy": mean_of(res.routing, "entropy"),
        # dynamic-k routers (DynaMoE, Tsallis top-p) and expert choice vary it; top-k fixes it at k
        "experts_per_token": mean_of(
            [{"v": r["assignments"] / r["tokens"]} for r in res.routing if r.get("tokens")], "v"
        ),
        # consecutive layers' expert sets: normalised mutual information (RMoE raises it)
        "nmi_consecutive": mean_of(res.routing, "nmi_set"),
    }


def throughput_label(summary: dict[str, Any]) -> str:
    """``tok/s/core`` (parallel workers, per CPU second) or ``tok/s (wall)`` (one at a time)."""
    return "tok/s/core" if summary.get("throughput_measure") == "cpu" else "tok/s (wall)"


def columns(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """``(header, key)`` of the table; ``key`` ``"diff"`` is the paired val-loss difference."""
    return [
        ("router", "router"),
        ("val loss", "val_loss"),
        (f"Δ val loss vs {summary.get('baseline') or 'baseline'}", "diff"),
        (throughput_label(summary), "throughput"),
        ("MFLOP/tok", "flops_per_token"),
        ("max/mean", "max_over_mean"),
        ("drop %", "drop_rate"),
        ("no-exp %", "no_expert_rate"),
        ("entropy", "entropy"),
    ]


def arm_name(label: str, r: dict[str, Any]) -> str:
    """The arm's label, starred when its routers are not causal at evaluation."""
    return label + ("" if r.get("causal_at_eval", True) else "*")


NARROW_HEADERS = {
    "val loss": "val\nloss",
    "tok/s/core": "tok/s\n/core",
    "tok/s (wall)": "tok/s\n(wall)",
    "max/mean": "max/\nmean",
    "MFLOP/tok": "MFLOP\n/tok",
    "drop %": "drop\n%",
    "no-exp %": "no-exp\n%",
}

# metric -> (format, scale) of its cells
FORMATS = {
    "val_loss": (".3f", 1.0),
    "val_ppl": (".3f", 1.0),
    "throughput": (",.0f", 1.0),
    "max_over_mean": (".2f", 1.0),
    "worst_layer_max_over_mean": (".2f", 1.0),
    "drop_rate": (".1f", 100.0),
    "no_expert_rate": (".1f", 100.0),
    "entropy": (".3f", 1.0),
    "experts_per_token": (".2f", 1.0),
    "nmi_consecutive": (".3f", 1.0),
    "train_drop_rate": (".1f", 100.0),
    "flops_per_token": (".2f", 1e-6),
    "eval_flops_per_token": (".2f", 1e-6),
}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def mean_cell(r: dict[str, Any], metric: str) -> str:
    """``mean ± half-width`` of the interval over seeds (``mean`` alone with one seed)."""
    fmt, scale = FORMATS[metric]
    st = r.get("stats", {}).get(metric)
    if st is None:
        return format(scale * r[metric], fmt) if _finite(r.get(metric)) else "-"
    mean = format(scale * st["mean"], fmt)
    if not (_finite(st["low"]) and _finite(st["high"])):
        return mean
    return f"{mean} ± {format(scale * (st['high'] - st['low']) / 2, fmt)}"


def diff_cell(r: dict[str, Any], metric: str = "val_loss") -> str:
    """``+0.012 ± 0.016 tie`` for an arm (the paired difference's mean ± half-width, and its
    reading); ``baseline`` for the baseline arm."""
    d = r.get("diff", {}).get(metric)
    if d is None:
        return "baseline" if "diff" in r and not r["diff"] else "-"
    fmt, scale = FORMATS[metric]
    fmt = "+" + fmt.lstrip(",")
    mean = format(scale * d["mean"], fmt)
    if not (_finite(d["low"]) and _finite(d["high"])):
        return f"{mean} (1 seed)"
    # the t-interval is symmetric: mean ± half-width, then how to read it
    return f"{mean} ± {format(scale * (d['high'] - d['low']) / 2, fmt.lstrip('+'))} {d['reading']}"


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, r in summary["routers"].items():
        row = [arm_name(label, r)]
        for _, key in columns(summary)[1:]:
            row.append(diff_cell(r) if key == "diff" else mean_cell(r, key))
        rows.append(row)
    return rows


def title(summary: dict[str, Any]) -> str:
    tc = summary["train_config"]
    seeds = summary.get("seeds") or [tc["seed"]]
    what = f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"
    return (
        f"moelab compare '{summary['name']}': {tc['steps']} steps x {tc['batch_size']} x {tc['seq_len']} "
        f"tokens, {what}"
    )


def print_table(summary: dict[str, Any], console: Any = None) -> None:
    """The comparison table, fitted to the console width. Arm names (with their star) and
    numbers never fold or truncate: when the table is wider than the console, the headers go on
    two lines in a lighter frame, and when the columns still do not fit they are folded into
    further tables, each led by the arm names."""
    from rich.console import Console

    console = console or Console()
    rows = table_rows(summary)
    n = len(columns(summary))
    for narrow in (False, True):
        groups = _fold(console, summary, rows, narrow, range(1, n))
        if len(groups) == 1 or narrow:
            break
    console.print(title(summary), style="bold", highlight=False, markup=False)
    for cols in groups:
        console.print(_table(summary, rows, [0, *cols], narrow))
    console.print(reading(summary), highlight=False, markup=False)
    console.print(footnote(summary), style="dim", highlight=False, markup=False)


def _table(summary: dict[str, Any], rows: list[list[str]], cols: list[int], narrow: bool) -> Any:
    from rich import box
    from rich.table import Table

    heads = [h for h, _ in columns(summary)]
    if narrow:  # a rule under the headers, two spaces between columns, no frame
        table = Table(box=box.SIMPLE_HEAD, padding=(0, 0, 0, 2), show_edge=False, pad_edge=False)
    else:
        table = Table(box=box.HEAVY_HEAD)
    for i in cols:
        head = heads[i]
        if narrow:  # headers on two lines, at spaces and before "/core" / "(wall)"
            head = NARROW_HEADERS.get(head, head.replace(" vs ", "\nvs "))
        width = max([len(r[i]) for r in rows] + [len(line) for line in head.split("\n")])
        # cells and header lines keep their full width: nothing folds or truncates
        table.add_column(head, justify="left" if i == 0 else "right", no_wrap=True, min_width=width)
    for row in rows:
        table.add_row(*(row[i] for i in cols))
    return table


def _fold(
    console: Any, summary: dict[str, Any], rows: list[list[str]], narrow: bool, cols: range
) -> list[list[int]]:
    """Columns per table: as many as fit beside the arm names (measured by rich)."""
    from rich.measure import Measurement

    def fits(group: list[int]) -> bool:
        table = _table(summary, rows, [0, *group], narrow)
        wide = console.options.update_width(10_000)  # measure unclamped
        return Measurement.get(console, wide, table).maximum <= console.width

    groups: list[list[int]] = [[]]
    for i in cols:
        if groups[-1] and not fits([*groups[-1], i]):
            groups.append([])
        groups[-1].append(i)
    return groups


def reading(summary: dict[str, Any]) -> str:
    """The table in words: which differences from the baseline are ties, and the eval noise."""
    seeds = summary.get("seeds") or [summary["train_config"]["seed"]]
    base = summary.get("baseline")
    parts = []
    for label, r in summary["routers"].items():
        d = r.get("diff", {}).get("val_loss")
        if d is None or d.get("reading") is None:
            continue
        what = {"tie": "ties with", "better": "beats", "worse": "loses to"}[d["reading"]]
        parts.append(f"{label} {what} {base}")
    text = "val loss: " + ("; ".join(parts) + "." if parts else "no difference can be called with one seed.")
    noise = summary.get("eval_noise") or {}
    if noise:
        paired = noise.get("paired_se") or {}
        text += (
            f" Eval noise: a run's val loss has a standard error of {noise['val_loss_se']:.4f} over its "
            f"{noise['windows']} windows"
        )
        if paired:
            text += (
                f", a paired difference {max(paired.values()):.4f} at most (the same windows for every arm)"
            )
        text += "."
    if len(seeds) < 2:
        text += " Run with --seeds 0,1,2 for intervals."
    return text


def footnote(summary: dict[str, Any]) -> str:
    seeds = summary.get("seeds") or [summary["train_config"]["seed"]]
    tps = (
        "tok/s/core: training tokens per second of one core (worker CPU time; runs side by side, "
        "one thread each)"
        if summary.get("throughput_measure") == "cpu"
        else "tok/s (wall): training tokens per wall-clock second"
    )
    return (
        f"mean ± half-width of the {interval_method(len(seeds))}. Δ val loss: the paired difference "
        f"arm - {summary.get('baseline') or 'baseline'} per seed, mean ± half-width; better/worse when its "
        "interval excludes 0. "
        "val loss: next-token cross-entropy on held-out text (or images, with --data mixed) (nats/token); "
        f"{tps}; MFLOP/tok: forward FLOPs per token of a training step, as the layers ran "
        "(moelab.core.flops; training costs about 3x)"
        + (
            " (--match-flops: each arm's steps scaled to the baseline's training FLOPs: "
            + ", ".join(f"{k} {v['steps']} steps" for k, v in summary["match_flops"].items())
            + ")"
            if summary.get("match_flops")
            else ""
        )
        + "; max/mean (expert load), drop %, entropy: on the val set, mean over MoE layers; drop %: "
        "assignments cut by expert capacity; no-exp %: tokens that no expert processed; "
        "entropy: router distribution, / log E (1 = uniform). * not causal at evaluation (the router's "
        "causal_at_eval is False: expert choice, or a capacity limit at eval, lets later tokens change "
        "a token's routing), so its val loss is not a true autoregressive loss."
    )


def write_outputs(summary: dict[str, Any], out_dir: Path) -> None:
    """``report.md``, ``loss_curves.png`` and ``expert_load.png`` (``results.json`` is the caller's)."""
    plot_loss_curves(summary, out_dir / "loss_curves.png")
    plot_expert_load(summary, out_dir / "expert_load.png")
    (out_dir / "report.md").write_text(render_report(summary))


def ema(xs: Sequence[float], alpha: float = 0.1) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else (1 - alpha) * m + alpha * x
        out.append(m)
    return out


def loss_ylim(curves: list[Sequence[float]], pad: float = 0.04) -> tuple[float, float] | None:
    """y-limits that hold every plotted point (finite ones), with ``pad`` of the range around."""
    vals = [float(v) for c in curves for v in c if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    margin = pad * (hi - lo) if hi > lo else 0.05 * max(abs(lo), 1.0)
    return lo - margin, hi + margin


def by_type_section(summary: dict[str, Any]) -> list[str]:
    """With token types (``--data mixed``): each arm's val loss on each type of predicted token,
    mean over seeds (and the router's own metrics, ``Router.metrics``, mean over layers and seeds)."""
    runs = {label: seed_runs(r) for label, r in summary["routers"].items()}
    kinds = sorted({k for rs in runs.values() for run in rs for k in run.get("val_loss_by_type", {})})
    out: list[str] = []
    if kinds:
        out += ["", "## Val loss by token type (mean over seeds)", "", "| arm | " + " | ".join(kinds) + " |"]
        out.append("|---|" + "---:|" * len(kinds))
        for label, rs in runs.items():
            cells = [mean_of([run.get("val_loss_by_type", {}) for run in rs], k) for k in kinds]
            out.append(f"| {label} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    metrics = {label: [run.get("router_metrics", {}) for run in rs] for label, rs in runs.items()}
    own = {label: sorted({k for m in ms for k in m}) for label, ms in metrics.items()}
    if any(own.values()):
        out += ["", "## Router metrics (mean over layers and seeds)", ""]
        for label, keys in own.items():
            if keys:
                vals = ", ".join(f"{k} {mean_of(metrics[label], k):.4g}" for k in keys)
                out.append(f"- `{label}`: {vals}")
    return out


def seed_runs(r: dict[str, Any]) -> list[dict[str, Any]]:
    """An arm's per-seed results, in seed order (a one-run record is its own single seed)."""
    return list(r["seeds"].values()) if "seeds" in r else [r]


def plot_loss_curves(summary: dict[str, Any], path: Path) -> None:
    """Train loss (EMA) as the mean over seeds with a band from the lowest to the highest seed,
    and val loss at each evaluation as the mean over seeds with the interval's error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from moelab.analysis.intervals import t_interval

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    plotted: list[Sequence[float]] = []
    n_seeds = 1
    for i, (router, r) in enumerate(summary["routers"].items()):
        runs = seed_runs(r)
        n_seeds = len(runs)
        color = f"C{i}"
        steps = runs[0]["history"]["step"]
        train = np.asarray([ema(run["history"]["loss"]) for run in runs])
        ax.plot(steps, train.mean(0), color=color, lw=1.4, label=f"{router} train (EMA)")
        plotted.append(train.mean(0).tolist())
        if len(runs) > 1:
            ax.fill_between(steps, train.min(0), train.max(0), color=color, alpha=0.2, lw=0)
            plotted += [train.min(0).tolist(), train.max(0).tolist()]
        eval_steps = runs[0]["history"]["eval_step"]
        if eval_steps:
            ivs = [
                t_interval([run["history"]["val_loss"][j] for run in runs]) for j in range(len(eval_steps))
            ]
            mean = [iv.mean for iv in ivs]
            err = [iv.half_width if iv.defined else 0.0 for iv in ivs]
            ax.errorbar(
                eval_steps,
                mean,
                yerr=err,
                fmt="o--",
                color=color,
                ms=4,
                lw=1,
                capsize=3,
                label=f"{router} val",
            )
            plotted.append(mean)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    band = f"; mean of {n_seeds} seeds, band: min-max, bars: 95% interval" if n_seeds > 1 else ""
    ax.set_title(f"moelab compare '{summary['name']}': loss{band}", fontsize=10)
    ax.grid(alpha=0.3)
    ylim = loss_ylim(plotted)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


MAX_ANNOTATED_EXPERTS = 32  # the load plot writes each cell's value up to this many experts


def plot_expert_load(summary: dict[str, Any], path: Path) -> None:
    """Expert load per layer of each arm, from its first seed's run (labelled so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    routers = [(n, seed_runs(r)[0]) for n, r in summary["routers"].items() if seed_runs(r)[0]["load"]]
    seed = (summary.get("seeds") or [summary["train_config"]["seed"]])[0]
    n = max(1, len(routers))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 1.0, 3.6), dpi=110, squeeze=False, layout="constrained")
    vmax = max([max(max(row) for row in r["load"]) for _, r in routers] + [2.0])
    im = None
    for ax, (router, r) in zip(axes[0], routers, strict=False):
        # layers may differ in E (Pyramid-MoE): shorter rows are padded with NaN (left blank)
        width = max(len(row) for row in r["load"])
        m = np.full((len(r["load"]), width), np.nan)
        for i, row in enumerate(r["load"]):
            m[i, : len(row)] = row
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        layers = [row["layer"] for row in r["routing"]]
        ax.set_yticks(range(len(layers)), [lbl.replace("blocks.", "L").replace(".ffn", "") for lbl in layers])
        ax.set_xlabel("expert")
        ax.set_title(f"{router} (seed {seed})\nmax/mean {r['max_over_mean']:.2f}", fontsize=9)
        if width > MAX_ANNOTATED_EXPERTS:  # pools of 10^4-10^6 experts: the colours alone
            continue
        ax.set_xticks(range(width))
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(
                    j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="w" if v < vmax / 2 else "k"
                )
    if not routers:
        axes[0][0].text(0.5, 0.5, "no MoE layers", ha="center")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="load / mean load")
    fig.suptitle(f"expert load per layer on the val set ('{summary['name']}', seed {seed})", fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def render_report(summary: dict[str, Any]) -> str:
    tc = summary["train_config"]
    seeds = summary.get("seeds") or [tc["seed"]]
    first = next(iter(summary["routers"].values()))
    mc = first["model_config"]
    cols = columns(summary)
    env = summary["environment"]
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
        f"seeds {', '.join(map(str, seeds))} (each arm on each seed; on one seed every arm has the same "
        f"initial weights and batches), bf16={tc['bf16']}.",
        f"Environment: {env.get('cpu', env['machine'])}, torch {env['torch']}, Python {env['python']}, "
        f"{env['cpus']} CPUs, {summary['jobs']} run(s) at a time with {env['threads']} thread(s) each. "
        f"Wall time {summary['wall_time_s']:.0f} s.",
        "",
        title(summary),
        "",
        "| " + " | ".join(h for h, _ in cols) + " |",
        "|" + "|".join("---" if h == "router" else "---:" for h, _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    lines += ["", reading(summary), "", footnote(summary), ""]
    arms = [(label, r) for label, r in summary["routers"].items() if r.get("diff")]
    if arms and len(seeds) > 1:
        metrics = [m for m in METRICS if any(m in r["diff"] for _, r in arms)]
        lines += [
            f"## Paired differences from {summary['baseline']} (arm - {summary['baseline']})",
            "",
            "| arm | " + " | ".join(metrics) + " |",
            "|---|" + "---:|" * len(metrics),
        ]
        lines += [
            "| " + label + " | " + " | ".join(diff_cell(r, m) for m in metrics) + " |" for label, r in arms
        ]
        lines.append("")
    lines += [
        "## Per seed",
        "",
        "| arm | seed | val loss | val loss SE (windows) | max/mean | drop % | entropy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in summary["routers"].items():
        for run in seed_runs(r):
            lines.append(
                f"| {label} | {run.get('seed', tc['seed'])} | {run['val_loss']:.4f} | "
                f"{run.get('val_loss_se', float('nan')):.4f} | {run['max_over_mean']:.2f} | "
                f"{100 * run['drop_rate']:.1f} | {run['entropy']:.3f} |"
            )
    lines += by_type_section(summary)
    lines += ["", "## Router settings", ""]
    for router, r in summary["routers"].items():
        m = r["model_config"]
        lines.append(
            f"- `{router}`: router_kwargs={json.dumps(m['router_kwargs'])}, aux_losses={json.dumps(m['aux_losses'])}; "
            f"causal at eval: {'yes' if r.get('causal_at_eval', True) else 'no'}; drop rate during training "
            f"{100 * r['train_drop_rate']:.1f}%; training took {r['train_time_s']:.0f} s wall, "
            f"{r['train_cpu_time_s']:.0f} s CPU (means over seeds)."
        )
    lines += [
        "",
        f"## Per layer (val set, seed {seeds[0]})",
        "",
        "| router | layer | max/mean | cv | drop % | entropy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for router, r in summary["routers"].items():
        for row in seed_runs(r)[0]["routing"]:
            lines.append(
                f"| {router} | {row['layer']} | {row['max_over_mean']:.2f} | {row['cv']:.2f} | "
                f"{100 * row['drop_rate']:.1f} | {row['entropy']:.3f} |"
            )
    lines += ["", "![loss curves](loss_curves.png)", "", "![expert load](expert_load.png)", ""]
    return "\n".join(lines)
