"""A tiny random transformers Llama for the LoRA and PEFT tests: ``tiny_llama(seed, vocab_size)``.

Usable by any test: ``from tiny_llama import tiny_llama`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn


def tiny_llama(seed: int = 0, vocab_size: int = 96) -> nn.Module:
    """A 2-layer random ``LlamaForCausalLM`` (hidden 32, SwiGLU 48, 4 heads, 2 KV heads), identical
    for one seed, in eval mode; skips the calling test without transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
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
    return transformers.LlamaForCausalLM(cfg).eval()
