"""Batching: ``Batches`` cuts the token stream into non-overlapping windows of ``seq_len`` tokens
and visits them in a fresh permutation each epoch, ``numpy.random.default_rng([seed, epoch])``.
Its whole state is ``(epoch, index)``: save ``state_dict()`` in a checkpoint and
``load_state_dict`` resumes at exactly the next window. Under data parallelism every rank holds
the same position and reads its own slice of each global batch.

``TensorData`` / ``TensorBatches`` do the same for in-memory examples (any model, not only a
language model): the rows of one or more tensors, visited in the same seeded, resumable order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moelab.data.corpus import STDLIB, Corpus, load_corpus
from moelab.data.mixed import is_mixed_source, load_mixed
from moelab.data.tokenizers import get_tokenizer


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
class _EpochOrder:
    """A seeded permutation per epoch and a resumable position in it (shared by both batchers)."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int) -> None:
        self.num_items, self.seed, self.rank, self.world_size = n, int(seed), int(rank), int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._perm_epoch = epoch
        return self._perm

    def _take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            order = self._order(self.epoch)
            n = min(count - len(out), self.num_items - self.index)
            out.extend(order[self.index : self.index + n].tolist())
            self.index += n
            if self.index == self.num_items:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def _mine(self, batch_size: int) -> list[int]:
        """The next global batch's items of this rank."""
        items = self._take(batch_size * self.world_size)
        return items[self.rank * batch_size : (self.rank + 1) * batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"data state was saved with seed={state['seed']}, these batches use seed={self.seed}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class Batches(_EpochOrder):
    """Deterministic, resumable ``[batch_size, seq_len]`` batches of token windows.

    With ``types`` (one token type per token: the mixed-modality corpus), each batch is the pair
    ``(ids, types)`` of two ``[batch_size, seq_len]`` long tensors of the same windows.

    The stream is cut into ``n = len(tokens) // seq_len`` non-overlapping windows; epoch ``e``
    visits them in the order ``default_rng([seed, e]).permutation(n)``. A global batch is the
    next ``batch_size * world_size`` windows; rank ``r`` takes windows ``[r*b, (r+1)*b)`` of it.
    State: ``{"epoch", "index"}``, the same on every rank.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        types: np.ndarray | None = None,
    ) -> None:
        self.tokens = np.asarray(tokens)
        self.types = _check_types(types, self.tokens)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        n = len(self.tokens) // self.seq_len
        if n < 1:
            raise ValueError(
                f"the token stream ({len(self.tokens)} tokens) is shorter than seq_len={seq_len}"
            )
        super().__init__(n, seed, rank, world_size)

    @property
    def num_windows(self) -> int:
        return self.num_items

    def next(self) -> Tensor | tuple[Tensor, Tensor]:
        """The next ``[batch_size, seq_len]`` long tensor of this rank (with types: ``(ids, types)``)."""
        return _windows(self.tokens, self.types, self._mine(self.batch_size), self.seq_len)


def _check_types(types: np.ndarray | None, tokens: np.ndarray) -> np.ndarray | None:
    if types is None:
        return None
    types = np.asarray(types)
    if types.shape != tokens.shape:
        raise ValueError(f"types must have one entry per token {tokens.shape}, got {types.shape}")
    return types


def _windows(
    tokens: np.ndarray, types: np.ndarray | None, starts: list[int] | np.ndarray, seq_len: int
) -> Tensor | tuple[Tensor, Tensor]:
    """Windows ``starts`` (in units of ``seq_len``) as a ``[len(starts), seq_len]`` long tensor,
    or ``(ids, types)`` when the stream has token types."""
    cut = lambda a: torch.from_numpy(np.stack([a[w * seq_len : (w + 1) * seq_len] for w in starts]).astype(np.int64))  # noqa: E731
    return cut(tokens) if types is None else (cut(tokens), cut(types))


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    types: np.ndarray | None = None,
) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
    """Fixed validation batches: ``max_batches`` global batches of windows spread evenly over the
    val stream (so a short budget still sees all of it), in order, no randomness.

    A global batch is ``batch_size * world_size`` windows and rank ``r`` takes its ``r``-th slice,
    as in training: the val set is the same whatever the number of processes.
    """
    n = len(tokens) // seq_len
    if n < 1:
        raise ValueError(f"the val stream ({len(tokens)} tokens) is shorter than seq_len={seq_len}")
    global_bs = batch_size * world_size
    want = min(n, global_bs * max_batches)
    starts = np.linspace(0, n - 1, want).round().astype(np.int64) if want < n else np.arange(n)
    batches = []
    for i in range(0, len(starts), global_bs):
        mine = starts[i : i + global_bs][rank * batch_size : (rank + 1) * batch_size]
        if len(mine):
            batches.append(_windows(tokens, _check_types(types, np.asarray(tokens)), mine, seq_len))
    return batches


@dataclass
class Data:
    """A corpus tokenised: train and val streams plus the tokenizer, and, for a mixed-modality
    corpus (``moelab.data.mixed``), each token's type."""

    corpus: Corpus
    tokenizer: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    train_types: np.ndarray | None = None
    val_types: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)


