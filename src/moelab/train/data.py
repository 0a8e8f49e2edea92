"""Training data: the embedded corpus, tokenizers, a deterministic file-level split, batching.

The default corpus is the running interpreter's own standard library ``.py`` sources (found
with ``sysconfig``): it is on every machine with Python and needs no download. ``site-packages``
and the stdlib's own test suites (directories named ``test``, ``tests``, ``idle_test``) are left
out: the tests are 60% of the bytes and full of deliberately odd files (bad encodings, syntax
errors); what remains (~12 MB on CPython 3.11) is ordinary library code.

Split: by file, deterministically: a file is in ``val`` when the first 8 bytes of
``sha256(relative path)``, as an integer, fall in the lowest ``val_fraction`` of the range.
The split depends only on the file's path, so it is the same on every run, process and machine
with the same files, and a file never appears in both.

Tokenizers: ``bytes`` (default; vocab 256, no training, no special tokens) or ``bpe`` (a
byte-level BPE from Hugging Face ``tokenizers``, trained on the train split on first use and
cached as JSON under ``~/.cache/moelab/tokenizers`` or ``$MOELAB_CACHE``).

Batching: ``Batches`` cuts the token stream into non-overlapping windows of ``seq_len`` tokens
and visits them in a fresh permutation each epoch, ``numpy.random.default_rng([seed, epoch])``.
Its whole state is ``(epoch, index)``: save ``state_dict()`` in a checkpoint and
``load_state_dict`` resumes at exactly the next window. Under data parallelism every rank holds
the same position and reads its own slice of each global batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

STDLIB = "stdlib"
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
DOC_SEPARATOR = b"\n\n"  # between files in the byte stream (bytes tokenizer has no special tokens)
EOT = "<|endoftext|>"  # the BPE tokenizer's document separator


def cache_dir() -> Path:
    """``$MOELAB_CACHE`` or ``~/.cache/moelab``."""
    return Path(os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab")


# ---------------------------------------------------------------------------------------------
# Corpus: (relative path, bytes) documents, split by file
# ---------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """Documents by relative name, split into train and val by name."""

    name: str
    train: list[tuple[str, bytes]] = field(default_factory=list)
    val: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """A short hash of the train split's names and sizes (cache key for trained tokenizers)."""
        h = hashlib.sha256()
        for rel, data in self.train:
            h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0")
        return h.hexdigest()[:16]

    def describe(self) -> str:
        mb = lambda docs: sum(len(d) for _, d in docs) / 1e6
        return (
            f"{self.name}: {len(self.train)} train files ({mb(self.train):.1f} MB), "
            f"{len(self.val)} val files ({mb(self.val):.1f} MB)"
        )


def in_val(relpath: str, val_fraction: float) -> bool:
    """The split rule: a pure function of the file's relative path."""
    h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2**64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = False) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the interpreter's stdlib ``.py`` files, sorted by name."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} (sysconfig 'stdlib') does not exist")
    out = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if SKIP_DIRS.intersection(parts[:-1]):
            continue
        if not include_tests and TEST_DIRS.intersection(parts[:-1]):
            continue
        if p.is_file():
            out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def _is_text(data: bytes) -> bool:
    return b"\0" not in data[:8192]


