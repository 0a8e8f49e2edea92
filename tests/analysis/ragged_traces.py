"""Ragged routing traces for the analysis tests: tokens with 0..kmax experts, ``-1``-padded."""

from __future__ import annotations

import random

import torch


def ragged_rows(rng: random.Random, T: int, E: int, kmax: int, sticky: float = 0.0) -> list[list[int]]:
    """Each token its own set of 0..kmax experts (capacity drops, expert choice); with probability
    ``sticky`` a token repeats the previous token's set."""
    rows: list[list[int]] = []
    for _ in range(T):
        if rows and rng.random() < sticky:
            rows.append(list(rows[-1]))
        else:
            rows.append(rng.sample(range(E), rng.randint(0, kmax)))
    return rows


def padded(rng: random.Random, rows: list[list[int]], width: int) -> torch.Tensor:
    """``[T, width]``: each row's experts in order, ``-1`` (no request) at random places among them."""
    out = []
    for r in rows:
        slots = sorted(rng.sample(range(width), len(r)))
        row = [-1] * width
        for s, e in zip(slots, r, strict=True):
            row[s] = e
        out.append(row)
    return torch.tensor(out, dtype=torch.long).view(len(rows), width)
