"""``bandit``: online model selection from feedback, Thompson sampling and Elo ratings
(Workload-Router-Pool, the vLLM Semantic Router vision, PAPERS.md item 27: the "online bandit"
router; vLLM-SR ``pkg/selection/elo.go``).

- Thompson sampling: each model ``m`` has a Beta(alpha_m, beta_m) posterior over its success rate;
  a request draws ``theta_m ~ Beta(alpha_m, beta_m)`` per candidate and takes the argmax. A reward
  ``r`` in [0, 1] updates ``alpha_m += r``, ``beta_m += 1 - r`` (the Bernoulli update, fractional
  rewards allowed). Prior Beta(1, 1) (uniform) by default.
- Elo: ``P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400))``; a comparison where ``model`` beat
  ``loser`` updates ``R_w += K (S - E_w)``, ``R_l += K ((1 - S) - (1 - E_w))`` with ``S = 1`` (a win)
  or ``0.5`` (a tie). K = 32 and initial rating 1500 (vLLM-SR ``EloKFactor``, ``DefaultEloRating``).
  Feedback without a ``loser`` moves the rating by ``self_feedback * K * (2r - 1)`` (vLLM-SR applies
  +-0.1 K for winner-only / loser-only feedback; we scale it by the reward, the same at r = 1 / 0).
  Selection: the highest rating (first in config order on ties).
- Hybrid (our choice, after vLLM-SR's hybrid selector ``alpha R~ + beta cos + gamma (1 - c~)``, whose
  weights elo 0.4 / router_dc 0.4 / cost 0.1 we keep): ``w_elo * R~_m + w_thompson * theta_m +
  w_cost * (1 - c~_m)`` with ``R~_m`` the mean expected Elo score of ``m`` against the other
  candidates, ``theta_m`` its Thompson sample, and ``c~_m`` its price (``cost_in + cost_out``)
  min-max scaled over the candidates (0 when all prices are equal).

All state (posteriors, ratings, counts, the RNG) is JSON-able through ``state_dict``; a gateway
with Redis-shared state runs load -> feedback -> save under a lock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moelab.gateway.policy import Decision, Feedback, RequestRouter, RouteRequest, register_policy

MODES = ("thompson", "elo", "hybrid")
DEFAULT_K = 32.0  # vLLM-SR elo.go EloKFactor
DEFAULT_RATING = 1500.0  # vLLM-SR elo.go DefaultEloRating
DEFAULT_SELF_FEEDBACK = 0.1  # vLLM-SR elo.go: winner-only / loser-only feedback moves 0.1 K
DEFAULT_HYBRID = {"elo": 0.4, "thompson": 0.4, "cost": 0.1}  # vLLM-SR hybrid.yaml elo / router_dc / cost
STATE_VERSION = 1


# ---- the math, as pure functions -------------------------------------------------------------


def elo_expected(r_i: float, r_j: float) -> float:
    """P(i beats j) = 1 / (1 + 10^((R_j - R_i) / 400))."""
    return 1.0 / (1.0 + 10.0 ** ((r_j - r_i) / 400.0))


def elo_update(r_winner: float, r_loser: float, k: float, score: float = 1.0) -> tuple[float, float]:
    """New (R_winner, R_loser) after a match in which the winner scored ``score`` (1 win, 0.5 tie)."""
    e_w = elo_expected(r_winner, r_loser)
    return r_winner + k * (score - e_w), r_loser + k * ((1.0 - score) - (1.0 - e_w))


def beta_update(alpha: float, beta: float, reward: float) -> tuple[float, float]:
    """Beta posterior after one reward in [0, 1]: (alpha + r, beta + 1 - r)."""
    return alpha + reward, beta + (1.0 - reward)


def mean_expected_scores(ratings: Sequence[float]) -> np.ndarray:
    """``[M]``: each model's mean P(beats j) over the other candidates (0.5 for a single model)."""
    r = np.asarray(ratings, dtype=np.float64)
    m = len(r)
    if m == 1:
        return np.array([0.5])
    p = 1.0 / (1.0 + 10.0 ** ((r[None, :] - r[:, None]) / 400.0))  # p[i, j] = P(i beats j)
    np.fill_diagonal(p, 0.0)
    return p.sum(axis=1) / (m - 1)


