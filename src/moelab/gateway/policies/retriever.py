"""``knn`` and ``centroid``: RouterRetriever-style routing by nearest pilot embeddings (PAPERS.md
item 24; Lee et al. 2024, *RouterRetriever*, code amy-hyunji/RouterRetriever
``get_pilot_embeddings.py``, ``test.py``). Torch-free (numpy); MiniLM loads lazily.

RouterRetriever routes a query to one expert: training queries are grouped by their best expert,
each group gives "pilot" embeddings (KMeans with k=1: the group's mean embedding), and a new query
goes to the expert of its most similar pilot. The official code takes the dot-product argmax over
all pilots (``rule="max"``); the paper averages the similarity over each expert's pilots
(``rule="mean"``). With one pilot per expert (the default ``n_pilots=1``) the two coincide.

Here an expert is a model of a ``RoutingTable`` and "best" is the highest quality on the prompt.
``knn`` keeps every training prompt as a pilot and votes among the ``k`` nearest.

This module also holds what the embedding policies (``knn``, ``centroid``, ``category``,
``cascade``) share: ``EmbeddingPolicy`` (embedder, candidates, costs, state) and the pure helpers
``best_sets``, ``normalised_cost``, ``choose``, ``kmeans``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.gateway.embed import get_embedder
from moelab.gateway.policy import (
    Decision,
    RequestRouter,
    RouteRequest,
    pack_array,
    register_policy,
    unpack_array,
)
from moelab.gateway.table import RoutingTable

# ---------------------------------------------------------------- pure helpers


def best_sets(quality: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """``[N, M]`` quality -> ``[N, M]`` bool: the models within ``tol`` of each row's best."""
    q = np.asarray(quality, dtype=np.float64)
    return q >= q.max(axis=1, keepdims=True) - tol


def normalised_cost(cost: np.ndarray) -> np.ndarray:
    """Min-max scale ``[M]`` costs to [0, 1] over the given models (all zero when they are equal)."""
    c = np.asarray(cost, dtype=np.float64)
    span = c.max() - c.min() if c.size else 0.0
    return np.zeros_like(c) if span <= 0 else (c - c.min()) / span


