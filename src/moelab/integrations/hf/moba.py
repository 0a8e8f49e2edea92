"""MoBA as a transformers attention backend: ``attn_implementation="moba"`` on any model whose
attention goes through transformers' attention registry (Llama, Qwen2, Mistral, SmolLM2, ...).

    from moelab.integrations.hf import register_moba
    register_moba(block_size=512, top_k=3)             # adds "moba" to transformers' registries
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba")
    model.generate(ids, max_new_tokens=32)

MoBA's paper integrates the same way (MoonshotAI/MoBA registers a function with
``AttentionInterface`` and reuses flash-attention's mask handling). The function receives the
layer's rotated queries and keys ``[B, H, S, Dh]`` (keys may have fewer heads, GQA):

- prefill (queries as long as keys): ``moelab.attention.moba.moba_attention``, causal, each
  query attending its own block and the ``top_k - 1`` best past blocks;
- decoding (fewer queries than cached keys): ``moba_decode``, the new queries gating over the cached
  key blocks. The result equals the full recomputation (MoBA's official wrapper falls back to dense
  attention here).

Padding is not supported (a batch with padded positions raises ``ValueError``): MoBA's blocks are
positions of one sequence. FlashMoBA's key convolution has parameters, so it is not part of a
backend swap; use ``MoELMConfig(attention="moba", attention_kwargs={"key_conv": 3})`` to train it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from moelab.attention.moba import DEFAULT_BLOCK_SIZE, DEFAULT_TOP_K, moba_attention, moba_decode


def moba_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    top_k: int = DEFAULT_TOP_K,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``query [B, H, S_q, Dh]``, ``key``/``value``
    ``[B, H_kv, S_k, Dh]`` -> ``(out [B, S_q, H, Dh], None)``."""
    if dropout:
        raise ValueError(f"attn_implementation='moba' has no attention dropout; got dropout={dropout}")
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "attn_implementation='moba' does not support padded batches (MoBA's blocks are positions)"
        )
    if query.shape[2] == key.shape[2]:
        out = moba_attention(query, key, value, block_size, top_k, scale=scaling)
    else:
        out = moba_decode(query, key, value, block_size, top_k, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_moba(
    block_size: int = DEFAULT_BLOCK_SIZE, top_k: int = DEFAULT_TOP_K, name: str = "moba"
) -> str:
    """Register MoBA under ``name`` in transformers' attention and mask registries (again with new
    options replaces it). Returns ``name``: pass it as ``attn_implementation``. Defaults: MoBA's
    block 512, top-3 (FlashMoBA: block 128, top_k scaled to the same sparsity)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")

    def forward(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kw: Any
    ):
        kw.pop("block_size", None)
        kw.pop("top_k", None)
        return moba_attention_forward(
            module, query, key, value, attention_mask, block_size=block_size, top_k=top_k, **kw
        )

    AttentionInterface.register(name, forward)
    # flash-attention's mask function: no [S, S] mask, only a padding mask when there is padding
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    return name


__all__ = ["moba_attention_forward", "register_moba"]
