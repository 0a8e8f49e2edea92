"""Bootstrap confidence intervals, shared by SRP/SCH (``lrc``) and the cross-lingual divergence.

(Routing statistics such as load balance and router entropy are ``moelab.core.stats``.)

The conventions are those of the LRC paper's official code (github.com/ljcleo/moe-lrc,
``31_srp_refine.py`` and ``41_sch_calc.py``), whose ``config.json`` also gives the defaults: 1000
resamples, 95% confidence. Samples (for SRP/SCH: whole sequences; for the divergence: sentence
pairs) are drawn with replacement, ``n`` per replicate; the *basic* (pivotal) interval is
``[2 theta - q_hi, 2 theta - q_lo]`` with ``q`` the sorted replicates at indices
``round(n_boot alpha / 2)`` and ``n_boot - round(n_boot alpha / 2)`` (clamped to the last index).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NUM_BOOTSTRAP = 1000  # official config.json "num_bootstrap"
CI_ALPHA = 0.05  # official config.json "ci_confidence" = 0.95
METHODS = ("basic", "percentile")


@dataclass(frozen=True)
class CI:
    """A point estimate with its bootstrap confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    n_boot: int
    alpha: float
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "n_boot": self.n_boot,
            "alpha": self.alpha,
            "method": self.method,
        }


def check_bootstrap(n_boot: object, alpha: object, method: object) -> None:
    """Raise ``ValueError`` naming the argument when a bootstrap setting is invalid."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    if method not in METHODS:
        raise ValueError(f"method must be 'basic' (the official code's) or 'percentile', got {method!r}")


def bootstrap_indices(n: int, n_boot: int, seed: int) -> Tensor:
    """``[n_boot, n]`` long: each row draws ``n`` sample indices with replacement."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(n, (n_boot, n), generator=g)


def resample_weights(n: int, n_boot: int, seed: int) -> Tensor:
    """``[n_boot, n]`` long: how many times each sample is drawn in each replicate (the draws of
    ``bootstrap_indices(n, n_boot, seed)``), so that a statistic that is a sum over samples is
    ``weights @ per_sample`` for every replicate at once."""
    idx = bootstrap_indices(n, n_boot, seed)
    w = torch.zeros(n_boot, n, dtype=torch.long)
    return w.scatter_add_(1, idx, torch.ones_like(idx))


def interval_from_replicates(
    estimate: Tensor, replicates: Tensor, alpha: float = CI_ALPHA, method: str = "basic"
) -> tuple[Tensor, Tensor]:
    """``(low, high)`` from ``replicates [n_boot, ...]`` around ``estimate [...]``.

    Order statistics at ``lo = round(n_boot alpha / 2)`` and ``hi = n_boot - lo`` (clamped to the
    last index), as ``31_srp_refine.py``/``41_sch_calc.py`` do. ``basic``: ``2 theta - q``;
    ``percentile``: ``q``.
    """
    n_boot = replicates.shape[0]
    srt = replicates.double().sort(dim=0).values
    lo_i = round(n_boot * alpha / 2)
    hi_i = min(n_boot - lo_i, n_boot - 1)
    q_lo, q_hi = srt[lo_i], srt[hi_i]
    if method == "basic":
        est = estimate.double()
        return 2 * est - q_hi, 2 * est - q_lo
    return q_lo, q_hi


def bootstrap_ci(
    fn: Callable[[list], float],
    samples: Sequence,
    n_boot: int = NUM_BOOTSTRAP,
    alpha: float = CI_ALPHA,
    seed: int = 0,
    method: str = "basic",
) -> CI:
    """Bootstrap ``fn`` over ``samples`` (e.g. one ``[T, k]`` tensor per sequence).

    Every replicate calls ``fn`` on ``len(samples)`` samples drawn with replacement (rows of
    ``bootstrap_indices(len(samples), n_boot, seed)``); the point estimate is ``fn(samples)``.
    """
    check_bootstrap(n_boot, alpha, method)
    if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)) or len(samples) == 0:
        raise ValueError("samples must be a non-empty sequence (list/tuple) of samples")
    items = list(samples)
    est = float(fn(items))
    idx = bootstrap_indices(len(items), n_boot, seed)
    reps = torch.tensor([float(fn([items[i] for i in row.tolist()])) for row in idx], dtype=torch.float64)
    lo, hi = interval_from_replicates(torch.tensor(est, dtype=torch.float64), reps, alpha, method)
    return CI(est, float(lo), float(hi), n_boot, float(alpha), method)
