"""Synthetic multi-query associative recall (MQAR) over a long context.

The task of Zoology (Arora et al. 2023) in the long-context form MoBA / FlashMoBA use to probe
block routing: key-value pairs are scattered through a long stretch of noise, and at the end the
keys are asked again, each followed by its value. A model answers a query ``k`` by finding the
earlier ``k`` and copying the token after it, so its attention must reach the block that holds the
pair: a block-sparse attention whose gate misses that block cannot answer.

Vocabulary (``vocab_size = 2 + num_keys + num_values + num_noise``, see :func:`recall_vocab_size`):
``0`` separates the context from the queries, ``1`` is unused padding, then the keys, the values and
the noise tokens. One sequence of length ``seq_len``:

    [ noise with the num_pairs pairs "k v" at random, non-overlapping places ] [0] [ k v  k v ... ]
    |<------------------------ seq_len - 1 - 2 * num_pairs ------------------->|     every key once, shuffled

Keys within a sequence are distinct; each key's value is drawn uniformly (values may repeat).
``labels`` (same shape as ``input_ids``, ``-100`` elsewhere) hold the value at every query's value
position, the next-token target of the query key before it (``moelab.MoELM``'s loss shifts labels
by one).
"""

from __future__ import annotations

import torch
from torch import Tensor

SEPARATOR = 0
PAD = 1
FIRST_KEY = 2


def recall_vocab_size(num_keys: int, num_values: int, num_noise: int) -> int:
    """Tokens a model needs for :func:`associative_recall_batch` with these pools."""
    return FIRST_KEY + num_keys + num_values + num_noise


def associative_recall_batch(
    batch_size: int,
    seq_len: int,
    num_pairs: int,
    *,
    num_keys: int = 64,
    num_values: int = 64,
    num_noise: int = 64,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """A batch of MQAR sequences (module docstring).

    Returns ``(input_ids [batch_size, seq_len], labels [batch_size, seq_len])``, long tensors on
    CPU; ``labels`` is ``-100`` except at the ``num_pairs`` query values of each sequence.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("num_pairs", num_pairs)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value in (("num_keys", num_keys), ("num_values", num_values), ("num_noise", num_noise)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_pairs > num_keys:
        raise ValueError(f"num_pairs={num_pairs} needs as many distinct keys; num_keys={num_keys}")
    context = seq_len - 1 - 2 * num_pairs
    if context < 2 * num_pairs:
        raise ValueError(
            f"seq_len={seq_len} is too short for {num_pairs} pairs: the context needs 2 * num_pairs tokens "
            f"plus the separator and 2 * num_pairs query tokens (seq_len >= {4 * num_pairs + 1})"
        )
    g = generator
    b = batch_size
    first_value = FIRST_KEY + num_keys
    first_noise = first_value + num_values
    keys = torch.rand(b, num_keys, generator=g).argsort(1)[:, :num_pairs] + FIRST_KEY  # distinct
    values = torch.randint(first_value, first_noise, (b, num_pairs), generator=g)
    ids = torch.randint(first_noise, first_noise + num_noise, (b, seq_len), generator=g)
    # Pair slots: choose num_pairs of the context's (context - num_pairs) "gaps" so that pairs never
    # overlap: sorted distinct picks s_i, pair i starts at s_i + i (each earlier pair shifts it by 1).
    slots = torch.rand(b, context - num_pairs, generator=g).argsort(1)[:, :num_pairs].sort(1).values
    starts = slots + torch.arange(num_pairs)
    ids.scatter_(1, starts, keys)
    ids.scatter_(1, starts + 1, values)
    ids[:, context] = SEPARATOR
    order = torch.rand(b, num_pairs, generator=g).argsort(1)  # ask the keys in a random order
    q_start = context + 1 + 2 * torch.arange(num_pairs)
    ids[:, q_start] = keys.gather(1, order)
    asked = values.gather(1, order)
    ids[:, q_start + 1] = asked
    labels = torch.full_like(ids, -100)
    labels[:, q_start + 1] = asked
    return ids, labels


def recall_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of the labelled positions whose value the logits one position earlier predict (argmax).

    ``logits [B, S, V]`` (next-token logits), ``labels [B, S]`` with ``-100`` where unlabelled.
    """
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    asked = target != -100
    if not bool(asked.any()):
        raise ValueError("labels has no labelled position (all -100)")
    return float((pred[asked] == target[asked]).float().mean())
