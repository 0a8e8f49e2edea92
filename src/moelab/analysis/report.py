"""Analysis of a whole trace, and its markdown + HTML report with plots.

``analyze_trace`` computes every metric of ``moelab.analysis`` per layer (load, entropy,
co-activation, layer-to-layer mutual information, SRP and SCH with bootstrap intervals, cache hit
curves); ``write_report`` turns the result (plus optional cross-lingual divergence and ARank rows)
into ``report.md``, ``report.html``, ``analysis.json`` and PNG plots in one directory.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moelab.analysis.cache import (
    DEFAULT_LOOKAHEAD,
    POLICIES,
    default_cache_sizes,
    first_tokens,
    hit_rate_curve,
    nominal_k,
    ragged_cache_sizes,
)
from moelab.analysis.lrc import (
    CI_ALPHA,
    NUM_BOOTSTRAP,
    PAD,
    SEGMENT_LENGTHS,
    interval_from_replicates,
    resample_weights,
    sch_ci,
    srp_from_stats,
    srp_stats,
)
from moelab.analysis.metrics import coactivation, load_matrix, trace_metrics
from moelab.core.routing import Routing
from moelab.core.tracing import Trace


@dataclass
class AnalysisOptions:
    """Knobs of ``analyze_trace`` (defaults: the LRC paper's, or ours where marked)."""

    segment_lengths: tuple[int, ...] = SEGMENT_LENGTHS
    n_boot: int = NUM_BOOTSTRAP
    alpha: float = CI_ALPHA
    seed: int = 0
    lookahead: int = DEFAULT_LOOKAHEAD
    policies: tuple[str, ...] = POLICIES
    max_cache_tokens: int = 4096  # tokens per layer fed to the (pure Python) cache simulators; ours
    extra: dict[str, Any] = field(default_factory=dict)


def split_layer(routing: Routing, lengths: Sequence[int]) -> tuple[list[Tensor], list[Tensor] | None]:
    """Cut one layer's routing into sequences: masks ``[T_i, E]`` and ``topk_index [T_i, k]``.

    A routing with the same number ``k`` of experts on every token gives plain ``[T_i, k]``; any
    other (capacity drops, expert choice) gives ``Routing.topk_index(fill=-1)``'s rows, ``[T_i, kmax]``
    padded with ``-1``, which SCH and the cache simulators read as "no request". The index list is
    None only when the layer has no assignment at all (nothing to request).
    """
    if sum(lengths) != routing.num_tokens:
        raise ValueError(f"sequence lengths sum to {sum(lengths)}, the routing has T={routing.num_tokens}")
    mask = routing.mask().cpu()
    masks = list(torch.split(mask, list(lengths)))
    if routing.num_tokens == 0 or routing.num_assignments == 0:
        return masks, None
    per_tok = routing.experts_per_token().cpu()
    if int(per_tok.min()) != int(per_tok.max()):
        topk = routing.topk_index(fill=PAD).cpu()  # entry order: the router's own order within a token
    else:
        k = int(per_tok[0])
        # Rows of the mask in ascending expert id: SRP/SCH depend on the set; column order only
        # matters for SCH's within-token clock, where the router's own order is used when known.
        topk = routing.topk_index().cpu() if routing.top_k is not None else mask.nonzero()[:, 1].view(-1, k)
    return masks, list(torch.split(topk, list(lengths)))


def ragged_summary(routing: Routing) -> dict[str, float | int | None] | None:
    """How a layer's routing departs from ``k`` experts per token; None when it does not.

    ``capacity_dropped``: share of the router's requested assignments that capacity dropped
    (``Routing.drop_rate()``; None when the routing records no request counts, e.g. expert
    choice); ``tokens_without_expert``: share of tokens with ``|S_t| = 0``.
    """
    per_tok = routing.experts_per_token().cpu()
    if routing.num_tokens == 0 or int(per_tok.min()) == int(per_tok.max()):
        return None
    return {
        "experts_per_token_min": int(per_tok.min()),
        "experts_per_token_mean": float(per_tok.double().mean()),
        "experts_per_token_max": int(per_tok.max()),
        "nominal_k": nominal_k(per_tok),
        "tokens_without_expert": float((per_tok == 0).double().mean()),
        "capacity_dropped": routing.drop_rate() if routing.requested is not None else None,
    }


def _srp_from_masks(masks: list[Tensor], L: int, opts: AnalysisOptions) -> dict[str, float] | None:
    """SRP with CI from per-sequence masks (works for any number of experts per token)."""
    stats = [srp_stats(m, L) for m in masks if m.shape[0] >= L]
    if not stats:
        return None
    M = torch.cat([s.matches for s in stats])
    P = torch.cat([s.preds for s in stats])
    A = torch.cat([s.acts for s in stats])
    est = srp_from_stats(M.sum(0), P.sum(0), A.sum(0))
    w = resample_weights(M.shape[0], opts.n_boot, opts.seed)
    reps = srp_from_stats(w @ M, w @ P, w @ A)
    lo, hi = interval_from_replicates(est, reps, opts.alpha, "basic")
    return {"estimate": float(est), "low": float(lo), "high": float(hi), "sequences": int(M.shape[0])}


def analyze_trace(
    trace: Trace,
    lengths: Sequence[int] | None = None,
    options: AnalysisOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every per-layer metric of a trace, as plain JSON-able data.

    Args:
        trace: the routings, one per layer (calls concatenated in order).
        lengths: token count of each sequence, in order (sums to every layer's T); None = one sequence.
        options: see ``AnalysisOptions``.
        progress: called with a short label after each step (for a progress bar).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a moelab.Trace, got {type(trace).__name__}")
    if not trace.layers:
        raise ValueError("trace has no layers to analyse")
    opts = options or AnalysisOptions()
    tick = progress or (lambda label: None)
    out: dict[str, Any] = {
        "layers": trace.layers,
        "options": {k: v for k, v in asdict(opts).items() if k != "extra"},
        "metrics": trace_metrics(trace),
        "load": load_matrix(trace).tolist(),
        "num_experts": [],
        "top_k": [],
        "sequences": [],
        "srp": {},
        "sch": {},
        "cache": {},
        "coactivation": {},
        "ragged": {},
        "skipped": {},
    }
    tick("metrics")
    for name in trace.layers:
        r = trace.routing(name)
        lens = list(lengths) if lengths is not None else [r.num_tokens]
        masks, topk = split_layer(r, lens)
        E = r.num_experts
        info = ragged_summary(r)
        if info is not None:
            out["ragged"][name] = info
        k = None if topk is None or info is not None else int(topk[0].shape[1])
        out["num_experts"].append(E)
        out["top_k"].append(k)
        out["sequences"].append(len(lens))
        out["coactivation"][name] = coactivation(r, normalize="row").tolist()
        out["srp"][name] = {}
        for L in opts.segment_lengths:
            res = _srp_from_masks(masks, L, opts)
            if res is not None:
                out["srp"][name][str(L)] = res
        out["sch"][name] = {}
        if topk is None:
            out["skipped"][name] = "no token of this layer was routed to any expert: no SCH or cache curve"
            tick(name)
            continue
        # SCH accepts any size 1..E: multiples of k (the paper's), of the nominal k when ragged.
        sch_sizes = default_cache_sizes(k if k is not None else int(info["nominal_k"]), E)  # type: ignore[index]
        for L in opts.segment_lengths:
            cis = sch_ci(topk, E, L, n_boot=opts.n_boot, alpha=opts.alpha, seed=opts.seed)
            out["sch"][name][str(L)] = {
                "cache_size": sch_sizes,
                "estimate": [cis[m - 1].estimate for m in sch_sizes],
                "low": [cis[m - 1].low for m in sch_sizes],
                "high": [cis[m - 1].high for m in sch_sizes],
            }
        seqs = first_tokens(topk, opts.max_cache_tokens)
        # Cache sizes: multiples of k; when ragged, from max_t |S_t| of the whole layer upward (the
        # simulators need every token's experts resident), then multiples of the nominal k.
        cache_sizes = (
            default_cache_sizes(k, E) if k is not None else ragged_cache_sizes(r.experts_per_token().cpu(), E)
        )
        out["cache"][name] = hit_rate_curve(
            seqs, E, cache_sizes=cache_sizes, policies=opts.policies, lookahead=opts.lookahead
        )
        out["cache"][name]["tokens"] = sum(int(s.shape[0]) for s in seqs)
        tick(name)
    return out


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(names: list[str]) -> list[str]:
    """Short layer labels: the trailing integer of a module name when there is one."""
    out = []
    for i, n in enumerate(names):
        digits = [p for p in n.replace("_", ".").split(".") if p.isdigit()]
        out.append(digits[-1] if digits else str(i))
    return out


def plot_load_heatmap(res: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    load = torch.tensor(res["load"])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * load.shape[1] + 2), max(2.5, 0.4 * load.shape[0] + 1.5)))
    im = ax.imshow(load.numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(load.shape[0]), _short(res["layers"]))
    ax.set_title("expert load (share of assignments)")
    fig.colorbar(im, ax=ax)
    return _save(plt, fig, path)


def plot_srp(res: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, lab in zip(res["layers"], _short(res["layers"]), strict=True):
        d = res["srp"].get(name, {})
        if not d:
            continue
        Ls = sorted(int(x) for x in d)
        est = [d[str(L)]["estimate"] for L in Ls]
        lo = [d[str(L)]["low"] for L in Ls]
        hi = [d[str(L)]["high"] for L in Ls]
        ax.plot(Ls, est, marker="o", label=f"layer {lab}")
        ax.fill_between(Ls, lo, hi, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment length L")
    ax.set_ylabel("SRP")
    ax.set_title("segment routing best performance (95% CI)")
    ax.legend(fontsize=7, ncol=2)
    return _save(plt, fig, path)


def _hit_rate_panels(plt: Any, panels: Sequence[Any], title: Callable[[Any], str], draw: Callable[[Any, Any], None]):
    """One hit-rate-by-cache-size panel per item of ``panels`` (``draw(ax, item)`` adds its lines)."""
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, item in zip(axes[0], panels, strict=False):
        draw(ax, item)
        ax.set_title(title(item))
        ax.set_xlabel("cache size (experts)")
        ax.set_ylim(0, 1.02)
    axes[0][0].set_ylabel("hit rate")
    axes[0][0].legend(fontsize=6)
    return fig


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sch(res: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    Ls = sorted({int(L) for d in res["sch"].values() for L in d})

    def draw(ax: Any, L: int) -> None:
        for name, lab in zip(res["layers"], _short(res["layers"]), strict=True):
            d = res["sch"].get(name, {}).get(str(L))
            if d is not None:
                ax.plot(d["cache_size"], d["estimate"], marker=".", label=f"layer {lab}")
                ax.fill_between(d["cache_size"], d["low"], d["high"], alpha=0.15)

    return _save(plt, _hit_rate_panels(plt, Ls, lambda L: f"SCH, L = {L}", draw), path)


def plot_cache(res: dict[str, Any], path: Path) -> Path:
    """Hit rate by cache size: the mean over layers when they share cache sizes, else one panel
    per policy with a line per layer (ragged layers start at their own ``max_t |S_t|``)."""
    plt = _plt()
    layers = [n for n in res["layers"] if n in res["cache"]]
    policies = [p for p in res["cache"][layers[0]] if p not in ("cache_size", "tokens")] if layers else []
    sizes = res["cache"][layers[0]]["cache_size"] if layers else []
    same = all(res["cache"][n]["cache_size"] == sizes for n in layers)
    styles = {"lru": ("o", "-"), "lfu": ("s", "-"), "belady": ("^", "-"), "lookahead": ("x", "--")}
    if same or not policies:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for p in policies:
            marker, line = styles.get(p, ("o", "-"))
            mean = torch.tensor([res["cache"][n][p] for n in layers]).mean(0).tolist()
            ax.plot(sizes, mean, marker=marker, linestyle=line, label=p)
        ax.set_xlabel("cache size (experts)")
        ax.set_ylabel("hit rate (mean over layers)")
        ax.set_ylim(0, 1.02)
        ax.set_title("expert-offloading cache hit rate")
        ax.legend(fontsize=8)
        return _save(plt, fig, path)

    def draw(ax: Any, p: str) -> None:
        marker, line = styles.get(p, ("o", "-"))
        for name, lab in zip(layers, _short(layers), strict=True):
            d = res["cache"][name]
            ax.plot(d["cache_size"], d[p], marker=marker, linestyle=line, label=f"layer {lab}")

    return _save(plt, _hit_rate_panels(plt, policies, lambda p: f"{p} hit rate", draw), path)


def plot_mi(res: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    rows = res["metrics"][1:]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    labels = _short(res["layers"])[1:]
    for key in ("nmi_top1", "nmi_set"):
        ax.plot(range(len(rows)), [r[key] for r in rows], marker="o", label=key)
    ax.set_xticks(
        range(len(rows)), [f"{a}->{b}" for a, b in zip(_short(res["layers"])[:-1], labels, strict=True)]
    )
    ax.set_ylabel("normalised MI")
    ax.set_title("routing mutual information, layer l -> l+1")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_coactivation(res: dict[str, Any], path: Path, max_layers: int = 8) -> Path:
    plt = _plt()
    layers = res["layers"][:max_layers]
    n = len(layers)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name, lab in zip(axes.flat, layers, _short(layers), strict=False):
        ax.axis("on")
        ax.imshow(torch.tensor(res["coactivation"][name]).numpy(), cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"layer {lab}: P(j | i)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(plt, fig, path)


def plot_divergence(
    rows: list[dict[str, Any]], path: Path, title: str = "cross-lingual routing divergence"
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x = list(range(len(rows)))
    ax.plot(x, [r["divergence"] for r in rows], marker="o")
    ax.fill_between(x, [r["low"] for r in rows], [r["high"] for r in rows], alpha=0.2)
    ax.set_xticks(x, _short([str(r["layer"]) for r in rows]))
    ax.set_xlabel("layer")
    ax.set_ylabel("JS / H(mixture)")
    ax.set_title(title)
    return _save(plt, fig, path)


def plot_arank(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(range(len(rows)), [r["arank"] for r in rows])
    ax.set_xticks(range(len(rows)), [str(r["layer"]) for r in rows])
    ax.set_xlabel("attention layer")
    ax.set_ylabel("ARank")
    seq = rows[0].get("seq_len") if rows else None
    ax.set_title(f"attention rank per layer (max {seq - 1 if seq else '?'})")
    return _save(plt, fig, path)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _var_k(res: dict[str, Any], layer: str) -> str:
    d = (res.get("ragged") or {}).get(layer)
    return "var" if d is None else f"var ({d['experts_per_token_mean']:.2f})"


def _by_size(sizes: Sequence[float], values: Sequence[float], columns: Sequence[int]) -> list[str]:
    """Values formatted into the given cache-size columns ("" where this row has no such size)."""
    at = {int(m): v for m, v in zip(sizes, values, strict=True)}
    return [_fmt_rate(at[m]) if m in at else "" for m in columns]


def _fmt_rate(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def _table(header: list[str], rows: list[list[Any]]) -> tuple[str, str]:
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
    md += "".join("| " + " | ".join(_fmt(c) for c in r) + " |\n" for r in rows)
    ht = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    ht += "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return md, ht + "</table>"


def write_report(
    res: dict[str, Any],
    out_dir: str | Path,
    *,
    title: str = "moelab routing analysis",
    source: str = "",
    divergence: list[dict[str, Any]] | None = None,
    arank: list[dict[str, Any]] | None = None,
    notes: list[str] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, ``analysis.json`` and the plots into ``out_dir``.

    Returns the written paths by name (``markdown``, ``html``, ``json`` and one per plot).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["load_heatmap"] = plot_load_heatmap(res, out / "load_heatmap.png")
    files["coactivation"] = plot_coactivation(res, out / "coactivation.png")
    if len(res["layers"]) > 1:
        files["mutual_information"] = plot_mi(res, out / "mutual_information.png")
    if any(res["srp"].values()):
        files["srp"] = plot_srp(res, out / "srp.png")
    if any(res["sch"].values()):
        files["sch"] = plot_sch(res, out / "sch.png")
    if res["cache"]:
        files["cache"] = plot_cache(res, out / "cache_hit_rate.png")
    if divergence:
        files["divergence"] = plot_divergence(divergence, out / "divergence.png")
    if arank:
        files["arank"] = plot_arank(arank, out / "arank.png")

    sections: list[tuple[str, str, str]] = []  # (heading, markdown body, html body)

    def add(heading: str, md: str, ht: str) -> None:
        sections.append((heading, md, ht))

    def img(key: str, alt: str) -> tuple[str, str]:
        if key not in files:
            return "", ""
        name = files[key].name
        return f"\n![{alt}]({name})\n", f'<p><img src="{html.escape(name)}" alt="{html.escape(alt)}"></p>'

    head = ["layer", "E", "k", "tokens", "max/mean", "CV", "dead", "drop", "entropy", "NMI top1", "NMI set"]
    rows = [
        [
            m["layer"],
            res["num_experts"][i],
            res["top_k"][i] or _var_k(res, m["layer"]),
            m["tokens"],
            m["max_over_mean"],
            m["cv"],
            m["dead_experts"],
            m["drop_rate"],
            m["entropy"],
            m["nmi_top1"],
            m["nmi_set"],
        ]
        for i, m in enumerate(res["metrics"])
    ]
    md, ht = _table(head, rows)
    i_md, i_ht = img("load_heatmap", "expert load heatmap")
    m_md, m_ht = img("mutual_information", "layer-to-layer mutual information")
    c_md, c_ht = img("coactivation", "co-activation")
    add("Load, entropy and mutual information", md + i_md + m_md + c_md, ht + i_ht + m_ht + c_ht)

    if any(res["srp"].values()):
        Ls = sorted({int(L) for d in res["srp"].values() for L in d})
        rows = []
        for name in res["layers"]:
            d = res["srp"].get(name, {})
            rows.append(
                [name]
                + [
                    f"{d[str(L)]['estimate']:.3f} [{d[str(L)]['low']:.3f}, {d[str(L)]['high']:.3f}]"
                    if str(L) in d
                    else "n/a"
                    for L in Ls
                ]
            )
        md, ht = _table(["layer"] + [f"SRP L={L}" for L in Ls], rows)
        i_md, i_ht = img("srp", "SRP")
        add("Local routing consistency: SRP", md + i_md, ht + i_ht)
    if any(res["sch"].values()):
        sizes = sorted({int(m) for v in res["sch"].values() for d in v.values() for m in d["cache_size"]})
        rows = []
        for name in res["layers"]:
            for L, d in res["sch"].get(name, {}).items():
                rows.append([name, L] + _by_size(d["cache_size"], d["estimate"], sizes))
        md, ht = _table(["layer", "L"] + [f"m={m}" for m in sizes], rows)
        i_md, i_ht = img("sch", "SCH")
        add("Local routing consistency: SCH (hit rate by cache size)", md + i_md, ht + i_ht)
    if res["cache"]:
        sizes = sorted({int(m) for d in res["cache"].values() for m in d["cache_size"]})
        rows = []
        for name, d in res["cache"].items():
            for p in [p for p in d if p not in ("cache_size", "tokens")]:
                rows.append([name, p] + _by_size(d["cache_size"], d[p], sizes))
        md, ht = _table(["layer", "policy"] + [f"m={m}" for m in sizes], rows)
        i_md, i_ht = img("cache", "cache hit rate")
        la = res["options"]["lookahead"]
        add(f"Expert-offloading caches (lookahead window {la} tokens)", md + i_md, ht + i_ht)
    ragged = res.get("ragged") or {}
    if ragged or res.get("skipped"):
        rows = [
            [
                name,
                f"{d['experts_per_token_min']}..{d['experts_per_token_max']}",
                d["experts_per_token_mean"],
                "n/a" if d["capacity_dropped"] is None else f"{100 * d['capacity_dropped']:.1f}%",
                f"{100 * d['tokens_without_expert']:.1f}%",
            ]
            for name, d in ragged.items()
        ]
        md, ht = _table(
            ["layer", "experts/token", "mean", "capacity-dropped (of assignments)", "tokens with 0 experts"],
            rows,
        )
        text = (
            "These layers give tokens different numbers of experts (capacity drops, expert choice). "
            "SRP, SCH and the caches read each token's own expert set S_t (a token with no expert "
            "requests nothing): SCH and cache hit rates are hits / sum_t |S_t|; cache sizes start at "
            "max_t |S_t|, SCH sizes are multiples of the nominal k = round(mean |S_t|). "
            "See docs/analysis.md."
        )
        skipped = "".join(f"\n- {n}: {why}" for n, why in (res.get("skipped") or {}).items())
        add(
            "Ragged routing (tokens with different numbers of experts)",
            f"{text}\n\n{md}{skipped}\n",
            f"<p>{html.escape(text)}</p>{ht}"
            + "".join(
                f"<p>{html.escape(n)}: {html.escape(w)}</p>" for n, w in (res.get("skipped") or {}).items()
            ),
        )
    if divergence:
        md, ht = _table(
            ["layer", "divergence", "95% CI low", "95% CI high", "pairs"],
            [[r["layer"], r["divergence"], r["low"], r["high"], r["pairs"]] for r in divergence],
        )
        i_md, i_ht = img("divergence", "cross-lingual divergence")
        add("Cross-lingual routing divergence", md + i_md, ht + i_ht)
    if arank:
        md, ht = _table(
            ["attention layer", "ARank", "seq len", "samples"],
            [[r["layer"], r["arank"], r.get("seq_len", ""), r.get("samples", "")] for r in arank],
        )
        i_md, i_ht = img("arank", "ARank")
        add("Attention rank (ARank)", md + i_md, ht + i_ht)

    intro = [
        f"source: `{source}`" if source else "",
        f"layers: {len(res['layers'])}, sequences: {res['sequences'][0]}",
    ]
    intro += notes or []
    intro_md = "\n".join(f"- {x}" for x in intro if x)
    md_text = f"# {title}\n\n{intro_md}\n\nDefinitions: docs/analysis.md.\n\n"
    md_text += "".join(f"## {h}\n\n{body}\n" for h, body, _ in sections)
    css = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
    ht_text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul>"
        + "".join(f"<li>{html.escape(x)}</li>" for x in intro if x)
        + "</ul>"
        + "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, _, b in sections)
        + "</body></html>"
    )
    files["markdown"] = out / "report.md"
    files["markdown"].write_text(md_text)
    files["html"] = out / "report.html"
    files["html"].write_text(ht_text)
    payload = dict(res, divergence=divergence, arank=arank, source=source)
    files["json"] = out / "analysis.json"
    files["json"].write_text(json.dumps(payload, indent=1, default=float))
    return files