def minmax(x: Sequence[float]) -> np.ndarray:
    """Min-max scaling to [0, 1]; all zeros when the values are all equal."""
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min() if len(x) else 0.0
    return np.zeros_like(x) if span <= 0 else (x - x.min()) / span


# ---- the policy --------------------------------------------------------------------------------


def _number(name: str, value: Any, *, low: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return float(value)


@register_policy(
    "bandit",
    paper="Workload-Router-Pool / vLLM Semantic Router (vllm-project/semantic-router, 2025)",
    summary="online selection from feedback: Thompson sampling over Beta posteriors, Elo ratings, or a hybrid",
)
class BanditRouter(RequestRouter):
    """Thompson / Elo / hybrid bandit over the candidate models, learned from ``feedback``.

    Args:
        mode: ``"thompson"`` (default), ``"elo"`` or ``"hybrid"`` (see the module docstring).
        prior: ``(alpha_0, beta_0)`` of every model's Beta prior, both > 0; default (1, 1).
        k: Elo K-factor, default 32 (vLLM-SR).
        initial_rating: Elo rating of an unseen model, default 1500 (vLLM-SR).
        self_feedback: fraction of K a reward without a ``loser`` moves the rating by, default 0.1
            (vLLM-SR).
        hybrid_weights: ``{"elo", "thompson", "cost"}`` weights of the hybrid score, default
            0.4 / 0.4 / 0.1 (vLLM-SR's hybrid.yaml, Thompson in router_dc's place: our choice).
        seed: seed of the sampling RNG (numpy PCG64); its state is part of ``state_dict``.
    """

    def __init__(
        self,
        mode: str = "thompson",
        prior: Sequence[float] = (1.0, 1.0),
        k: float = DEFAULT_K,
        initial_rating: float = DEFAULT_RATING,
        self_feedback: float = DEFAULT_SELF_FEEDBACK,
        hybrid_weights: dict[str, float] | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if isinstance(prior, (str, bytes)) or not isinstance(prior, Sequence) or len(prior) != 2:
            raise ValueError(f"prior must be a pair (alpha_0, beta_0), got {prior!r}")
        self.prior = (
            _number("prior[0]", prior[0], positive=True),
            _number("prior[1]", prior[1], positive=True),
        )
        self.k = _number("k", k, positive=True)
        self.initial_rating = _number("initial_rating", initial_rating)
        self.self_feedback = _number("self_feedback", self_feedback, low=0.0)
        weights = dict(DEFAULT_HYBRID if hybrid_weights is None else hybrid_weights)
        if set(weights) != set(DEFAULT_HYBRID):
            raise ValueError(
                f"hybrid_weights must have exactly the keys {sorted(DEFAULT_HYBRID)}, got {sorted(weights)}"
            )
        self.hybrid_weights = {
            name: _number(f"hybrid_weights[{name!r}]", w, low=0.0) for name, w in weights.items()
        }
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        # per model: Beta posterior, Elo rating, how many rewards / comparisons it got
        self.alpha: dict[str, float] = {}
        self.beta: dict[str, float] = {}
        self.rating: dict[str, float] = {}
        self.rewards: dict[str, int] = {}
        self.comparisons: dict[str, int] = {}

    # -- state per model --

    def _ensure(self, model: str) -> None:
        if model not in self.alpha:
            self.alpha[model], self.beta[model] = self.prior
            self.rating[model] = self.initial_rating
            self.rewards[model] = 0
            self.comparisons[model] = 0

    def _params(self, model: str) -> tuple[float, float, float]:
        """(alpha, beta, rating) of ``model``, the prior for an unseen one (route does not add it)."""
        if model in self.alpha:
            return self.alpha[model], self.beta[model], self.rating[model]
        return self.prior[0], self.prior[1], self.initial_rating

    def posterior_mean(self, model: str) -> float:
        a, b, _ = self._params(model)
        return a / (a + b)

    # -- routing --

    def scores(self, models: Sequence[Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """``[M]`` selection scores of the candidates (``ModelInfo``s) in the current mode, and what
        they were computed from. Thompson draws advance the RNG."""
        names = [m.name for m in models]
        params = [self._params(n) for n in names]
        info: dict[str, Any] = {"mode": self.mode}
        if self.mode in ("thompson", "hybrid"):
            theta = np.array([self.rng.beta(a, b) for a, b, _ in params])
            info["thompson"] = dict(zip(names, theta.round(4).tolist(), strict=True))
        if self.mode in ("elo", "hybrid"):
            ratings = [r for _, _, r in params]
            info["ratings"] = dict(zip(names, [round(r, 2) for r in ratings], strict=True))
        if self.mode == "thompson":
            return theta, info
        if self.mode == "elo":
            # Bradley-Terry share 10^(R/400) / sum, vLLM-SR's Elo score; its argmax is the top rating
            z = np.asarray(ratings) * (math.log(10.0) / 400.0)
            p = np.exp(z - z.max())
            return p / p.sum(), info
        w = self.hybrid_weights
        price = minmax([m.cost_in + m.cost_out for m in models])
        score = w["elo"] * mean_expected_scores(ratings) + w["thompson"] * theta + w["cost"] * (1.0 - price)
        return score, info

    def route(self, request: RouteRequest) -> Decision:
        if not request.models:
            raise ValueError("request.models is empty: the bandit needs at least one candidate model")
        score, info = self.scores(request.models)
        best = int(np.argmax(score))  # first in config order on ties
        return Decision(request.models[best].name, self.name, float(score[best]), info=info)

    # -- learning --

    def feedback(self, fb: Feedback) -> None:
        """Beta update of ``fb.model`` with ``fb.reward``; an Elo match ``model`` vs ``fb.loser``
        (reward 0.5 = a tie, else a win of ``model``) or, without a loser, a self-feedback step."""
        if not isinstance(fb, Feedback):
            raise TypeError(f"feedback must be a Feedback, got {type(fb).__name__}")
        if not isinstance(fb.model, str) or not fb.model:
            raise ValueError(f"feedback.model must be a model name, got {fb.model!r}")
        reward = _number("feedback.reward", fb.reward)
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"feedback.reward must be in [0, 1], got {fb.reward!r}")
        if fb.loser is not None and (not isinstance(fb.loser, str) or fb.loser == fb.model or not fb.loser):
            raise ValueError(f"feedback.loser must be another model's name, got {fb.loser!r}")
        m = fb.model
        self._ensure(m)
        self.alpha[m], self.beta[m] = beta_update(self.alpha[m], self.beta[m], reward)
        self.rewards[m] += 1
        if fb.loser is None:
            self.rating[m] += self.self_feedback * self.k * (2.0 * reward - 1.0)
            return
        loser = fb.loser
        self._ensure(loser)
        score = 0.5 if reward == 0.5 else 1.0
        self.rating[m], self.rating[loser] = elo_update(self.rating[m], self.rating[loser], self.k, score)
        self.comparisons[m] += 1
        self.comparisons[loser] += 1

    # -- state --

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes: per-model posteriors, ratings and counts, and the RNG state."""
        models = {
            m: {"alpha": self.alpha[m], "beta": self.beta[m], "rating": self.rating[m],
                "rewards": self.rewards[m], "comparisons": self.comparisons[m]}
            for m in self.alpha
        }  # fmt: skip
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "models": models,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if not state:  # a fresh shared store: keep the initial state
            return
        expected = {"version", "mode", "models", "rng"}
        if set(state) != expected:
            raise ValueError(f"bandit state must have keys {sorted(expected)}, got {sorted(state)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"bandit state version {state['version']!r} is not {STATE_VERSION}")
        if not isinstance(state["models"], dict):
            raise ValueError("bandit state['models'] must be a dict model -> statistics")
        alpha, beta, rating, rewards, comparisons = {}, {}, {}, {}, {}
        for m, s in state["models"].items():
            keys = {"alpha", "beta", "rating", "rewards", "comparisons"}
            if not isinstance(s, dict) or set(s) != keys:
                raise ValueError(f"bandit state for model {m!r} must have keys {sorted(keys)}, got {s!r}")
            alpha[m] = _number(f"state alpha of {m!r}", s["alpha"], positive=True)
            beta[m] = _number(f"state beta of {m!r}", s["beta"], positive=True)
            rating[m] = _number(f"state rating of {m!r}", s["rating"])
            rewards[m], comparisons[m] = int(s["rewards"]), int(s["comparisons"])
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = state["rng"]
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"bandit state['rng'] is not a PCG64 state: {e}") from None
        self.alpha, self.beta, self.rating = alpha, beta, rating
        self.rewards, self.comparisons, self.rng = rewards, comparisons, rng
