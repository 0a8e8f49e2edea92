"""``moelab repro``: verdict rules against hand-written numbers, docs merging, and a tiny real run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moelab.analysis.intervals import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE
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


# two steps of a tiny model: enough to exercise a reproduction end to end
TINY_TRAIN = {"steps": 2, "batch_size": 2, "seq_len": 32, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1}
JITTER = (-0.002, 0.0, 0.003)  # three seeds' small, independent differences


def seeds_of(rows_for_seed):
    """Three seeds' rows: ``rows_for_seed(jitter)`` per seed."""
    return [rows_for_seed(j) for j in JITTER]


def verdict(name, per_seed):
    return REPRODUCTIONS[name].judge(per_seed)["verdict"]


def test_load_balance_verdict():
    def case(lb_loss, lb_balance):
        return seeds_of(
            lambda j: {"no_aux": row(2.0 + j, 2.5), "load_balance": row(lb_loss + 2 * j, lb_balance + j)}
        )

    assert verdict("load_balance", case(2.0, 1.3)) == HOLDS
    assert verdict("load_balance", case(2.0, 2.6)) == DOES_NOT_HOLD  # balanced worse
    assert (
        verdict("load_balance", case(2.0 + 2 * LOSS_MARGIN, 1.3)) == DOES_NOT_HOLD
    )  # loss worse beyond the margin
    assert (
        verdict("load_balance", case(2.0 + LOSS_MARGIN, 1.3)) == INCONCLUSIVE
    )  # the interval straddles the margin


def test_z_verdict_reads_z_and_loss():
    ok = seeds_of(lambda j: {"lb": row(2.0, 1.2, z=10.0 + j), "lb_z": row(2.01 + j, 1.2, z=1.0)})
    assert verdict("z", ok) == HOLDS
    bad = seeds_of(lambda j: {"lb": row(2.0, 1.2, z=1.0), "lb_z": row(2.0 + j, 1.2, z=2.0 + j)})
    assert verdict("z", bad) == DOES_NOT_HOLD


def test_aux_free_verdict():
    def case(bias_balance):
        return seeds_of(
            lambda j: {
                "none": row(2.0, 3.0),
                "aux_loss": row(2.0 + j, 1.3),
                "bias": row(1.99, bias_balance + j),
            }
        )

    assert verdict("aux_loss_free", case(1.35)) == HOLDS
    assert verdict("aux_loss_free", case(2.0)) == DOES_NOT_HOLD  # balances worse than the aux loss


def test_expert_choice_verdict_needs_balance_and_a_real_loss_gap():
    def case(ec_loss):
        return seeds_of(lambda j: {"top2": row(2.0, 1.4), "expert_choice": row(ec_loss + j, 1.0)})

    assert verdict("expert_choice", case(1.9)) == HOLDS
    assert verdict("expert_choice", case(2.0 - LOSS_MARGIN / 2)) == INCONCLUSIVE  # inside the margin
    assert verdict("expert_choice", case(2.1)) == DOES_NOT_HOLD


def test_one_seed_or_noisy_seeds_are_inconclusive():
    one = [{"top2": row(2.0, 1.4), "expert_choice": row(1.9, 1.0)}]
    assert verdict("expert_choice", one) == INCONCLUSIVE  # no interval from one seed
    noisy = [{"top2": row(2.0, 1.4), "expert_choice": row(x, 1.0)} for x in (1.8, 2.1, 1.9)]
    assert verdict("expert_choice", noisy) == INCONCLUSIVE  # a mean gap of 0.067, but the seeds disagree


def test_write_docs_merges_rows_and_keeps_the_page(tmp_path):
    doc = tmp_path / "reproductions.md"
    doc.write_text(f"# R\n\nintro\n\n{BEGIN}\nOLDROW\n{END}\n\nafter\n")
    rec = {
        "method": "z",
        "paper": "p",
        "claim": "c",
        "measured": "m",
        "verdict": "does not hold",
        "seeds": [0],
        "steps": 3,
    }
    write_docs({"z": rec}, doc)
    write_docs({"load_balance": {**rec, "method": "load_balance", "verdict": "holds"}}, doc)
    text = doc.read_text()
    assert "intro" in text and "after" in text and "OLDROW" not in text
    assert "`z`" in text and "**does not hold**" in text and "`load_balance`" in text
    assert set(json.loads(doc.with_suffix(".json").read_text())) == {"z", "load_balance"}
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        write_docs({"z": rec}, doc)


