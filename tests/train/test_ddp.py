"""DDP: two torchrun processes (gloo, CPU) agree with each other and with one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from ddp_worker import configs  # noqa: E402

from moelab.train.trainer import Trainer  # noqa: E402


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, texts):
    data_dir = texts
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "ddp_worker.py"),
        str(out),
        str(data_dir),
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    # both replicas end bit-identical
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    # only rank 0 wrote checkpoints and the final model
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step_0000003",
        "step_0000006",
    ]
    assert (out / "final" / "model.safetensors").is_file()

    # one process on the concatenated batch (2 ranks x 2 = 4 sequences) reaches the same weights
    torch.set_num_threads(1)
    mcfg, tcfg = configs(str(data_dir), 4)
    single = Trainer(mcfg, tcfg, None, progress=False)
    res = single.train()
    s = single.model.state_dict()
    for k in s:
        torch.testing.assert_close(r0[k], s[k], rtol=1e-4, atol=1e-5, msg=k)
    with safe_open(str(out / "rank0.safetensors"), "pt") as f:
        meta = f.metadata()
    assert abs(float(meta["val_loss"]) - res.val_loss) < 1e-4
    # the ranks' val windows are gathered: the same windows and standard error as one process
    windows = [float(x) for x in meta["windows"].strip("[]").split(",")]
    assert len(windows) == len(res.val_window_losses) == 16
    torch.testing.assert_close(
        torch.tensor(windows), torch.tensor(sorted(res.val_window_losses)), atol=1e-4, rtol=0
    )
    assert abs(float(meta["val_loss_se"]) - res.val_loss_se) < 1e-5


@pytest.mark.slow
def test_torchrun_expert_parallel_training_matches_one_process(tmp_path, texts):
    """``TrainConfig.ep = 2`` (``moelab train --ep 2``): each rank holds half the experts, the
    non-expert weights are data parallel; the gathered final model equals one process trained on
    the concatenated batch."""
    out = tmp_path / "ep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(out), str(texts), "2", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gathered = load_file(str(out / "final" / "model.safetensors"))
    torch.set_num_threads(1)
    mcfg, tcfg = configs(str(texts), 4)
    single = Trainer(mcfg, tcfg, None, progress=False)
    single.train()
    s = single.model.state_dict()
    assert gathered.keys() == s.keys()
    for k in s:
        torch.testing.assert_close(gathered[k], s[k], rtol=1e-4, atol=1e-5, msg=k)
    # resumable under EP: the step-3 checkpoint holds the gathered model and one optimizer shard
    # per rank; resumed from it, the run ends bit-identical to the uninterrupted one
    step3 = out / "checkpoints" / "step_0000003"
    assert {p.name for p in step3.iterdir()} >= {
        "model.safetensors", "config.json", "optimizer.rank0.safetensors", "optimizer.rank1.safetensors",
    }  # fmt: skip
    assert not (step3 / "optimizer.safetensors").exists()
    ck = load_file(str(step3 / "model.safetensors"))
    assert all(ck[k].shape == s[k].shape for k in s)  # unsharded: [E, ...] experts
    # the second run started at step 3: it wrote only the step-6 checkpoint
    assert sorted(p.name for p in (out / "resumed" / "checkpoints").iterdir()) == ["latest", "step_0000006"]
    resumed = load_file(str(out / "resumed" / "final" / "model.safetensors"))
    assert resumed.keys() == gathered.keys()
    assert all(torch.equal(resumed[k], gathered[k]) for k in gathered)
