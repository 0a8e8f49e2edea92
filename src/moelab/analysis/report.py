"""Analysis of a whole trace, and its markdown + HTML report.

``analyze_trace`` computes every metric of ``moelab.analysis`` per layer (load, entropy,
co-activation, layer-to-layer mutual information, SRP and SCH with bootstrap intervals, cache hit
curves); ``write_report`` turns the result (plus optional cross-lingual divergence and ARank rows)
into ``report.md``, ``report.html``, ``analysis.json`` and the PNG plots of
``moelab.analysis.plots`` in one directory. The report defines every number it shows inline.

Large E: the load statistics and the mutual information work from the COO entries at any E.
What needs dense per-sequence views (SRP, SCH, the cache simulators) or an ``[E, E]`` matrix
(co-activation) is skipped per layer with the reason in ``result["skipped"]``; so is what would
make the report unreadable (see ``REPORT_MAX_*``).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moelab.analysis.cache import (
    DEFAULT_LOOKAHEAD,
    POLICIES,
    default_cache_sizes,
    first_tokens,
    hit_rate_curve,
    ragged_cache_sizes,
)
from moelab.analysis.limits import require_dense
from moelab.analysis.lrc import SEGMENT_LENGTHS, sch_ci, srp_ci
from moelab.analysis.metrics import coactivation, load_matrix, trace_metrics
from moelab.analysis.plots import report_figures
from moelab.analysis.sequences import ragged_summary, split_sequences
from moelab.analysis.stats import CI_ALPHA, NUM_BOOTSTRAP
from moelab.core.tracing import Trace

# Report limits (ours): a [E, E] co-activation is stored and drawn up to this E (beyond it the
# pixels are unreadable and analysis.json grows by E^2 numbers per layer) ...
REPORT_MAX_COACTIVATION_EXPERTS = 128
# ... and the per-expert load of every layer up to this E (the balance statistics cover any E).
REPORT_MAX_LOAD_EXPERTS = 4096


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


def analyze_trace(
    trace: Trace,
    lengths: Sequence[int] | None = None,
    options: AnalysisOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every per-layer metric of a trace, as plain JSON-able data.

    Args:
        trace: the routings, one per layer (calls concatenated in order).
        lengths: token count of each sequence, in order (sums to every layer's T): ``[S] * B``
            for ``[B, S]`` batches. None reads each layer as one sequence (with a warning: a
            batch read as one sequence gets windows and caches across its sequence boundaries).
        options: see ``AnalysisOptions``.
        progress: called with a short label after each step (for a progress bar).
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a moelab.Trace, got {type(trace).__name__}")
    if not trace.layers:
        raise ValueError("trace has no layers to analyse")
    if lengths is None:
        warnings.warn(
            "analyze_trace: lengths=None reads each layer's tokens as one sequence; pass the "
            "sequence lengths ([S] * B for [B, S] batches) so that SRP, SCH and the caches stay "
            "inside sequences",
            UserWarning,
            stacklevel=2,
        )
    opts = options or AnalysisOptions()
    tick = progress or (lambda label: None)
    num_experts = [trace.routing(n).num_experts for n in trace.layers]
    out: dict[str, Any] = {
        "layers": trace.layers,
        "options": {k: v for k, v in asdict(opts).items() if k != "extra"},
        "metrics": trace_metrics(trace),
        "load": load_matrix(trace).tolist() if max(num_experts) <= REPORT_MAX_LOAD_EXPERTS else None,
        "num_experts": [],
        "top_k": [],
        "sequences": [],
        "srp": {},
        "sch": {},
        "cache": {},
        "coactivation": {},
        "ragged": {},
        "skipped": {},
        "notes": [],
    }
    if out["load"] is None:
        out["notes"].append(
            f"per-expert load not stored: E = {max(num_experts):,} > {REPORT_MAX_LOAD_EXPERTS:,} "
            "(the balance statistics of the first table cover every expert)"
        )
    tick("metrics")

    def skip(layer: str, why: str) -> None:
        prev = out["skipped"].get(layer)
        out["skipped"][layer] = why if prev is None else f"{prev}; {why}"

    for name in trace.layers:
        r = trace.routing(name)
        lens = list(lengths) if lengths is not None else [r.num_tokens]
        E = r.num_experts
        info = ragged_summary(r)
        if info is not None:
            out["ragged"][name] = info
        k = None if info is not None or r.num_assignments == 0 else int(r.experts_per_token()[0])
        out["num_experts"].append(E)
        out["top_k"].append(k)
        out["sequences"].append(len(lens))
        out["srp"][name], out["sch"][name] = {}, {}
        if E <= REPORT_MAX_COACTIVATION_EXPERTS:
            out["coactivation"][name] = coactivation(r, normalize="row").tolist()
        else:
            out["coactivation"][name] = None
            skip(name, f"co-activation not drawn: E = {E:,} > {REPORT_MAX_COACTIVATION_EXPERTS}")
        try:
            require_dense("SRP, SCH and the cache curves", "[T, E] per sequence", max(lens, default=0), E)
        except ValueError as e:
            skip(name, str(e))
            tick(name)
            continue
        topk = split_sequences(r, lens)
        if topk is None:
            skip(name, "no token of this layer was routed to any expert: no SRP, SCH or cache curve")
            tick(name)
            continue
        for L in opts.segment_lengths:
            long_enough = [s for s in topk if s.shape[0] >= L]
            if not long_enough:
                continue
            try:
                ci = srp_ci(long_enough, E, L, n_boot=opts.n_boot, alpha=opts.alpha, seed=opts.seed)
            except ValueError:  # no window holds a routed token: SRP is undefined at this L
                continue
            out["srp"][name][str(L)] = {
                "estimate": ci.estimate,
                "low": ci.low,
                "high": ci.high,
                "sequences": len(long_enough),
            }
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
# report
# --------------------------------------------------------------------------------------------------
# One line per number the report shows (markdown; `code` renders as code in the HTML too).
DEFINITIONS: dict[str, str] = {
    "E, k": "experts of the layer, experts per token (`var`: tokens get different numbers; the mean in brackets)",
    "max/mean": "`max_e n_e / mean_e n_e`, with `n_e` the assignments expert `e` received (1 = balanced)",
    "CV": "coefficient of variation `std_e n_e / mean_e n_e` (population std; 0 = balanced)",
    "dead": "experts that received no assignment",
    "drop": "share of the router's requested assignments that capacity dropped",
    "entropy": "mean over tokens of `H(p_t) / log E`, `p_t` the router's probabilities (1 = uniform, 0 = one-hot; n/a without them)",
    "NMI top1, NMI set": "mutual information with the previous layer over `sqrt(H(X) H(Y))`, for each token's top-1 expert / an expert drawn from each token's set (1 = determined, 0 = independent)",
    "load heatmap": "`n_e / mean_e n_e` per layer and expert",
    "co-activation": "`P(j | i)`: share of expert `i`'s tokens also routed to expert `j` (diagonal, always 1, masked)",
    "SRP": "segment routing best performance: the best F1 of predicting each window of `L` consecutive tokens' experts with one expert set per window (1 = one set serves every window)",
    "SCH": "segment cache best hit rate: hit rate of a cache of `m` experts that knows the next `L` tokens' routing (first uses count as hits while the cache has room)",
    "cache hit rate": "hits / requests of a cache of `m` experts starting empty: `lru`, `lfu`, `belady` (the oracle, evicts the expert needed farthest ahead), `lookahead` (Belady within the next `W` tokens)",
    "divergence": "`JS(q_a, q_b) / H((q_a + q_b) / 2)` between the mean routing distributions of parallel sentences, averaged over pairs (0 = same routing)",
    "ARank": "mean over heads of the rank of the strictly lower-triangular attention map (at most `S - 1`)",
    "[low, high]": "95% basic bootstrap interval, resampling sequences (sentence pairs for the divergence)",
}

# docs/analysis.md of a source checkout (src/moelab/analysis/report.py -> the repository root).
DOCS_PAGE = Path(__file__).resolve().parents[3] / "docs" / "analysis.md"


def _inline_html(text: str) -> str:
    """Escape ``text`` for HTML and render its `code` spans as ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _definitions(res: dict[str, Any], divergence: Any, arank: Any) -> tuple[str, str]:
    shown = {
        "load heatmap": res.get("load") is not None,
        "co-activation": any(v is not None for v in res["coactivation"].values()),
        "NMI top1, NMI set": len(res["layers"]) > 1,
        "SRP": any(res["srp"].values()),
        "SCH": any(res["sch"].values()),
        "cache hit rate": bool(res["cache"]),
        "divergence": bool(divergence),
        "ARank": bool(arank),
    }
    items = [(k, v) for k, v in DEFINITIONS.items() if shown.get(k, True)]
    md = "".join(f"- **{k}**: {v}\n" for k, v in items)
    ht = "<ul>" + "".join(f"<li><b>{html.escape(k)}</b>: {_inline_html(v)}</li>" for k, v in items) + "</ul>"
    return md, ht