def load_data(
    source: str | Path | Sequence[str | Path] = STDLIB,
    tokenizer: str = "bytes",
    *,
    val_fraction: float = 0.05,
    bpe_vocab_size: int = 4096,
    include_tests: bool = False,
) -> Data:
    """Load, split and tokenise a corpus (see ``load_corpus`` and ``get_tokenizer``).

    ``"mixed"``, ``"mixed:fashion"``, ``"mixed:digits"``: the mixed-modality corpus of
    ``moelab.data.mixed`` (its own tokenizer; ``tokenizer`` must be ``"bytes"``, the default).
    """
    if is_mixed_source(source):

        if tokenizer != "bytes":
            raise ValueError(f"the mixed corpus has its own tokenizer (bytes + 16 grey levels); got tokenizer={tokenizer!r}")
        corpus, tok, train, val, train_types, val_types = load_mixed(source)
        return Data(corpus, tok, train, val, train_types=train_types, val_types=val_types)
    corpus = load_corpus(source, val_fraction=val_fraction, include_tests=include_tests)
    tok = get_tokenizer(tokenizer, corpus, bpe_vocab_size)
    return Data(corpus, tok, tok.encode_docs(corpus.train), tok.encode_docs(corpus.val))


# ---------------------------------------------------------------------------------------------
# In-memory examples (any model)
# ---------------------------------------------------------------------------------------------
def _as_tensors(x: object, name: str) -> tuple[Tensor, ...]:
    items = (x,) if isinstance(x, Tensor) else tuple(x) if isinstance(x, (tuple, list)) else None
    if not items or not all(isinstance(t, Tensor) for t in items):
        raise TypeError(f"{name} must be a tensor or a tuple of tensors, got {type(x).__name__}")
    n = items[0].shape[0] if items[0].dim() else 0
    if n < 1 or any(t.dim() == 0 or t.shape[0] != n for t in items):
        shapes = [tuple(t.shape) for t in items]
        raise ValueError(f"{name}'s tensors must share a first (example) dimension >= 1, got shapes {shapes}")
    return items


@dataclass
class TensorData:
    """Train and val examples held in memory: the rows of one tensor or of a tuple of tensors
    (``(x [N, ...], y [N, ...])``). A batch is the same structure with ``batch_size`` rows.

    ``TensorData(train=(x, y), val=(x_val, y_val))``; ``moelab.train.Trainer`` reads it with
    ``TensorBatches`` (seeded, resumable, sharded over ranks like ``Batches``).
    """

    train: Tensor | tuple[Tensor, ...]
    val: Tensor | tuple[Tensor, ...]

    def __post_init__(self) -> None:
        train, val = _as_tensors(self.train, "train"), _as_tensors(self.val, "val")
        if len(train) != len(val):
            raise ValueError(f"train holds {len(train)} tensors but val holds {len(val)}")
        self.single = isinstance(self.train, Tensor)
        self.train_tensors, self.val_tensors = train, val

    def _pack(self, items: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
        return items[0] if self.single else items

    def eval_batches(
        self, batch_size: int, max_batches: int, *, rank: int = 0, world_size: int = 1
    ) -> list[Tensor | tuple[Tensor, ...]]:
        """Fixed val batches, spread evenly over the val rows like ``eval_batches``."""
        n = self.val_tensors[0].shape[0]
        global_bs = batch_size * world_size
        want = min(n, global_bs * max_batches)
        starts = np.linspace(0, n - 1, want).round().astype(np.int64) if want < n else np.arange(n)
        out = []
        for i in range(0, len(starts), global_bs):
            mine = torch.from_numpy(starts[i : i + global_bs][rank * batch_size : (rank + 1) * batch_size])
            if len(mine):
                out.append(self._pack(tuple(t[mine] for t in self.val_tensors)))
        return out


class TensorBatches(_EpochOrder):
    """Deterministic, resumable batches of ``TensorData``'s train rows (the order rule of ``Batches``)."""

    def __init__(
        self, data: TensorData, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        self.data, self.batch_size = data, int(batch_size)
        super().__init__(data.train_tensors[0].shape[0], seed, rank, world_size)

    def next(self) -> Tensor | tuple[Tensor, ...]:
        rows = torch.as_tensor(self._mine(self.batch_size), dtype=torch.long)
        return self.data._pack(tuple(t[rows] for t in self.data.train_tensors))
