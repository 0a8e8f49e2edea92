"""Training: the loop for any module (``trainer``), its checkpoints, DDP helpers, routing monitor
and progress display, the paper settings (``settings``) and router comparisons (``compare``).

Lazy (PEP 562) like ``moelab`` itself: ``moelab.train.settings`` (the paper settings and the demo's
defaults) is torch-free, so the command line can read it without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "BPETokenizer": "moelab.data",
    "Batches": "moelab.data",
    "ByteTokenizer": "moelab.data",
    "Corpus": "moelab.data",
    "Data": "moelab.data",
    "TensorData": "moelab.data",
    "load_corpus": "moelab.data",
    "load_data": "moelab.data",
    "TrainConfig": "moelab.train.config",
    "TrainResult": "moelab.train.trainer",
    "Trainer": "moelab.train.trainer",
    "latest_checkpoint": "moelab.train.checkpoint",
    "lm_loss": "moelab.train.trainer",
    "PAPER_SETTINGS": "moelab.train.settings",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moelab.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