def choose(score: np.ndarray, cost: np.ndarray, cost_weight: float = 0.0) -> int:
    """``argmax_m score_m - cost_weight * normalised_cost_m``; ties go to the cheaper model, then
    to the first. ``score``/``cost``: ``[M]``; ``-inf`` scores are never chosen unless all are."""
    score = np.asarray(score, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    value = score - cost_weight * normalised_cost(cost) if cost_weight else score.copy()
    if not np.isfinite(value).any():
        value = np.zeros_like(value)
    top = value.max()
    tied = np.flatnonzero(value >= top - 1e-12 * max(1.0, abs(top)))
    return int(tied[np.argmin(cost[tied])])  # argmin returns the first of equal costs


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means on ``[n, d]`` rows with k-means++ seeding -> ``[min(k, n), d]`` centroids.
    k=1 is the mean (RouterRetriever's default). Deterministic for a given ``seed``."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if k >= n:
        return x.copy()
    if k == 1:
        return x.mean(axis=0, keepdims=True)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):  # k-means++: next centre with probability ~ squared distance
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
    c = np.asarray(centres)
    assign = np.full(n, -1)
    for _ in range(iters):
        new = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in range(len(c)):
            if (assign == j).any():  # an empty cluster keeps its centre
                c[j] = x[assign == j].mean(axis=0)
    return c


# ---------------------------------------------------------------- shared policy base


def _check_cost_weight(cost_weight: Any) -> float:
    if isinstance(cost_weight, bool) or not isinstance(cost_weight, (int, float)) or not cost_weight >= 0:
        raise ValueError(f"cost_weight must be a number >= 0, got {cost_weight!r}")
    return float(cost_weight)


class EmbeddingPolicy(RequestRouter):
    """What the embedding policies share: an embedder (``"minilm"``, lazily loaded, or
    ``"hashing"``, or an object with ``.embed``), the fitted models with their table costs and mean
    training quality, and the choice among a request's candidates.

    Costs at route time: the request's ``cost_in + cost_out`` when any candidate has a non-zero
    price (the gateway config is the truth when serving), else the costs of the fitted table.
    """

    def __init__(self, embedder: Any = "minilm", cost_weight: float = 0.0) -> None:
        self.embedder = get_embedder(embedder)
        self.cost_weight = _check_cost_weight(cost_weight)
        self.models: list[str] = []
        self.cost = np.zeros(0)
        self.mean_quality = np.zeros(0)

    # -- fitting
    def _check_table(self, table: Any) -> RoutingTable:
        if not isinstance(table, RoutingTable):
            raise TypeError(f"table must be a RoutingTable, got {type(table).__name__}")
        if len(table) == 0:
            raise ValueError(f"table {table.name!r} has no rows")
        self.models = list(table.models)
        self.cost = np.asarray(table.cost, dtype=np.float64).copy()
        self.mean_quality = table.quality.mean(axis=0)
        return table

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embedder.embed(list(texts)), dtype=np.float64)

    def _require_fit(self) -> None:
        if not self.models:
            raise ValueError(f"policy {self.name!r} is not fitted: call fit(table) or load_state_dict")

    # -- routing
    def candidates(self, request: RouteRequest) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The request's models the policy was fit on, in request order: ``(names, columns
        into self.models, costs [C])``. ``ValueError`` naming both lists when none is left."""
        self._require_fit()
        if not isinstance(request, RouteRequest):
            raise TypeError(f"request must be a RouteRequest, got {type(request).__name__}")
        infos = [m for m in request.models if m.name in self.models]
        if not infos:
            raise ValueError(
                f"policy {self.name!r}: none of the request's models {[m.name for m in request.models]} "
                f"was fitted (fitted: {self.models})"
            )
        cols = np.array([self.models.index(m.name) for m in infos])
        priced = np.array([m.cost_in + m.cost_out for m in infos], dtype=np.float64)
        cost = priced if (priced > 0).any() else self.cost[cols]
        return [m.name for m in infos], cols, cost

    def _decide(self, emb: np.ndarray, names: list[str], cols: np.ndarray, cost: np.ndarray, lam: float):
        """One prompt's ``[d]`` embedding, its candidates and the cost weight ``lam`` ->
        ``(index into names, score, info)``."""
        raise NotImplementedError

    def route(self, request: RouteRequest) -> Decision:
        """``request.threshold`` (``model: "router-<policy>-<t>"``) overrides ``cost_weight`` for
        this request (``knn``, ``centroid``; ``category`` reads it as ``min_confidence``)."""
        names, cols, cost = self.candidates(request)
        lam, t = self.cost_weight, request.threshold
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
                raise ValueError(f"threshold must be a cost_weight >= 0 for policy {self.name!r}, got {t!r}")
            lam = float(t)
        i, score, info = self._decide(self._embed([request.prompt])[0], names, cols, cost, lam)
        return Decision(names[i], self.name, float(score), info=info)

    def predict(self, prompts: list[str], models: list[str] | None = None) -> list[str]:
        """Offline batch routing: the chosen model of each prompt (one batched embedding call), among
        ``models`` (default: all fitted, priced by the table's costs)."""
        self._require_fit()
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        names = list(self.models) if models is None else [m for m in models if m in self.models]
        if not names:
            raise ValueError(f"none of models {models} was fitted (fitted: {self.models})")
        cols = np.array([self.models.index(m) for m in names])
        emb = self._embed(list(prompts))
        return [names[self._decide(e, names, cols, self.cost[cols], self.cost_weight)[0]] for e in emb]

    # -- state
    def _base_state(self) -> dict[str, Any]:
        return {
            "policy": self.name, "embedder": getattr(self.embedder, "name", "custom"),
            "dim": int(getattr(self.embedder, "dim", 0)), "cost_weight": self.cost_weight,
            "models": list(self.models), "cost": self.cost.tolist(), "mean_quality": self.mean_quality.tolist(),
        }  # fmt: skip

    def _load_base(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"policy", "embedder", "models", "cost", "mean_quality"} - set(state)
        if missing:
            raise ValueError(f"state of policy {self.name!r} lacks keys {sorted(missing)}")
        if state["policy"] != self.name:
            raise ValueError(f"state is for policy {state['policy']!r}, not {self.name!r}")
        mine = getattr(self.embedder, "name", "custom")
        if state["embedder"] != mine or int(state.get("dim", 0)) != int(getattr(self.embedder, "dim", 0)):
            raise ValueError(
                f"state was fitted with embedder {state['embedder']!r} (dim {state.get('dim')}), "
                f"this policy embeds with {mine!r} (dim {getattr(self.embedder, 'dim', 0)})"
            )
        self.models = list(state["models"])
        self.cost = np.asarray(state["cost"], dtype=np.float64)
        self.mean_quality = np.asarray(state["mean_quality"], dtype=np.float64)
        self.cost_weight = _check_cost_weight(state.get("cost_weight", self.cost_weight))


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _pilot_rows(table: RoutingTable, drop_uninformative: bool, tol: float) -> np.ndarray:
    """Rows that can be pilots: with ``drop_uninformative``, rows where every model scores the same
    (all wrong or all right: no best model) are left out."""
    best = best_sets(table.quality, tol)
    keep = ~best.all(axis=1) if drop_uninformative else np.ones(len(table), dtype=bool)
    if not keep.any():
        raise ValueError(
            f"table {table.name!r}: no row has a best model (every model scores the same on every row)"
        )
    return np.flatnonzero(keep)


# ---------------------------------------------------------------- centroid


@register_policy(
    "centroid",
    paper="RouterRetriever (Lee et al. 2024): pilot embeddings per expert, route to the nearest pilot",
    summary="one KMeans centroid (or n_pilots) per model of the prompts it is best on; dot-product routing",
)
class CentroidRouter(EmbeddingPolicy):
    """Route to the model whose pilot embeddings are most similar to the prompt.

    ``fit(table)``: model m's pilots are ``kmeans(E[rows where m is best], n_pilots)`` of the
    L2-normalised prompt embeddings ``E`` (not renormalised, as KMeans centroids). A row where
    several models tie for best counts for each of them (our choice: 0/1 tables tie often).
    ``route``: ``s_m = max_j <e, p_mj>`` (``rule="max"``, the official ``test.py``, default) or
    ``mean_j`` (``rule="mean"``, the paper); then ``argmax_m s_m - cost_weight * c_m`` with ``c``
    the min-max normalised cost (``cost_weight=0``: RouterRetriever's rule). A model with no pilot
    scores ``-inf``.

    Args: ``embedder``; ``n_pilots`` (KMeans k per model, 1 as in RouterRetriever); ``rule``;
    ``cost_weight`` (lambda >= 0); ``drop_uninformative`` (skip rows where all models tie, our
    choice); ``tie_tol`` (quality within this of the best counts as best, 0); ``seed`` (k-means).
    """

    def __init__(
        self, embedder: Any = "minilm", n_pilots: int = 1, rule: str = "max", cost_weight: float = 0.0,
        drop_uninformative: bool = True, tie_tol: float = 0.0, seed: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(embedder, cost_weight)
        self.n_pilots = _check_int("n_pilots", n_pilots, 1)
        if rule not in ("max", "mean"):
            raise ValueError(f"rule must be 'max' (official code) or 'mean' (paper), got {rule!r}")
        self.rule = rule
        self.drop_uninformative = bool(drop_uninformative)
        self.tie_tol = float(tie_tol)
        self.seed = int(seed)
        self.pilots = np.zeros((0, 0))  # [P, d]
        self.pilot_model = np.zeros(0, dtype=int)  # [P] column of each pilot's model

    def fit(self, table: RoutingTable) -> CentroidRouter:
        table = self._check_table(table)
        rows = _pilot_rows(table, self.drop_uninformative, self.tie_tol)
        emb = self._embed([table.prompts[i] for i in rows])
        best = best_sets(table.quality[rows], self.tie_tol)
        pilots, owner = [], []
        for m in range(len(self.models)):
            if best[:, m].any():
                c = kmeans(emb[best[:, m]], self.n_pilots, seed=self.seed)
                pilots.append(c)
                owner += [m] * len(c)
        self.pilots = np.concatenate(pilots)
        self.pilot_model = np.asarray(owner, dtype=int)
        return self

    def scores(self, embedding: np.ndarray) -> np.ndarray:
        """``[d]`` prompt embedding -> ``[M]`` pilot similarity per fitted model (``-inf``: no pilot)."""
        sim = self.pilots @ embedding
        out = np.full(len(self.models), -np.inf)
        for m in np.unique(self.pilot_model):
            s = sim[self.pilot_model == m]
            out[m] = s.max() if self.rule == "max" else s.mean()
        return out

    def _decide(self, emb, names, cols, cost, lam):
        s = self.scores(emb)[cols]
        i = choose(s, cost, lam)
        return (
            i,
            s[i],
            {"similarity": {n: float(v) for n, v in zip(names, s, strict=True)}, "rule": self.rule},
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._base_state(), "n_pilots": self.n_pilots, "rule": self.rule,
            "pilots": pack_array(self.pilots), "pilot_model": self.pilot_model.tolist(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        self.n_pilots, self.rule = int(state["n_pilots"]), str(state["rule"])
        self.pilots = unpack_array(state["pilots"], np.float64)
        self.pilot_model = np.asarray(state["pilot_model"], dtype=int)


# ---------------------------------------------------------------- knn

VOTES = ("majority", "similarity", "quality")


def knn_scores(sim: np.ndarray, quality: np.ndarray, k: int, vote: str, tol: float = 0.0) -> np.ndarray:
    """Scores of ``C`` models from the ``k`` pilots most similar to one prompt.

    ``sim``: ``[P]`` similarities to the pilots; ``quality``: ``[P, C]`` the pilots' quality of the
    candidate models. Each neighbour's best models share its vote (a tie of b models gives each
    1/b). ``vote``: ``"majority"`` (vote counts / k), ``"similarity"`` (votes weighted by
    similarity, / the weights' sum), ``"quality"`` (the similarity-weighted mean quality of each
    model over the neighbours: an estimate of its quality on this prompt). Returns ``[C]``.
    """
    k = min(k, len(sim))
    near = np.argpartition(-sim, k - 1)[:k] if k < len(sim) else np.arange(len(sim))
    q = quality[near]
    w = np.ones(k) if vote == "majority" else np.maximum(sim[near], 0.0) + 1e-12
    if vote == "quality":
        return w @ q / w.sum()
    best = best_sets(q, tol)
    share = best / best.sum(axis=1, keepdims=True)
    return w @ share / w.sum()


@register_policy(
    "knn",
    paper="RouterRetriever (Lee et al. 2024) with every training prompt as a pilot; k nearest neighbours vote",
    summary="k nearest training prompts vote for their best model (count, similarity or quality weighted)",
)
class KNNRouter(EmbeddingPolicy):
    """Route by the ``k`` training prompts most similar to the prompt (dot product of normalised
    embeddings). Each neighbour votes for its best model among the request's candidates
    (``knn_scores``); ``argmax_m score_m - cost_weight * c_m``. With ``k=1`` this is
    RouterRetriever's nearest-pilot rule with every training prompt as a pilot.

    Args: ``embedder``; ``k`` (our choice, 10); ``vote`` (``"similarity"`` default, our choice;
    ``"majority"``; ``"quality"``); ``cost_weight``; ``drop_uninformative`` (rows where every model
    scores the same are no pilots; our choice, True); ``tie_tol``.
    """

    def __init__(
        self, embedder: Any = "minilm", k: int = 10, vote: str = "similarity", cost_weight: float = 0.0,
        drop_uninformative: bool = True, tie_tol: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(embedder, cost_weight)
        self.k = _check_int("k", k, 1)
        if vote not in VOTES:
            raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
        self.vote = vote
        self.drop_uninformative = bool(drop_uninformative)
        self.tie_tol = float(tie_tol)
        self.pilots = np.zeros((0, 0))  # [P, d]
        self.pilot_quality = np.zeros((0, 0))  # [P, M]

    def fit(self, table: RoutingTable) -> KNNRouter:
        table = self._check_table(table)
        rows = _pilot_rows(table, self.drop_uninformative, self.tie_tol)
        self.pilots = self._embed([table.prompts[i] for i in rows])
        self.pilot_quality = table.quality[rows].copy()
        return self

    def _decide(self, emb, names, cols, cost, lam):
        s = knn_scores(self.pilots @ emb, self.pilot_quality[:, cols], self.k, self.vote, self.tie_tol)
        i = choose(s, cost, lam)
        return (
            i,
            s[i],
            {"scores": {n: float(v) for n, v in zip(names, s, strict=True)}, "k": self.k, "vote": self.vote},
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._base_state(), "k": self.k, "vote": self.vote, "tie_tol": self.tie_tol,
            "pilots": pack_array(self.pilots), "pilot_quality": pack_array(self.pilot_quality),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        self.k, self.vote, self.tie_tol = int(state["k"]), str(state["vote"]), float(state["tie_tol"])
        self.pilots = unpack_array(state["pilots"], np.float64)
        self.pilot_quality = unpack_array(state["pilot_quality"], np.float64)
