"""Load what ``moelab analyze`` is pointed at, and run models to get traces.

Targets: a ``MoELM`` checkpoint directory (``config.json`` + ``model.safetensors``), a transformers
model directory (``AutoModelForCausalLM``), or a saved trace (``Trace.save`` file, with an optional
``<file>.json`` sidecar holding the sequence lengths).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.core.tracing import Trace, trace


@dataclass
class Target:
    """What was loaded: ``kind`` is ``"moelm"``, ``"transformers"`` or ``"trace"``."""

    kind: str
    path: Path
    model: nn.Module | None = None
    tokenizer: Any = None
    trace: Trace | None = None
    lengths: list[int] | None = None
    max_len: int | None = None
    notes: list[str] = field(default_factory=list)


class ByteTokens:
    """UTF-8 bytes as token ids (models trained with moelab's default ``bytes`` tokenizer)."""

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokens:
    """A transformers tokenizer behind the same ``encode`` interface."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.name = type(tok).__name__

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


class JSONTokens:
    """A Hugging Face ``tokenizers`` JSON file (moelab's BPE checkpoints)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.name = f"bpe:{path.name}"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids


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


def _is_moelm_config(cfg: dict[str, Any]) -> bool:
    return "model_type" not in cfg and {"n_layers", "num_experts", "d_model"} <= set(cfg)


def load_target(path: str | Path, tokenizer: str | None = None) -> Target:
    """Load a MoELM checkpoint, a transformers model directory or a trace file (see module doc)."""
    p = Path(path)
    if p.is_file():
        trace = Trace.load(p)
        t = Target("trace", p, trace=trace)
        side = sidecar_path(p)
        if side.is_file():
            t.lengths = json.loads(side.read_text()).get("sequence_lengths")
        return t
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is neither a trace file nor a model directory")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{p} has no config.json: not a MoELM checkpoint nor a transformers model directory"
        )
    cfg = json.loads(cfg_file.read_text())
    if _is_moelm_config(cfg):
        from moelab.models import MoELM

        model = MoELM.from_pretrained(p).eval()
        t = Target("moelm", p, model=model, max_len=model.config.max_seq_len)
        t.tokenizer = _moelm_tokenizer(p, model.config.vocab_size, tokenizer)
        return t
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the [hf] extra is part of the dev install
        raise ImportError(
            "analysing a transformers model needs the [hf] extra (pip install transformers)"
        ) from e
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p)).eval()
    max_len = getattr(model.config, "max_position_embeddings", None)
    t = Target("transformers", p, model=model, max_len=max_len)
    t.tokenizer = _hf_tokenizer(p, int(model.config.vocab_size), tokenizer)
    return t


def _moelm_tokenizer(d: Path, vocab_size: int, override: str | None) -> Any:
    if override is not None:
        return _override_tokenizer(override, vocab_size)
    if (d / "tokenizer.json").is_file():
        return JSONTokens(d / "tokenizer.json")
    state = d / "trainer_state.json"
    if state.is_file() and json.loads(state.read_text()).get("tokenizer") == "bpe":
        raise ValueError(
            f"{d} was trained with a BPE tokenizer but holds no tokenizer.json; pass --tokenizer PATH"
        )
    if vocab_size == 256:
        return ByteTokens()
    raise ValueError(
        f"{d}: vocab_size={vocab_size} is not the byte tokenizer's 256 and no tokenizer.json is present; "
        "pass --tokenizer PATH/TO/tokenizer.json"
    )


def _hf_tokenizer(d: Path, vocab_size: int, override: str | None) -> Any:
    if override is not None:
        return _override_tokenizer(override, vocab_size)
    if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        return HFTokens(AutoTokenizer.from_pretrained(str(d)))
    if vocab_size >= 256:
        return ByteTokens()
    raise ValueError(
        f"{d} has no tokenizer files and vocab_size={vocab_size} < 256 (bytes do not fit); pass --tokenizer"
    )


def _override_tokenizer(spec: str, vocab_size: int) -> Any:
    if spec == "bytes":
        if vocab_size < 256:
            raise ValueError(f"--tokenizer bytes needs vocab_size >= 256, the model has {vocab_size}")
        return ByteTokens()
    p = Path(spec)
    if p.is_file():
        return JSONTokens(p)
    if p.is_dir():
        from transformers import AutoTokenizer

        return HFTokens(AutoTokenizer.from_pretrained(str(p)))
    raise ValueError(
        f"--tokenizer must be 'bytes', a tokenizer.json file or a tokenizer directory, got {spec!r}"
    )


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
    texts: Iterator[str], tokenizer: Any, seq_len: int, num_seqs: int, vocab_size: int | None = None
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
    tokenizer: Any,
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
