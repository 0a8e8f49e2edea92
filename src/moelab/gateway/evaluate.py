"""Offline evaluation of request routers on routing tables (``moelab gateway eval``). Torch-free
(MiniLM loads lazily when an embedding policy embeds).

- RouteLLM tables (weak/strong): a seeded split by id into a train half and a test half (our
  choice); each trained 2-model policy (``threshold`` with each scorer by default) is fitted on the
  train half and swept on the test half; the ``random`` router and the oracle on that same half;
  APGR and CPT(20/50/80%) with the sweep points (``moelab.gateway.metrics``). The random router and
  the oracle on the whole table (RouteLLM's reference numbers) are given too.
- The LLMRouter table (``split`` column): every offline-capable multi-model policy (a registered
  ``request_router`` whose class overrides ``fit``, not a 2-model one), fitted on ``train`` and run
  on ``test``, its ``cost_weight`` (or ``cost_coe``) swept; each single model; the per-query
  oracle; quality, cost and RouterBench's AIQ over the table's cost range.

``evaluate(table, policies)`` returns a ``TableResult``; ``write_report(results, out)`` writes
``report.md``, ``results.json`` and one cost-quality plot per table.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab import registry
from moelab.gateway import metrics as M
from moelab.gateway.datasets import model_infos
from moelab.gateway.embed import get_embedder
from moelab.gateway.policy import KIND, RequestRouter, RouteRequest, build_policy
from moelab.gateway.table import RoutingTable

TWO_MODEL_DEFAULT = ("threshold:scorer=mf", "threshold:scorer=embed_lr")
COST_GRIDS = {
    "cost_weight": (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0),
    "cost_coe": (0.0, 0.1, 0.25, 0.5, 0.75, 0.9),
}
# a cascade's acceptance threshold (our grid): policies with ``simulate(table, threshold)`` run
# offline on the table, accepting by their learned P(correct), since the table holds no answers
CASCADE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class CachedEmbedder:
    """Wraps an embedder and remembers each text's row, so that the policies of one evaluation
    embed every prompt once."""

    def __init__(self, embedder: Any) -> None:
        self.inner = get_embedder(embedder)
        self.name = self.inner.name
        self._rows: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.inner.dim)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if todo:
            for t, row in zip(todo, np.asarray(self.inner.embed(todo), dtype=np.float32), strict=True):
                self._rows[t] = row
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._rows[t] for t in texts])


@dataclass(frozen=True)
class PolicySpec:
    """``NAME`` or ``NAME:key=value:key=value`` (values read as JSON, else as strings)."""

    label: str
    name: str
    params: dict[str, Any]

    @staticmethod
    def parse(spec: str) -> PolicySpec:
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"a policy spec must be 'NAME' or 'NAME:key=value:...', got {spec!r}")
        name, *pairs = spec.strip().split(":")
        params: dict[str, Any] = {}
        for pair in pairs:
            key, eq, raw = pair.partition("=")
            if not eq or not key:
                raise ValueError(f"policy spec {spec!r}: expected key=value, got {pair!r}")
            try:
                params[key] = json.loads(raw)
            except json.JSONDecodeError:
                params[key] = raw
        label = name + "".join(f"-{v}" for v in params.values())
        return PolicySpec(label, name, params)


def split_by_id(ids: np.ndarray, seed: int = 0, train_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row positions: the distinct ids shuffled by ``seed``, the first
    ``round(train_fraction * n)`` train (our choice; RouteLLM evaluates on whole benchmarks)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    uniq = np.unique(np.asarray(ids))
    perm = np.random.default_rng(seed).permutation(uniq.size)
    train_ids = uniq[perm[: int(round(train_fraction * uniq.size))]]
    mask = np.isin(ids, train_ids)
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def load_policies() -> None:
    """Register the gateway's policies (the package's imports, and this evaluation's own two)."""
    importlib.import_module("moelab.gateway.policies")
    for mod in ("baselines", "threshold"):
        importlib.import_module(f"moelab.gateway.policies.{mod}")


def offline_policies(two_model: bool) -> list[str]:
    """Registered request routers whose class overrides ``fit``, 2-model ones or the others."""
    load_policies()
    out = []
    for name in registry.names(KIND):
        cls = registry.get(KIND, name).obj
        if (
            getattr(cls, "fit", None) is not RequestRouter.fit
            and bool(getattr(cls, "two_model", False)) == two_model
        ):
            out.append(name)
    return out


def _accepts(name: str, param: str) -> bool:
    load_policies()
    sig = inspect.signature(registry.get(KIND, name).obj.__init__)
    return param in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def _build(spec: PolicySpec, embedder: CachedEmbedder, **extra: Any) -> RequestRouter:
    params = dict(spec.params, **extra)
    if "embedder" not in params and _accepts(spec.name, "embedder"):
        params["embedder"] = embedder
    return build_policy(spec.name, **params)


