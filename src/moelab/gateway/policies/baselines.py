"""Baseline request routers: ``random`` (RouteLLM's random router). Also the strong/weak pair
resolution that the two-model policies (``random``, ``threshold``) share. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moelab.gateway.policy import Decision, ModelInfo, RequestRouter, RouteRequest, register_policy


def _price(m: ModelInfo) -> float:
    return m.cost_in + m.cost_out


def strong_weak(
    models: Sequence[ModelInfo], strong: str | None = None, weak: str | None = None,
    fallback: tuple[str | None, str | None] = (None, None),
) -> tuple[str, str]:  # fmt: skip
    """The (strong, weak) model names among ``models``.

    Order of precedence: the explicit names; the models tagged ``"strong"`` / ``"weak"``; the
    ``fallback`` names (e.g. the pair a policy was trained on) when both are candidates; else the
    most / least expensive (``cost_in + cost_out``; ties: config order).
    """
    if len(models) < 2:
        raise ValueError(
            f"a strong/weak policy needs at least 2 candidate models, got {[m.name for m in models]}"
        )
    names = [m.name for m in models]
    for label, given in (("strong", strong), ("weak", weak)):
        if given is not None and given not in names:
            raise ValueError(f"{label} must be one of the candidate models {names}, got {given!r}")
    tagged = {t: next((m.name for m in models if t in m.tags), None) for t in ("strong", "weak")}
    fb_ok = all(f is not None and f in names for f in fallback)
    by_price = sorted(range(len(models)), key=lambda i: (_price(models[i]), i))
    s = strong or tagged["strong"] or (fallback[0] if fb_ok else None) or names[by_price[-1]]
    w = weak or tagged["weak"] or (fallback[1] if fb_ok else None)
    if w is None:
        w = next(names[i] for i in by_price if names[i] != s)
    if s == w:
        raise ValueError(f"strong and weak must be different models, both are {s!r}")
    return s, w


@register_policy(
    "random",
    paper="RouteLLM (Ong et al. 2024, arXiv 2406.18665): the random router baseline",
    summary="strong-win score ~ uniform(0, 1); strong when score >= threshold (APGR ~ 0.5)",
)
class RandomPolicy(RequestRouter):
    """RouteLLM's random router between a strong and a weak model.

    The score is a uniform(0, 1) draw per request; the strong model is chosen when ``score >=
    threshold`` (so ``threshold`` = 1 - the expected fraction of strong calls).

    Args:
        threshold: default 0.5 (our choice: half the calls strong); ``request.threshold`` overrides.
        strong, weak: model names (default: tags, else most / least expensive; ``strong_weak``).
        seed: the generator's seed (None: fresh entropy).
    """

    two_model = True

    def __init__(self, threshold: float = 0.5, strong: str | None = None, weak: str | None = None, seed: int | None = None) -> None:  # fmt: skip
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold <= 1.0
        ):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.strong, self.weak = strong, weak
        self.rng = np.random.default_rng(seed)

    def scores(self, prompts: Sequence[str]) -> np.ndarray:
        """``[N]`` uniform(0, 1) strong-win scores (the prompts are not read)."""
        return self.rng.uniform(0.0, 1.0, len(prompts))

    def route(self, request: RouteRequest) -> Decision:
        strong, weak = strong_weak(request.models, self.strong, self.weak)
        t = self.threshold if request.threshold is None else float(request.threshold)
        score = float(self.rng.uniform(0.0, 1.0))
        return Decision(
            model=strong if score >= t else weak, policy=self.name, score=score, info={"threshold": t}
        )

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) - {"threshold"}:
            raise ValueError(f"random policy state has only 'threshold', got keys {sorted(state)}")
        self.threshold = float(state.get("threshold", self.threshold))
