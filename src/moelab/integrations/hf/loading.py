"""Load a transformers model or tokenizer from a directory (for ``moelab analyze`` and scripts).

    model = load_causal_lm("path/to/olmoe")       # AutoModelForCausalLM, in eval mode
    tok = load_tokenizer("path/to/olmoe")         # tok.encode(text) -> list[int], no special tokens

The tokenizer is wrapped so that it has the one method moelab's runners call
(``encode(text) -> list[int]``) and adds no special tokens: analysis cuts a concatenated corpus
into windows, where a BOS token in front of every document would be noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

# Files any of which makes a directory a transformers tokenizer directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TransformersTokenizer:
    """A transformers tokenizer behind ``encode(text) -> list[int]`` (no special tokens).

    Attributes:
        tokenizer: the wrapped ``PreTrainedTokenizerBase``.
        name: its class name.
        vocab_size: ``len(tokenizer)`` (added tokens included).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.name = type(tokenizer).__name__
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def has_tokenizer_files(path: str | Path) -> bool:
    """Whether the directory ``path`` holds a transformers tokenizer."""
    p = Path(path)
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: str | Path) -> TransformersTokenizer:
    """``AutoTokenizer.from_pretrained(path)`` wrapped in ``TransformersTokenizer``."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a tokenizer directory")
    return TransformersTokenizer(AutoTokenizer.from_pretrained(str(p)))


def load_causal_lm(path: str | Path, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` in eval mode."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json: not a transformers model directory")
    return AutoModelForCausalLM.from_pretrained(str(p), **kwargs).eval()
