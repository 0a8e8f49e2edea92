"""``threshold``: RouteLLM's strong/weak routing (Ong et al. 2024, arXiv 2406.18665; code
lm-sys/RouteLLM ``routellm/routers/matrix_factorization/``, ``calibrate_threshold.py``).

A scorer gives each prompt a strong-win probability ``P(strong beats weak | prompt)``; the
strong model is called when it is ``>= threshold``. Two scorers, both numpy-only:

- ``mf``: RouteLLM's matrix-factorisation router. Model embeddings ``v_m [d]`` (L2-normalised),
  a bias-free projection ``W1 [d, D]`` of the prompt embedding ``q [D]``, a bias-free head
  ``w2 [d]``: ``delta(m, q) = w2 . (v_m / |v_m| * (W1 q))``, win probability
  ``sigmoid(delta(strong, q) - delta(weak, q))``. Trained by Adam on binary cross-entropy with
  Gaussian noise on ``q`` (RouteLLM ``train_matrix_factorization.py``: d 128, lr 3e-4, weight decay
  1e-5, 100 epochs, batch 64, noise 0.1).
- ``embed_lr``: logistic regression on ``q`` with an intercept and an L2 penalty (``C`` as in
  scikit-learn), fitted exactly by Newton's method (our choice; the issue's second scorer).

Labels come from per-prompt quality: 1 when the strong model's answer is better than the weak
one's, 0 when worse; ties (both right or both wrong) are dropped by default, as RouteLLM's trainer
keeps only battles with a winner (``ties="weak"`` labels them 0 instead).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moelab.gateway.embed import EMBEDDERS, get_embedder
from moelab.gateway.policies.baselines import strong_weak
from moelab.gateway.policy import Decision, RequestRouter, RouteRequest, register_policy
from moelab.gateway.table import RoutingTable

SCORERS = ("mf", "embed_lr")
TIES = ("drop", "weak")


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free


def calibrate(scores: Sequence[float] | np.ndarray, target_strong_fraction: float) -> float:
    """The threshold that sends ``target_strong_fraction`` of these prompts strong (``score >=
    threshold``): the ``1 - f`` quantile of the scores (RouteLLM ``calibrate_threshold.py``:
    ``win_rates.quantile(1 - strong_model_pct)``, linear interpolation)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be a non-empty 1-d array of finite numbers, got shape {s.shape}")
    f = target_strong_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
        raise ValueError(f"target_strong_fraction must be a number in [0, 1], got {f!r}")
    if f == 0.0:
        return float(np.nextafter(s.max(), np.inf))  # strictly above every score: none strong
    return float(np.quantile(s, 1.0 - f))


def win_labels(weak: np.ndarray, strong: np.ndarray, ties: str = "drop") -> tuple[np.ndarray, np.ndarray]:
    """(row positions, labels): label 1 where ``strong > weak``, 0 where ``strong < weak``; ties are
    dropped (``"drop"``, RouteLLM) or labelled 0 (``"weak"``: the cheaper model suffices)."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    weak, strong = np.asarray(weak, dtype=np.float64), np.asarray(strong, dtype=np.float64)
    keep = np.flatnonzero(strong != weak) if ties == "drop" else np.arange(weak.size)
    return keep, (strong[keep] > weak[keep]).astype(np.float64)


# ---- matrix factorisation (RouteLLM MFModel), numpy --------------------------------------------


def mf_init(text_dim: int, dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Parameters with torch's default initialisation (as RouteLLM's): ``P [2, d]`` ~ N(0, 1) (rows:
    weak, strong), ``W1 [d, D]`` and ``w2 [d]`` ~ U(+-1/sqrt(fan_in))."""
    a, b = 1.0 / np.sqrt(text_dim), 1.0 / np.sqrt(dim)
    return {
        "P": rng.standard_normal((2, dim)),
        "W1": rng.uniform(-a, a, (dim, text_dim)),
        "w2": rng.uniform(-b, b, dim),
    }