def test_run_repro_tiny_budget(tmp_path):
    model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "num_experts": 4, "top_k": 2, "max_seq_len": 32}
    train = dict(TINY_TRAIN)
    rec = run_repro("z", seeds=[0, 1], model=model, train=train, out=str(tmp_path), jobs=1, progress=False)
    assert set(rec["rows"]) == {"lb", "lb_z"} and rec["verdict"] in (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)
    assert rec["rows"]["lb"]["z"] > 0 and len(rec["per_seed"]) == 2
    assert rec["per_seed"][0]["lb"]["val_loss"] != rec["per_seed"][1]["lb"]["val_loss"]
    # every condition is judged on the seeds' paired values
    z_diff = [p["lb_z"]["z"] - p["lb"]["z"] for p in rec["per_seed"]]
    first = rec["conditions"][0]
    assert first["condition"] == "z: lb_z - lb < 0" and first["interval"]["n"] == 2
    assert first["interval"]["mean"] == pytest.approx(sum(z_diff) / 2)
    assert (tmp_path / "z" / "repro.json").exists()
    with pytest.raises(ValueError, match="unknown reproduction"):
        run_repro("nope", seeds=[0], model=model, train=train, out=str(tmp_path))


def loc(srp, sch_2k, lru=0.5, lookahead=0.6, val_loss=2.0):
    return {**row(val_loss, 1.2), "srp": srp, "sch_2k": sch_2k, "lru": lru, "lfu": lru, "belady": lookahead,
            "lookahead": lookahead}  # fmt: skip


def test_lrc_verdicts():
    def arch(half_srp):
        return seeds_of(
            lambda j: {
                "every_layer": loc(0.6 + j, 0.8),
                "shared_expert": loc(0.5, 0.7),
                "every_2nd": loc(half_srp, 0.75),
            }
        )

    assert verdict("lrc_architecture", arch(0.55)) == HOLDS
    assert verdict("lrc_architecture", arch(0.65)) == DOES_NOT_HOLD  # a sparser model more consistent in SRP

    def local(strong_sch):
        return seeds_of(
            lambda j: {
                "global": loc(0.6, 0.8 + j),
                "seq_1e-2": loc(0.55 + j, 0.75),
                "seq_1e-1": loc(0.5, strong_sch),
            }
        )

    assert verdict("lrc_local_balance", local(0.7)) == HOLDS
    assert verdict("lrc_local_balance", local(0.76)) == DOES_NOT_HOLD  # SCH not monotone


def test_lookahead_verdict_needs_a_margin():
    from moelab.repro.claims import HIT_MARGIN

    def case(gain):
        return seeds_of(lambda j: {"topk": loc(0.5, 0.7, lru=0.5 + j, lookahead=0.5 + gain)})

    assert verdict("lookahead_cache", case(0.1)) == HOLDS
    assert verdict("lookahead_cache", case(HIT_MARGIN / 2)) == INCONCLUSIVE
    assert verdict("lookahead_cache", case(-0.1)) == DOES_NOT_HOLD


def test_locality_reproduction_runs_arms_with_their_own_architecture(tmp_path):
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "max_seq_len": 32}
    train = dict(TINY_TRAIN)
    rec = run_repro(
        "lrc_architecture", seeds=[0], model=model, train=train, out=str(tmp_path), jobs=1, progress=False
    )
    assert set(rec["rows"]) == {"every_layer", "shared_expert", "every_2nd"}
    for label in rec["rows"]:
        assert 0 < rec["rows"][label]["srp"] <= 1 and 0 < rec["rows"][label]["lookahead"] <= 1
    assert rec["arms"]["every_2nd"]["model"] == {"moe_every": 2}
    summary = json.loads((tmp_path / "lrc_architecture" / "results.json").read_text())
    layers = {label: len(r["seeds"]["0"]["locality"]) for label, r in summary["routers"].items()}
    assert layers == {"every_layer": 2, "shared_expert": 2, "every_2nd": 1}


