"""``moelab repro``: verdict rules against hand-written numbers, docs merging, and a tiny real run."""

from __future__ import annotations

import json

import pytest

from moelab.repro.claims import LOSS_MARGIN, REPRODUCTIONS
from moelab.repro.docs import BEGIN, END, write_docs
from moelab.repro.runner import run_repro


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


def loc(srp, sch_2k, lru=0.5, lookahead=0.6, val_loss=2.0):
    return {**row(val_loss, 1.2), "srp": srp, "sch_2k": sch_2k, "lru": lru, "lfu": lru, "belady": lookahead,
            "lookahead": lookahead}  # fmt: skip


def test_lrc_verdicts():
    v = REPRODUCTIONS["lrc_architecture"].verdict
    ok = {"every_layer": loc(0.6, 0.8), "shared_expert": loc(0.5, 0.7), "every_2nd": loc(0.55, 0.75)}
    assert v(ok)[0]
    assert not v({**ok, "every_2nd": loc(0.65, 0.75)})[0]  # a sparser model more consistent in SRP
    v = REPRODUCTIONS["lrc_local_balance"].verdict
    ok = {"global": loc(0.6, 0.8), "seq_1e-2": loc(0.55, 0.75), "seq_1e-1": loc(0.5, 0.7)}
    assert v(ok)[0]
    assert not v({**ok, "seq_1e-1": loc(0.5, 0.76)})[0]  # SCH not monotone


def test_lookahead_verdict_needs_a_margin():
    from moelab.repro.claims import HIT_MARGIN

    v = REPRODUCTIONS["lookahead_cache"].verdict
    assert v({"topk": loc(0.5, 0.7, lru=0.5, lookahead=0.6)})[0]
    assert not v({"topk": loc(0.5, 0.7, lru=0.5, lookahead=0.5 + HIT_MARGIN / 2)})[0]


def test_locality_reproduction_runs_arms_with_their_own_architecture(tmp_path):
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "max_seq_len": 32}
    train = {
        "steps": 2,
        "batch_size": 2,
        "seq_len": 32,
        "warmup_steps": 1,
        "eval_every": 2,
        "eval_batches": 1,
    }
    rec = run_repro(
        "lrc_architecture", seeds=[0], model=model, train=train, out=str(tmp_path), jobs=1, progress=False
    )
    assert set(rec["rows"]) == {"every_layer", "shared_expert", "every_2nd"}
    for label in rec["rows"]:
        assert 0 < rec["rows"][label]["srp"] <= 1 and 0 < rec["rows"][label]["lookahead"] <= 1
    assert rec["arms"]["every_2nd"]["model"] == {"moe_every": 2}
    summary = json.loads((tmp_path / "lrc_architecture" / "seed0" / "results.json").read_text())
    layers = {label: len(r["locality"]) for label, r in summary["routers"].items()}
    assert layers == {"every_layer": 2, "shared_expert": 2, "every_2nd": 1}


def test_multilingual_verdict_reads_a_u_over_layers():
    from moelab.repro.claims import _u_shape_parts

    assert _u_shape_parts(8) == ([0, 1], [2, 3, 4, 5], [6, 7])
    assert _u_shape_parts(4) == ([0], [1, 2], [3])
    v = REPRODUCTIONS["multilingual_u_shape"].verdict
    u = {"layers": 4.0, "layer0": 0.03, "layer1": 0.01, "layer2": 0.012, "layer3": 0.04, "val_loss": 2.0}
    assert v({"bilingual": u})[0]
    rising = {**u, "layer0": 0.005}  # the first quarter is below the middle: no U
    assert not v({"bilingual": rising})[0]


