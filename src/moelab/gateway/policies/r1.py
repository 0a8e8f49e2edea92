"""``r1``: Router-R1's multi-round routing protocol, reward and a small REINFORCE-trained router
(Router-R1, PAPERS.md item 23; ulab-uiuc/Router-R1).

The protocol: a policy model writes ``<think>...</think>`` and then either
``<search>Model: query</search>`` (the driver calls that model and appends
``<information>answer</information>``) or ``<answer>...</answer>``; at most 4 searches.
``parse_trajectory`` checks the format, ``run_protocol`` drives the loop with any policy
(a callable text -> text) and any models (callables query -> answer, with a price).

The reward (PAPERS.md item 23): format = 0 if valid else -1; outcome = EM (or F1) of the answer;
cost = price x completion tokens per call, summed, then sqrt, then min-max scaled between the 5th
and 95th percentiles of the last 1000 costs, ``c = 1 - scaled``;
``reward = -1`` if the format is bad, ``0`` if outcome = 0, else
``(outcome + format)(1 - cost_coe) + cost_coe * c``. ``cost_coe`` defaults to 0 (Router-R1's
train.sh).

The paper trains Qwen2.5-3B with PPO; here (our choice, CPU-sized) the router is a softmax over
models given simple prompt features (``prompt_features``), trained by REINFORCE with a mean-reward
baseline on toy oracle models or on a ``RoutingTable``; ``route`` takes its most likely model.
"""

from __future__ import annotations

import re
import string
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moelab.gateway.policy import Decision, RequestRouter, RouteRequest, register_policy

MAX_TURNS = 4  # Router-R1: up to 4 routing rounds
COST_WINDOW = 1000  # Router-R1: cost percentiles over the last 1000 samples
COST_PERCENTILES = (5.0, 95.0)
_TAG = re.compile(r"<(/?)(think|search|information|answer)>")
_PUNCTUATION = frozenset(string.punctuation)
_SEARCH = re.compile(r"^\s*([^:\n]+?)\s*:\s*(\S.*?)\s*$", re.S)


# ---- the protocol ------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A parsed policy output: ``valid`` format or not (``error`` says why), the ``searches``
    ``(model, query)``, the ``informations`` returned, and the final ``answer`` (None if none)."""

    valid: bool
    error: str = ""
    thinks: list[str] = field(default_factory=list)
    searches: list[tuple[str, str]] = field(default_factory=list)
    informations: list[str] = field(default_factory=list)
    answer: str | None = None


def parse_trajectory(text: str, max_turns: int = MAX_TURNS) -> Trajectory:
    """Check ``text`` against ``(<think> <search> <information>)* <think> <answer>``, with only
    whitespace between blocks, no nested tags, ``Model: query`` in each search and at most
    ``max_turns`` searches."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    out = Trajectory(valid=False)
    expected = {"think"}  # what may open next
    pos = 0
    blocks: list[tuple[str, str]] = []
    while True:
        m = _TAG.search(text, pos)
        if m is None:
            if text[pos:].strip():
                out.error = f"text outside tags: {text[pos:].strip()[:40]!r}"
                return out
            break
        if text[pos : m.start()].strip():
            out.error = f"text outside tags before <{m[2]}>: {text[pos : m.start()].strip()[:40]!r}"
            return out
        closing, tag = m[1] == "/", m[2]
        if closing:
            out.error = f"</{tag}> without <{tag}>"
            return out
        end = text.find(f"</{tag}>", m.end())
        if end < 0:
            out.error = f"<{tag}> is not closed"
            return out
        body = text[m.end() : end]
        if _TAG.search(body):
            out.error = f"a tag inside <{tag}>"
            return out
        if tag not in expected:
            out.error = f"<{tag}> where {' or '.join(f'<{e}>' for e in sorted(expected))} was expected"
            return out
        blocks.append((tag, body))
        expected = {
            "think": {"search", "answer"},
            "search": {"information"},
            "information": {"think"},
            "answer": set(),
        }[tag]
        pos = end + len(tag) + 3
    if not blocks or blocks[-1][0] != "answer":
        out.error = "no <answer> at the end"
        return out
    for tag, body in blocks:
        if tag == "think":
            out.thinks.append(body.strip())
        elif tag == "search":
            s = _SEARCH.match(body)
            if s is None:
                out.error = f"search {body.strip()[:40]!r} is not 'Model: query'"
                return out
            out.searches.append((s[1], s[2]))
        elif tag == "information":
            out.informations.append(body.strip())
        else:
            out.answer = body.strip()
    if len(out.searches) > max_turns:
        out.error = f"{len(out.searches)} searches, more than max_turns={max_turns}"
        return out
    out.valid = True
    return out