@dataclass
class Row:
    """One line of a report: a policy (or reference) and its numbers (None: not applicable)."""

    label: str
    apgr: float | None = None
    cpt: dict[str, M.CPT] = field(default_factory=dict)
    quality: float | None = None
    cost: float | None = None
    aiq: float | None = None
    points: list[tuple[float, float]] = field(default_factory=list)  # (x, y) as plotted
    note: str = ""
    seconds: float = 0.0


@dataclass
class TableResult:
    name: str
    kind: str  # "two_model" or "multi_model"
    n_train: int
    n_test: int
    summary: dict[str, Any]
    rows: list[Row]


def _curve_row(label: str, curve: M.Curve, w: float, s: float, note: str = "", seconds: float = 0.0) -> Row:
    # AIQ on RouteLLM's cost axis, the % of strong calls over [0, 100]
    return Row(label, apgr=M.apgr(curve, w, s), cpt={f"{int(p * 100)}%": M.cpt(curve, w, s, p) for p in M.CPT_LEVELS},
               aiq=M.aiq(curve.x, curve.y, (0.0, 100.0)), points=curve.points(), note=note, seconds=seconds)  # fmt: skip


def _oracle(w: np.ndarray, s: np.ndarray) -> M.Curve:
    binary = np.isin(w, (0.0, 1.0)).all() and np.isin(s, (0.0, 1.0)).all()
    return M.oracle_curve(w, s) if binary else M.oracle_curve_scores(w, s)