def _files_under(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """``(name, path)`` of every non-hidden text-looking file under ``paths`` (files or folders)."""
    out: dict[str, Path] = {}
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            out[p.name if len(paths) == 1 else p.as_posix()] = p
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    out[(rel if len(paths) == 1 else f).as_posix()] = f
        else:
            raise FileNotFoundError(f"data path {str(raw)!r} is neither a file nor a directory")
    return sorted(out.items())


def load_corpus(
    source: str | Path | Sequence[str | Path] = STDLIB,
    *,
    val_fraction: float = 0.05,
    include_tests: bool = False,
) -> Corpus:
    """Load and split a corpus.

    Args:
        source: ``"stdlib"`` (default), a text file, a folder (every non-hidden text file below
            it), a list of those, or ``"hf:NAME"`` / ``"hf:NAME:CONFIG"`` for a Hugging Face
            ``datasets`` dataset (needs the ``datasets`` package and a network).
        val_fraction: share of files in the val split (by the hash rule, so approximately).
        include_tests: with ``stdlib``, also take the stdlib's test suites.

    When the file-level split leaves either side empty (one file, or very few), each file is
    split instead: its last ``val_fraction`` of lines goes to val.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if isinstance(source, (str, Path)) and str(source).startswith("hf:"):
        return load_hf_corpus(str(source)[3:], val_fraction=val_fraction)
    if isinstance(source, (str, Path)) and str(source) == STDLIB:
        name, files = STDLIB, stdlib_files(include_tests)
    else:
        paths = [source] if isinstance(source, (str, Path)) else list(source)
        if not paths:
            raise ValueError("source must name at least one file or folder")
        name, files = ",".join(str(p) for p in paths), _files_under(paths)
    corpus = Corpus(name=name)
    docs = []
    for rel, p in files:
        data = p.read_bytes()
        if data and _is_text(data):
            docs.append((rel, data))
    if not docs:
        raise ValueError(f"no text files found in {name!r}")
    for rel, data in docs:
        (corpus.val if in_val(rel, val_fraction) else corpus.train).append((rel, data))
    if not corpus.train or not corpus.val:
        corpus.train, corpus.val = [], []
        for rel, data in docs:
            lines = data.splitlines(keepends=True)
            cut = max(1, int(round(len(lines) * (1 - val_fraction)))) if len(lines) > 1 else len(lines)
            corpus.train.append((rel, b"".join(lines[:cut])))
            if lines[cut:]:
                corpus.val.append((rel, b"".join(lines[cut:])))
        if not corpus.val:
            raise ValueError(f"{name!r} is too small to hold out a validation split")
    return corpus


def load_hf_corpus(spec: str, *, val_fraction: float = 0.05, text_field: str = "text") -> Corpus:
    """A Hugging Face ``datasets`` dataset as a corpus (``NAME`` or ``NAME:CONFIG``).

    Uses its ``validation`` split when it has one, otherwise holds out rows by the hash rule on
    the row index. Imported lazily: ``datasets`` is not a dependency of moelab.
    """
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError(
            f"data source 'hf:{spec}' needs the `datasets` package (pip install datasets) and a network; "
            "otherwise pass text files or folders, or use the default 'stdlib' corpus"
        ) from None
    name, _, config = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # network, unknown name, ...
        raise RuntimeError(f"could not load dataset {spec!r} with datasets.load_dataset: {e}") from e
    if "train" not in ds:
        raise ValueError(f"dataset {spec!r} has no 'train' split (splits: {list(ds)})")
    if text_field not in ds["train"].column_names:
        raise ValueError(
            f"dataset {spec!r} has no {text_field!r} column (columns: {ds['train'].column_names})"
        )
    corpus = Corpus(name=f"hf:{spec}")
    val_split = next((s for s in ("validation", "valid", "val", "test") if s in ds), None)
    for i, row in enumerate(ds["train"]):
        doc = (f"train/{i}", row[text_field].encode("utf-8"))
        (corpus.val if val_split is None and in_val(doc[0], val_fraction) else corpus.train).append(doc)
    if val_split is not None:
        corpus.val = [
            (f"{val_split}/{i}", r[text_field].encode("utf-8")) for i, r in enumerate(ds[val_split])
        ]
    return corpus


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

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot_id = tok.token_to_id(EOT)

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
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str | bytes) -> list[int]:
        s = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return self.tok.encode(s).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def encode_docs(self, docs: list[tuple[str, bytes]]) -> np.ndarray:
        texts = [d.decode("utf-8", errors="replace") for _, d in docs]
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


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
class Batches:
    """Deterministic, resumable ``[batch_size, seq_len]`` batches of token windows.

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
    ) -> None:
        self.tokens = np.asarray(tokens)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_windows = len(self.tokens) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(
                f"the token stream ({len(self.tokens)} tokens) is shorter than seq_len={seq_len}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def _take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            order = self._order(self.epoch)
            n = min(count - len(out), self.num_windows - self.index)
            out.extend(order[self.index : self.index + n].tolist())
            self.index += n
            if self.index == self.num_windows:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def next(self) -> Tensor:
        """The next ``[batch_size, seq_len]`` long tensor of this rank."""
        windows = self._take(self.batch_size * self.world_size)
        mine = windows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        rows = [self.tokens[w * self.seq_len : (w + 1) * self.seq_len] for w in mine]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"data state was saved with seed={state['seed']}, these batches use seed={self.seed}"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int, *, rank: int = 0, world_size: int = 1
) -> list[Tensor]:
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
            rows = [tokens[s * seq_len : (s + 1) * seq_len] for s in mine]
            batches.append(torch.from_numpy(np.stack(rows).astype(np.int64)))
    return batches


@dataclass
class Data:
    """A corpus tokenised: train and val streams plus the tokenizer."""

    corpus: Corpus
    tokenizer: object
    train_tokens: np.ndarray
    val_tokens: np.ndarray

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
    """Load, split and tokenise a corpus (see ``load_corpus`` and ``get_tokenizer``)."""
    corpus = load_corpus(source, val_fraction=val_fraction, include_tests=include_tests)
    tok = get_tokenizer(tokenizer, corpus, bpe_vocab_size)
    return Data(corpus, tok, tok.encode_docs(corpus.train), tok.encode_docs(corpus.val))
