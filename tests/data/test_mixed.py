"""The mixed-modality corpus: patch tokens against a plain loop, types, batches, training with types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.data import Batches, eval_batches, load_data
from moelab.data.mixed import (
    IMAGE,
    LEVELS,
    TEXT,
    MixedTokenizer,
    fashion_available,
    interleave,
    load_fashion,
    patch_levels,
)

pytest.importorskip("sklearn")


def test_patch_levels_match_a_plain_loop():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 8, 12))
    got = patch_levels(images, 4, 256.0)
    for n in range(3):
        k = 0
        for r in range(0, 8, 4):
            for c in range(0, 12, 4):
                mean = images[n, r : r + 4, c : c + 4].mean()
                assert got[n, k] == min(int(mean / 256.0 * LEVELS), LEVELS - 1)
                k += 1
    assert got.shape == (3, 6) and got.min() >= 0 and got.max() < LEVELS
    with pytest.raises(ValueError, match="patch"):
        patch_levels(images, 5, 256.0)


def test_interleave_puts_each_class_name_before_its_image_with_types():
    tok = MixedTokenizer()
    levels = np.array([[0, 15], [3, 4]])
    tokens, types = interleave(["cat", "dog"], np.array([1, 0]), levels, tok)
    expect = tok.encode("dog: ") + [256, 271] + tok.encode("\n") + tok.encode("cat: ") + [259, 260] + tok.encode("\n")
    assert tokens.tolist() == expect
    assert types.tolist() == [TEXT] * 5 + [IMAGE] * 2 + [TEXT] + [TEXT] * 5 + [IMAGE] * 2 + [TEXT]
    assert tok.decode(tokens).startswith("dog: ")


def test_digits_corpus_streams_tokens_with_types():
    data = load_data("mixed:digits")
    assert data.vocab_size == 272 and data.train_types is not None
    assert len(data.train_tokens) == len(data.train_types) and len(data.val_tokens) == len(data.val_types)
    img = data.train_types == IMAGE
    assert (data.train_tokens[img] >= 256).all() and (data.train_tokens[~img] < 256).all()
    assert "digits" in data.corpus.describe()
    b = Batches(data.train_tokens, 32, 4, seed=0, types=data.train_types)
    ids, types = b.next()
    assert ids.shape == types.shape == (4, 32)
    assert torch.equal(ids >= 256, types == IMAGE)
    ev = eval_batches(data.val_tokens, 32, 4, 2, types=data.val_types)
    assert all(isinstance(x, tuple) and x[0].shape == x[1].shape for x in ev)
    with pytest.raises(ValueError, match="types must have one entry per token"):
        Batches(data.train_tokens, 32, 4, types=data.train_types[:-1])
    with pytest.raises(ValueError, match="own tokenizer"):
        load_data("mixed:digits", "bpe")


def test_fashion_loader_names_the_install_line_when_absent(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion(tmp_path)
    if not fashion_available():
        with pytest.warns(UserWarning, match="falls back to sklearn's digits"):
            assert load_data("mixed").corpus.name == "mixed:digits"
    else:
        assert load_data("mixed").corpus.name == "mixed:fashion"


def test_training_on_typed_data_passes_types_and_reports_loss_per_type():
    from moelab.core.router import Router
    from moelab.models import MoELM, MoELMConfig
    from moelab.train import TrainConfig, Trainer

    seen = []
    data = load_data("mixed:digits")
    cfg = MoELMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=4, vocab_size=data.vocab_size)
    model = MoELM(cfg)
    for _, layer in model.moe_layers():
        layer.router.register_forward_pre_hook(lambda m, args: seen.append(args[1].token_types))
    tcfg = TrainConfig(steps=2, batch_size=4, seq_len=32, eval_every=2, eval_batches=2, log_every=1)
    res = Trainer(model, tcfg, data=data).train()
    assert seen and all(t is not None and t.shape == (4 * 32,) for t in seen)
    assert set(res.val_loss_by_type) == {"text", "image"}
    assert all(np.isfinite(v) for v in res.val_loss_by_type.values())
    assert isinstance(model.moe_layers()[0][1].router, Router)
