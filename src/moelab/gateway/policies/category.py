"""``category``: Composition of Experts' two-step routing (PAPERS.md item 25; Jain et al. 2024,
SambaNova, *Composition of Experts*). Torch-free (numpy); MiniLM loads lazily.

1. A category classifier ``c(x)``: an embedding model plus a softmax-regression head
   (``fit_logistic``), trained on the table's ``task`` column or on labels the user gives.
2. A category -> model map chosen on validation data: the best model per category, under a
   budget on the mean cost per request (``choose_map``, exact).
3. Uncertainty fallback: a prompt whose top class probability is below ``min_confidence`` (or
   whose class entropy is above ``max_entropy``) goes to a generalist model.

The paper gives no classifier, thresholds or budget numbers (PAPERS.md: N/F); the defaults below
are our choices. ``fit_logistic`` is also used by ``cascade``'s P(correct | prompt, model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.gateway.policies.retriever import EmbeddingPolicy, choose, normalised_cost
from moelab.gateway.policies.threshold import sigmoid
from moelab.gateway.policy import Decision, RouteRequest, register_policy
from moelab.gateway.table import RoutingTable

# ---------------------------------------------------------------- logistic regression


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, *, link: str = "softmax", l2: float = 1e-3, steps: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``p = link(x W + b)`` by minimising ``mean_n CE(y_n, p_n) + l2/2 ||W||^2`` (bias not
    penalised) with Nesterov-accelerated gradient descent, step ``1/L`` from the Hessian bound.

    ``x``: ``[N, d]``; ``y``: ``[N, K]`` targets: for ``link="softmax"`` rows of class
    probabilities (one-hot for hard labels), for ``link="sigmoid"`` K independent binary targets in
    [0, 1] (K one-vs-rest regressions fitted at once). Returns ``W [d, K]``, ``b [K]``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x must be [N, d] and y [N, K] with N > 0, got {x.shape} and {y.shape}")
    if link not in ("softmax", "sigmoid"):
        raise ValueError(f"link must be 'softmax' or 'sigmoid', got {link!r}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2!r}")
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    # The Hessian of the mean CE in the logits is <= 1/2 I (softmax) or 1/4 I (sigmoid).
    curv = 0.5 if link == "softmax" else 0.25
    lip = curv * np.linalg.eigvalsh(xb.T @ xb / n)[-1] + l2
    mom = (1 - np.sqrt(l2 / lip)) / (1 + np.sqrt(l2 / lip))
    act = _softmax if link == "softmax" else sigmoid
    reg = np.ones((d + 1, 1))
    reg[-1] = 0.0
    w = np.zeros((d + 1, y.shape[1]))
    w_prev = w
    for _ in range(steps):
        v = w + mom * (w - w_prev)
        grad = xb.T @ (act(xb @ v) - y) / n + l2 * reg * v
        w_prev, w = w, v - grad / lip
    return w[:-1], w[-1]


def predict_logistic(x: np.ndarray, w: np.ndarray, b: np.ndarray, link: str = "softmax") -> np.ndarray:
    """``[N, d]`` -> ``[N, K]`` probabilities of a ``fit_logistic`` model."""
    z = np.asarray(x, dtype=np.float64) @ w + b
    return _softmax(z) if link == "softmax" else sigmoid(z)


def entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row of ``[N, K]`` probabilities."""
    p = np.asarray(p, dtype=np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


# ---------------------------------------------------------------- category -> model map


def choose_map(
    value: np.ndarray, weight: np.ndarray, cost: np.ndarray, budget: float | None = None
) -> tuple[np.ndarray, float, float]:
    """The category -> model map maximising ``sum_k weight_k value[k, map_k]`` subject to
    ``sum_k weight_k cost[map_k] <= budget`` (a multiple-choice knapsack), solved exactly by
    dynamic programming over the Pareto front of (cost, value) of partial maps.

    ``value``: ``[K, M]``; ``weight``: ``[K]`` (share of requests per category); ``cost``: ``[M]``.
    Returns ``(map [K] model columns, total value, total cost)``. ``ValueError`` if even the
    cheapest map exceeds the budget.
    """
    value = np.asarray(value, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if budget is None:
        pick = np.array([choose(value[k], cost) for k in range(len(value))], dtype=int)
        return pick, float(weight @ value[np.arange(len(value)), pick]), float(weight @ cost[pick])
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]  # (cost, value, choices)
    slack = 1e-12 * max(1.0, abs(budget))
    for k in range(len(value)):
        grown = [
            (c + weight[k] * cost[m], v + weight[k] * value[k, m], ch + (m,))
            for c, v, ch in front for m in range(len(cost))
            if c + weight[k] * cost[m] <= budget + slack
        ]  # fmt: skip
        if not grown:
            cheapest = float(weight @ np.full(len(weight), cost.min()))
            raise ValueError(f"budget {budget} is below the cheapest map's mean cost {cheapest:.6g}")
        grown.sort(key=lambda t: (t[0], -t[1]))
        front = []
        for c, v, ch in grown:  # keep only maps that beat every cheaper one
            if not front or v > front[-1][1] + 1e-15:
                front.append((c, v, ch))
    c, v, ch = max(front, key=lambda t: (t[1], -t[0]))
    return np.array(ch, dtype=int), float(v), float(c)


# ---------------------------------------------------------------- the policy


@register_policy(
    "category",
    paper="Composition of Experts (Jain et al. 2024, SambaNova): category classifier + category->expert map",
    summary="classify the prompt's category, route to that category's best model under a cost budget; "
    "low confidence falls back to a generalist",
)
class CategoryRouter(EmbeddingPolicy):
    """Two-step routing: category classifier, then a category -> model map.

    ``fit(table, labels=None)``: categories = ``labels`` (``N`` strings) or ``table.task``. A
    seeded ``val_fraction`` of the rows is held out; the classifier (``fit_logistic`` on the
    embeddings, ``l2``, ``steps``) learns on the rest. On the validation rows: the generalist
    (``generalist``, default the model with the best mean validation quality, the paper's "strong
    generalist") takes the prompts below ``min_confidence`` / above ``max_entropy``; the others
    are grouped by *predicted* category (so the map absorbs the classifier's errors, our choice)
    and ``choose_map`` picks one model per category maximising the mean of ``quality -
    cost_weight * c`` (``c``: min-max normalised cost) with the mean cost of all validation
    requests, fallbacks included, ``<= budget`` (in the table's cost unit; None: no budget). A
    category with no validation prompt maps to the generalist.

    ``route``: probabilities ``p = c(x)``; fallback -> the generalist; else the map's model of
    ``argmax p``. A model missing from the request is replaced by the best candidate for that
    category (validation quality minus ``cost_weight * c``). ``Decision.score`` = ``max p``.

    Defaults (our choice; the paper gives none): ``val_fraction=0.2``, ``min_confidence=0.5``,
    ``max_entropy=None``, ``l2=1e-4``, ``steps=300``, ``budget=None``, ``cost_weight=0``.
    """

    def __init__(
        self, embedder: Any = "minilm", budget: float | None = None, cost_weight: float = 0.0,
        generalist: str | None = None, min_confidence: float = 0.5, max_entropy: float | None = None,
        val_fraction: float = 0.2, l2: float = 1e-4, steps: int = 300, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(embedder, cost_weight)
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0
        ):
            raise ValueError(f"budget must be None or a number >= 0 (mean cost per request), got {budget!r}")
        if not (isinstance(min_confidence, (int, float)) and 0 <= min_confidence <= 1):
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence!r}")
        if max_entropy is not None and not (isinstance(max_entropy, (int, float)) and max_entropy >= 0):
            raise ValueError(f"max_entropy must be None or a number >= 0 (nats), got {max_entropy!r}")
        if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if generalist is not None and not isinstance(generalist, str):
            raise TypeError(f"generalist must be a model name (str) or None, got {type(generalist).__name__}")
        self.budget = None if budget is None else float(budget)
        self.generalist_param = generalist
        self.min_confidence = float(min_confidence)
        self.max_entropy = None if max_entropy is None else float(max_entropy)
        self.val_fraction, self.l2, self.steps, self.seed = float(val_fraction), float(l2), steps, int(seed)
        self.categories: list[str] = []
        self.w = np.zeros((0, 0))  # [d, K]
        self.b = np.zeros(0)  # [K]
        self.category_model = np.zeros(0, dtype=int)  # [K] model column per category
        self.category_quality = np.zeros((0, 0))  # [K, M] validation quality per category
        self.generalist = ""
        self.val_report: dict[str, Any] = {}
        self.val_rows = np.zeros(0, dtype=int)

    def _fallback(self, p: np.ndarray, min_confidence: float | None = None) -> np.ndarray:
        floor = self.min_confidence if min_confidence is None else min_confidence
        low = p.max(axis=1) < floor
        if self.max_entropy is not None:
            low |= entropy(p) > self.max_entropy
        return low

    def fit(self, table: RoutingTable, labels: list[str] | None = None) -> CategoryRouter:
        table = self._check_table(table)
        labels = table.task if labels is None else labels
        if labels is None:
            raise ValueError(f"table {table.name!r} has no task column: pass labels=[N category strings]")
        if isinstance(labels, str) or len(labels) != len(table):
            raise ValueError(f"labels must be {len(table)} category strings, one per row")
        labels = [str(v) for v in labels]
        self.categories = sorted(set(labels))
        y = np.array([self.categories.index(v) for v in labels])
        n = len(table)
        rng = np.random.default_rng(self.seed)
        n_val = int(round(self.val_fraction * n))
        if n_val < 1 or n - n_val < 1:
            raise ValueError(f"table has {n} rows: too few to hold out val_fraction={self.val_fraction}")
        perm = rng.permutation(n)
        val, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        self.val_rows = val  # row positions of the validation part (the map was chosen on them)
        emb = self._embed(table.prompts)
        onehot = np.eye(len(self.categories))[y]
        self.w, self.b = fit_logistic(emb[tr], onehot[tr], l2=self.l2, steps=self.steps)
        p = predict_logistic(emb[val], self.w, self.b)
        self._choose_map(table.quality[val], p)
        self.val_report["classifier_accuracy"] = float((p.argmax(1) == y[val]).mean())
        return self

    def _choose_map(self, q_val: np.ndarray, p: np.ndarray) -> None:
        """Generalist, per-category validation quality and the budgeted map (see the class doc)."""
        if self.generalist_param is None:
            self.generalist = self.models[choose(q_val.mean(axis=0), self.cost)]
        elif self.generalist_param not in self.models:
            raise ValueError(
                f"generalist must be one of the table's models {self.models}, got {self.generalist_param!r}"
            )
        else:
            self.generalist = self.generalist_param
        g = self.models.index(self.generalist)
        n_val, n_cat = len(q_val), len(self.categories)
        low = self._fallback(p)
        pred = p.argmax(axis=1)
        counts = np.array([((pred == k) & ~low).sum() for k in range(n_cat)])
        overall = q_val.mean(axis=0)
        self.category_quality = np.array(
            [q_val[(pred == k) & ~low].mean(axis=0) if counts[k] else overall for k in range(n_cat)]
        )
        c_norm = normalised_cost(self.cost)
        seen = np.flatnonzero(counts)
        fallback_cost = low.mean() * self.cost[g]
        budget = None if self.budget is None else self.budget - fallback_cost
        if budget is not None and budget < -1e-12:
            raise ValueError(
                f"budget {self.budget} is below the cost of the generalist fallback alone "
                f"({fallback_cost:.6g}): raise budget, lower min_confidence or choose a cheaper generalist"
            )
        value = self.category_quality[seen] - self.cost_weight * c_norm[None, :]
        pick, _, _ = choose_map(value, counts[seen] / n_val, self.cost, budget)
        self.category_model = np.full(n_cat, g)
        self.category_model[seen] = pick
        routed = np.where(low, g, self.category_model[pred])
        self.val_report = {
            "n_val": n_val, "fallback_share": float(low.mean()),
            "quality": float(q_val[np.arange(n_val), routed].mean()), "cost": float(self.cost[routed].mean()),
        }  # fmt: skip

    def probabilities(self, prompts: list[str]) -> np.ndarray:
        """``[N, K]`` category probabilities (columns: ``self.categories``)."""
        self._require_fit()
        return predict_logistic(self._embed(list(prompts)), self.w, self.b)

    def route(self, request: RouteRequest) -> Decision:
        """``request.threshold`` (``model: "router-category-<t>"``) overrides ``min_confidence``."""
        t = request.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1):
            raise ValueError(f"threshold must be a min_confidence in [0, 1] for policy 'category', got {t!r}")
        names, cols, cost = self.candidates(request)
        i, score, info = self._decide(
            self._embed([request.prompt])[0], names, cols, cost, self.cost_weight, t
        )
        return Decision(names[i], self.name, float(score), info=info)

    def _decide(self, emb, names, cols, cost, lam, min_confidence=None):
        p = predict_logistic(emb[None], self.w, self.b)
        k = int(p[0].argmax())
        fallback = bool(self._fallback(p, min_confidence)[0])
        want = self.generalist if fallback else self.models[self.category_model[k]]
        if want in names:
            i = names.index(want)
        else:  # the mapped model is not a candidate: the best candidate for this category
            row = self.mean_quality if fallback else self.category_quality[k]
            i = choose(row[cols], cost, lam)
        info = {"category": self.categories[k], "fallback": fallback, "entropy": float(entropy(p)[0])}
        return i, float(p[0, k]), info

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._base_state(), "budget": self.budget, "min_confidence": self.min_confidence,
            "max_entropy": self.max_entropy, "categories": list(self.categories), "w": self.w.tolist(),
            "b": self.b.tolist(), "category_model": self.category_model.tolist(),
            "category_quality": self.category_quality.tolist(), "generalist": self.generalist,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        self.budget = state["budget"]
        self.min_confidence, self.max_entropy = float(state["min_confidence"]), state["max_entropy"]
        self.categories = list(state["categories"])
        self.w, self.b = np.asarray(state["w"], dtype=np.float64), np.asarray(state["b"], dtype=np.float64)
        self.category_model = np.asarray(state["category_model"], dtype=int)
        self.category_quality = np.asarray(state["category_quality"], dtype=np.float64)
        self.generalist = str(state["generalist"])
