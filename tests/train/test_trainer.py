"""Trainer: learning, the schedule, safe checkpoints and exact resume."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from moelab.data import load_data
from moelab.models import MoELM, MoELMConfig
from moelab.train.trainer import TrainConfig, Trainer, latest_checkpoint, lr_at


@pytest.fixture(scope="module")
def data():
    return load_data()  # the embedded stdlib corpus, bytes


def tiny(**kw) -> MoELMConfig:
    base = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, num_experts=4, top_k=2)
    return MoELMConfig(**{**base, **kw})


def run_cfg(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2)
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_on_the_corpus(data):
    tr = Trainer(tiny(), run_cfg(steps=20, batch_size=8, seq_len=64, eval_every=0), data=data, progress=False)
    res = tr.train()
    loss = res.history["loss"]
    assert len(loss) == 20 and res.step == 20
    assert sum(loss[-5:]) / 5 < loss[0] - 1.0, loss
    assert res.val_loss < loss[0] - 1.0 and math.isclose(res.val_ppl, math.exp(res.val_loss))
    assert res.routing and len(res.load) == 2 and len(res.load[0]) == 4
    assert res.tokens_per_s > 0 and res.tokens_per_cpu_s > 0


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_train_config_errors():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown TrainConfig key"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")


def test_checkpoint_is_safetensors_and_json_only(tmp_path, data):
    tr = Trainer(
        tiny(router="sigmoid_topk"),
        run_cfg(steps=4, ckpt_every=2, keep_checkpoints=5),
        tmp_path,
        data=data,
        progress=False,
    )
    tr.train()
    ck = latest_checkpoint(tmp_path)
    assert ck is not None and ck.name == "step_0000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step_0000002",
        "step_0000004",
    ]
    files = sorted(p.name for p in ck.iterdir())
    assert files == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer_state.json",
    ]
    for p in ck.iterdir():
        head = p.read_bytes()[:2]
        assert not head.startswith(b"\x80"), f"{p.name} looks like a pickle"
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            assert load_file(str(p))  # parses as safetensors
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 4 and set(state["data"]) == {"epoch", "index", "seed"}
    assert "python_random" in state["rng"] and state["train_config"]["steps"] == 4
    opt = load_file(str(ck / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg_sq") for k in opt)
    # the checkpoint directory is a model directory too
    m = MoELM.from_pretrained(ck)
    assert torch.equal(m.blocks[0].ffn.router.expert_bias, tr.model.blocks[0].ffn.router.expert_bias)
    assert (tmp_path / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "router,kwargs",
    [
        # stochastic routing (GShard sampling + Switch jitter) needs the RNG state restored exactly
        ("topk", {"jitter": 0.01, "second_expert_policy": "sampling", "capacity_factor": 1.0}),
        ("sigmoid_topk", {}),  # the expert bias is updated outside autograd every step
    ],
)
def test_resume_is_bit_identical(tmp_path, data, router, kwargs):
    mcfg = tiny(router=router, router_kwargs=kwargs)
    cfg = run_cfg(steps=10, ckpt_every=4, eval_every=3)
    full = Trainer(mcfg, cfg, tmp_path / "full", data=data, progress=False)
    full.train()

    interrupted = Trainer(mcfg, cfg, tmp_path / "cut", data=data, progress=False)
    interrupted.train(stop_after=6)  # "killed" at step 6: steps 5-6 are lost, step 4 is on disk
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000004"
    del interrupted
    torch.manual_seed(1234)  # a new process would start from other RNG states
    random.seed(1234)
    resumed = Trainer(mcfg, cfg, tmp_path / "cut", data=data, progress=False)
    res = resumed.train(resume=True)
    assert res.step == 10
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history["loss"] == full.history["loss"]
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_resume_refuses_a_different_model(tmp_path, data):
    Trainer(tiny(), run_cfg(steps=2, ckpt_every=2), tmp_path, data=data, progress=False).train()
    other = Trainer(
        tiny(num_experts=2, top_k=1), run_cfg(steps=4, ckpt_every=2), tmp_path, data=data, progress=False
    )
    with pytest.raises(ValueError, match="different model config"):
        other.train(resume=True)


def test_bf16_autocast_runs(data):
    tr = Trainer(tiny(), run_cfg(steps=2, bf16=True, eval_every=0), data=data, progress=False)
    res = tr.train()
    assert math.isfinite(res.val_loss) and all(p.dtype == torch.float32 for p in tr.model.parameters())
