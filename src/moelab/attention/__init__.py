"""Attention routing: which keys each query attends to (``moelab list attention``)."""

from moelab.attention.moba import (
    KeyConv,
    MoBAAttention,
    causal_key_conv,
    moba_attention,
    moba_attention_reference,
    moba_block_means,
    moba_decode,
    moba_gate,
    moba_routing,
)
from moelab.attention.selective_heads import SelectiveHeadAttention

__all__ = [
    "KeyConv",
    "MoBAAttention",
    "SelectiveHeadAttention",
    "causal_key_conv",
    "moba_attention",
    "moba_attention_reference",
    "moba_block_means",
    "moba_decode",
    "moba_gate",
    "moba_routing",
]
