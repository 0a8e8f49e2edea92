"""`moelab compare` and `moelab train` end to end on a tiny budget."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

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
        "--seed",
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
    for r in data["routers"].values():
        for key in (
            "val_loss",
            "val_ppl",
            "throughput",
            "max_over_mean",
            "drop_rate",
            "entropy",
            "no_expert_rate",
        ):
            assert isinstance(r[key], float), key
        assert r["step"] == 4 and len(r["history"]["loss"]) == 4 and r["history"]["eval_step"] == [2, 4]
        assert len(r["load"]) == 2 and len(r["load"][0]) == 4
    topk, ec = data["routers"]["topk"], data["routers"]["expert_choice"]
    # the paper's setting, evaluated dropless (causal)
    assert topk["model_config"]["router_kwargs"] == {"capacity_factor": 1.25, "eval_capacity_factor": None}
    assert ec["max_over_mean"] == pytest.approx(1.0)  # balanced by construction
    md = (out / "report.md").read_text()
    assert "| topk |" in md and "expert_choice*" in md and "![expert load](expert_load.png)" in md
    model = MoELM.from_pretrained(out / "sigmoid_topk" / "final")
    assert model.config.router == "sigmoid_topk"


def test_compare_in_process_is_deterministic_and_takes_overrides(tmp_path, texts):
    def settings(name):
        return CompareSettings(
            routers=["topk", "expert_choice"],
            name=name,
            out=str(tmp_path),
            model={"d_model": 16, "n_layers": 1, "n_heads": 2, "num_experts": 4, "max_seq_len": 32},
            train={
                "steps": 3,
                "batch_size": 4,
                "seq_len": 32,
                "eval_every": 0,
                "eval_batches": 1,
                "data": str(texts),
            },
            router_kwargs={"topk": {"capacity_factor": None}},
            save_models=False,
        )

    a = run_compare(settings("a"), jobs=1, progress=False)
    b = run_compare(settings("b"), jobs=1, progress=False)
    assert a["throughput_measure"] == "wall"
    for r in ("topk", "expert_choice"):
        assert a["routers"][r]["history"]["loss"] == b["routers"][r]["history"]["loss"]
    assert a["routers"]["topk"]["drop_rate"] == 0.0  # dropless override
    assert not (tmp_path / "a" / "topk").exists()


def test_compare_and_train_report_bad_arguments(tmp_path):
    res = CliRunner().invoke(
        app, ["compare", "--routers", "topk,nope", "--out", str(tmp_path), "--no-progress"]
    )
    assert res.exit_code == 2 and "unknown router(s) ['nope']" in res.output
    res = CliRunner().invoke(app, ["compare", "--router-arg", "capacity_factor=2", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "ROUTER.ARG=VALUE" in res.output
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