def evaluate_two_model(table: RoutingTable, policies: Sequence[str] = TWO_MODEL_DEFAULT, *, embedder: Any = "minilm",
                       seed: int = 0, random_iters: int = 10, num_results: int = 10) -> TableResult:  # fmt: skip
    """RouteLLM-style evaluation of a weak/strong table (columns ``meta["weak"]``, ``meta["strong"]``)."""
    weak, strong = table.meta.get("weak", table.models[0]), table.meta.get("strong", table.models[-1])
    wi, si = table.column(weak), table.column(strong)
    emb = embedder if isinstance(embedder, CachedEmbedder) else CachedEmbedder(embedder)
    rows: list[Row] = []
    W, S = table.quality[:, wi], table.quality[:, si]
    rows.append(_curve_row("random (whole table)", M.random_sweep(W, S, random_iters, seed, num_results), W.mean(), S.mean(),
                           f"mean of {random_iters} sweeps, all {len(table)} rows"))  # fmt: skip
    rows.append(
        _curve_row("oracle (whole table)", _oracle(W, S), W.mean(), S.mean(), "budget f = 0, 0.1, ..., 1")
    )
    tr, te = split_by_id(table.ids, seed)
    train, test = table.rows(tr), table.rows(te)
    w, s = test.quality[:, wi], test.quality[:, si]
    wq, sq = float(w.mean()), float(s.mean())
    rows.append(
        _curve_row(
            "random",
            M.random_sweep(w, s, random_iters, seed, num_results),
            wq,
            sq,
            f"mean of {random_iters} sweeps",
        )
    )  # noqa: E501
    rows.append(_curve_row("oracle", _oracle(w, s), wq, sq))
    for spec in map(PolicySpec.parse, policies):
        t0 = time.perf_counter()
        try:
            policy = _build(spec, emb).fit(train)
            if callable(getattr(policy, "scores", None)):
                scores = np.asarray(policy.scores(test.prompts), dtype=np.float64)
            else:
                infos = model_infos(test)
                scores = np.array(
                    [policy.route(RouteRequest(prompt=p, models=infos)).score for p in test.prompts]
                )
            if not np.all(np.isfinite(scores)):
                raise ValueError("the policy gives no finite strong-win scores to sweep")
            curve = M.router_sweep(scores, w, s, num_results)
            rows.append(_curve_row(spec.label, curve, wq, sq, seconds=time.perf_counter() - t0))
        except Exception as e:  # noqa: BLE001 - one failing policy is reported, the others still run
            rows.append(
                Row(spec.label, note=f"failed: {type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
            )
    summary = {"weak": weak, "strong": strong, "weak_quality": wq, "strong_quality": sq,
               "weak_quality_all": float(W.mean()), "strong_quality_all": float(S.mean()), "n_all": len(table),
               "seed": seed, "embedder": emb.name}  # fmt: skip
    return TableResult(table.name, "two_model", len(train), len(test), summary, rows)


def _route_all(policy: RequestRouter, test: RoutingTable) -> np.ndarray:
    infos = model_infos(test)
    picks = []
    for p in test.prompts:
        d = policy.route(RouteRequest(prompt=p, models=infos))
        if d.cascade:
            raise ValueError(
                "the policy answers with cascades, which need the models' answers (not in the table)"
            )
        picks.append(test.column(d.model))
    return np.asarray(picks)


def evaluate_multi_model(table: RoutingTable, policies: Sequence[str] | None = None, *, embedder: Any = "minilm",
                         seed: int = 0) -> TableResult:  # fmt: skip
    """RouterBench-style evaluation of a multi-model table with a ``split`` column (train / test)."""
    if table.split is None:
        raise ValueError(
            f"table {table.name!r} needs a split column (train/test) for a multi-model evaluation"
        )
    train, test = table.where_split("train"), table.where_split("test")
    emb = embedder if isinstance(embedder, CachedEmbedder) else CachedEmbedder(embedder)
    specs = [
        PolicySpec.parse(p) for p in (offline_policies(two_model=False) if policies is None else policies)
    ]
    q, c = test.quality, test.cost
    lo, hi = float(c.min()), float(c.max())
    rows = [Row(m, quality=float(q[:, j].mean()), cost=float(c[j]), points=[(float(c[j]), float(q[:, j].mean()))])
            for j, m in enumerate(test.models)]  # fmt: skip
    singles = [(r.cost, r.quality) for r in rows]
    zero = Row("single models' hull (RouterBench zero router)", aiq=M.aiq([x for x, _ in singles], [y for _, y in singles], (lo, hi)),
               points=[tuple(p) for p in M.nondecreasing_hull([x for x, _ in singles], [y for _, y in singles]).tolist()])  # fmt: skip # noqa: E501
    oq, oc = M.oracle_multi(q, c)
    rows += [
        zero,
        Row(
            "oracle (per-query best, cheapest)",
            quality=oq,
            cost=oc,
            aiq=M.aiq([oc], [oq], (lo, hi)),
            points=[(oc, oq)],
        ),
    ]  # noqa: E501
    for spec in specs:
        t0 = time.perf_counter()
        sweep = next((k for k in COST_GRIDS if k not in spec.params and _safe_accepts(spec.name, k)), None)
        grid = COST_GRIDS[sweep] if sweep else (None,)
        pts: list[tuple[float, float]] = []
        try:
            if callable(getattr(registry.get(KIND, spec.name).obj, "simulate", None)):
                policy = _build(spec, emb).fit(train)
                for t in CASCADE_THRESHOLDS:
                    r = policy.simulate(test, threshold=t)
                    pts.append((r["cost"], r["quality"]))
                note = f"acceptance threshold swept over {list(CASCADE_THRESHOLDS)}, simulated (every called model paid)"
            else:
                for value in grid:
                    policy = _build(spec, emb, **({sweep: value} if sweep else {})).fit(train)
                    picks = _route_all(policy, test)
                    pts.append((float(c[picks].mean()), float(q[np.arange(len(test)), picks].mean())))
                note = f"{sweep} swept over {list(grid)}" if sweep else "one operating point"
            best = max(pts, key=lambda p: (p[1], -p[0]))
            rows.append(Row(spec.label, quality=best[1], cost=best[0], aiq=M.aiq([p[0] for p in pts], [p[1] for p in pts], (lo, hi)),
                            points=pts, note=note, seconds=time.perf_counter() - t0))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - one failing policy is reported, the others still run
            rows.append(
                Row(spec.label, note=f"failed: {type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
            )
    summary = {
        "cost_unit": table.meta.get("cost_unit", ""),
        "cost_range": (lo, hi),
        "seed": seed,
        "embedder": emb.name,
    }
    return TableResult(table.name, "multi_model", len(train), len(test), summary, rows)


def _safe_accepts(name: str, param: str) -> bool:
    try:
        return _accepts(name, param)
    except ValueError:
        return False


def evaluate(table: RoutingTable, policies: Sequence[str] | None = None, *, embedder: Any = "minilm",
             seed: int = 0, random_iters: int = 10) -> TableResult:  # fmt: skip
    """Evaluate ``policies`` (specs ``NAME[:key=value...]``; None: the defaults) on ``table``: a
    2-model table RouteLLM's way, a multi-model table with a split RouterBench's way (module doc)."""
    if not isinstance(table, RoutingTable):
        raise TypeError(f"table must be a RoutingTable, got {type(table).__name__}")
    if len(table.models) == 2:
        return evaluate_two_model(table, TWO_MODEL_DEFAULT if policies is None else policies, embedder=embedder,
                                  seed=seed, random_iters=random_iters)  # fmt: skip
    return evaluate_multi_model(table, policies, embedder=embedder, seed=seed)


# ---- the report --------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _cpt_cell(c: M.CPT | None) -> str:
    if c is None:
        return ""
    if c.value is not None:
        return f"{c.value:.1f}%"
    first = f"; first reached at {c.first_reached:.1f}%" if c.first_reached is not None else ""
    return f"undefined ({c.reason}{first})"


def render_markdown(results: Sequence[TableResult], plots: dict[str, str] | None = None) -> str:
    """The markdown report of ``results`` (``plots``: table name -> image file name)."""
    lines = ["# moelab gateway eval", ""]
    for r in results:
        lines += [f"## {r.name}", ""]
        if r.kind == "two_model":
            s = r.summary
            lines += [
                f"Weak `{s['weak']}`, strong `{s['strong']}`. Whole table: n = {s['n_all']}, weak "
                f"{_fmt(s['weak_quality_all'], 4)}, strong {_fmt(s['strong_quality_all'], 4)}. Test half "
                f"(seed {s['seed']}): n = {r.n_test} (train {r.n_train}), weak {_fmt(s['weak_quality'], 4)}, "
                f"strong {_fmt(s['strong_quality'], 4)}. Embedder: {s['embedder']}. AIQ: RouterBench's, with "
                "the % of strong calls as the cost, over [0, 100].",
                "",
                "| router | APGR | CPT(20%) | CPT(50%) | CPT(80%) | AIQ | note |",
                "|---|---|---|---|---|---|---|",
            ]
            for row in r.rows:
                cells = [_cpt_cell(row.cpt.get(k)) for k in ("20%", "50%", "80%")]
                lines.append(
                    f"| {row.label} | {_fmt(row.apgr)} | {' | '.join(cells)} | {_fmt(row.aiq)} | {row.note} |"
                )
            lines += ["", "Sweep points (% strong calls: quality):", ""]
            for row in r.rows:
                if row.points:
                    pts = ", ".join(f"{x:.1f}: {y:.4f}" for x, y in row.points)
                    lines.append(f"- {row.label}: {pts}")
        else:
            lo, hi = r.summary["cost_range"]
            lines += [
                f"Train n = {r.n_train}, test n = {r.n_test}. Cost: {r.summary['cost_unit']}; AIQ over "
                f"[{lo:g}, {hi:g}]. Embedder: {r.summary['embedder']}.",
                "",
                "| router | quality (best point) | cost | AIQ | note |",
                "|---|---|---|---|---|",
            ]
            for row in r.rows:
                lines.append(
                    f"| {row.label} | {_fmt(row.quality)} | {_fmt(row.cost)} | {_fmt(row.aiq)} | {row.note} |"
                )
            lines += ["", "Operating points (cost: quality):", ""]
            for row in r.rows:
                if len(row.points) > 1:
                    lines.append(f"- {row.label}: " + ", ".join(f"{x:.3f}: {y:.4f}" for x, y in row.points))
        if plots and r.name in plots:
            lines += ["", f"![{r.name}]({plots[r.name]})"]
        lines.append("")
    return "\n".join(lines)


def plot(result: TableResult, path: Path) -> None:
    """The cost-quality plot of one table (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for row in result.rows:
        if not row.points or "whole table" in row.label:
            continue
        xs, ys = zip(*row.points, strict=True)
        if len(xs) == 1:
            ax.scatter(xs, ys, s=18, label=row.label)
        else:
            ax.plot(xs, ys, marker=".", label=row.label, linestyle="--" if "hull" in row.label else "-")
    if result.kind == "two_model":
        ax.axhline(result.summary["weak_quality"], color="grey", lw=0.7, ls=":")
        ax.axhline(result.summary["strong_quality"], color="grey", lw=0.7, ls=":")
        ax.set_xlabel("% calls to the strong model (test half)")
    else:
        ax.set_xlabel(f"cost ({result.summary['cost_unit']})")
    ax.set_ylabel("quality")
    ax.set_title(result.name)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(r: TableResult) -> dict[str, Any]:
    rows = []
    for row in r.rows:
        cpt = {k: {"value": c.value, "reason": c.reason, "first_reached": c.first_reached, "np_interp": c.np_interp}
               for k, c in row.cpt.items()}  # fmt: skip
        rows.append({"label": row.label, "apgr": row.apgr, "cpt": cpt, "quality": row.quality, "cost": row.cost,
                     "aiq": row.aiq, "points": row.points, "note": row.note, "seconds": round(row.seconds, 2)})  # fmt: skip
    return {
        "name": r.name,
        "kind": r.kind,
        "n_train": r.n_train,
        "n_test": r.n_test,
        "summary": r.summary,
        "rows": rows,
    }


def write_report(results: Sequence[TableResult], out: str | Path) -> Path:
    """Write ``report.md``, ``results.json`` and ``<table>.png`` under ``out``; returns the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for r in results:
        plot(r, out / f"{r.name}.png")
        plots[r.name] = f"{r.name}.png"
    (out / "results.json").write_text(json.dumps([_jsonable(r) for r in results], indent=1) + "\n")
    path = out / "report.md"
    path.write_text(render_markdown(results, plots))
    return path
