"""A tiny random Llama, PEFT LoRA folders on it, and a hook-based LoRA reference, for the PEFT interop tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

TARGETS = ["q_proj", "v_proj", "up_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer random ``LlamaForCausalLM`` (hidden 32, vocab 64), identical for one seed, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


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
