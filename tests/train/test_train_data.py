"""Data: the stdlib corpus, its file-level split, tokenizers, deterministic resumable batches."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch

from moelab import data as D
from moelab.data.corpus import DOC_SEPARATOR, in_val


@pytest.fixture(scope="module")
def stdlib():
    return D.load_corpus()


def test_stdlib_split_is_deterministic_and_disjoint(stdlib):
    again = D.load_corpus()
    names = lambda docs: [n for n, _ in docs]
    assert names(stdlib.train) == names(again.train) and names(stdlib.val) == names(again.val)
    train, val = set(names(stdlib.train)), set(names(stdlib.val))
    assert train and val and not train & val
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
    # the rule is a pure function of the relative path
    assert all(in_val(n, 0.05) for n in val) and not any(in_val(n, 0.05) for n in train)
    assert all(n.endswith(".py") for n in train | val)
    assert not any(
        set(n.split("/")[:-1]) & {"site-packages", "test", "tests", "idle_test"} for n in train | val
    )
    assert stdlib.fingerprint == again.fingerprint


def test_byte_tokenizer_round_trip(stdlib):
    tok = D.ByteTokenizer()
    assert tok.decode(tok.encode("héllo\n")) == "héllo\n"
    stream = tok.encode_docs(stdlib.val[:2])
    assert stream.dtype == np.uint16 and stream.max() < 256
    assert len(stream) == len(stdlib.val[0][1]) + len(DOC_SEPARATOR) + len(stdlib.val[1][1])


def test_user_files_and_folders(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(40):
        (folder / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    (folder / ".hidden").write_text("secret")
    (folder / "blob.bin").write_bytes(b"\0\1\2" * 10)
    c = D.load_corpus(folder, val_fraction=0.2)
    names = {n for n, _ in c.train} | {n for n, _ in c.val}
    assert names == {f"f{i}.txt" for i in range(40)} and c.val and c.train
    one = tmp_path / "one.txt"
    one.write_text("".join(f"line {i}\n" for i in range(100)))
    c1 = D.load_corpus(one, val_fraction=0.1)  # one file: split inside it, by lines
    assert c1.train[0][1].count(b"\n") == 90 and c1.val[0][1].count(b"\n") == 10
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        D.load_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="val_fraction"):
        D.load_corpus(one, val_fraction=0)


def test_hf_source_without_datasets_is_a_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *a, **kw):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match=r"needs the `datasets` package"):
        D.load_corpus("hf:wikitext:wikitext-2-raw-v1")


def test_bpe_trains_once_and_is_cached(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"m{i}.py").write_text(f"def function_{i}(value):\n    return value * {i} + value\n" * 30)
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    data = D.load_data(folder, "bpe", bpe_vocab_size=300, val_fraction=0.2)
    cached = list((tmp_path / "cache" / "tokenizers").glob("bpe-300-*.json"))
    assert len(cached) == 1 and data.vocab_size == 300
    assert data.tokenizer.decode(data.tokenizer.encode("def function_3(value):")) == "def function_3(value):"
    assert data.train_tokens.max() < 300 and len(data.train_tokens) < sum(
        len(d) for _, d in data.corpus.train
    )
    again = D.load_data(folder, "bpe", bpe_vocab_size=300, val_fraction=0.2)  # from the cache
    assert np.array_equal(again.train_tokens, data.train_tokens)
    with pytest.raises(ValueError, match="tokenizer must be"):
        D.get_tokenizer("words")


def test_batches_are_deterministic_resumable_and_sharded():
    tokens = np.arange(1000, dtype=np.uint16)
    a = D.Batches(tokens, seq_len=10, batch_size=4, seed=3)
    first = [a.next() for _ in range(30)]  # 120 windows: crosses an epoch (100 windows)
    assert first[0].shape == (4, 10) and first[0].dtype == torch.long
    epoch0 = torch.cat(first[:25])[:, 0] // 10
    assert sorted(epoch0.tolist()) == list(range(100))  # each window once per epoch
    b = D.Batches(tokens, seq_len=10, batch_size=4, seed=3)
    assert all(torch.equal(x, b.next()) for x in first)
    # resume from a saved position
    c = D.Batches(tokens, seq_len=10, batch_size=4, seed=3)
    for _ in range(7):
        c.next()
    state = c.state_dict()
    d = D.Batches(tokens, seq_len=10, batch_size=4, seed=3)
    d.load_state_dict(state)
    assert all(torch.equal(first[i], d.next()) for i in range(7, 30))
    # a different seed gives a different order; the wrong seed is refused on resume
    assert not torch.equal(D.Batches(tokens, 10, 4, seed=4).next(), first[0])
    with pytest.raises(ValueError, match="seed"):
        D.Batches(tokens, 10, 4, seed=4).load_state_dict(state)
    # two ranks split each global batch of a single process with twice the batch
    whole = D.Batches(tokens, 10, 4, seed=3)
    r0, r1 = (D.Batches(tokens, 10, 2, seed=3, rank=r, world_size=2) for r in (0, 1))
    for _ in range(5):
        assert torch.equal(whole.next(), torch.cat([r0.next(), r1.next()]))


def test_eval_batches_are_fixed_and_spread_over_ranks():
    tokens = np.arange(2000, dtype=np.uint16)
    full = D.eval_batches(tokens, 10, 4, 6)
    assert len(full) == 6 and full[0].shape == (4, 10)
    assert full[-1][-1, 0].item() == 1990  # spans the whole stream
    # two ranks with half the batch each see the same val set
    r0, r1 = (D.eval_batches(tokens, 10, 2, 6, rank=r, world_size=2) for r in (0, 1))
    assert len(r0) == len(r1) == 6
    assert all(torch.equal(f, torch.cat([a, b])) for f, a, b in zip(full, r0, r1, strict=True))


def test_tokenizers_load_back_from_files_and_checkpoints(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(20):
        (folder / f"m{i}.py").write_text(f"def f_{i}(x):\n    return x + {i}\n" * 20)
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    bpe = D.load_data(folder, "bpe", bpe_vocab_size=300, val_fraction=0.2).tokenizer
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    bpe.tok.save(str(model_dir / "tokenizer.json"))
    back = D.load_tokenizer(model_dir / "tokenizer.json")
    assert back.encode("def f_3(x):") == bpe.encode("def f_3(x):") and back.vocab_size == bpe.vocab_size
    assert D.checkpoint_tokenizer(model_dir, bpe.vocab_size).encode("x + 1") == bpe.encode("x + 1")
    assert D.checkpoint_tokenizer(tmp_path, 256).encode("hé") == [104, 195, 169]  # bytes
    with pytest.raises(ValueError, match="no tokenizer.json"):
        D.checkpoint_tokenizer(tmp_path, 300)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizers JSON"):
        D.load_tokenizer(tmp_path / "bad.json")
