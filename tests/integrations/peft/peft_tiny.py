"""A tiny random Llama, PEFT LoRA folders on it, and a hook-based LoRA reference, for the PEFT interop tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_llama import tiny_llama as shared_tiny_llama
from torch import Tensor, nn

TARGETS = ["q_proj", "v_proj", "up_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    """The shared tiny Llama (``tests/tiny_llama.py``) with a 64-token vocabulary."""
    return shared_tiny_llama(seed, vocab_size=64)


def tiny_ids(seed: int = 1) -> Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def make_peft_lora(
    folder: Path, seed: int, *, r: int = 4, alpha: float = 8, targets=TARGETS, **config
) -> Path:
    """Save a PEFT LoRA with random (non-zero) A and B, trained on ``tiny_llama()``, to ``folder``."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    torch.manual_seed(seed)
    lora_config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **config
    )
    get_peft_model(model, lora_config).save_pretrained(str(folder))
    return folder


@torch.no_grad()
def logits(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids).logits


def lora_reference_logits(ids: Tensor, modules: dict[str, tuple[Tensor, Tensor]], scaling: float) -> Tensor:
    """``tiny_llama()`` with ``W x + scaling * B (A x)`` on each named module, by forward hooks: no PEFT, no moelab."""
    model = tiny_llama()
    named = dict(model.named_modules())
    for name, (a, b) in modules.items():

        def add_lora(module, inputs, out, a=a, b=b):
            return out + scaling * (inputs[0] @ a.T) @ b.T

        named[name].register_forward_hook(add_lora)
    return logits(model, ids)