def docs_link(out: Path) -> tuple[str, str]:
    """A link to docs/analysis.md that works from ``out``: relative inside the source checkout
    (``runs/analyze/...``), a ``file://`` URI elsewhere; without a checkout, just the page's name."""
    if DOCS_PAGE.is_file():
        root, here = DOCS_PAGE.parents[1], out.resolve()
        inside = here == root or root in here.parents
        href = Path(os.path.relpath(DOCS_PAGE, here)).as_posix() if inside else DOCS_PAGE.as_uri()
        return (
            f"Full definitions and sources: [docs/analysis.md]({href}).",
            f'<p>Full definitions and sources: <a href="{html.escape(href)}">docs/analysis.md</a>.</p>',
        )
    text = "Full definitions and sources: `docs/analysis.md` in the moelab repository."
    return text, f"<p>{_inline_html(text)}</p>"


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
    files: dict[str, Path] = report_figures(res, out, divergence, arank)

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
    if ragged:
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
            "max_t |S_t|, SCH sizes are multiples of the nominal k = round(mean |S_t|)."
        )
        add(
            "Ragged routing (tokens with different numbers of experts)",
            f"{text}\n\n{md}",
            f"<p>{_inline_html(text)}</p>{ht}",
        )
    skipped = res.get("skipped") or {}
    if skipped:
        add(
            "Skipped",
            "".join(f"- {n}: {why}\n" for n, why in skipped.items()),
            "<ul>"
            + "".join(f"<li>{html.escape(n)}: {_inline_html(w)}</li>" for n, w in skipped.items())
            + "</ul>",
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
    intro += list(res.get("notes") or []) + list(notes or [])
    intro_md = "\n".join(f"- {x}" for x in intro if x)
    def_md, def_ht = _definitions(res, divergence, arank)
    link_md, link_ht = docs_link(out)
    sections.insert(0, ("Definitions", f"{def_md}\n{link_md}\n", def_ht + link_ht))
    md_text = f"# {title}\n\n{intro_md}\n\n"
    md_text += "".join(f"## {h}\n\n{body}\n" for h, body, _ in sections)
    css = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
        "code{background:#f3f3f3;padding:0 3px;border-radius:3px}"
    )
    ht_text = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul>"
        + "".join(f"<li>{_inline_html(x)}</li>" for x in intro if x)
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
