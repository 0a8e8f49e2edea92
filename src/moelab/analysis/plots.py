"""Plots of routing: from a ``Trace`` (``plot_load``, ``plot_coactivation``,
``plot_mutual_information``), and the figures of ``moelab analyze``'s report (``report_figures``).

    import moelab.analysis as A
    A.plot_load(trace, "load.png")                 # expert load per layer
    A.plot_coactivation(trace, 0, "coact.png")     # P(j | i) of the first traced layer

Each function returns a ``matplotlib.figure.Figure`` and, given ``path``, also writes it there
(the format follows the suffix). matplotlib is imported inside the functions, so importing
``moelab.analysis`` does not import it. Figures are plain ``Figure`` objects, not pyplot ones:
nothing switches the global backend or stays open in pyplot, and a notebook still shows a
returned figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moelab.analysis.metrics import coactivation, load_matrix, trace_metrics
from moelab.core.tracing import Trace

# Layers drawn in a co-activation grid (4 per row); ours, to keep the figure readable.
MAX_COACTIVATION_PANELS = 8


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _finish(fig: Any, path: str | Path | None, dpi: int = 110) -> Any:
    fig.tight_layout()
    if path is not None:
        fig.savefig(Path(path), dpi=dpi)
    return fig


def layer_labels(names: Sequence[str]) -> list[str]:
    """Short layer labels: the trailing integer of a module name when there is one, else the index."""
    out = []
    for i, n in enumerate(names):
        digits = [p for p in str(n).replace("_", ".").split(".") if p.isdigit()]
        out.append(digits[-1] if digits else str(i))
    return out


def _check_trace(trace: object) -> Trace:
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a moelab.Trace, got {type(trace).__name__}")
    if not trace.layers:
        raise ValueError("trace has no layers to plot")
    return trace


def _expert_ticks(ax: Any, num_experts: int) -> None:
    """Every expert id on both axes up to 16 experts, else matplotlib's integer ticks."""
    from matplotlib.ticker import MaxNLocator

    if num_experts <= 16:
        ax.set_xticks(range(num_experts))
        ax.set_yticks(range(num_experts))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=6)


