"""``cascade``: try the cheap model first, keep its answer if it looks right, else escalate
(the routing & cascading survey, PAPERS.md item 26, Moslem & Kelleher 2026; AutoMix-style
acceptance, Madaan et al. 2023). Torch-free (numpy); MiniLM loads lazily.

The models are tried in cost order (cheapest first, or a configured ``order``). The ``Decision``
carries ``cascade=[m1, m2, ...]``; the server calls them in order and keeps the first answer that
``accept(request, model, answer)`` accepts (the last model's answer if none is). Acceptance needs
both signals (our choice):

- the answer is not empty, a refusal or a hedge (``answer_rejected``: case-insensitive phrases);
- a learned ``P(correct | prompt, model) >= threshold``: one logistic regression per model on the
  prompt embedding, fitted on a ``RoutingTable``'s quality (soft targets for fractional scores).

AutoMix verifies each answer with the model itself (few-shot self-verification); we use a
learned prompt-level probability instead, which needs no extra model call and can be trained and
evaluated offline. The expected cost of a cascade,

    E[C] = sum_k C_k prod_{j<k} (1 - P(accept_j)),

is ``expected_cascade_cost`` (the survey's formula); ``simulate(table)`` reports it with the
realised quality and cost.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from moelab.gateway.policies.category import fit_logistic, predict_logistic
from moelab.gateway.policies.retriever import EmbeddingPolicy
from moelab.gateway.policy import Decision, RouteRequest, register_policy
from moelab.gateway.table import RoutingTable


def expected_cascade_cost(cost: np.ndarray, accept: np.ndarray) -> np.ndarray:
    """``E[C] = sum_k C_k prod_{j<k} (1 - a_j)``: the expected cost of calling models in order and
    stopping at the first accepted answer (independent acceptances; the last model's ``a`` is not
    used). ``cost``: ``[K]``; ``accept``: ``[..., K]`` probabilities. Returns ``[...]``."""
    cost = np.asarray(cost, dtype=np.float64)
    a = np.asarray(accept, dtype=np.float64)
    if cost.ndim != 1 or a.shape[-1] != len(cost):
        raise ValueError(f"cost must be [K] and accept [..., K], got {cost.shape} and {a.shape}")
    if ((a < 0) | (a > 1)).any():
        raise ValueError("accept must hold probabilities in [0, 1]")
    reach = np.cumprod(np.concatenate([np.ones(a.shape[:-1] + (1,)), 1.0 - a[..., :-1]], axis=-1), axis=-1)
    return (reach * cost).sum(axis=-1)


# Answers that carry no usable content (our choice; lower case, matched anywhere in the first 200
# characters). Refusals and explicit hedges are escalated like empty answers.
REJECT_PHRASES = (
    "i can't help", "i cannot help", "i can't answer", "i cannot answer", "i'm unable to",
    "i am unable to", "i'm not able to", "i am not able to", "i'm sorry, but", "i apologize, but",
    "as an ai", "i don't know", "i do not know", "i'm not sure", "i am not sure", "not enough information",
)  # fmt: skip


def answer_rejected(answer: str, phrases: tuple[str, ...] = REJECT_PHRASES) -> str | None:
    """Why an answer is rejected on its face (``"empty"``, ``"refusal: <phrase>"``), or None."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    text = re.sub(r"\s+", " ", answer.strip().lower().replace("\u2019", "'"))
    if not text:
        return "empty"
    head = text[:200]
    for p in phrases:
        if p in head:
            return f"refusal: {p}"
    return None


def cost_order(models: list[str], cost: np.ndarray, quality: np.ndarray, pareto: bool = True) -> list[str]:
    """Models cheapest first (equal costs: higher ``quality`` first). With ``pareto``, a model is
    kept only if its quality beats every cheaper kept model's: escalating to a model that is both
    dearer and worse cannot help on average (our choice). ``cost``, ``quality``: ``[M]``."""
    out: list[str] = []
    best = -np.inf
    for i in np.lexsort((-np.asarray(quality), np.asarray(cost))):
        if not pareto or quality[i] > best:
            out.append(models[i])
            best = max(best, quality[i])
    return out