@dataclass
class Endpoint:
    """A routable model for the driver: ``fn(query) -> answer`` and its price per completion token."""

    fn: Callable[[str], str]
    price: float

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Endpoint.fn must be callable query -> answer, got {self.fn!r}")
        if isinstance(self.price, bool) or not isinstance(self.price, (int, float)) or self.price < 0:
            raise ValueError(f"Endpoint.price must be a number >= 0, got {self.price!r}")


def completion_tokens(answer: str) -> int:
    """Tokens of a model answer for pricing: whitespace words, at least 1 (our choice)."""
    return max(1, len(answer.split()))


@dataclass
class Rollout:
    """One run of the protocol: the policy's text (``<information>`` blocks included), its parse,
    the calls made ``(model, query, answer, cost)`` and their total cost (price x tokens)."""

    text: str
    trajectory: Trajectory
    calls: list[tuple[str, str, str, float]]

    @property
    def cost(self) -> float:
        return float(sum(c[3] for c in self.calls))


def run_protocol(
    question: str, policy: Callable[[str], str], models: dict[str, Endpoint], max_turns: int = MAX_TURNS
) -> Rollout:
    """Drive the multi-round loop: the policy sees ``question`` plus everything so far, its output
    is cut after the first ``</search>`` or ``</answer>`` (the generation stop strings), a search
    calls ``models[Model]`` and appends its answer as ``<information>``. Stops at an answer, a
    malformed turn, or after ``max_turns`` searches plus one more turn."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not callable(policy):
        raise TypeError(f"policy must be a callable text -> text, got {policy!r}")
    if not isinstance(models, dict) or not all(isinstance(e, Endpoint) for e in models.values()):
        raise TypeError("models must be a dict name -> Endpoint")
    text, calls = "", []
    for _ in range(max_turns + 1):
        out = policy(question + "\n" + text)
        if not isinstance(out, str):
            raise TypeError(f"policy returned {type(out).__name__}, expected str")
        stops = [i + len(t) for t in ("</search>", "</answer>") if (i := out.find(t)) >= 0]
        out = out[: min(stops)] if stops else out
        text += out
        if not out.endswith("</search>") or "<search>" not in out:
            break
        s = _SEARCH.match(out[out.rfind("<search>") + 8 : -9])
        if s is None:
            break
        name, query = s[1], s[2]
        if name in models:
            answer = str(models[name].fn(query))
            calls.append((name, query, answer, models[name].price * completion_tokens(answer)))
        else:
            answer = f"error: unknown model {name!r}; available: {', '.join(models)}"
        text += f"\n<information>{answer}</information>\n"
    return Rollout(text, parse_trajectory(text, max_turns), calls)


# ---- the reward --------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    golds = [golds] if isinstance(golds, str) else list(golds)
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """Best token-level F1 over the gold answers (normalised tokens)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    best = 0.0
    p = normalize_answer(prediction).split()
    for g in golds:
        t = normalize_answer(g).split()
        common = sum((Counter(p) & Counter(t)).values())
        if common:
            prec, rec = common / len(p), common / len(t)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def r1_reward(valid: bool, outcome: float, cost_score: float, cost_coe: float) -> float:
    """Router-R1's reward: -1 for a bad format; 0 when the outcome is 0; else
    ``(outcome + format)(1 - cost_coe) + cost_coe * cost_score`` with format = 0 (valid) and
    ``cost_score = c = 1 - scaled cost`` in [0, 1]."""
    fmt = 0.0 if valid else -1.0
    if not valid:
        return -1.0
    if outcome == 0:
        return 0.0
    return (outcome + fmt) * (1.0 - cost_coe) + cost_coe * cost_score


