"""Multi-query associative recall batches, checked sequence by sequence against a plain reading."""

import pytest
import torch

from moelab.data.recall import (
    FIRST_KEY,
    SEPARATOR,
    associative_recall_batch,
    recall_accuracy,
    recall_vocab_size,
)


@pytest.mark.parametrize(("seq_len", "num_pairs"), [(17, 4), (64, 8), (200, 16), (9, 2)])
def test_every_query_asks_a_context_key_and_labels_its_value(seq_len, num_pairs):
    nk, nv, nn = 20, 7, 5
    ids, labels = associative_recall_batch(
        6,
        seq_len,
        num_pairs,
        num_keys=nk,
        num_values=nv,
        num_noise=nn,
        generator=torch.Generator().manual_seed(1),
    )
    assert ids.shape == labels.shape == (6, seq_len)
    assert int(ids.max()) < recall_vocab_size(nk, nv, nn)
    is_key = lambda t: FIRST_KEY <= t < FIRST_KEY + nk  # noqa: E731
    is_value = lambda t: FIRST_KEY + nk <= t < FIRST_KEY + nk + nv  # noqa: E731
    for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        sep = seq_len - 1 - 2 * num_pairs
        assert row[sep] == SEPARATOR and SEPARATOR not in row[:sep] + row[sep + 1 :]
        # the context: noise plus exactly num_pairs "key value" pairs with distinct keys
        pairs = {}
        for t in range(sep):
            if is_key(row[t]):
                assert row[t] not in pairs, "a key appears twice in the context"
                assert t + 1 < sep and is_value(row[t + 1])
                pairs[row[t]] = row[t + 1]
        assert len(pairs) == num_pairs
        assert sum(is_value(x) for x in row[:sep]) == num_pairs
        # the queries: every key once, followed by its value, which is the label there
        queries = row[sep + 1 :]
        asked = queries[0::2]
        assert sorted(asked) == sorted(pairs)
        for i, key in enumerate(asked):
            pos = sep + 2 + 2 * i
            assert row[pos] == pairs[key] == lab[pos]
        assert sum(x != -100 for x in lab) == num_pairs


def test_seeded_and_validated():
    a = associative_recall_batch(2, 40, 4, generator=torch.Generator().manual_seed(3))
    b = associative_recall_batch(2, 40, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="seq_len=16 is too short"):
        associative_recall_batch(1, 16, 4)
    with pytest.raises(ValueError, match="num_pairs=9 needs as many distinct keys"):
        associative_recall_batch(1, 100, 9, num_keys=8)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        associative_recall_batch(0, 100, 2)


def test_recall_accuracy_reads_the_previous_positions_logits():
    ids, labels = associative_recall_batch(3, 33, 4, generator=torch.Generator().manual_seed(0))
    v = int(ids.max()) + 1
    logits = torch.zeros(3, 33, v)
    for b in range(3):
        for t in range(1, 33):
            if labels[b, t] != -100:
                logits[b, t - 1, labels[b, t]] = 1.0  # the right answer, one position earlier
    assert recall_accuracy(logits, labels) == 1.0
    logits[0] = 0.0  # row 0 now predicts token 0 everywhere: its 4 queries are wrong
    assert recall_accuracy(logits, labels) == pytest.approx(8 / 12)
    with pytest.raises(ValueError, match="no labelled position"):
        recall_accuracy(logits, torch.full_like(labels, -100))
