"""``moelab gateway eval`` end to end on small slices (hashing embeddings): the report's reference
rows equal the metrics recomputed by brute force here, and every default multi-model policy gets
numbers (a cascade by simulation, since the tables hold no answers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from moelab.cli import app
from moelab.gateway.datasets import load_table
from moelab.gateway.evaluate import CASCADE_THRESHOLDS, evaluate_multi_model


def test_eval_cli_writes_report_with_brute_force_reference_rows(tmp_path):
    res = CliRunner().invoke(
        app,
        ["gateway", "eval", "--data", "routellm_gsm8k", "--limit", "300", "--embedder", "hashing",
         "--policies", "threshold:scorer=mf", "--out", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.md").is_file() and (tmp_path / "routellm_gsm8k.png").is_file()
    (table,) = json.loads((tmp_path / "results.json").read_text())
    rows = {r["label"]: r for r in table["rows"]}
    # the oracle on the same 300 rows, by brute force: at budget f it calls the strong model on the
    # round(f * n) prompts where only the strong model is right; APGR averages PGR over f = 0..1
    full = load_table("routellm_gsm8k")
    keep = np.sort(np.random.default_rng(0).permutation(len(full))[:300])
    w, s = full.quality[keep, 0], full.quality[keep, 1]
    gain = np.sort((s > w).astype(float))[::-1]
    pgr = []
    for f in np.linspace(0, 1, 11):
        quality = (w.sum() + gain[: int(round(f * len(w)))].sum()) / len(w)
        pgr.append((quality - w.mean()) / (s.mean() - w.mean()))
    apgr = (sum(pgr) - (pgr[0] + pgr[-1]) / 2) / 10  # the trapezoid rule over the 11 budgets
    assert rows["oracle (whole table)"]["apgr"] == pytest.approx(apgr, abs=1e-9)
    # the oracle's curve rises then stays flat (concave), so its own hull is the curve: AIQ is the
    # area under it over [0, 100]% strong calls, by the trapezoid rule
    x = np.linspace(0, 100, 11)
    y = np.array([(w.sum() + gain[: int(round(f * len(w)))].sum()) / len(w) for f in x / 100])
    area = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x))) / 100
    assert rows["oracle (whole table)"]["aiq"] == pytest.approx(area, abs=1e-9)
    assert rows["threshold-mf"]["apgr"] is not None and rows["threshold-mf"]["note"] == ""


def test_multi_model_eval_gives_every_default_policy_numbers():
    full = load_table("llmrouter")
    rng = np.random.default_rng(0)
    split = np.asarray(full.split)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    table = full.rows(np.sort(np.concatenate([rng.permutation(train)[:800], test])))
    result = evaluate_multi_model(table, ["cascade", "knn", "centroid"], embedder="hashing")
    rows = {r.label: r for r in result.rows}
    q, c = table.where_split("test").quality, table.where_split("test").cost
    best = q.max(axis=1)
    cheapest = [min(c[j] for j in np.flatnonzero(q[i] == best[i])) for i in range(len(q))]
    oracle = rows["oracle (per-query best, cheapest)"]
    assert oracle.quality == pytest.approx(best.mean()) and oracle.cost == pytest.approx(np.mean(cheapest))
    for name in ("cascade", "knn", "centroid"):
        assert not rows[name].note.startswith("failed"), rows[name].note
        assert rows[name].aiq is not None and 0 < rows[name].aiq <= oracle.quality
    assert len(rows["cascade"].points) == len(CASCADE_THRESHOLDS)
