"""Data for training and analysis: corpora (``corpus``), tokenizers (``tokenizers``), batches (``batches``).

Both ``moelab.train`` and ``moelab.analysis`` read corpora, so data sits below both of them.
"""

from moelab.data.batches import Batches, Data, TensorBatches, TensorData, eval_batches, load_data
from moelab.data.corpus import STDLIB, Corpus, load_corpus
from moelab.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    checkpoint_tokenizer,
    get_tokenizer,
    load_tokenizer,
)

__all__ = [
    "STDLIB",
    "BPETokenizer",
    "Batches",
    "ByteTokenizer",
    "Corpus",
    "Data",
    "TensorBatches",
    "TensorData",
    "checkpoint_tokenizer",
    "eval_batches",
    "get_tokenizer",
    "load_corpus",
    "load_data",
    "load_tokenizer",
]