def mf_logits(params: dict[str, np.ndarray], q: np.ndarray) -> np.ndarray:
    """``[N]`` strong-minus-weak logits ``w2 . ((v_s/|v_s| - v_w/|v_w|) * (W1 q))`` for ``q [N, D]``."""
    P = params["P"]
    n = P / np.linalg.norm(P, axis=1, keepdims=True)
    return (q @ params["W1"].T) @ ((n[1] - n[0]) * params["w2"])


def mf_loss_grads(
    params: dict[str, np.ndarray], q: np.ndarray, y: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean binary cross-entropy of ``mf_logits`` against labels ``y [N]``, and its gradients."""
    P, W1, w2 = params["P"], params["W1"], params["w2"]
    norms = np.linalg.norm(P, axis=1, keepdims=True)
    n = P / norms
    diff = n[1] - n[0]
    h = q @ W1.T  # [N, d]
    z = h @ (diff * w2)
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    r = (sigmoid(z) - y) / y.size  # dL/dz
    hr = h.T @ r  # [d]
    g_diff = hr * w2
    g_n = np.stack([-g_diff, g_diff])
    g_P = (g_n - n * np.sum(n * g_n, axis=1, keepdims=True)) / norms  # through p / |p|
    g_W1 = np.outer(diff * w2, q.T @ r)
    return loss, {"P": g_P, "W1": g_W1, "w2": hr * diff}


def adam_step(
    params, grads, state, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8
) -> None:  # noqa: ANN001
    """One ``torch.optim.Adam`` step in place (L2 weight decay added to the gradient, as torch's)."""
    state["t"] = t = state.get("t", 0) + 1
    b1, b2 = betas
    for k, p in params.items():
        g = grads[k] + weight_decay * p
        m = state.setdefault(f"m_{k}", np.zeros_like(p))
        v = state.setdefault(f"v_{k}", np.zeros_like(p))
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        p -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


def fit_mf(
    q: np.ndarray,
    y: np.ndarray,
    *,
    dim=128,
    epochs=100,
    batch_size=64,
    lr=3e-4,
    weight_decay=1e-5,
    noise=0.1,
    seed=0,
) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Train the MF scorer on embeddings ``q [N, D]`` and labels ``y [N]`` (RouteLLM's loop:
    shuffled mini-batches, noise ``N(0, noise^2)`` added to ``q`` in training only)."""
    rng = np.random.default_rng(seed)
    params = mf_init(q.shape[1], dim, rng)
    state: dict[str, Any] = {}
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            qb = q[idx] + rng.normal(0.0, noise, (len(idx), q.shape[1])) if noise > 0 else q[idx]
            _, grads = mf_loss_grads(params, qb, y[idx])
            adam_step(params, grads, state, lr, weight_decay)
    return params


# ---- logistic regression, numpy (Newton) -------------------------------------------------------


def fit_logistic(
    x: np.ndarray, y: np.ndarray, C: float = 1.0, max_iter: int = 100, tol: float = 1e-10
) -> tuple[np.ndarray, float]:  # noqa: E501
    """L2-penalised logistic regression, ``min 0.5 |w|^2 + C sum BCE(x w + b, y)`` (scikit-learn's
    objective; the intercept is not penalised), solved by Newton's method. Returns ``(w [D], b)``."""
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.full(d + 1, 1.0 / C)
    reg[-1] = 0.0
    for _ in range(max_iter):
        p = sigmoid(xb @ theta)
        grad = xb.T @ (p - y) + reg * theta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-12 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < tol:
            break
    return theta[:-1], float(theta[-1])


def train_weights(
    scorer: str, q: np.ndarray, y: np.ndarray, hyper: dict[str, Any], seed: int
) -> dict[str, np.ndarray]:
    """The scorer's weights trained on embeddings ``q [N, D]`` and labels ``y [N]``."""
    if scorer == "mf":
        keys = ("dim", "epochs", "batch_size", "lr", "weight_decay", "noise")
        return fit_mf(q, y, seed=seed, **{k: hyper[k] for k in keys})
    coef, intercept = fit_logistic(q, y, C=hyper["C"])
    return {"coef": coef, "intercept": np.array([intercept])}


def weights_scores(scorer: str, weights: dict[str, np.ndarray], q: np.ndarray) -> np.ndarray:
    """``[N]`` strong-win probabilities of embeddings ``q [N, D]``."""
    if scorer == "mf":
        return sigmoid(mf_logits(weights, q))
    return sigmoid(q @ weights["coef"] + weights["intercept"][0])


def out_of_fold_scores(scorer, q, rows, y, hyper, seed, folds) -> np.ndarray:  # noqa: ANN001
    """``[N]`` scores of every row of ``q [N, D]`` by a scorer that did not train on it: rows are
    dealt into ``folds`` folds; fold ``k`` is scored by a scorer trained on the labelled rows
    (``rows``, ``y``) outside it. Calibrating on these, not on in-sample scores, keeps an
    overfitted scorer's over-confident training scores out of the threshold (our choice; RouteLLM
    calibrates on another dataset's prompts)."""
    fold = np.random.default_rng(seed).permutation(len(q)) % folds
    out = np.empty(len(q))
    for k in range(folds):
        train = fold[rows] != k
        if y[train].min() == y[train].max():
            raise ValueError(f"fold {k} of {folds} has labels of one class only: use fewer calibration_folds")
        w = train_weights(scorer, q[rows[train]], y[train], hyper, seed)
        out[fold == k] = weights_scores(scorer, w, q[fold == k])
    return out


# ---- the policy --------------------------------------------------------------------------------


def _number(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@register_policy(
    "threshold",
    paper="RouteLLM (Ong et al. 2024, arXiv 2406.18665), lm-sys/RouteLLM matrix_factorization",
    summary="strong-win probability from a scorer (mf: matrix factorisation; embed_lr: logistic regression "
    "on embeddings); strong when >= threshold, calibrated to a target strong-call fraction",
)
class ThresholdPolicy(RequestRouter):
    """RouteLLM's strong/weak threshold router (module docstring for the math).

    Args:
        scorer: ``"mf"`` (RouteLLM's matrix factorisation) or ``"embed_lr"``.
        threshold: the win probability at or above which the strong model is called; None: set by
            ``fit`` to ``calibrate(training scores, strong_fraction)``. ``request.threshold``
            (``model: "router-threshold-<t>"``) overrides it per request.
        strong_fraction: the target fraction of strong calls ``fit`` calibrates to (default 0.5,
            our choice; RouteLLM asks the user for a percentage).
        strong, weak: model names; default: the candidates tagged ``strong`` / ``weak``, else the
            pair it was trained on, else the most / least expensive.
        embedder: ``"minilm"`` (default, loaded lazily; RouteLLM used OpenAI's
            text-embedding-3-small: ours is an offline choice), ``"hashing"`` or an object with
            ``embed(texts)``.
        ties: ``"drop"`` (RouteLLM) or ``"weak"`` (see ``win_labels``).
        dim, epochs, batch_size, lr, weight_decay, noise: the MF trainer's (RouteLLM's defaults).
        C: the inverse L2 strength of ``embed_lr`` (1.0, scikit-learn's default: our choice).
        calibration_folds: ``fit`` calibrates on out-of-fold scores of the table's prompts, from
            this many folds (0, the default: the trained scorer's in-sample scores, which measured as accurate and less noisy).
        seed: initialisation and batch order.
        state: a state dict or the path of a JSON file written by ``moelab gateway train``.
    """

    two_model = True

    def __init__(
        self, scorer: str = "mf", threshold: float | None = None, strong_fraction: float = 0.5,
        strong: str | None = None, weak: str | None = None, embedder: Any = "minilm", ties: str = "drop",
        dim: int = 128, epochs: int = 100, batch_size: int = 64, lr: float = 3e-4, weight_decay: float = 1e-5,
        noise: float = 0.1, C: float = 1.0, calibration_folds: int = 0, seed: int = 0, state: str | Path | dict | None = None,
    ) -> None:  # fmt: skip
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
        self.scorer = scorer
        self.threshold = None if threshold is None else _number(threshold, "threshold", 0.0, 1.0)
        self.strong_fraction = _number(strong_fraction, "strong_fraction", 0.0, 1.0)
        self.strong, self.weak, self.ties = strong, weak, ties
        self.hyper = {
            "dim": _positive_int(dim, "dim"), "epochs": _positive_int(epochs, "epochs"),
            "batch_size": _positive_int(batch_size, "batch_size"), "lr": _number(lr, "lr", 0.0, 10.0),
            "weight_decay": _number(weight_decay, "weight_decay", 0.0, 10.0),
            "noise": _number(noise, "noise", 0.0, 100.0), "C": _number(C, "C", 1e-12, 1e12),
        }  # fmt: skip
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        if (
            isinstance(calibration_folds, bool)
            or not isinstance(calibration_folds, int)
            or calibration_folds < 0
            or calibration_folds == 1
        ):
            raise ValueError(
                f"calibration_folds must be 0 (in-sample scores) or an int >= 2, got {calibration_folds!r}"
            )
        self.calibration_folds = calibration_folds
        self._embedder_spec = embedder
        if isinstance(embedder, str) and embedder not in EMBEDDERS:
            raise ValueError(
                f"embedder must be one of {sorted(EMBEDDERS)} or an object with .embed, got {embedder!r}"
            )
        self._embedder: Any = None if isinstance(embedder, str) else get_embedder(embedder)
        self.weights: dict[str, np.ndarray] | None = None
        self.trained_pair: tuple[str | None, str | None] = (None, None)
        self.info: dict[str, Any] = {}
        if state is not None:
            if isinstance(state, (str, Path)):
                path = Path(state)
                if not path.is_file():
                    raise ValueError(
                        f"state must be a state dict or an existing JSON file, got {str(state)!r}"
                    )
                state = json.loads(path.read_text())
            if not isinstance(state, dict):
                raise TypeError(f"state must be a dict or a JSON file path, got {type(state).__name__}")
            self.load_state_dict(state)

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            self._embedder = get_embedder(self._embedder_spec)  # MiniLM loads on first embed
        return self._embedder

    def _embed(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.embedder.embed(list(prompts)), dtype=np.float64)

    def score_embeddings(self, q: np.ndarray) -> np.ndarray:
        """``[N]`` strong-win probabilities for prompt embeddings ``q [N, D]``."""
        if self.weights is None:
            raise RuntimeError(
                "the threshold policy is not trained: call fit(table), pass state=, or run `moelab gateway train`"
            )  # noqa: E501
        if q.shape[1] != self.info["text_dim"]:
            raise ValueError(
                f"embeddings must have {self.info['text_dim']} dims (trained so), got {q.shape[1]}"
            )
        return weights_scores(self.scorer, self.weights, q)

    def scores(self, prompts: Sequence[str]) -> np.ndarray:
        """``[N]`` strong-win probabilities of ``prompts`` (batched; what ``route`` thresholds)."""
        return self.score_embeddings(self._embed(prompts))

    def fit(self, table: RoutingTable) -> ThresholdPolicy:
        """Train the scorer on ``table``'s strong and weak columns (names from the ``strong`` /
        ``weak`` parameters, else ``table.meta``, else the most / least expensive column), then
        calibrate the threshold when it is None."""
        if not isinstance(table, RoutingTable):
            raise TypeError(f"table must be a RoutingTable, got {type(table).__name__}")
        strong = self.strong or table.meta.get("strong")
        weak = self.weak or table.meta.get("weak")
        if strong not in table.models or weak not in table.models:
            order = np.argsort(table.cost, kind="stable")
            strong, weak = table.models[order[-1]], table.models[order[0]]
        ws, ss = table.quality[:, table.column(weak)], table.quality[:, table.column(strong)]
        rows, y = win_labels(ws, ss, self.ties)
        if y.size == 0 or y.min() == y.max():
            raise ValueError(
                f"table {table.name!r} needs prompts where each model wins, got {int(y.sum())} strong wins of {y.size}"
            )  # noqa: E501
        q = self._embed(table.prompts)
        h = self.hyper
        self.weights = train_weights(self.scorer, q[rows], y, h, self.seed)
        self.trained_pair = (strong, weak)
        self.info = {
            "text_dim": int(q.shape[1]),
            "train_rows": int(y.size),
            "strong_wins": int(y.sum()),
            "table": table.name,
        }  # noqa: E501
        if self.threshold is None:
            folds = self.calibration_folds
            scores = (
                out_of_fold_scores(self.scorer, q, rows, y, h, self.seed, folds)
                if folds >= 2
                else self.score_embeddings(q)
            )
            self.threshold = calibrate(scores, self.strong_fraction)
            self.info.update(calibrated_to=self.strong_fraction, calibration_folds=folds)
        return self

    def route(self, request: RouteRequest) -> Decision:
        strong, weak = strong_weak(request.models, self.strong, self.weak, self.trained_pair)
        score = float(self.scores([request.prompt])[0])  # raises first when untrained
        t = request.threshold if request.threshold is not None else self.threshold
        if t is None:
            raise RuntimeError("the threshold policy has no threshold: fit it, load a state, or pass one")
        return Decision(model=strong if score >= t else weak, policy=self.name, score=score,
                        info={"threshold": float(t), "scorer": self.scorer})  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        if self.weights is None:
            raise RuntimeError("the threshold policy is not trained: nothing to save")
        emb = self.embedder
        return {
            "scorer": self.scorer, "threshold": self.threshold, "strong": self.trained_pair[0],
            "weak": self.trained_pair[1], "embedder": getattr(emb, "name", type(emb).__name__),
            "ties": self.ties, "hyper": dict(self.hyper), "info": dict(self.info),
            "weights": {k: v.tolist() for k, v in self.weights.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        need = {"scorer", "threshold", "strong", "weak", "embedder", "weights", "info"}
        if not isinstance(state, dict) or not need <= set(state):
            have = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"threshold state needs keys {sorted(need)}, got {have}")
        if state["scorer"] not in SCORERS:
            raise ValueError(f"state scorer must be one of {SCORERS}, got {state['scorer']!r}")
        want = {"mf": {"P", "W1", "w2"}, "embed_lr": {"coef", "intercept"}}[state["scorer"]]
        if set(state["weights"]) != want:
            raise ValueError(
                f"{state['scorer']} weights need keys {sorted(want)}, got {sorted(state['weights'])}"
            )
        if isinstance(self._embedder_spec, str):  # the state says which embedder it was trained on
            self._embedder_spec, self._embedder = state["embedder"], None
        elif getattr(self._embedder, "name", None) != state["embedder"]:
            raise ValueError(
                f"state was trained with embedder {state['embedder']!r}, the policy has {self._embedder.name!r}"
            )  # noqa: E501
        self.scorer = state["scorer"]
        self.threshold = None if state["threshold"] is None else float(state["threshold"])
        self.trained_pair = (state["strong"], state["weak"])
        self.ties = state.get("ties", self.ties)
        self.hyper.update(state.get("hyper", {}))
        self.info = dict(state["info"])
        self.weights = {k: np.asarray(v, dtype=np.float64) for k, v in state["weights"].items()}
