"""Attention routing: which keys each query attends to (``moelab list attention``)."""
