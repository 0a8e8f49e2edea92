"""The ``moba`` reproduction: its runner trains every arm on the recall task, and its verdict reads recall."""

from __future__ import annotations

import moelab.repro.moba as moba_repro
from moelab.repro.claims import REPRODUCTIONS


def test_runner_trains_every_arm_and_reports_recall(monkeypatch):
    monkeypatch.setattr(moba_repro, "EVAL_SEQUENCES", 8)
    rows = moba_repro.run_moba_recall(
        seed=0, model=dict(moba_repro.RECALL_MODEL), train={"steps": 2, "batch_size": 2, "threads": 1}
    )
    assert list(rows) == list(moba_repro.ARMS)
    for row in rows.values():
        assert 0.0 <= row["recall"] <= 1.0 and row["val_loss"] > 0 and row["train_s"] > 0
    assert "recall accuracy" in REPRODUCTIONS["moba"].describe(rows)


def test_verdict_follows_recall():
    rep = REPRODUCTIONS["moba"]
    good = [
        {
            "dense": {"recall": 0.90},
            "moba_large": {"recall": 0.40 + d},
            "moba_small": {"recall": 0.60 + d},
            "moba_small_kconv": {"recall": 0.90 + d},
        }
        for d in (0.0, 0.004, -0.004)
    ]
    assert rep.judge(good)["verdict"] == "holds"
    bad = [{**rows, "moba_small": {"recall": 0.30}} for rows in good]  # small blocks recall less
    assert rep.judge(bad)["verdict"] != "holds"
