"""A LoRA mixture inside transformers' own ``Trainer`` (peft #2749-style requests: MoE-LoRA in
mainstream trainers): ``moelab.lora.include_aux_loss`` puts the routers' losses into ``outputs.loss``."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_llama

from moelab.lora import apply, include_aux_loss, mixture_layers

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_outputs_loss_includes_the_aux_losses_in_training_only():
    model = tiny_llama()
    apply(model, ["q_proj", "down_proj"], method="mole", num_experts=3, rank=2)
    ids = torch.randint(0, 96, (2, 8))
    model.train()
    plain = model(ids, labels=ids).loss
    handle = include_aux_loss(model)
    out = model(ids, labels=ids)
    aux = sum(layer.aux_loss for layer in mixture_layers(model).values())
    assert float(aux.detach()) > 0
    torch.testing.assert_close(out.loss, plain + aux)
    model.eval()
    torch.testing.assert_close(model(ids, labels=ids).loss, plain)
    handle.remove()
    model.train()
    torch.testing.assert_close(model(ids, labels=ids).loss, plain)
    with pytest.raises(ValueError, match="no LoRA mixture layers"):
        include_aux_loss(tiny_llama())


def test_transformers_trainer_trains_the_mixture(tmp_path):
    model = tiny_llama()
    apply(model, ["q_proj", "v_proj"], method="dynmole", num_experts=3, rank=2)
    include_aux_loss(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    router_before = {n: layer.router.weight.detach().clone() for n, layer in mixture_layers(model).items()}
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": x, "labels": x} for x in torch.randint(0, 96, (8, 12), generator=g)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(layer.bank.lora_B.abs().sum() > 0 for layer in mixture_layers(model).values())
    assert any(
        not torch.equal(layer.router.weight, router_before[n]) for n, layer in mixture_layers(model).items()
    )
