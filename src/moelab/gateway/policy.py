"""The request-router contract: what every gateway policy (registry kind ``request_router``)
takes and returns. Torch-free.

A policy is a small object built from its config parameters (``build_policy(name, **params)``):

- ``route(request) -> Decision``: pick a model for one request (``RouteRequest``: the prompt text,
  the OpenAI messages, the candidate ``ModelInfo``s, an optional threshold override from
  ``model: "router-<policy>-<threshold>"``);
- ``fit(table) -> self``: offline training on a ``RoutingTable`` (policies that learn; the others
  raise ``TypeError``);
- ``feedback(Feedback)``: online updates (bandits, ``POST /v1/feedback``); a no-op by default;
- ``state_dict()`` / ``load_state_dict(d)``: JSON-able state (what a Redis-backed gateway shares
  across workers, what ``moelab gateway train`` writes);
- cascades: a ``Decision`` with ``cascade=[m1, m2, ...]`` asks the server to call the models in
  order and stop at the first answer ``policy.accept(request, model, answer_text)`` accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moelab import registry

KIND = "request_router"


def pack_array(a: Any) -> dict[str, Any]:
    """A numpy array as compact, exact JSON: ``{"dtype", "shape", "base64"}`` (little-endian bytes).
    A policy's large matrices (``knn``'s pilot embeddings) take ~half the bytes of a JSON list of
    floats and parse far faster, and they round-trip bit for bit."""
    import base64

    import numpy as np

    a = np.ascontiguousarray(a)
    dt = a.dtype.newbyteorder("<")
    return {
        "dtype": dt.str,
        "shape": list(a.shape),
        "base64": base64.b64encode(a.astype(dt).tobytes()).decode(),
    }


def unpack_array(x: Any, dtype: Any = None) -> Any:
    """The array ``pack_array`` packed, or a (nested) list as older states hold; cast to ``dtype``."""
    import base64

    import numpy as np

    if isinstance(x, dict) and {"dtype", "shape", "base64"} <= set(x):
        a = np.frombuffer(base64.b64decode(x["base64"]), dtype=np.dtype(x["dtype"])).reshape(x["shape"])
        return a.astype(dtype if dtype is not None else a.dtype.newbyteorder("="))
    return np.asarray(x, dtype=dtype)


@dataclass(frozen=True)
class ModelInfo:
    """One upstream model as a policy sees it.

    ``cost_in`` / ``cost_out``: USD per 1k input / output tokens; ``context_window``: tokens
    (None: unknown); ``tags``: free labels (``"strong"``, ``"weak"``, ``"math"``, ``"generalist"``).
    """

    name: str
    cost_in: float = 0.0
    cost_out: float = 0.0
    context_window: int | None = None
    tags: tuple[str, ...] = ()


@dataclass
class RouteRequest:
    """What a policy reads from one request.

    ``prompt``: the text to route on (the last user message by default: ``prompt_of``);
    ``messages``: the OpenAI chat messages (or ``[{"role": "user", "content": prompt}]``);
    ``models``: the candidates, in config order; ``threshold``: an override of the policy's
    threshold (``model: "router-<policy>-<threshold>"``), else None; ``key``: the caller's key id
    (never the key itself); ``input_tokens``: an estimate of the prompt's tokens.
    """

    prompt: str
    models: Sequence[ModelInfo]
    messages: list[dict[str, Any]] | None = None
    threshold: float | None = None
    key: str | None = None
    input_tokens: int | None = None

    def model(self, name: str) -> ModelInfo:
        for m in self.models:
            if m.name == name:
                return m
        raise ValueError(f"model {name!r} is not a candidate ({[m.name for m in self.models]})")


@dataclass
class Decision:
    """A policy's choice.

    ``model``: the chosen model's name; ``policy``: the policy's name; ``score``: its confidence
    or score in the policy's own units (a strong-win probability for ``threshold``), reported in
    the ``x-moelab-score`` header; ``cascade``: models to try in order (the server stops at the
    first accepted answer); ``info``: anything else worth logging (JSON-able).
    """

    model: str
    policy: str
    score: float = float("nan")
    cascade: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Feedback:
    """Outcome of one routed request (``POST /v1/feedback``): the model that answered, a reward
    in [0, 1] (1 = good), optionally the model it was compared with (``loser``, for Elo)."""

    model: str
    reward: float
    prompt: str | None = None
    loser: str | None = None
    request_id: str | None = None


class RequestRouter:
    """Base class of the gateway's policies (see the module docstring)."""

    name: str = ""

    def route(self, request: RouteRequest) -> Decision:
        raise NotImplementedError

    def fit(self, table: Any) -> RequestRouter:
        raise TypeError(f"policy {self.name!r} is not trained offline (it has no fit)")

    def feedback(self, fb: Feedback) -> None:
        return None

    def accept(self, request: RouteRequest, model: str, answer: str) -> tuple[bool, float]:
        """For cascades: whether ``answer`` from ``model`` is kept, and the confidence it was judged by."""
        return True, float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"policy {self.name!r} has no state to load, got keys {sorted(state)}")


def register_policy(name: str, *, paper: str, summary: str):
    """Class decorator: register a ``RequestRouter`` subclass as request router ``name``."""

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, RequestRouter)):
            raise TypeError(f"register_policy({name!r}) needs a RequestRouter subclass, got {cls!r}")
        cls.name = name
        return registry.register(KIND, name, paper=paper, summary=summary)(cls)

    return deco


def build_policy(name: str, **params: Any) -> RequestRouter:
    """The registered policy ``name`` built with ``params`` (a config's ``policies`` entry)."""
    if not isinstance(name, str):
        raise TypeError(f"policy name must be a str, got {type(name).__name__}")
    info = registry.get(KIND, name)
    try:
        return info.obj(**params)
    except TypeError as e:
        raise ValueError(f"policy {name!r}: bad parameters {sorted(params)}: {e}") from None


def prompt_of(messages: list[dict[str, Any]]) -> str:
    """The text a policy routes on: the last user message's text (content parts joined)."""
    for msg in reversed(messages):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
