"""Run models to get traces for analysis, and save/load traces with their sequence lengths.

- ``corpus_texts`` + ``token_windows``: a corpus (``moelab.data``) cut into ``[N, S]`` windows;
- ``run_trace``: a model run on the windows under ``moelab.trace`` (moelab layers and any model a
  registered integration traces, e.g. an unpatched transformers MoE);
- ``sentence_routings``: one forward per sentence (cross-lingual divergence);
- ``save_trace`` / ``load_trace``: ``Trace.save`` plus a JSON sidecar with the sequence lengths.

A tokenizer here is anything with ``encode(text) -> list[int]``: ``moelab.data.ByteTokenizer``, a
``moelab.data`` BPE, or a transformers tokenizer adapted by ``moelab.integrations.hf``. Loading
models and tokenizers from a path is the CLI's work (``moelab.cli.analyze``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.core.tracing import Trace, trace


class Tokenizer(Protocol):
    """What the runners need of a tokenizer."""

    def encode(self, text: str) -> list[int]: ...


def sidecar_path(trace_path: Path) -> Path:
    return trace_path.with_name(trace_path.name + ".json")


def save_trace(trace: Trace, path: str | Path, lengths: Sequence[int] | None, source: str = "") -> Path:
    """``Trace.save`` plus a JSON sidecar (``<file>.json``) with the sequence lengths."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    trace.save(p)
    meta = {
        "format": "moelab-trace-sidecar-1",
        "sequence_lengths": list(lengths) if lengths else None,
        "source": source,
    }
    sidecar_path(p).write_text(json.dumps(meta))
    return p


def load_trace(path: str | Path) -> tuple[Trace, list[int] | None]:
    """A ``Trace.save`` file and the sequence lengths of its sidecar (None without a sidecar)."""
    p = Path(path)
    tr = Trace.load(p)
    side = sidecar_path(p)
    lengths = json.loads(side.read_text()).get("sequence_lengths") if side.is_file() else None
    return tr, lengths


# --------------------------------------------------------------------------------------------------
# corpus -> sequences
# --------------------------------------------------------------------------------------------------
def corpus_texts(text_paths: Sequence[str | Path] | None) -> Iterator[str]:
    """Documents to analyse: the given text files/folders, else the stdlib corpus' val split."""
    from moelab.data import load_corpus

    if text_paths:
        corpus = load_corpus([str(p) for p in text_paths])
        docs = corpus.train + corpus.val
    else:
        docs = load_corpus("stdlib").val
    for _, data in docs:
        yield data.decode("utf-8", errors="replace")


def token_windows(
    texts: Iterator[str], tokenizer: Tokenizer, seq_len: int, num_seqs: int, vocab_size: int | None = None
) -> Tensor:
    """``[N, seq_len]`` long: the documents' tokens concatenated and cut into ``num_seqs`` windows."""
    need = seq_len * num_seqs
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer.encode(text))
        buf.extend(tokenizer.encode("\n\n"))
        if len(buf) >= need:
            break
    n = len(buf) // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {len(buf)} tokens, fewer than one sequence of seq_len={seq_len}")
    ids = torch.tensor(buf[: min(n, num_seqs) * seq_len], dtype=torch.long).view(-1, seq_len)
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise ValueError(f"the tokenizer produced id {int(ids.max())} >= the model's vocab_size={vocab_size}")
    return ids


@torch.no_grad()
def run_trace(
    model: nn.Module, ids: Tensor, batch_size: int = 8, on_batch: Callable[[int], None] | None = None
) -> tuple[Trace, list[int]]:
    """Run ``model`` on ``ids [N, S]`` in batches under a trace; returns the trace and the lengths."""
    tr = Trace()
    model.eval()
    with trace(model, tr):
        for i in range(0, ids.shape[0], batch_size):
            model(ids[i : i + batch_size])
            if on_batch is not None:
                on_batch(min(batch_size, ids.shape[0] - i))
    if not tr.layers:
        raise ValueError(f"{type(model).__name__} recorded no routing: it has no MoE layer moelab can trace")
    return tr, [int(ids.shape[1])] * int(ids.shape[0])


@torch.no_grad()
def sentence_routings(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    max_len: int | None = None,
    on_sentence: Callable[[], None] | None = None,
) -> dict[str, list[Routing]]:
    """One forward per sentence; ``{layer: [Routing of sentence i]}`` in sentence order."""
    tr = Trace()
    model.eval()
    with trace(model, tr):
        for s in sentences:
            ids = tokenizer.encode(s)
            if max_len is not None:
                ids = ids[:max_len]
            if not ids:
                raise ValueError(f"sentence {s!r} has no tokens")
            model(torch.tensor([ids], dtype=torch.long))
            if on_sentence is not None:
                on_sentence()
    return {name: list(rs) for name, rs in tr.records.items()}


def read_parallel(
    path_a: str | Path, path_b: str | Path, max_pairs: int | None = None
) -> list[tuple[str, str]]:
    """Line-aligned parallel files -> ``[(a, b)]``, skipping pairs where either line is blank."""
    a = Path(path_a).read_text(encoding="utf-8").splitlines()
    b = Path(path_b).read_text(encoding="utf-8").splitlines()
    if len(a) != len(b):
        raise ValueError(f"parallel files must have the same number of lines, got {len(a)} and {len(b)}")
    pairs = [(x.strip(), y.strip()) for x, y in zip(a, b, strict=True) if x.strip() and y.strip()]
    if not pairs:
        raise ValueError("the parallel files hold no non-empty line pair")
    return pairs[:max_pairs] if max_pairs else pairs
