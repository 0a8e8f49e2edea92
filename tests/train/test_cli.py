"""The command line: resume and config rules, paper settings, progress lines, list, narrow tables."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moelab.cli import app
from moelab.train.compare import CompareSettings, arm_causal_at_eval, run_compare
from moelab.train.report import loss_ylim, print_table, table_rows

TINY = ["--d-model", "16", "--layers", "2", "--heads", "2", "--experts", "4", "--top-k", "2"]
TINY += ["--seq-len", "32", "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2", "--warmup", "1"]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def trained(tmp_path: Path, texts: Path) -> Path:
    """A 2-step run with a checkpoint at step 2 (sigmoid_topk, seed 0)."""
    out = tmp_path / "run"
    res = run("train", "--out", out, "--router", "sigmoid_topk", "--data", texts, "--no-progress", "--steps", 2,
              "--ckpt-every", 2, *TINY)  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def test_train_echoes_paper_settings_and_takes_aux_loss(tmp_path, texts):
    res = run("train", "--out", tmp_path / "a", "--router", "sigmoid_topk", "--aux-loss", "z=1e-3",
              "--data", texts, "--steps", 2, "--ckpt-every", 0, *TINY)  # fmt: skip
    assert res.exit_code == 0, res.output
    # the same source as compare: DeepSeek-V3's sequence-wise loss, plus the flag's z-loss
    assert 'aux_losses {"load_balance_seq": 0.0001, "z": 0.001}' in res.output
    assert "DeepSeek-V3" in res.output and "set-up (data, model)" in res.output
    cfg = json.loads((tmp_path / "a" / "final" / "config.json").read_text())
    assert cfg["aux_losses"] == {"load_balance_seq": 1e-4, "z": 1e-3}
    # not a terminal: one plain line per evaluation (eval every 2 steps), with an ETA
    assert "sigmoid_topk: step 2/2  loss" in res.output and "eta" in res.output and "done in" in res.output
    assert "tok/s (wall)" in res.output
    res = run("train", "--out", tmp_path / "b", "--aux-loss", "z", "--data", texts, *TINY)
    assert res.exit_code != 0 and "NAME=COEF" in res.output


def test_resume_takes_the_checkpoint_settings(trained):
    # no shape flags retyped: they come from the checkpoint; --steps may change
    res = run("train", "--out", trained, "--resume", "--steps", 4, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "step 4" in res.output
    cfg = json.loads((trained / "final" / "config.json").read_text())
    assert cfg["router"] == "sigmoid_topk" and cfg["d_model"] == 16


def test_resume_mismatch_names_only_the_differing_flags(trained):
    res = run("train", "--out", trained, "--resume", "--steps", 4, "--seed", 1, "--d-model", 16,
              "--experts", 8, "--no-progress")  # fmt: skip
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "--seed 1 (checkpoint: 0)" in out and "--experts gives num_experts=8 (checkpoint: 4)" in out
    assert "--d-model" not in out and "--steps" not in out.split("Drop them")[0]


def test_resume_without_a_checkpoint_fails_clearly(tmp_path, texts):
    for where in (tmp_path / "empty", tmp_path / "missing"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        res = run("train", "--out", where, "--resume", "--data", texts, "--no-progress", *TINY)
        assert res.exit_code == 2 and f"no checkpoint under {where}" in " ".join(res.output.split())
        assert not (where / "final").exists()


def test_a_checkpoint_directory_as_out_is_rejected_or_resumed(trained):
    ckpt = trained / "checkpoints" / "step_0000002"
    res = run("train", "--out", ckpt, "--no-progress")
    assert res.exit_code == 2 and "is a checkpoint directory" in res.output and "--resume" in res.output
    res = run("train", "--out", trained, "--no-progress")  # a run with checkpoints, without --resume
    assert res.exit_code == 2 and "already holds checkpoints" in res.output
    res = run("train", "--out", ckpt, "--resume", "--steps", 3, "--no-progress")  # resume from it
    assert res.exit_code == 0, res.output
    assert (trained / "final").is_dir() and (trained / "checkpoints" / "step_0000003").is_dir() is False


def test_config_with_shape_flags_is_an_error(tmp_path, texts):
    cfg = tmp_path / "model.json"
    cfg.write_text(
        json.dumps({"d_model": 16, "n_layers": 1, "n_heads": 2, "num_experts": 4, "max_seq_len": 32})
    )
    res = run(
        "train", "--out", tmp_path / "r", "--config", cfg, "--experts", 8, "--layers", 3, "--data", texts
    )
    assert res.exit_code == 2
    assert "--config replaces the model options; drop --experts, --layers" in " ".join(res.output.split())


def test_checkpoints_get_ordinary_permissions(trained):
    mode = 0o666 & ~0o022  # the fixture ran under this test process' umask
    old = os.umask(0o022)
    os.umask(old)
    if old != 0o022:
        pytest.skip(f"umask is {oct(old)}")
    for p in [*(trained / "checkpoints" / "step_0000002").iterdir(), *(trained / "final").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == mode, p


def test_compare_stars_every_arm_not_causal_at_eval(tmp_path, texts):
    s = CompareSettings(
        routers=["capped", "dropless", "expert_choice"],
        variants={"capped": "topk", "dropless": "topk"},
        name="causal",
        out=str(tmp_path),
        model={"d_model": 16, "n_layers": 1, "n_heads": 2, "num_experts": 4, "max_seq_len": 32},
        train={
            "steps": 2,
            "batch_size": 4,
            "seq_len": 32,
            "eval_every": 0,
            "eval_batches": 1,
            "data": str(texts),
        },
        router_kwargs={"capped": {"eval_capacity_factor": "same"}},  # the paper's cf 1.25, also at eval
        aux_overrides={"": {"z": 0}},  # and --aux-loss z=0 for every arm
        save_models=False,
    )
    assert [arm_causal_at_eval(r, s) for r in s.routers] == [False, True, False]
    summary = run_compare(s, jobs=1, progress=False)
    assert [row[0] for row in table_rows(summary)] == ["capped*", "dropless", "expert_choice*"]
    topk = summary["routers"]["dropless"]["model_config"]
    assert topk["router_kwargs"] == {"capacity_factor": 1.25, "eval_capacity_factor": None}
    assert topk["aux_losses"] == {"load_balance": 1e-2}
    # at 80 columns the table keeps every arm name whole, star included, and every number
    from rich.console import Console

    console = Console(width=80, record=True)
    print_table(summary, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for row in table_rows(summary):
        for cell in row:
            assert cell in text, cell
    assert "tok/s" in text and "(wall)" in text


def test_compare_aux_loss_flag_and_errors(tmp_path):
    res = run("compare", "--routers", "topk", "--aux-loss", "nope.z=0", "--out", tmp_path)
    assert res.exit_code == 2 and "not among --routers" in res.output
    res = run(
        "compare", "--routers", "topk", "--router-arg", "topk.drop_policy=probability", "--out", tmp_path
    )
    assert res.exit_code == 2 and "batch_priority" in res.output


def test_loss_plot_limits_hold_every_point():
    curves = [[5.5, 4.0, 2.5], [2.4, 2.2], [float("nan"), 7.0]]
    lo, hi = loss_ylim(curves)
    assert lo < 2.2 and hi > 7.0
    assert loss_ylim([[]]) is None


def test_list_groups_by_kind_and_filters():
    res = run("list", "--kind", "routers")
    rows = res.output.splitlines()
    assert res.exit_code == 0 and "router:" in res.output and "topk" in res.output
    assert not any(row.startswith("z ") for row in rows)  # the loss `z` is not listed
    res = run("list", "--kind", "layer")
    assert res.exit_code == 0 and "moe" in res.output and "soft" in res.output
    res = run("list", "--kind", "nope")
    assert (
        res.exit_code == 2
        and len(res.output.strip().splitlines()) == 1
        and "kind must be one of" in res.output
    )
    res = run("list")
    assert res.exit_code == 0 and {"router:", "loss:", "layer:"} <= set(res.output.split())


def test_cli_import_is_lazy():
    code = "import sys, moelab.cli; print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
