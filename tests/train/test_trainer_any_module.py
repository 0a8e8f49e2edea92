"""The trainer on a module that is not a language model: a tiny MoE classifier with its own loss."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moelab
from moelab.data import TensorBatches, TensorData
from moelab.train.checkpoint import latest_checkpoint
from moelab.train.trainer import TrainConfig, Trainer


class MoEClassifier(nn.Module):
    """x [B, 8] -> Linear -> moelab.MoE (4 experts, top-2) -> Linear -> logits [B, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.moe = moelab.MoE(16, num_experts=4, top_k=2, aux_losses={"load_balance": 1e-2})
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.moe(self.inp(x))))


def classify_loss(model, batch):
    x, y = batch
    logits = model(x)
    ce = F.cross_entropy(logits, y)
    aux = moelab.aux_loss(model)
    acc = (logits.argmax(-1) == y).float().mean()
    return ce + aux, {"task_loss": ce, "aux_loss": aux, "accuracy": acc}


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 8-d: a task a small MLP learns in a few dozen steps."""
    centers = torch.randn(3, 8, generator=torch.Generator().manual_seed(123)) * 2.0  # one task
    g = torch.Generator().manual_seed(seed)  # train and val: different samples of it
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, 8, generator=g), y


@pytest.fixture(scope="module")
def data() -> TensorData:
    return TensorData(train=synthetic(512, 0), val=synthetic(128, 1))


def cfg(**kw) -> TrainConfig:
    base = dict(steps=30, batch_size=32, lr=1e-2, warmup_steps=2, eval_every=10, eval_batches=4, threads=1)
    return TrainConfig(**{**base, **kw})


def test_a_classifier_learns_with_a_custom_loss(data):
    torch.manual_seed(0)
    tr = Trainer(MoEClassifier(), cfg(), loss_fn=classify_loss, data=data, progress=False)
    first = tr.evaluate()["val_loss"]
    res = tr.train()
    assert res.step == 30 and res.history["eval_step"] == [10, 20, 30]
    assert res.val_loss < 0.1 * first, (first, res.val_loss)
    # the reported val loss is the mean task loss over the val rows, recomputed here independently
    with torch.no_grad():
        tr.model.eval()
        x, y = data.val_tensors
        expected = F.cross_entropy(tr.model(x), y).item()
    assert res.val_loss == pytest.approx(expected, rel=1e-5)
    assert all(a > 0 for a in res.history["aux_loss"])  # the MoE's load-balance loss was logged
    assert res.routing and len(res.load) == 1 and len(res.load[0]) == 4  # traced like any MoE model
    assert res.params == sum(p.numel() for p in tr.model.parameters())


def test_classifier_resume_is_bit_identical(tmp_path, data):
    c = cfg(steps=12, ckpt_every=4, eval_every=5)
    torch.manual_seed(0)
    full = Trainer(MoEClassifier(), c, tmp_path / "full", loss_fn=classify_loss, data=data, progress=False)
    full.train()

    torch.manual_seed(0)
    cut = Trainer(MoEClassifier(), c, tmp_path / "cut", loss_fn=classify_loss, data=data, progress=False)
    cut.train(stop_after=6)
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000004"
    names = sorted(p.name for p in latest_checkpoint(tmp_path / "cut").iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]
    torch.manual_seed(999)  # a new process: other initial weights and RNG states
    random.seed(999)
    resumed = Trainer(MoEClassifier(), c, tmp_path / "cut", loss_fn=classify_loss, data=data, progress=False)
    res = resumed.train(resume=True)
    assert res.step == 12
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history["loss"] == full.history["loss"]
    assert (tmp_path / "cut" / "final" / "model.safetensors").is_file()


def test_resume_names_only_what_differs(tmp_path, data):
    c = cfg(steps=4, ckpt_every=2)
    Trainer(MoEClassifier(), c, tmp_path, loss_fn=classify_loss, data=data, progress=False).train()

    class Wider(MoEClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(16, 5)

    wider = Trainer(Wider(), cfg(steps=6), tmp_path, loss_fn=classify_loss, data=data, progress=False)
    with pytest.raises(ValueError, match="different model") as e:
        wider.train(resume=True)
    assert "out.weight: [3, 16] -> [5, 16]" in str(e.value) and "moe." not in str(e.value)
    other_lr = Trainer(
        MoEClassifier(), cfg(steps=6, lr=5e-3), tmp_path, loss_fn=classify_loss, data=data, progress=False
    )
    with pytest.raises(ValueError, match=r"\(saved -> now\): lr: 0.01 -> 0.005\. Only") as e:
        other_lr.train(resume=True)  # steps differ too, but may change on resume: not named
    assert "steps: " not in str(e.value)


def test_bad_loss_functions_and_data_are_clear_errors(data):
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        Trainer(MoEClassifier(), cfg(), loss_fn="ce", data=data, progress=False)
    with pytest.raises(TypeError, match="data must be a moelab.data.Data or TensorData"):
        Trainer(MoEClassifier(), cfg(), loss_fn=classify_loss, data=[1, 2], progress=False)
    tr = Trainer(MoEClassifier(), cfg(steps=1), data=data, progress=False)  # default lm_loss
    with pytest.raises(TypeError, match="takes \\[B, S\\] token ids"):
        tr.train()
    tr = Trainer(MoEClassifier(), cfg(steps=1), loss_fn=lambda m, b: m(b[0]).sum(), data=data, progress=False)
    with pytest.raises(TypeError, match="must return \\(loss tensor, metrics dict\\)"):
        tr.train()
    with pytest.raises(TypeError, match="nn.Module or a MoELMConfig"):
        Trainer("model", cfg(), data=data)
    with pytest.raises(ValueError, match="share a first"):
        TensorData(train=(torch.zeros(4, 2), torch.zeros(3)), val=torch.zeros(2, 2))


def test_tensor_batches_are_seeded_resumable_and_sharded(data):
    a = TensorBatches(data, 32, seed=3)
    first = [a.next() for _ in range(20)]  # 640 rows: crosses an epoch of 512
    rows = torch.cat([x for x, _ in first[:16]])
    assert rows.shape == (512, 8)
    assert torch.equal(rows.sort(0).values, data.train_tensors[0].sort(0).values)  # each row once per epoch
    b = TensorBatches(data, 32, seed=3)
    for _ in range(7):
        b.next()
    c = TensorBatches(data, 32, seed=3)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(first[i][0], c.next()[0]) for i in range(7, 20))
    whole = TensorBatches(data, 8, seed=3)
    r0, r1 = (TensorBatches(data, 4, seed=3, rank=r, world_size=2) for r in (0, 1))
    for _ in range(5):
        assert torch.equal(whole.next()[1], torch.cat([r0.next()[1], r1.next()[1]]))