# --------------------------------------------------------------------------------------------------
# figures from arrays (shared by the Trace API and the report)
# --------------------------------------------------------------------------------------------------
def load_figure(relative_LE: Tensor, labels: Sequence[str]) -> Any:
    """Heatmap of ``relative_LE [layers, E]`` = expert load / mean load (NaN: no such expert)."""
    import matplotlib

    L, E = relative_LE.shape
    fig = _figure(min(14.0, max(4.0, 0.35 * E + 2)), min(12.0, max(2.5, 0.4 * L + 1.5)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    im = ax.imshow(relative_LE.numpy(), aspect="auto", cmap=cmap, vmin=0, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), list(labels))
    ax.set_title("expert load (1 = the mean over experts)")
    fig.colorbar(im, ax=ax, label="assignments / mean assignments")
    return fig


def coactivation_figure(matrices: Sequence[Tensor], labels: Sequence[str], title: str = "") -> Any:
    """One panel per ``[E, E]`` row-normalised co-activation ``P(j | i)``, diagonal masked.

    The diagonal is ``P(i | i) = 1`` for every used expert: drawn, it would set the colour scale
    and wash out the off-diagonal structure, so it is grey and each panel scales to its largest
    off-diagonal value (own colorbar).
    """
    import matplotlib

    n = max(1, len(matrices))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.4 * cols, 3.0 * rows + (0.4 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
    for ax in axes.flat[len(matrices) :]:
        ax.axis("off")
    for ax, mat, lab in zip(axes.flat, matrices, labels, strict=False):
        m = mat.double().clone()
        m.fill_diagonal_(float("nan"))
        off = m[~m.isnan()]
        vmax = float(off.max()) if off.numel() and float(off.max()) > 0 else 1.0
        im = ax.imshow(m.numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {lab}", fontsize=9)
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
        _expert_ticks(ax, int(m.shape[0]))
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label("P(j | i)", fontsize=8)
        cb.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def mutual_information_figure(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> Any:
    """NMI (top-1 and set) of each layer with the previous one; ``rows`` from ``trace_metrics``."""
    fig = _figure(5.5, 3.2)
    ax = fig.subplots()
    pairs = [f"{a}->{b}" for a, b in zip(labels[:-1], labels[1:], strict=True)]
    for key, label in (("nmi_top1", "top-1 expert"), ("nmi_set", "expert set")):
        ax.plot(range(len(pairs)), [r[key] for r in rows[1:]], marker="o", label=label)
    ax.set_xticks(range(len(pairs)), pairs)
    ax.set_xlabel("layer l -> l+1")
    ax.set_ylabel("normalised MI")
    ax.set_ylim(bottom=0)
    ax.set_title("routing mutual information between consecutive layers")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------------
# the Trace API
# --------------------------------------------------------------------------------------------------
def plot_load(trace: Trace, path: str | Path | None = None) -> Any:
    """Expert load per traced layer: a ``[layers, E]`` heatmap of ``n_e / mean_e n_e`` (1 =
    balanced, 0 = a dead expert). Returns the ``Figure``; writes it to ``path`` when given."""
    tr = _check_trace(trace)
    shares = load_matrix(tr)
    rel = torch.full_like(shares, float("nan"))
    for i, name in enumerate(tr.layers):
        E = tr.routing(name).num_experts
        rel[i, :E] = shares[i, :E] * E  # share / (1 / E)
    return _finish(load_figure(rel, layer_labels(tr.layers)), path)


def _pick_layers(trace: Trace, layer: str | int | None) -> list[str]:
    if layer is None:
        return trace.layers[:MAX_COACTIVATION_PANELS]
    if isinstance(layer, bool) or not isinstance(layer, (str, int)):
        raise TypeError(f"layer must be a layer name, an index into trace.layers or None, got {layer!r}")
    if isinstance(layer, int):
        if not -len(trace.layers) <= layer < len(trace.layers):
            raise ValueError(f"layer index {layer} is out of range for {len(trace.layers)} traced layers")
        return [trace.layers[layer]]
    if layer not in trace.layers:
        raise ValueError(f"layer {layer!r} was not traced; traced layers: {trace.layers}")
    return [layer]


def plot_coactivation(trace: Trace, layer: str | int | None = None, path: str | Path | None = None) -> Any:
    """Co-activation ``P(j | i)`` (share of expert ``i``'s tokens also routed to ``j``; diagonal
    masked) of one layer (a name or an index into ``trace.layers``), or of the first
    ``MAX_COACTIVATION_PANELS`` layers when ``layer`` is None. Refuses (``ValueError``) when
    ``[E, E]`` is too large (``coactivation``). Returns the ``Figure``; writes it to ``path``."""
    tr = _check_trace(trace)
    names = _pick_layers(tr, layer)
    mats = [coactivation(tr.routing(n), normalize="row") for n in names]
    labels = layer_labels(tr.layers)
    picked = [labels[tr.layers.index(n)] for n in names]
    return _finish(coactivation_figure(mats, picked), path)


def plot_mutual_information(trace: Trace, path: str | Path | None = None) -> Any:
    """Normalised mutual information (top-1 and set) between consecutive traced layers
    (``trace_metrics``). Needs at least two layers. Returns the ``Figure``; writes it to ``path``."""
    tr = _check_trace(trace)
    if len(tr.layers) < 2:
        raise ValueError("plot_mutual_information needs a trace with at least two layers")
    return _finish(mutual_information_figure(trace_metrics(tr), layer_labels(tr.layers)), path)


# --------------------------------------------------------------------------------------------------
# the report's figures (from analyze_trace's result)
# --------------------------------------------------------------------------------------------------
def _srp_figure(res: dict[str, Any]) -> Any:
    fig = _figure(5.5, 3.6)
    ax = fig.subplots()
    for name, lab in zip(res["layers"], layer_labels(res["layers"]), strict=True):
        d = res["srp"].get(name, {})
        if not d:
            continue
        Ls = sorted(int(x) for x in d)
        ax.plot(Ls, [d[str(L)]["estimate"] for L in Ls], marker="o", label=f"layer {lab}")
        ax.fill_between(Ls, [d[str(L)]["low"] for L in Ls], [d[str(L)]["high"] for L in Ls], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment length L (tokens)")
    ax.set_ylabel("SRP")
    ax.set_title("segment routing best performance (95% CI)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def _hit_rate_panels(panels: Sequence[Any], title: Callable[[Any], str], draw: Callable[[Any, Any], None]):
    """One hit-rate-by-cache-size panel per item of ``panels`` (``draw(ax, item)`` adds its lines)."""
    n = max(1, len(panels))
    fig = _figure(3.2 * n, 3.2)
    axes = fig.subplots(1, n, squeeze=False)
    for ax, item in zip(axes[0], panels, strict=False):
        draw(ax, item)
        ax.set_title(title(item))
        ax.set_xlabel("cache size (experts)")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("hit rate")
    axes[0][0].legend(fontsize=6)
    return fig


def _sch_figure(res: dict[str, Any]) -> Any:
    Ls = sorted({int(L) for d in res["sch"].values() for L in d})

    def draw(ax: Any, L: int) -> None:
        for name, lab in zip(res["layers"], layer_labels(res["layers"]), strict=True):
            d = res["sch"].get(name, {}).get(str(L))
            if d is not None:
                ax.plot(d["cache_size"], d["estimate"], marker=".", label=f"layer {lab}")
                ax.fill_between(d["cache_size"], d["low"], d["high"], alpha=0.15)

    return _hit_rate_panels(Ls, lambda L: f"SCH, L = {L}", draw)


def _cache_figure(res: dict[str, Any]) -> Any:
    """Hit rate by cache size: the mean over layers when they share cache sizes, else one panel
    per policy with a line per layer (ragged layers start at their own ``max_t |S_t|``)."""
    layers = [n for n in res["layers"] if n in res["cache"]]
    policies = [p for p in res["cache"][layers[0]] if p not in ("cache_size", "tokens")] if layers else []
    sizes = res["cache"][layers[0]]["cache_size"] if layers else []
    same = all(res["cache"][n]["cache_size"] == sizes for n in layers)
    styles = {"lru": ("o", "-"), "lfu": ("s", "-"), "belady": ("^", "-"), "lookahead": ("x", "--")}
    if same or not policies:
        fig = _figure(5.5, 3.6)
        ax = fig.subplots()
        for p in policies:
            marker, line = styles.get(p, ("o", "-"))
            mean = torch.tensor([res["cache"][n][p] for n in layers]).mean(0).tolist()
            ax.plot(sizes, mean, marker=marker, linestyle=line, label=p)
        ax.set_xlabel("cache size (experts)")
        ax.set_ylabel("hit rate (mean over layers)")
        ax.set_ylim(0, 1.02)
        ax.set_title("expert-offloading cache hit rate")
        ax.legend(fontsize=8)
        return fig

    def draw(ax: Any, p: str) -> None:
        marker, line = styles.get(p, ("o", "-"))
        for name, lab in zip(layers, layer_labels(layers), strict=True):
            d = res["cache"][name]
            ax.plot(d["cache_size"], d[p], marker=marker, linestyle=line, label=f"layer {lab}")

    return _hit_rate_panels(policies, lambda p: f"{p} hit rate", draw)


def _divergence_figure(rows: list[dict[str, Any]]) -> Any:
    fig = _figure(5.5, 3.4)
    ax = fig.subplots()
    x = list(range(len(rows)))
    ax.plot(x, [r["divergence"] for r in rows], marker="o")
    ax.fill_between(x, [r["low"] for r in rows], [r["high"] for r in rows], alpha=0.2)
    ax.set_xticks(x, layer_labels([str(r["layer"]) for r in rows]))
    ax.set_xlabel("layer")
    ax.set_ylabel("JS / H(mixture)")
    ax.set_title("cross-lingual routing divergence (95% CI)")
    return fig


def _arank_figure(rows: list[dict[str, Any]]) -> Any:
    fig = _figure(5.5, 3.2)
    ax = fig.subplots()
    ax.bar(range(len(rows)), [r["arank"] for r in rows])
    ax.set_xticks(range(len(rows)), [str(r["layer"]) for r in rows])
    ax.set_xlabel("attention layer")
    ax.set_ylabel("ARank")
    seq = rows[0].get("seq_len") if rows else None
    ax.set_title(f"attention rank per layer (max {seq - 1 if seq else '?'})")
    return fig


def report_figures(
    res: dict[str, Any],
    out_dir: Path,
    divergence: list[dict[str, Any]] | None = None,
    arank: list[dict[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the PNGs of ``moelab analyze``'s report into ``out_dir``; returns them by name."""
    out: dict[str, Any] = {}
    labels = layer_labels(res["layers"])
    if res.get("load") is not None:
        shares = torch.tensor(res["load"], dtype=torch.float64)
        rel = torch.full_like(shares, float("nan"))
        for i, E in enumerate(res["num_experts"]):
            rel[i, :E] = shares[i, :E] * E
        out["load_heatmap"] = (load_figure(rel, labels), "load_heatmap.png")
    coact = [n for n in res["layers"] if res["coactivation"].get(n) is not None]
    if coact:
        shown = coact[:MAX_COACTIVATION_PANELS]
        title = (
            "" if len(shown) == len(res["layers"]) else f"first {len(shown)} of {len(res['layers'])} layers"
        )
        mats = [torch.tensor(res["coactivation"][n], dtype=torch.float64) for n in shown]
        picked = [labels[res["layers"].index(n)] for n in shown]
        out["coactivation"] = (coactivation_figure(mats, picked, title), "coactivation.png")
    if len(res["layers"]) > 1:
        out["mutual_information"] = (
            mutual_information_figure(res["metrics"], labels),
            "mutual_information.png",
        )
    if any(res["srp"].values()):
        out["srp"] = (_srp_figure(res), "srp.png")
    if any(res["sch"].values()):
        out["sch"] = (_sch_figure(res), "sch.png")
    if res["cache"]:
        out["cache"] = (_cache_figure(res), "cache_hit_rate.png")
    if divergence:
        out["divergence"] = (_divergence_figure(divergence), "divergence.png")
    if arank:
        out["arank"] = (_arank_figure(arank), "arank.png")
    files: dict[str, Path] = {}
    for key, (fig, name) in out.items():
        _finish(fig, out_dir / name)
        files[key] = out_dir / name
    return files