@register_policy(
    "cascade",
    paper="Routing & cascading survey (Moslem & Kelleher 2026), AutoMix-style acceptance (Madaan et al. 2023)",
    summary="cheapest model first; accept by a learned P(correct | prompt, model) and an answer check; "
    "escalate; reports E[C]",
)
class CascadeRouter(EmbeddingPolicy):
    """Cheap-first cascade with learned acceptance.

    ``fit(table)``: ``P(correct | prompt, m) = sigmoid(e W_m + b_m)`` per model (``fit_logistic``,
    ``link="sigmoid"``, ``l2``, ``steps``) on the embeddings ``e`` with the table's quality as
    target. ``route``: the candidates in ``order`` (default ``cost_order``: cheapest first, and
    with ``pareto`` only models better on mean training quality than every cheaper one);
    ``Decision(model=first, cascade=[...], score=P(first))``.
    With ``prescreen=True`` a model (except the last) whose P is below the threshold is left out
    of the cascade before any call (the prompt-level signal already rejects it; our option).
    ``accept``: answer not rejected (``answer_rejected``, if ``answer_check``) and
    ``P >= threshold`` (``request.threshold`` overrides). ``simulate(table)``: offline.

    Defaults (our choice; AutoMix's thresholds are for its self-verifier): ``threshold=0.5``,
    ``l2=1e-4``, ``steps=300``, ``answer_check=True``, ``prescreen=False``, ``pareto=True``.
    """

    def __init__(
        self, embedder: Any = "minilm", threshold: float = 0.5, order: list[str] | None = None,
        answer_check: bool = True, prescreen: bool = False, pareto: bool = True, l2: float = 1e-4,
        steps: int = 300,
    ) -> None:  # fmt: skip
        super().__init__(embedder, 0.0)
        self.threshold = self._check_threshold(threshold)
        if order is not None and (isinstance(order, str) or not all(isinstance(m, str) for m in order)):
            raise TypeError(f"order must be a list of model names or None, got {order!r}")
        if order is not None and len(set(order)) != len(order):
            raise ValueError(f"order must not repeat models, got {order}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.order_param = None if order is None else list(order)
        self.answer_check, self.prescreen, self.pareto = bool(answer_check), bool(prescreen), bool(pareto)
        self.l2, self.steps = float(l2), steps
        self.order: list[str] = []
        self.w = np.zeros((0, 0))  # [d, M]
        self.b = np.zeros(0)  # [M]

    @staticmethod
    def _check_threshold(t: Any) -> float:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise ValueError(f"threshold must be a probability in [0, 1], got {t!r}")
        return float(t)

    def fit(self, table: RoutingTable) -> CascadeRouter:
        table = self._check_table(table)
        if self.order_param is not None:
            unknown = [m for m in self.order_param if m not in self.models]
            if unknown:
                raise ValueError(f"order names models {unknown} that are not in the table {self.models}")
            self.order = list(self.order_param)
        else:
            self.order = cost_order(self.models, self.cost, self.mean_quality, self.pareto)
        q = np.clip(table.quality, 0.0, 1.0)  # quality as P(correct): [0, 1] scores
        self.w, self.b = fit_logistic(
            self._embed(table.prompts), q, link="sigmoid", l2=self.l2, steps=self.steps
        )
        return self

    def p_correct(self, prompts: list[str]) -> np.ndarray:
        """``[N, M]`` learned P(correct | prompt, model), columns ``self.models``."""
        self._require_fit()
        return predict_logistic(self._embed(list(prompts)), self.w, self.b, link="sigmoid")

    def _chain(self, names: list[str], p: np.ndarray, t: float) -> list[str]:
        chain = [m for m in self.order if m in names]
        if not chain:  # only models left out of ``order`` (e.g. dominated ones): those, cheapest first
            chain = [m for m in cost_order(self.models, self.cost, self.mean_quality, False) if m in names]
        if self.prescreen and len(chain) > 1:
            kept = [m for m in chain[:-1] if p[self.models.index(m)] >= t]
            chain = kept + [chain[-1]]
        return chain

    def route(self, request: RouteRequest) -> Decision:
        names, _, _ = self.candidates(request)
        t = self.threshold if request.threshold is None else self._check_threshold(request.threshold)
        p = self.p_correct([request.prompt])[0]
        chain = self._chain(names, p, t)
        probs = {m: float(p[self.models.index(m)]) for m in chain}
        return Decision(
            chain[0], self.name, probs[chain[0]], cascade=chain, info={"p_correct": probs, "threshold": t}
        )

    def accept(self, request: RouteRequest, model: str, answer: str) -> tuple[bool, float]:
        if model not in self.models:
            raise ValueError(f"model must be one of the fitted models {self.models}, got {model!r}")
        t = self.threshold if request.threshold is None else self._check_threshold(request.threshold)
        p = float(self.p_correct([request.prompt])[0, self.models.index(model)])
        if self.answer_check and answer_rejected(answer) is not None:
            return False, p
        return p >= t, p

    def simulate(self, table: RoutingTable, threshold: float | None = None) -> dict[str, Any]:
        """Run the cascade offline on ``table`` (no answers: acceptance by the learned P only).

        Returns ``quality`` and ``cost`` (realised means: every called model is paid),
        ``expected_cost`` (``expected_cascade_cost`` with each stage's acceptance rate among the
        prompts that reached it: equals ``cost`` when the rates are measured on the same rows; NaN
        with ``prescreen``, where skipped stages are not paid),
        ``accept_rate`` and ``stop_share`` per stage, and the ``order``.
        """
        if not isinstance(table, RoutingTable):
            raise TypeError(f"table must be a RoutingTable, got {type(table).__name__}")
        t = self.threshold if threshold is None else self._check_threshold(threshold)
        cols = [table.column(m) for m in self.order]  # the table must hold the cascade's models
        p = self.p_correct(table.prompts)
        n, order_idx = len(table), [self.models.index(m) for m in self.order]
        cost = np.array([self.cost[i] for i in order_idx])
        stop, paid = np.zeros(n, dtype=int), np.zeros(n)
        for r in range(n):
            ks = [self.order.index(m) for m in self._chain(self.order, p[r], t)]
            stop[r] = next((k for k in ks[:-1] if p[r, order_idx[k]] >= t), ks[-1])
            paid[r] = cost[[k for k in ks if k <= stop[r]]].sum()  # every called model is paid
        reached = np.array([(stop >= k).sum() for k in range(len(cols))])
        stopped = np.array([(stop == k).sum() for k in range(len(cols))])
        rate = np.where(reached > 0, stopped / np.maximum(reached, 1), 1.0)
        quality = table.quality[np.arange(n), np.asarray(cols)[stop]]
        return {
            "order": list(self.order), "threshold": t, "quality": float(quality.mean()),
            "cost": float(paid.mean()),
            "expected_cost": float("nan") if self.prescreen else float(expected_cascade_cost(cost, rate)),
            "accept_rate": rate.tolist(), "stop_share": (stopped / n).tolist(),
        }  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            **self._base_state(), "threshold": self.threshold, "order": list(self.order),
            "prescreen": self.prescreen, "answer_check": self.answer_check, "w": self.w.tolist(), "b": self.b.tolist(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_base(state)
        unknown = [m for m in state["order"] if m not in self.models]
        if unknown:
            raise ValueError(f"state's order names models {unknown} that it was not fitted on")
        self.threshold = self._check_threshold(state["threshold"])
        self.order = list(state["order"])
        self.prescreen, self.answer_check = bool(state["prescreen"]), bool(state["answer_check"])
        self.w, self.b = np.asarray(state["w"], dtype=np.float64), np.asarray(state["b"], dtype=np.float64)
