"""Training: the embedded corpus (``data``), the training loop (``trainer``), router comparisons
(``compare``) and their CLI commands (``moelab train``, ``moelab compare``)."""

from moelab.data import Batches, BPETokenizer, ByteTokenizer, Corpus, Data, load_corpus, load_data
from moelab.train.trainer import TrainConfig, Trainer, TrainResult, latest_checkpoint

__all__ = [
    "BPETokenizer",
    "Batches",
    "ByteTokenizer",
    "Corpus",
    "Data",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "latest_checkpoint",
    "load_corpus",
    "load_data",
]
