"""What ``moelab compare`` writes and prints: the table, ``report.md``, ``loss_curves.png``,
``expert_load.png``. Works on the plain-data summary that ``run_compare`` returns."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    }


def throughput_label(summary: dict[str, Any]) -> str:
    """``tok/s/core`` (parallel workers, per CPU second) or ``tok/s (wall)`` (one at a time)."""
    return "tok/s/core" if summary.get("throughput_measure") == "cpu" else "tok/s (wall)"


def columns(summary: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("router", "router"),
        ("val loss", "val_loss"),
        ("ppl", "val_ppl"),
        (throughput_label(summary), "throughput"),
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
    "drop %": "drop\n%",
    "no-exp %": "no-exp\n%",
}


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, r in summary["routers"].items():
        rows.append(
            [
                arm_name(label, r),
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
    """The comparison table, fitted to the console width. Arm names (with their star) and
    numbers never fold or truncate: below 100 columns the headers go on two lines, and when the
    columns still do not fit they are folded into further tables, each led by the arm names."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    tc = summary["train_config"]
    title = (
        f"moelab compare '{summary['name']}': {tc['steps']} steps x {tc['batch_size']} x {tc['seq_len']} tokens, "
        f"seed {tc['seed']}"
    )
    rows = table_rows(summary)
    narrow = console.width < 100
    heads, widths = [], []
    for i, (head, _) in enumerate(columns(summary)):
        if narrow:  # headers on two lines, at spaces and before "/core" / "(wall)"
            head = NARROW_HEADERS.get(head, head)
        heads.append(head)
        widths.append(max([len(r[i]) for r in rows] + [len(line) for line in head.split("\n")]))
    groups, current, used = [], [], widths[0] + 2
    for i in range(1, len(heads)):  # fold: as many columns per table as fit beside the names
        if current and used + widths[i] + 2 > console.width:
            groups.append(current)
            current, used = [], widths[0] + 2
        current.append(i)
        used += widths[i] + 2
    groups.append(current)
    for g, cols in enumerate(groups):
        table = Table(
            title=title if g == 0 else None,
            box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
            pad_edge=not narrow,
        )
        for i in [0, *cols]:
            # cells and header lines keep their full width: nothing folds or truncates
            table.add_column(
                heads[i], justify="left" if i == 0 else "right", no_wrap=True, min_width=widths[i]
            )
        for row in rows:
            table.add_row(*(row[i] for i in [0, *cols]))
        console.print(table)
    console.print(footnote(summary), style="dim", highlight=False)


def footnote(summary: dict[str, Any]) -> str:
    tps = (
        "tok/s/core: training tokens per second of one core (worker CPU time; arms ran side by side, "
        "one thread each)"
        if summary.get("throughput_measure") == "cpu"
        else "tok/s (wall): training tokens per wall-clock second"
    )
    return (
        "val loss: next-token cross-entropy on held-out files (nats/token), ppl = exp(val loss); "
        f"{tps}; max/mean (expert load), drop %, entropy: on the val set, mean over MoE layers; drop %: "
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


def plot_loss_curves(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    plotted: list[Sequence[float]] = []
    for i, (router, r) in enumerate(summary["routers"].items()):
        h = r["history"]
        color = f"C{i}"
        train = ema(h["loss"])
        ax.plot(h["step"], train, color=color, lw=1.4, label=f"{router} train (EMA)")
        plotted.append(train)
        if h["eval_step"]:
            ax.plot(h["eval_step"], h["val_loss"], "o--", color=color, ms=4, lw=1, label=f"{router} val")
            plotted.append(h["val_loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"moelab compare '{summary['name']}': loss")
    ax.grid(alpha=0.3)
    ylim = loss_ylim(plotted)
    if ylim is not None:
        ax.set_ylim(*ylim)
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
        f"seed {tc['seed']}, bf16={tc['bf16']}.",
        f"Environment: torch {env['torch']}, Python {env['python']}, {env['cpus']} CPUs, {summary['jobs']} "
        f"arm(s) at a time with {env['threads']} thread(s) each. Wall time {summary['wall_time_s']:.0f} s.",
        "",
        "| " + " | ".join(h for h, _ in cols) + " |",
        "|" + "|".join("---" if h == "router" else "---:" for h, _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary)]
    lines += ["", footnote(summary), "", "## Router settings", ""]
    for router, r in summary["routers"].items():
        m = r["model_config"]
        lines.append(
            f"- `{router}`: router_kwargs={json.dumps(m['router_kwargs'])}, aux_losses={json.dumps(m['aux_losses'])}; "
            f"causal at eval: {'yes' if r.get('causal_at_eval', True) else 'no'}; drop rate during training "
            f"{100 * r['train_drop_rate']:.1f}%; training took {r['train_time_s']:.0f} s wall, "
            f"{r['train_cpu_time_s']:.0f} s CPU."
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
