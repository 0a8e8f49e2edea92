"""The vocabulary of reproductions: arms, conditions on paired differences, and the verdict rule
(``moelab.repro.claims`` has the rule in words). Shared by ``claims`` and ``zoo``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moelab.analysis.intervals import combine, judge, t_interval

# A val-loss difference below this (nats/token) is of no practical consequence at this scale
# (our choice: the seed-to-seed spread of one arm at the demo budget is about 0.02-0.05).
LOSS_MARGIN = 0.02
# Hit-rate differences below this count as ties (ours): a few hundred val windows per layer.
HIT_MARGIN = 0.01


@dataclass(frozen=True)
class Arm:
    router: str
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    aux_losses: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # MoELMConfig overrides for this arm only


Rows = dict[str, dict[str, float]]  # arm label -> measured numbers (one seed, or the mean over seeds)


@dataclass(frozen=True)
class Condition:
    """One part of a claim: ``value(rows)`` measured on each seed is claimed ``"lower"`` than
    ``threshold`` (or ``"higher"``); ``margin`` widens the band the interval must clear on both
    sides (``moelab.analysis.intervals.judge``)."""

    label: str  # what is measured, e.g. "val loss: load_balance - no_aux"
    value: Callable[[Rows], float]
    claim: str  # "lower" or "higher"
    threshold: float = 0.0
    margin: float = 0.0

    def text(self) -> str:
        sign = "<" if self.claim == "lower" else ">"
        bound = self.threshold - self.margin if self.claim == "lower" else self.threshold + self.margin
        return f"{self.label} {sign} {bound:+g}" if bound else f"{self.label} {sign} 0"


def diff(metric: str, a: str, b: str, scale_b: float = 1.0) -> Callable[[Rows], float]:
    """``rows[a][metric] - scale_b * rows[b][metric]``."""
    return lambda r: r[a][metric] - scale_b * r[b][metric]


def lower(metric: str, a: str, b: str, name: str | None = None) -> Condition:
    """``a`` has a lower ``metric`` than ``b`` (any amount)."""
    return Condition(f"{name or metric}: {a} - {b}", diff(metric, a, b), "lower")


def higher(metric: str, a: str, b: str, name: str | None = None, margin: float = 0.0) -> Condition:
    """``a`` has a higher ``metric`` than ``b`` (by more than ``margin``)."""
    return Condition(f"{name or metric}: {a} - {b}", diff(metric, a, b), "higher", margin=margin)


def no_worse_loss(a: str, b: str) -> Condition:
    """``a``'s val loss is not worse than ``b``'s by more than ``LOSS_MARGIN`` (non-inferiority)."""
    return Condition(f"val loss: {a} - {b}", diff("val_loss", a, b), "lower", threshold=LOSS_MARGIN)


def lower_loss(a: str, b: str) -> Condition:
    """``a``'s val loss is lower than ``b``'s by more than ``LOSS_MARGIN`` (superiority)."""
    return Condition(f"val loss: {a} - {b}", diff("val_loss", a, b), "lower", margin=LOSS_MARGIN)


@dataclass(frozen=True)
class Reproduction:
    name: str
    method: str  # the registered method whose docs page this row belongs to
    paper: str
    claim: str
    arms: dict[str, Arm]
    conditions: tuple[Condition, ...]  # the claim; every one is judged over seeds
    describe: Callable[[Rows], str]  # what was measured, from the mean over seeds
    model: dict[str, Any] = field(default_factory=dict)  # MoELMConfig overrides for every arm
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides, e.g. locality
    # A reproduction that is not a ``moelab compare`` (other data, other measurements):
    # ``runner(seed=, model=, train=, out=, progress=, console=) -> Rows``; ``arms`` then only
    # documents what it trains.
    runner: Callable[..., Rows] | None = None
    # ``requires() -> None`` when the machine has what the reproduction needs, else why not
    # (checked before anything trains; ``moelab repro`` skips it with that message).
    requires: Callable[[], str | None] | None = None
    # Scale each arm's steps to the first arm's training FLOPs (``moelab compare --match-flops``).
    match_flops: bool = False

    def judge(self, per_seed: list[Rows]) -> dict[str, Any]:
        """The verdict from each seed's rows: every condition's interval and verdict, combined."""
        parts = []
        for c in self.conditions:
            iv = t_interval([c.value(rows) for rows in per_seed])
            parts.append(
                {
                    "condition": c.text(),
                    "interval": iv.to_dict(),
                    "verdict": judge(iv, c.claim, c.threshold, c.margin),
                }
            )
        return {"verdict": combine([p["verdict"] for p in parts]), "conditions": parts}


def fmt(x: float) -> str:
    """A load or ratio for a 'measured' line: 2 decimals from 1 up, 3 below."""
    return f"{x:.2f}" if abs(x) >= 0.995 or x == 0 else f"{x:.3f}"