def test_multilingual_verdict_reads_a_u_over_layers():
    from moelab.repro.claims import _u_shape_parts

    assert _u_shape_parts(8) == ([0, 1], [2, 3, 4, 5], [6, 7])
    assert _u_shape_parts(4) == ([0], [1, 2], [3])
    u = {"layers": 4.0, "layer0": 0.03, "layer1": 0.01, "layer2": 0.012, "layer3": 0.04, "val_loss": 2.0}
    assert (
        verdict("multilingual_u_shape", seeds_of(lambda j: {"bilingual": {**u, "layer1": 0.01 + j}})) == HOLDS
    )
    rising = {**u, "layer0": 0.005}  # the first quarter is below the middle: no U
    assert (
        verdict("multilingual_u_shape", seeds_of(lambda j: {"bilingual": {**rising, "layer1": 0.01 + j}}))
        == DOES_NOT_HOLD
    )


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
    train = dict(TINY_TRAIN)
    rec = run_repro(
        "multilingual_u_shape", seeds=[0], model=model, train=train, out=str(tmp_path), progress=False
    )
    row = rec["rows"]["bilingual"]
    assert row["layers"] == 8 and all(0 <= row[f"layer{i}"] <= 1 for i in range(8))
    assert rec["verdict"] == INCONCLUSIVE and "divergence by MoE layer" in rec["measured"]  # one seed
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


def test_stored_rows_are_rejudged_from_their_seeds():
    """A record of the rule before intervals (``holds`` / ``seed_holds``) is judged again from its
    per-seed rows; the old verdict is kept beside the new one."""
    from moelab.repro.docs import rejudge, verdict_text

    rec = {
        "name": "expert_choice",
        "holds": False,
        "seed_holds": [False, True],
        "rows": {"top2": row(2.0, 1.4), "expert_choice": row(1.95, 1.0)},
        "per_seed": [
            {"top2": row(2.0, 1.4), "expert_choice": row(2.0, 1.0)},  # a tie on seed 0
            {"top2": row(2.0, 1.4), "expert_choice": row(1.9, 1.0)},
        ],
    }
    out = rejudge(rec)
    assert (
        out["previous_verdict"] == "mixed (1 of 2 seeds)" and "holds" not in out and "seed_holds" not in out
    )
    assert out["verdict"] == INCONCLUSIVE and verdict_text(out) == "**inconclusive**"
    cond = out["conditions"][1]
    assert cond["condition"] == "val loss: expert_choice - top2 < -0.02"
    assert cond["interval"]["mean"] == pytest.approx(-0.05) and cond["verdict"] == INCONCLUSIVE
    assert verdict_text({"verdict": "holds"}) == "holds"
    assert rejudge({"name": "unknown", "holds": True}) == {"name": "unknown", "holds": True}


def test_repro_cli_checks_prerequisites_and_paths_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from moelab.cli import app
    from moelab.repro.docs import docs_path

    # the docs page is found from the package, whatever the current directory
    monkeypatch.chdir(tmp_path)
    assert docs_path().is_file() and docs_path().parent.name == "docs"
    # the reproduction's own prerequisite check (bound when the claims were defined), so the test
    # does not depend on whether this machine has the Bibles
    rep = REPRODUCTIONS["multilingual_u_shape"]
    missing = dataclasses.replace(rep, requires=lambda: "the 'diatheke' program is not installed")
    monkeypatch.setitem(REPRODUCTIONS, "multilingual_u_shape", missing)
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


@pytest.mark.parametrize("name", sorted(n for n, r in REPRODUCTIONS.items() if r.runner is None))
def test_every_reproductions_arms_build_their_models(name):
    """Each arm's MoELMConfig is valid and its router builds (catches a misspelt setting before a
    ten-minute run): the same checks ``moelab repro`` makes before training."""
    from moelab.repro.runner import settings_for
    from moelab.train.compare import arm_causal_at_eval, router_configs

    rep = REPRODUCTIONS[name]
    model = {"d_model": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 32}
    s = settings_for(rep, seeds=[0], model=model, train={"steps": 1}, out="unused")
    for label in rep.arms:
        mcfg, _ = router_configs(label, s, 256)
        # a depth arm (mod, mor, ...) keeps the model's expert router and sets the depth router
        assert rep.arms[label].router in (mcfg.router, mcfg.depth)
        arm_causal_at_eval(label, s)


def test_pyramid_arms_differ_in_expert_counts_only():
    from moelab.models import MoELM
    from moelab.repro.runner import settings_for
    from moelab.train.compare import router_configs

    rep = REPRODUCTIONS["pyramid"]
    model = {"d_model": 32, "n_layers": 4, "n_heads": 2, "max_seq_len": 32}
    s = settings_for(rep, seeds=[0], model=model, train={"steps": 1}, out="unused")
    counts = {}
    for label in rep.arms:
        mcfg, _ = router_configs(label, s, 256)
        counts[label] = [MoELM(mcfg).blocks[i].ffn.num_experts for i in range(4)]
    assert counts == {"uniform": [8, 8, 8, 8], "pyramid": [4, 4, 8, 8], "pr_moe": [4, 4, 8, 8]}
