"""`moelab compare` and `moelab train` end to end on a tiny budget."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from moelab.analysis.intervals import paired_interval, standard_error, t_interval
from moelab.cli import app
from moelab.models import MoELM
from moelab.train.compare import CompareSettings, run_compare

TINY = [
    "--d-model",
    "16",
    "--layers",
    "2",
    "--heads",
    "2",
    "--experts",
    "4",
    "--top-k",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--eval-every",
    "2",
    "--eval-batches",
    "2",
]


def test_compare_cli_writes_report_json_and_plots(tmp_path, texts):
    args = [
        "compare",
        "--routers",
        "topk,sigmoid_topk,expert_choice",
        "--steps",
        "4",
        "--seeds",
        "3,4",
        "--final-eval-batches",
        "3",
        "--name",
        "smoke",
        "--out",
        str(tmp_path / "runs"),
        "--data",
        str(texts),
        "--jobs",
        "3",
        "--no-progress",
        *TINY,
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for router in ("topk", "sigmoid_topk", "expert_choice"):
        assert router in res.output
    assert "val loss" in res.output and "drop %" in res.output and "entropy" in res.output
    out = tmp_path / "runs" / "smoke"
    for name in ("report.md", "results.json", "loss_curves.png", "expert_load.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 200, name
    data = json.loads((out / "results.json").read_text())
    assert list(data["routers"]) == ["topk", "sigmoid_topk", "expert_choice"] and data["jobs"] == 3
    assert data["seeds"] == [3, 4] and data["baseline"] == "topk"
    # the table: means with intervals, paired differences from the baseline, the eval noise
    assert "±" in res.output and "baseline" in res.output and "t-interval over 2 seeds" in res.output
    assert "Eval noise" in res.output and "windows" in res.output
    keys = ("val_loss", "val_ppl", "throughput", "max_over_mean", "drop_rate", "entropy", "no_expert_rate")
    for label, r in data["routers"].items():
        assert sorted(r["seeds"]) == ["3", "4"]
        for key in keys:
            assert isinstance(r[key], float), key
            per_seed = [r["seeds"][s][key] for s in ("3", "4")]
            iv = t_interval(per_seed)  # every per-seed number is kept: the statistics recompute
            assert r[key] == pytest.approx(iv.mean) and r["stats"][key]["mean"] == pytest.approx(iv.mean)
            assert r["stats"][key]["low"] == pytest.approx(iv.low) and r["stats"][key][
                "high"
            ] == pytest.approx(iv.high)
            if label != "topk":
                d = paired_interval(per_seed, [data["routers"]["topk"]["seeds"][s][key] for s in ("3", "4")])
                assert r["diff"][key]["mean"] == pytest.approx(d.mean)
                assert r["diff"][key]["high"] == pytest.approx(d.high)
        for seed, run in r["seeds"].items():
            assert run["seed"] == int(seed)
            assert (
                run["step"] == 4
                and len(run["history"]["loss"]) == 4
                and run["history"]["eval_step"] == [2, 4]
            )
            assert len(run["load"]) == 2 and len(run["load"][0]) == 4
            # the final evaluation on 3 batches of 4 windows; its loss is their mean, its SE their spread
            w = run["val_window_losses"]
            assert len(w) == 12 and sum(w) / len(w) == pytest.approx(run["val_loss"], rel=1e-5)
            assert run["val_loss_se"] == pytest.approx(standard_error(w))
        assert r["seeds"]["3"]["history"]["loss"] != r["seeds"]["4"]["history"]["loss"]
    assert data["eval_noise"]["windows"] == 12 and data["eval_noise"]["paired_se"]["expert_choice"] > 0
    topk, ec = data["routers"]["topk"], data["routers"]["expert_choice"]
    assert topk["diff"] == {} and set(ec["diff"]) >= set(keys)
    # the paper's setting, evaluated dropless (causal)
    assert topk["model_config"]["router_kwargs"] == {"capacity_factor": 1.25, "eval_capacity_factor": None}
    assert ec["max_over_mean"] == pytest.approx(1.0)  # balanced by construction
    md = (out / "report.md").read_text()
    assert "| topk |" in md and "expert_choice*" in md and "![expert load](expert_load.png)" in md
    assert "## Paired differences from topk" in md and "| expert_choice | 4 |" in md
    model = MoELM.from_pretrained(out / "sigmoid_topk" / "seed4" / "final")
    assert model.config.router == "sigmoid_topk"


def tiny_settings(tmp_path, texts, name, routers, *, eval_batches=1, **kwargs):
    """A 3-step comparison of a one-layer model on the test texts, writing no models."""
    return CompareSettings(
        routers=routers,
        name=name,
        out=str(tmp_path),
        model={"d_model": 16, "n_layers": 1, "n_heads": 2, "num_experts": 4, "max_seq_len": 32},
        train={
            "steps": 3,
            "batch_size": 4,
            "seq_len": 32,
            "eval_every": 0,
            "eval_batches": eval_batches,
            "data": str(texts),
        },
        save_models=False,
        **kwargs,
    )


def test_arms_are_paired_by_seed(tmp_path, texts):
    """Two arms with the same router and settings: on each seed they start from the same weights
    and read the same batches, so they agree exactly and their paired difference is 0 (a tie);
    across seeds they differ."""
    s = tiny_settings(
        tmp_path,
        texts,
        "paired",
        ["a", "b"],
        eval_batches=2,
        variants={"a": "topk", "b": "topk"},
        seeds=[0, 1, 2],
    )
    summary = run_compare(s, jobs=1, progress=False)
    a, b = summary["routers"]["a"], summary["routers"]["b"]
    for seed in ("0", "1", "2"):
        assert a["seeds"][seed]["history"]["loss"] == b["seeds"][seed]["history"]["loss"]
        assert a["seeds"][seed]["val_window_losses"] == b["seeds"][seed]["val_window_losses"]
    assert a["seeds"]["0"]["val_loss"] != a["seeds"]["1"]["val_loss"]
    d = b["diff"]["val_loss"]
    assert d["mean"] == 0.0 and d["low"] == 0.0 and d["high"] == 0.0 and d["reading"] == "tie"
    assert a["stats"]["val_loss"]["high"] > a["stats"]["val_loss"]["low"]  # the seeds do vary
    assert summary["eval_noise"]["paired_se"] == {"b": 0.0}


def test_compare_in_process_is_deterministic_and_takes_overrides(tmp_path, texts):
    def settings(name):
        return tiny_settings(
            tmp_path,
            texts,
            name,
            ["topk", "expert_choice"],
            router_kwargs={"topk": {"capacity_factor": None}},
        )

    a = run_compare(settings("a"), jobs=1, progress=False)
    b = run_compare(settings("b"), jobs=1, progress=False)
    assert a["throughput_measure"] == "wall"
    for r in ("topk", "expert_choice"):
        assert (
            a["routers"][r]["seeds"]["0"]["history"]["loss"]
            == b["routers"][r]["seeds"]["0"]["history"]["loss"]
        )
    assert a["routers"]["topk"]["drop_rate"] == 0.0  # dropless override
    assert not (tmp_path / "a" / "topk").exists()


def test_compare_and_train_report_bad_arguments(tmp_path):
    res = CliRunner().invoke(
        app, ["compare", "--routers", "topk,nope", "--out", str(tmp_path), "--no-progress"]
    )
    assert res.exit_code == 2 and "unknown router(s) ['nope']" in res.output
    res = CliRunner().invoke(app, ["compare", "--router-arg", "capacity_factor=2", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "ROUTER.ARG=VALUE" in res.output
    res = CliRunner().invoke(app, ["compare", "--routers", "topk,moma", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code != 0 and "routes by token type" in res.output and "--data mixed" in res.output
    res = CliRunner().invoke(app, ["compare", "--experts-per-layer", "8,x", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code != 0 and "comma-separated integers" in res.output
    res = CliRunner().invoke(app, ["compare", "--experts-per-layer", "8,8", "--out", str(tmp_path), "--no-progress"])
    assert res.exit_code != 0 and "one expert count per MoE layer" in res.output
    res = CliRunner().invoke(
        app, ["compare", "--routers", "topk", "--model-arg", "pyr.experts_per_layer=[4,4,8,8]", "--out", str(tmp_path)]
    )
    assert res.exit_code != 0 and "--model-arg names arm(s) ['pyr']" in res.output
    res = CliRunner().invoke(app, ["compare", "--model-arg", "experts_per_layer=[4,4,8,8]", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "ROUTER.ARG=VALUE" in res.output and "--model-arg" in res.output
    res = CliRunner().invoke(
        app, ["compare", "--routers", "topk", "--model-arg", "topk.expert_count=3", "--out", str(tmp_path), "--no-progress"]
    )
    assert res.exit_code != 0 and "unknown MoELMConfig key(s) ['expert_count']" in res.output
    res = CliRunner().invoke(
        app, ["train", "--out", str(tmp_path), "--data", str(tmp_path / "missing"), "--no-progress"]
    )
    assert res.exit_code == 2 and "neither a file nor a directory" in res.output


def test_train_cli_checkpoints_and_resumes(tmp_path, texts):
    out = tmp_path / "run"
    base = [
        "train",
        "--out",
        str(out),
        "--router",
        "sigmoid_topk",
        "--data",
        str(texts),
        "--no-progress",
        "--warmup",
        "1",
        *TINY,
    ]
    res = CliRunner().invoke(app, [*base, "--steps", "2", "--ckpt-every", "2"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [*base, "--steps", "4", "--ckpt-every", "2", "--resume"])
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "step 4" in res.output
    assert json.loads((out / "result.json").read_text())["step"] == 4
    assert torch.equal(
        MoELM.from_pretrained(out / "final").embed.weight,
        MoELM.from_pretrained(out / "checkpoints" / "step_0000004").embed.weight,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seeds", "1,x"], "comma-separated integers"),
        (["--seeds", "3,3"], "distinct"),
        (["--seeds", "4-2"], "ranges"),
        (["--baseline", "nope"], "not among --routers"),
    ],
)
def test_compare_rejects_bad_seeds_and_baseline(tmp_path, args, message):
    res = CliRunner().invoke(app, ["compare", "--routers", "topk,expert_choice", "--out", str(tmp_path), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "compare").exists()  # nothing trained


def test_report_gives_loss_by_token_type_and_router_metrics_as_means_over_seeds():
    from moelab.train.report import by_type_section

    summary = {
        "routers": {
            "a": {"seeds": {"0": {"val_loss_by_type": {"text": 1.0, "image": 3.0}, "router_metrics": {"m": 2.0}},
                            "1": {"val_loss_by_type": {"text": 2.0, "image": 5.0}, "router_metrics": {"m": 4.0}}}},
            "b": {"seeds": {"0": {"val_loss_by_type": {"text": 0.5, "image": 1.0}}, "1": {}}},
        }
    }  # fmt: skip
    text = "\n".join(by_type_section(summary))
    assert "| a | 4.0000 | 1.5000 |" in text  # image, text: sorted names
    assert "| b | 1.0000 | 0.5000 |" in text  # a seed without the number is left out of the mean
    assert "- `a`: m 3" in text and "`b`:" not in text
    assert by_type_section({"routers": {"a": {"seeds": {"0": {}}}}}) == []


def test_compare_model_arg_gives_one_arm_a_pyramid(tmp_path, texts):
    """``--model-arg LABEL.experts_per_layer=[...]``: Pyramid-MoE against a uniform arm in one run."""
    args = ["compare", "--routers", "uniform=topk,pyramid=topk", "--model-arg", "pyramid.experts_per_layer=[2,4]",
            "--steps", "2", "--seeds", "0", "--final-eval-batches", "1", "--name", "pyr", "--out",
            str(tmp_path / "runs"), "--data", str(texts), "--jobs", "1", "--no-progress", *TINY]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "runs" / "pyr" / "results.json").read_text())
    assert data["routers"]["pyramid"]["model_config"]["experts_per_layer"] == [2, 4]
    assert data["routers"]["uniform"]["model_config"]["experts_per_layer"] is None
    assert data["routers"]["pyramid"]["params"] < data["routers"]["uniform"]["params"]
