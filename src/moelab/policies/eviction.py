"""Eviction policies of an expert cache (LRU, LFU, lookahead, Belady) as small objects.

State: a **clock** that ticks on every request, ``last_use[e]`` (the clock of ``e``'s latest
request or load) and ``freq[e]`` (the number of requests of ``e`` so far, never reset by
eviction). The victim is the candidate with the smallest key:

- ``lru``: ``last_use``;
- ``lfu``: ``(freq, last_use)`` (least frequently used, ties by LRU);
- ``belady``: ``(-next_use, last_use)``: evict the expert needed farthest in the future, ties by
  LRU (Belady 1966; optimal for demand paging when ``next_use`` is the true future);
- ``lookahead`` with window ``W``: as ``belady`` but a next use after ``step + W`` counts as
  never (what pre-gating provides, Read-ME: Cai et al. 2024): among experts not needed within the
  window it is LRU. ``W = 0`` is LRU.

``next_use`` (Belady and lookahead) maps an expert to the step of its next use; a value
``>= never`` (default infinity) means "not needed again". Without ``next_use`` (a runtime that
knows no future) both fall back to LRU. The caller keeps the set of resident experts and passes
the unpinned ones as ``candidates``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from moelab.core.checks import positive_int

POLICIES: tuple[str, ...] = ("lru", "lfu", "belady", "lookahead")
DEFAULT_LOOKAHEAD = 8  # tokens; our choice (Read-ME does not fix a window for the cache)


class CachePolicy:
    """Base class: recency and frequency counters over ``num_experts`` experts; LRU victims."""

    name = "lru"
    uses_future = False

    def __init__(self, num_experts: int) -> None:
        self.num_experts = positive_int("num_experts", num_experts)
        self.reset()

    def reset(self) -> None:
        """Forget every request (a cold cache)."""
        self.clock = 0
        self.last_use = [0] * self.num_experts
        self.freq = [0] * self.num_experts

    def on_access(self, expert: int) -> None:
        """A request of ``expert``: the clock ticks, its recency and frequency are updated."""
        self.clock += 1
        self.last_use[expert] = self.clock
        self.freq[expert] += 1

    def on_load(self, expert: int) -> None:
        """``expert`` was loaded without a request (prefetch): recency only, frequency unchanged."""
        self.clock += 1
        self.last_use[expert] = self.clock

    def victim(
        self, candidates: Iterable[int], step: int = 0, next_use: Sequence[float] | None = None,
        never: float = math.inf,
    ) -> int:  # fmt: skip
        """The expert to evict among ``candidates`` (non-empty) at ``step``."""
        cand = _nonempty(candidates)
        last = self.last_use
        return min(cand, key=lambda e: last[e])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_experts={self.num_experts})"


class LRUPolicy(CachePolicy):
    """Least recently used."""

    name = "lru"


class LFUPolicy(CachePolicy):
    """Least frequently used, ties by least recently used."""

    name = "lfu"

    def victim(
        self, candidates: Iterable[int], step: int = 0, next_use: Sequence[float] | None = None,
        never: float = math.inf,
    ) -> int:  # fmt: skip
        cand = _nonempty(candidates)
        last, freq = self.last_use, self.freq
        return min(cand, key=lambda e: (freq[e], last[e]))


class LookaheadPolicy(CachePolicy):
    """Belady within a window of ``window`` steps (pre-gating lookahead), LRU beyond it."""

    name = "lookahead"
    uses_future = True

    def __init__(self, num_experts: int, window: int = DEFAULT_LOOKAHEAD) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"lookahead must be an int >= 0 (tokens), got {window!r}")
        self.window = window
        super().__init__(num_experts)

    def _horizon(self, step: int) -> float:
        return step + self.window

    def victim(
        self, candidates: Iterable[int], step: int = 0, next_use: Sequence[float] | None = None,
        never: float = math.inf,
    ) -> int:  # fmt: skip
        cand = _nonempty(candidates)
        last = self.last_use
        if next_use is None:
            return min(cand, key=lambda e: last[e])
        horizon = self._horizon(step)

        def key(e: int) -> tuple[float, int]:
            n = next_use[e]
            return (-(n if n <= horizon and n < never else math.inf), last[e])

        return min(cand, key=key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_experts={self.num_experts}, window={self.window})"


class BeladyPolicy(LookaheadPolicy):
    """Belady's optimal replacement: evict the expert needed farthest in the future (an unbounded
    lookahead); with pre-gated predictions as ``next_use`` it is "Belady with pre-gating"."""

    name = "belady"

    def __init__(self, num_experts: int) -> None:
        super().__init__(num_experts, 0)

    def _horizon(self, step: int) -> float:
        return math.inf

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_experts={self.num_experts})"


def make_policy(name: object, num_experts: int, lookahead: object = DEFAULT_LOOKAHEAD) -> CachePolicy:
    """A fresh policy by name (``POLICIES``); ``lookahead`` is the window of ``"lookahead"``."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise ValueError(f"lookahead must be an int >= 0 (tokens), got {lookahead!r}")
    if name == "lru":
        return LRUPolicy(num_experts)
    if name == "lfu":
        return LFUPolicy(num_experts)
    if name == "belady":
        return BeladyPolicy(num_experts)
    return LookaheadPolicy(num_experts, lookahead)


def _nonempty(candidates: Iterable[int]) -> list[int]:
    cand = list(candidates)
    if not cand:
        raise ValueError("victim: no candidate to evict (every resident expert is pinned)")
    return cand
