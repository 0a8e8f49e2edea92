"""Tokenizers: ``bytes`` (default; vocab 256, no training, no special tokens) or ``bpe`` (a
byte-level BPE from Hugging Face ``tokenizers``, trained on the train split on first use and
cached as JSON under ``~/.cache/moelab/tokenizers`` or ``$MOELAB_CACHE``).

The one tokenizer path of moelab: training (``load_data``), analysis and the reproductions all
encode text with these classes. Both share ``encode(text) -> list[int]``, ``decode(ids)`` and
``vocab_size``. To read a tokenizer back:

- ``load_tokenizer(path)``: a ``tokenizers`` JSON file (what a BPE run writes as ``tokenizer.json``);
- ``checkpoint_tokenizer(directory, vocab_size)``: the tokenizer a moelab model directory was
  trained with (its ``tokenizer.json``, else bytes when ``vocab_size`` is 256).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moelab.data.corpus import DOC_SEPARATOR, EOT, Corpus, cache_dir


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to train. Files are joined with a blank line."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_docs(self, docs: list[tuple[str, bytes]]) -> np.ndarray:
        """One ``uint16`` token stream for a list of documents."""
        return np.frombuffer(DOC_SEPARATOR.join(d for _, d in docs), dtype=np.uint8).astype(np.uint16)

    def to_json(self) -> dict:
        return {"type": "bytes"}


class BPETokenizer:
    """Byte-level BPE from Hugging Face ``tokenizers`` (GPT-2 style pre-tokenisation).

    Train with ``BPETokenizer.train(corpus, vocab_size)`` or get the cached one with
    ``BPETokenizer.for_corpus``; documents are separated by ``<|endoftext|>`` (id 0).
    """

    name = "bpe"

    def __init__(self, tok, source: str = "") -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)  # None for a tokenizer trained elsewhere
        self.source = source  # the file it was read from, if any (shown in reports)

    @classmethod
    def train(cls, corpus: Corpus, vocab_size: int = 4096) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 + 1:
            raise ValueError(f"vocab_size for bpe must be > 257 (bytes + {EOT}), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((d.decode("utf-8", errors="replace") for _, d in corpus.train), trainer)
        return cls(tok)

    @classmethod
    def for_corpus(
        cls, corpus: Corpus, vocab_size: int = 4096, directory: str | Path | None = None
    ) -> BPETokenizer:
        """The BPE for this corpus' train split: loaded from the cache, else trained and cached."""
        d = Path(directory) if directory is not None else cache_dir() / "tokenizers"
        path = d / f"bpe-{vocab_size}-{corpus.fingerprint}.json"
        if path.is_file():
            return cls.from_file(path)
        tok = cls.train(corpus, vocab_size)
        d.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tok.tok.save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent ranks/processes never read a partial file
        return tok

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """A tokenizer saved by ``tokenizers`` (``Tokenizer.save``); see ``load_tokenizer``."""
        return load_tokenizer(path)

    def encode(self, text: str | bytes) -> list[int]:
        s = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self.tok.encode(s).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def encode_docs(self, docs: list[tuple[str, bytes]]) -> np.ndarray:
        texts = [d.decode("utf-8", errors="replace") for _, d in docs]
        if self.eot_id is None:
            raise ValueError(f"this BPE tokenizer has no {EOT!r} token to separate documents with")
        out: list[int] = []
        for enc in self.tok.encode_batch(texts):
            out.extend(enc.ids)
            out.append(self.eot_id)
        return np.asarray(out, dtype=np.uint16 if self.vocab_size <= 65536 else np.int32)

    def to_json(self) -> dict:
        return {"type": "bpe", "vocab_size": self.vocab_size, "tokenizer": json.loads(self.tok.to_str())}


def get_tokenizer(name: str, corpus: Corpus | None = None, vocab_size: int = 4096):
    """``"bytes"`` or ``"bpe"`` (trained on ``corpus``' train split, cached)."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "bpe":
        if corpus is None:
            raise ValueError("tokenizer 'bpe' needs the corpus to train on")
        return BPETokenizer.for_corpus(corpus, vocab_size)
    raise ValueError(f"tokenizer must be 'bytes' or 'bpe', got {name!r}")


def load_tokenizer(path: str | Path) -> BPETokenizer:
    """A Hugging Face ``tokenizers`` JSON file (``tokenizer.json``) as a ``BPETokenizer``.

    Raises ``FileNotFoundError`` when ``path`` is not a file and ``ValueError`` when it does not
    parse as a ``tokenizers`` file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {str(p)!r} does not exist")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust parser raises a bare Exception
        raise ValueError(f"{p} is not a Hugging Face tokenizers JSON file: {e}") from None
    return BPETokenizer(tok, source=str(p))


TOKENIZER_FILE = "tokenizer.json"


def checkpoint_tokenizer(directory: str | Path, vocab_size: int) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a moelab model directory (``final/`` or a checkpoint) was trained with.

    Its ``tokenizer.json`` when present (BPE runs write one beside the weights); else the byte
    tokenizer when ``vocab_size == 256``. Anything else is an error that asks for the file: a
    model with another vocabulary cannot be fed bytes.
    """
    d = Path(directory)
    if (d / TOKENIZER_FILE).is_file():
        return load_tokenizer(d / TOKENIZER_FILE)
    state = d / "trainer_state.json"
    if state.is_file() and json.loads(state.read_text()).get("tokenizer") == "bpe":
        raise ValueError(f"{d} was trained with a BPE tokenizer but holds no {TOKENIZER_FILE}")
    if vocab_size == ByteTokenizer.vocab_size:
        return ByteTokenizer()
    raise ValueError(
        f"{d}: vocab_size={vocab_size} is not the byte tokenizer's 256 and no {TOKENIZER_FILE} is present"
    )
