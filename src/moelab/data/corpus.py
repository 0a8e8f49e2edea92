"""Corpora: the embedded default (the stdlib's own sources), text files, a deterministic split.

The default corpus is the running interpreter's own standard library ``.py`` sources (found
with ``sysconfig``): it is on every machine with Python and needs no download. ``site-packages``
and the stdlib's own test suites (directories named ``test``, ``tests``, ``idle_test``) are left
out: the tests are 60% of the bytes and full of deliberately odd files (bad encodings, syntax
errors); what remains (~12 MB on CPython 3.11) is ordinary library code.

Split: by file, deterministically: a file is in ``val`` when the first 8 bytes of
``sha256(relative path)``, as an integer, fall in the lowest ``val_fraction`` of the range.
The split depends only on the file's path, so it is the same on every run, process and machine
with the same files, and a file never appears in both.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    summary: str | None = None  # what ``describe`` says, for corpora that are not text files

    @property
    def fingerprint(self) -> str:
        """A short hash of the train split's names and sizes (cache key for trained tokenizers)."""
        h = hashlib.sha256()
        for rel, data in self.train:
            h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0")
        return h.hexdigest()[:16]

    def describe(self) -> str:
        if self.summary is not None:
            return self.summary
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
