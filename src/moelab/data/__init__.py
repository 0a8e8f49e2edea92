"""Data for training and analysis: corpora (``corpus``), tokenizers (``tokenizers``), batches (``batches``).

Both ``moelab.train`` and ``moelab.analysis`` read corpora, so data sits below both of them.
"""

from moelab.data.batches import Batches, Data, TensorBatches, TensorData, eval_batches, load_data
from moelab.data.bibles import DiathekeError, bibles_missing, parallel_verses, read_bible
from moelab.data.corpus import STDLIB, Corpus, load_corpus
from moelab.data.recall import associative_recall_batch, recall_accuracy, recall_vocab_size
from moelab.data.tasks import (
    TASK_NAMES,
    Example,
    Task,
    chrf,
    encode_examples,
    load_tasks,
    score,
    task_unavailable,
)
from moelab.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    checkpoint_tokenizer,
    get_tokenizer,
    load_tokenizer,
)

__all__ = [
    "STDLIB",
    "TASK_NAMES",
    "BPETokenizer",
    "Batches",
    "ByteTokenizer",
    "Corpus",
    "Data",
    "DiathekeError",
    "Example",
    "Task",
    "TensorBatches",
    "TensorData",
    "associative_recall_batch",
    "bibles_missing",
    "checkpoint_tokenizer",
    "chrf",
    "encode_examples",
    "eval_batches",
    "get_tokenizer",
    "load_corpus",
    "load_data",
    "load_tasks",
    "load_tokenizer",
    "parallel_verses",
    "read_bible",
    "recall_accuracy",
    "recall_vocab_size",
    "score",
    "task_unavailable",
]