def test_multilingual_runner_on_synthetic_parallel_verses(tmp_path, monkeypatch):
    """The runner end to end, with verses made up here instead of diatheke's Bibles."""
    import moelab.analysis.crosslingual as cl

    words_en = ["light", "water", "earth", "day", "night", "heaven", "seed", "tree"]
    words_es = ["luz", "agua", "tierra", "dia", "noche", "cielo", "semilla", "arbol"]
    verses = []
    for b, book in enumerate(["Genesis", "Exodus", "Psalms", "John"]):
        for v in range(60):
            i = (b * 7 + v) % 8
            verses.append((f"{book} 1:{v + 1}", f"the {words_en[i]} and the {words_en[i - 1]}",
                           f"la {words_es[i]} y la {words_es[i - 1]}"))  # fmt: skip
    monkeypatch.setattr(cl, "parallel_verses", lambda *a, **k: verses)
    model = {"d_model": 32, "n_heads": 2, "num_experts": 4, "top_k": 2}
    train = {
        "steps": 2,
        "batch_size": 2,
        "seq_len": 32,
        "warmup_steps": 1,
        "eval_every": 2,
        "eval_batches": 1,
    }
    rec = run_repro(
        "multilingual_u_shape", seeds=[0], model=model, train=train, out=str(tmp_path), progress=False
    )
    row = rec["rows"]["bilingual"]
    assert row["layers"] == 8 and all(0 <= row[f"layer{i}"] <= 1 for i in range(8))
    assert isinstance(rec["holds"], bool) and "divergence by MoE layer" in rec["measured"]
    files = sorted(p.name for p in (tmp_path / "multilingual_u_shape" / "seed0" / "data").iterdir())
    assert files[:2] == ["en_Exodus.txt", "en_Genesis.txt"] and len(files) == 8


def test_corpus_helpers_split_and_write(tmp_path):
    from moelab.analysis.crosslingual import split_parallel, write_bilingual_corpus

    verses = [(f"1 John 1:{i}", f"en {i}", f"es {i}") for i in range(10)]
    train, held = split_parallel(verses, 5)
    assert [v[0] for v in held] == ["1 John 1:0", "1 John 1:5"] and len(train) == 8
    d = write_bilingual_corpus(train, tmp_path / "c")
    assert (d / "en_1_John.txt").read_text().splitlines() == [f"en {i}" for i in range(10) if i % 5]
    assert (d / "es_1_John.txt").exists()
    with pytest.raises(ValueError, match="every"):
        split_parallel(verses, 1)


def test_a_claim_holds_only_on_every_seed():
    from moelab.repro.docs import rejudge, verdict_text

    good, tie = row(1.9, 1.0), row(2.0, 1.4)
    rec = {
        "name": "expert_choice",
        "holds": True,
        "rows": {"top2": row(2.0, 1.4), "expert_choice": row(1.95, 1.0)},  # the mean holds...
        "per_seed": [
            {"top2": tie, "expert_choice": row(2.0, 1.0)},  # ...seed 0 is a tie
            {"top2": tie, "expert_choice": good},
        ],
    }
    out = rejudge(rec)
    assert out["seed_holds"] == [False, True] and out["holds"] is False
    assert verdict_text(out) == "**mixed**: holds on 1 of 2 seeds"
    assert verdict_text({"holds": True, "seed_holds": [True, True]}) == "holds"
    assert verdict_text({"holds": False, "seed_holds": [False, False]}) == "**does not hold**"
    assert rejudge({"name": "unknown", "holds": True}) == {"name": "unknown", "holds": True}


def test_repro_cli_checks_prerequisites_and_paths_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import moelab.repro.multilingual as ml
    from moelab.cli import app
    from moelab.repro.docs import docs_path

    # the docs page is found from the package, whatever the current directory
    monkeypatch.chdir(tmp_path)
    assert docs_path().is_file() and docs_path().parent.name == "docs"
    monkeypatch.setattr(ml, "bibles_missing", lambda: "the 'diatheke' program is not installed")
    res = CliRunner().invoke(app, ["repro", "multilingual_u_shape", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    assert "skip multilingual_u_shape: the 'diatheke' program is not installed" in res.output
    assert "nothing to run" in res.output and not (tmp_path / "o" / "multilingual_u_shape").exists()
    res = CliRunner().invoke(
        app,
        ["repro", "z", "--write-docs", "--docs", str(tmp_path / "missing.md"), "--out", str(tmp_path / "o")],
    )
    assert res.exit_code == 2 and "missing.md does not exist" in res.output
    assert not (tmp_path / "o" / "z").exists()  # nothing trained