class CostScaler:
    """``c = 1 - clip((sqrt(cost) - p5) / (p95 - p5), 0, 1)`` with p5 / p95 the percentiles of the
    last ``window`` sqrt-costs (this batch included). When p95 == p5, scaled is 0 for costs at or
    below p5 and 1 above (the limit; our choice)."""

    def __init__(
        self, window: int = COST_WINDOW, percentiles: tuple[float, float] = COST_PERCENTILES
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        lo, hi = percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must be 0 <= low < high <= 100, got {percentiles!r}")
        self.percentiles = (float(lo), float(hi))
        self.history: deque[float] = deque(maxlen=window)

    def __call__(self, costs: Sequence[float]) -> np.ndarray:
        """``[B]`` cost scores c in [0, 1] of a batch of raw costs (price x tokens), after adding
        their square roots to the window."""
        raw = np.sqrt(np.asarray(costs, dtype=np.float64))
        if raw.ndim != 1 or np.any(~np.isfinite(raw)):
            raise ValueError(f"costs must be a 1-d sequence of finite numbers >= 0, got {costs!r}")
        self.history.extend(raw.tolist())
        lo, hi = np.percentile(np.asarray(self.history), self.percentiles)
        # p95 == p5 (all recent costs equal): the limit of the scaling, 0 at or below p5, 1 above
        scaled = np.clip((raw - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
        return 1.0 - scaled


# ---- the small policy --------------------------------------------------------------------------


def prompt_features(text: str) -> np.ndarray:
    """``[4]`` features of a prompt: bias, words / 32 (capped at 4), share of digits among
    characters, question marks (capped at 3) / 3. Our choice: cheap and torch-free."""
    n_words = len(text.split())
    digits = sum(c.isdigit() for c in text) / max(len(text), 1)
    return np.array([1.0, min(n_words / 32.0, 4.0), digits, min(text.count("?"), 3) / 3.0])


N_FEATURES = 4


class SoftmaxPolicy:
    """``pi(m | x) = softmax(W x)_m`` over ``models``; ``W`` is ``[M, F]``."""

    def __init__(self, models: Sequence[str], n_features: int = N_FEATURES, seed: int = 0) -> None:
        if not models or len(set(models)) != len(models):
            raise ValueError(f"models must be distinct names, got {models!r}")
        self.models = list(models)
        self.weights = np.zeros((len(models), n_features))
        self.rng = np.random.default_rng(seed)

    def probs(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """``[B, M]`` (or ``[M]``) choice probabilities for features ``x`` ``[B, F]`` (or ``[F]``);
        ``mask`` ``[M]`` bool removes models."""
        z = x @ self.weights.T
        if mask is not None:
            z = np.where(mask, z, -np.inf)
        z = z - z.max(axis=-1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=-1, keepdims=True)

    def sample(self, x: np.ndarray) -> np.ndarray:
        """``[B]`` model indices drawn from ``pi(. | x)``."""
        p = self.probs(x)
        u = self.rng.random((len(p), 1))
        return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), len(self.models) - 1)

    def reinforce_step(self, x: np.ndarray, actions: np.ndarray, advantages: np.ndarray, lr: float) -> None:
        """``W += lr * mean_b A_b (onehot(a_b) - pi(. | x_b)) x_b^T`` (the REINFORCE gradient of
        ``log pi(a | x)`` for a softmax-linear policy)."""
        p = self.probs(x)
        onehot = np.eye(len(self.models))[actions]
        self.weights += lr * ((advantages[:, None] * (onehot - p)).T @ x) / len(x)

    def as_text_policy(self, greedy: bool = False) -> Callable[[str], str]:
        """The policy as a protocol speaker: first turn routes the question to a sampled (or the
        most likely) model, the next turn answers with the information received."""

        def choose(question: str) -> str:
            x = prompt_features(question)[None]
            return self.models[int(np.argmax(self.probs(x)[0])) if greedy else int(self.sample(x)[0])]

        return protocol_speaker(choose)


def protocol_speaker(choose: Callable[[str], str]) -> Callable[[str], str]:
    """A text policy for ``run_protocol``: ``<think>..</think><search>{choose(question)}: question</search>``
    on the first turn, then ``<think>..</think><answer>{information}</answer>``."""

    def speak(context: str) -> str:
        if "<information>" in context:
            info = context[context.rfind("<information>") + 13 : context.rfind("</information>")]
            return f"<think>the routed model answered</think>\n<answer>{info.strip()}</answer>"
        question = context.strip()
        return f"<think>route by prompt features</think>\n<search>{choose(question)}: {question}</search>"

    return speak


def reinforce(
    policy: SoftmaxPolicy,
    features: np.ndarray,
    play: Callable[[int, int], tuple[bool, float, float]],
    cost_coe: float,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 3.0,
    scaler: CostScaler | None = None,
) -> list[float]:
    """Train ``policy`` by REINFORCE with the Router-R1 reward. Each step samples ``batch_size``
    rows of ``features`` ``[N, F]``, a model per row, and ``play(row, model_index) -> (valid,
    outcome, raw cost)``; advantage = reward - batch mean. Returns the mean reward per step."""
    scaler = CostScaler() if scaler is None else scaler
    history = []
    for _ in range(steps):
        rows = policy.rng.integers(0, len(features), size=batch_size)
        x = features[rows]
        actions = policy.sample(x)
        played = [play(int(r), int(a)) for r, a in zip(rows, actions, strict=True)]
        c = scaler([p[2] for p in played])
        rewards = np.array([r1_reward(v, o, ci, cost_coe) for (v, o, _), ci in zip(played, c, strict=True)])
        policy.reinforce_step(x, actions, rewards - rewards.mean(), lr)
        history.append(float(rewards.mean()))
    return history


# ---- toy oracle models (the CPU check of PAPERS.md item 23) ------------------------------------


def toy_task(n: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """``n`` arithmetic questions ``(question, gold, hard)``: easy ones are short (``a + b``), hard
    ones long multi-step expressions, so prompt length tells them apart."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b, c, d = (int(v) for v in rng.integers(1, 10, size=4))
        if rng.random() < 0.5:
            out.append((f"What is {a} + {b}?", str(a + b), False))
        else:
            q = f"Take {a}, add {b} times {c}, then subtract {d}, and report the final value carefully step by step?"
            out.append((q, str(a + b * c - d), True))
    return out


def toy_models(seed: int = 0) -> tuple[dict[str, Endpoint], dict[str, tuple[float, float]]]:
    """Three oracle models (small, medium, large) answering a ``toy_task`` question right with
    probability (easy, hard) = (0.9, 0.2), (0.95, 0.6), (0.97, 0.9), priced 1, 4 and 16 per token.
    Returns the endpoints and the accuracies."""
    acc = {"small": (0.9, 0.2), "medium": (0.95, 0.6), "large": (0.97, 0.9)}
    price = {"small": 1.0, "medium": 4.0, "large": 16.0}
    rng = np.random.default_rng(seed)

    def solver(name: str) -> Callable[[str], str]:
        def answer(query: str) -> str:
            nums = [int(v) for v in re.findall(r"\d+", query)]
            hard = len(nums) == 4
            truth = nums[0] + nums[1] * nums[2] - nums[3] if hard else sum(nums[:2])
            return str(truth) if rng.random() < acc[name][int(hard)] else str(truth + 1)

        return answer

    return {m: Endpoint(solver(m), price[m]) for m in acc}, acc


# ---- the gateway policy ------------------------------------------------------------------------


@register_policy(
    "r1",
    paper="Router-R1: multi-round routing and aggregation with RL (Zhang et al., 2025; ulab-uiuc/Router-R1)",
    summary="think/route/answer protocol and reward with cost_coe; a small softmax router trained by REINFORCE",
)
class R1Router(RequestRouter):
    """Router-R1 as a gateway policy: ``route`` picks the small policy's most likely candidate.

    Args:
        cost_coe: weight of the cost term in the reward, in [0, 1]; default 0 (Router-R1 train.sh).
        steps, batch_size, lr: REINFORCE schedule (batch 64 as Router-R1; steps 150, lr 3.0 ours).
        seed: RNG seed of sampling and training.
        max_turns: searches allowed per protocol run, default 4 (Router-R1).
        outcome: ``"em"`` (default) or ``"f1"`` for ``train_protocol``.
    """

    def __init__(self, cost_coe: float = 0.0, steps: int = 150, batch_size: int = 64, lr: float = 3.0,
                 seed: int = 0, max_turns: int = MAX_TURNS, outcome: str = "em") -> None:  # fmt: skip
        if isinstance(cost_coe, bool) or not isinstance(cost_coe, (int, float)) or not 0.0 <= cost_coe <= 1.0:
            raise ValueError(f"cost_coe must be a number in [0, 1], got {cost_coe!r}")
        for name, v in (("steps", steps), ("batch_size", batch_size), ("max_turns", max_turns)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if outcome not in ("em", "f1"):
            raise ValueError(f"outcome must be 'em' or 'f1', got {outcome!r}")
        self.cost_coe, self.steps, self.batch_size, self.lr = float(cost_coe), steps, batch_size, float(lr)
        self.seed, self.max_turns, self.outcome = seed, max_turns, outcome
        self.policy: SoftmaxPolicy | None = None

    def _new_policy(self, models: Sequence[str]) -> SoftmaxPolicy:
        self.policy = SoftmaxPolicy(models, seed=self.seed)
        return self.policy

    def fit(self, table: Any) -> R1Router:
        """REINFORCE on a ``RoutingTable``: choosing model m for prompt n has outcome
        ``quality[n, m]`` (clipped to [0, 1]) and raw cost ``cost[m]``; the format is valid."""
        for attr in ("prompts", "models", "quality", "cost"):
            if not hasattr(table, attr):
                raise TypeError(
                    f"fit needs a RoutingTable (prompts, models, quality, cost), got {type(table).__name__}"
                )
        quality = np.clip(np.asarray(table.quality, dtype=np.float64), 0.0, 1.0)
        cost = np.asarray(table.cost, dtype=np.float64)
        feats = np.stack([prompt_features(p) for p in table.prompts])
        policy = self._new_policy(table.models)
        reinforce(policy, feats, lambda n, m: (True, float(quality[n, m]), float(cost[m])), self.cost_coe,
                  self.steps, self.batch_size, self.lr)  # fmt: skip
        return self

    def train_protocol(
        self, questions: Sequence[tuple[str, str]], models: dict[str, Endpoint]
    ) -> list[float]:
        """REINFORCE through the full protocol: for each sampled question the policy speaks the
        think / search / answer format (``SoftmaxPolicy.as_text_policy``), ``run_protocol`` calls
        the chosen model, and the reward is ``r1_reward`` of the parse, EM/F1 against the gold and
        the call's cost. ``questions``: ``(question, gold)`` pairs. Returns mean reward per step."""
        if not questions:
            raise ValueError("questions must be a non-empty list of (question, gold) pairs")
        policy = self._new_policy(list(models))
        feats = np.stack([prompt_features(q.strip()) for q, _ in questions])
        score = exact_match if self.outcome == "em" else f1_score

        def play(row: int, action: int) -> tuple[bool, float, float]:
            question, gold = questions[row]
            forced = protocol_speaker(lambda _q: policy.models[action])  # the action REINFORCE sampled
            rollout = run_protocol(question, forced, models, self.max_turns)
            t = rollout.trajectory
            return t.valid, score(t.answer or "", gold) if t.valid else 0.0, rollout.cost

        return reinforce(policy, feats, play, self.cost_coe, self.steps, self.batch_size, self.lr)

    def run(
        self, question: str, models: dict[str, Endpoint], policy: Callable[[str], str] | None = None
    ) -> Rollout:
        """One protocol run with ``policy`` (default: the trained small policy, greedy)."""
        if policy is None:
            if self.policy is None:
                raise ValueError("r1 has no trained policy: call fit / train_protocol, or pass policy=")
            policy = self.policy.as_text_policy(greedy=True)
        return run_protocol(question, policy, models, self.max_turns)

    def route(self, request: RouteRequest) -> Decision:
        if not request.models:
            raise ValueError("request.models is empty: r1 needs at least one candidate model")
        if self.policy is None:
            raise ValueError("r1 has no trained policy: fit it (moelab gateway train) or load its state")
        names = [m.name for m in request.models]
        mask = np.array([m in names for m in self.policy.models])
        if not mask.any():
            raise ValueError(f"r1 was trained on {self.policy.models}, none of the candidates {names}")
        p = self.policy.probs(prompt_features(request.prompt), mask)
        best = int(np.argmax(p))
        probs = {m: round(float(q), 4) for m, q in zip(self.policy.models, p, strict=True) if q > 0}
        return Decision(self.policy.models[best], self.name, float(p[best]), info={"probs": probs})

    def state_dict(self) -> dict[str, Any]:
        if self.policy is None:
            return {}
        return {"models": list(self.policy.models), "weights": self.policy.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        if not state:
            return
        if set(state) != {"models", "weights"}:
            raise ValueError(f"r1 state must have keys ['models', 'weights'], got {sorted(state)}")
        w = np.asarray(state["weights"], dtype=np.float64)
        if w.shape != (len(state["models"]), N_FEATURES):
            raise ValueError(
                f"r1 state weights must be [{len(state['models'])}, {N_FEATURES}], got {w.shape}"
            )
        self._new_policy(state["models"]).weights = w
