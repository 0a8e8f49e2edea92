"""``moelab repro``: verdict rules against hand-written numbers, docs merging, and a tiny real run."""

from __future__ import annotations

import json

import pytest

from moelab.train.repro import BEGIN, END, LOSS_MARGIN, REPRODUCTIONS, run_repro, write_docs


def row(val_loss, max_over_mean, z=1.0, max_abs_logit=1.0):
    return {
        "val_loss": val_loss,
        "max_over_mean": max_over_mean,
        "drop_rate": 0.0,
        "entropy": 0.9,
        "z": z,
        "max_abs_logit": max_abs_logit,
    }


def test_load_balance_verdict():
    v = REPRODUCTIONS["load_balance"].verdict
    assert v({"no_aux": row(2.0, 2.5), "load_balance": row(2.0, 1.3)})[0]
    assert not v({"no_aux": row(2.0, 2.5), "load_balance": row(2.0, 2.6)})[0]  # no better balanced
    assert not v({"no_aux": row(2.0, 2.5), "load_balance": row(2.0 + 2 * LOSS_MARGIN, 1.3)})[0]  # worse loss


def test_z_verdict_reads_z_and_loss():
    v = REPRODUCTIONS["z"].verdict
    assert v({"lb": row(2.0, 1.2, z=10.0), "lb_z": row(2.01, 1.2, z=1.0)})[0]
    assert not v({"lb": row(2.0, 1.2, z=1.0), "lb_z": row(2.0, 1.2, z=2.0)})[0]


def test_aux_free_verdict():
    v = REPRODUCTIONS["aux_loss_free"].verdict
    ok = {"none": row(2.0, 3.0), "aux_loss": row(2.0, 1.3), "bias": row(1.99, 1.35)}
    assert v(ok)[0]
    assert not v({**ok, "bias": row(1.99, 2.0)})[0]  # balances worse than the aux loss


def test_expert_choice_verdict_needs_balance_and_a_real_loss_gap():
    v = REPRODUCTIONS["expert_choice"].verdict
    assert v({"top2": row(2.0, 1.4), "expert_choice": row(1.9, 1.0)})[0]
    assert not v({"top2": row(2.0, 1.4), "expert_choice": row(2.0 - LOSS_MARGIN / 2, 1.0)})[0]


def test_write_docs_merges_rows_and_keeps_the_page(tmp_path):
    doc = tmp_path / "reproductions.md"
    doc.write_text(f"# R\n\nintro\n\n{BEGIN}\nOLDROW\n{END}\n\nafter\n")
    rec = {
        "method": "z",
        "paper": "p",
        "claim": "c",
        "measured": "m",
        "holds": False,
        "seeds": [0],
        "steps": 3,
    }
    write_docs({"z": rec}, doc)
    write_docs({"load_balance": {**rec, "method": "load_balance", "holds": True}}, doc)
    text = doc.read_text()
    assert "intro" in text and "after" in text and "OLDROW" not in text
    assert "`z`" in text and "**does not hold**" in text and "`load_balance`" in text
    assert set(json.loads(doc.with_suffix(".json").read_text())) == {"z", "load_balance"}
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        write_docs({"z": rec}, doc)


def test_run_repro_tiny_budget(tmp_path):
    model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "num_experts": 4, "top_k": 2, "max_seq_len": 32}
    train = {
        "steps": 2,
        "batch_size": 2,
        "seq_len": 32,
        "warmup_steps": 1,
        "eval_every": 2,
        "eval_batches": 1,
    }
    rec = run_repro("z", seeds=[0], model=model, train=train, out=str(tmp_path), jobs=1, progress=False)
    assert set(rec["rows"]) == {"lb", "lb_z"} and isinstance(rec["holds"], bool)
    assert rec["rows"]["lb"]["z"] > 0
    assert (tmp_path / "z" / "repro.json").exists()
    with pytest.raises(ValueError, match="unknown reproduction"):
        run_repro("nope", seeds=[0], model=model, train=train, out=str(tmp_path))
