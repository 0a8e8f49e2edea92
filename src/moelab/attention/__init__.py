"""Attention routing: which keys each query attends to (``moelab list attention``)."""

from moelab.attention.selective_heads import SelectiveHeadAttention

__all__ = ["SelectiveHeadAttention"]
