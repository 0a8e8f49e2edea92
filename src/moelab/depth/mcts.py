"""Dr.LLM's supervision: layer paths and the Monte Carlo tree search that finds short correct ones.

Heakl et al. 2025, *Dr.LLM: Dynamic Layer Routing in LLMs* (code: parameterlab/dr-llm,
``data_generation.py``). A path is the list of layer indices a model executes, in order (a skipped
layer is absent, a repeated one appears twice). The search explores paths under a budget: actions
skip one or two consecutive layers or repeat one layer once; the reward is correctness;
``UCB = mean + c sqrt(ln N / n) - length_penalty * len / L``; the shortest correct path is kept.
Labels per layer (0 skip, 1 execute, 2 repeat) are what the routers are trained on
(``moelab.depth.layer_router``). Where we differ from the official code: docs/methods/drllm.md.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from moelab.core.checks import positive_int

# Defaults, PAPERS.md sec. A.3 and the official code.
MCTS_SIMULATIONS = 50  # data_generation.py --num_simulations in the README example
UCB_C = 1.8  # exploration_constant
LENGTH_PENALTY = 3.0  # length_penalty
RANDOM_CHILD_P = 0.1  # random_prob
MAX_PATH_LEN = 40  # max_path_length
MAX_SKIP = 2  # SKIP_SIZE = [1, 2]
MAX_REPEAT = 1  # REPEAT_SIZE = [1], a layer repeated once


def _check_num_layers(num_layers: object) -> int:
    return positive_int("num_layers", num_layers)


def path_to_labels(path: Sequence[int], num_layers: int, max_count: int = 2) -> list[int]:
    """Per-block labels of a layer path: how many times each block runs, ``{0 skip, 1 execute, 2
    repeat}``. ``path`` is the list of block indices executed in order; it must be
    non-decreasing (blocks run in depth order, a repeat right after itself) with every block at
    most ``max_count`` times. (The official ``train.py``: ``layer_config.count(idx)``.)"""
    n = _check_num_layers(num_layers)
    p = [int(i) for i in path]
    if any(not 0 <= i < n for i in p):
        raise ValueError(f"path must hold block indices in [0, {n}), got {p}")
    if any(a > b for a, b in zip(p, p[1:], strict=False)):
        raise ValueError(f"path must be non-decreasing (blocks in depth order, repeats adjacent), got {p}")
    counts = Counter(p)
    labels = [counts.get(i, 0) for i in range(n)]
    if max(labels, default=0) > max_count:
        raise ValueError(f"path runs a block more than max_count={max_count} times: {p}")
    return labels


def labels_to_path(labels: Sequence[int] | Tensor) -> list[int]:
    """The layer path of per-block run counts: block ``i`` listed ``labels[i]`` times, in order."""
    values = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"labels must be ints >= 0 (0 skip, 1 execute, 2 repeat), got {values}")
    return [i for i, c in enumerate(values) for _ in range(c)]


@dataclass
class LayerPathSearch:
    """What ``mcts_layer_paths`` found.

    Attributes:
        num_layers: ``L``.
        best_path: the shortest correct path (ties: fewer distinct blocks, then the smaller list),
            or None when no evaluated path was correct.
        base_correct: whether the plain path ``0 .. L-1`` is correct.
        correct_paths: every correct path evaluated, best first.
        num_simulations: simulations run; ``num_evaluations``: distinct paths evaluated.
    """

    num_layers: int
    best_path: list[int] | None
    base_correct: bool
    correct_paths: list[list[int]] = field(default_factory=list)
    num_simulations: int = 0
    num_evaluations: int = 0

    @property
    def labels(self) -> list[int]:
        """Per-block labels of ``best_path``, or of the plain path when nothing was correct."""
        path = self.best_path if self.best_path is not None else list(range(self.num_layers))
        return path_to_labels(path, self.num_layers, max_count=max(1, len(path)))


class _Node:
    __slots__ = ("path", "parent", "children", "untried", "visits", "reward")

    def __init__(self, path: tuple[int, ...], parent: _Node | None, untried: list[tuple[int, ...]]) -> None:
        self.path = path
        self.parent = parent
        self.children: list[_Node] = []
        self.untried = untried
        self.visits = 0
        self.reward = 0.0


def path_successors(
    path: Sequence[int], max_skip: int = MAX_SKIP, max_repeat: int = MAX_REPEAT, max_len: int = MAX_PATH_LEN
) -> list[list[int]]:
    """The paths one MCTS action away from ``path`` (distinct, in a fixed order): drop ``1 ..
    max_skip`` consecutive entries, or run one entry's block once more right after itself (when
    it runs at most ``max_repeat`` times already and the new path is at most ``max_len`` long)."""
    p = tuple(int(i) for i in path)
    n = len(p)
    out: dict[tuple[int, ...], None] = {}
    for start in range(n):
        for size in range(1, max_skip + 1):
            if start + size <= n:
                out.setdefault(p[:start] + p[start + size :])
    if n + 1 <= max_len:
        counts = Counter(p)
        for start in range(n):
            if counts[p[start]] <= max_repeat:
                out.setdefault(p[: start + 1] + (p[start],) + p[start + 1 :])
    return [list(q) for q in out]


def _ucb(node: _Node, log_n: float, ucb_c: float, length_penalty: float, n_layers: int) -> float:
    """Dr.LLM's UCB: mean reward + c sqrt(ln N / n) - penalty * len(path) / L (inf when unvisited)."""
    if node.visits == 0:
        return math.inf
    mean = node.reward / node.visits
    return mean + ucb_c * math.sqrt(log_n / node.visits) - length_penalty * len(node.path) / n_layers


def _path_key(path: Sequence[int]) -> tuple[int, int, tuple[int, ...]]:
    return len(path), len(set(path)), tuple(path)


def _check_mcts_options(
    n_layers: int,
    num_simulations: int,
    ucb_c: float,
    length_penalty: float,
    random_child_p: float,
    max_len: int,
    max_skip: int,
    max_repeat: int,
    stop_saving: int | None,
) -> None:
    positive_int("num_simulations", num_simulations)
    positive_int("max_len", max_len)
    positive_int("max_skip", max_skip)
    if isinstance(max_repeat, bool) or not isinstance(max_repeat, int) or max_repeat < 0:
        raise ValueError(f"max_repeat must be an int >= 0, got {max_repeat!r}")
    for name, value in (("ucb_c", ucb_c), ("length_penalty", length_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if (
        isinstance(random_child_p, bool)
        or not isinstance(random_child_p, (int, float))
        or not 0 <= random_child_p <= 1
    ):
        raise ValueError(f"random_child_p must be a probability in [0, 1], got {random_child_p!r}")
    if stop_saving is not None:
        positive_int("stop_saving", stop_saving)
    if max_len < n_layers:
        raise ValueError(f"max_len must be >= num_layers={n_layers} (the plain path), got {max_len}")


def _reward(r: object) -> float:
    if isinstance(r, Tensor) and r.numel() == 1:
        r = r.item()
    if not isinstance(r, (bool, int, float)) or not 0.0 <= float(r) <= 1.0:
        raise TypeError(f"evaluate must return a bool or a number in [0, 1], got {r!r}")
    return float(r)


def _search(
    n_layers: int,
    num_simulations: int,
    ucb_c: float,
    length_penalty: float,
    random_child_p: float,
    max_len: int,
    max_skip: int,
    max_repeat: int,
    stop_saving: int | None,
    seed: int,
) -> Any:
    """The MCTS of ``mcts_layer_paths`` as a generator: it yields each path that needs a reward,
    receives the reward through ``send``, and returns the ``LayerPathSearch``."""
    rng = random.Random(seed)

    def successors(path: tuple[int, ...]) -> list[tuple[int, ...]]:
        out = [tuple(q) for q in path_successors(path, max_skip, max_repeat, max_len)]
        rng.shuffle(out)  # the official search shuffles the actions and pops the last
        return out

    rewards: dict[tuple[int, ...], float] = {}
    root_path = tuple(range(n_layers))
    root = _Node(root_path, None, successors(root_path))
    in_tree = {root_path}
    best: tuple[int, ...] | None = None
    sims = 0
    for sim in range(num_simulations):
        sims = sim + 1
        node = root
        log_n = math.log(sim + 1)
        while not node.untried and node.children:
            if rng.random() < random_child_p:
                node = rng.choice(node.children)
            else:
                node = max(node.children, key=lambda c: _ucb(c, log_n, ucb_c, length_penalty, n_layers))
        if node.visits > 0:
            # expand one untried action; a path already in the tree (the same path reached by
            # another order of actions) is not added again (our choice: the official search spends
            # a simulation on it)
            while node.untried and node.untried[-1] in in_tree:
                node.untried.pop()
            if node.untried:
                path = node.untried.pop()
                child = _Node(path, node, successors(path))
                in_tree.add(path)
                node.children.append(child)
                node = child
        if node.path not in rewards:
            rewards[node.path] = _reward((yield list(node.path)))
        r = rewards[node.path]
        if r > 0.5 and (best is None or _path_key(node.path) < _path_key(best)):
            best = node.path
        walk: _Node | None = node
        while walk is not None:
            walk.visits += 1
            walk.reward += r
            walk = walk.parent
        if stop_saving is not None and best is not None and len(best) <= n_layers - stop_saving:
            break
    correct = sorted((p for p, r in rewards.items() if r > 0.5), key=_path_key)
    return LayerPathSearch(
        num_layers=n_layers,
        best_path=None if best is None else list(best),
        base_correct=rewards.get(root_path, 0.0) > 0.5,
        correct_paths=[list(p) for p in correct],
        num_simulations=sims,
        num_evaluations=len(rewards),
    )


def mcts_layer_paths(
    num_layers: int,
    evaluate: Callable[[list[int]], bool | float],
    num_simulations: int = MCTS_SIMULATIONS,
    *,
    ucb_c: float = UCB_C,
    length_penalty: float = LENGTH_PENALTY,
    random_child_p: float = RANDOM_CHILD_P,
    max_len: int = MAX_PATH_LEN,
    max_skip: int = MAX_SKIP,
    max_repeat: int = MAX_REPEAT,
    stop_saving: int | None = None,
    seed: int = 0,
) -> LayerPathSearch:
    """Length-aware MCTS over layer paths (Dr.LLM's supervision; PAPERS.md A.3, ``data_generation.py``).

    A path is the list of block indices executed in order, starting from ``0 .. L-1``. An action
    skips 1..``max_skip`` consecutive entries or repeats one block once (``path_successors``).
    ``evaluate(path)`` is the reward: correctness of the model's answer along the path (a bool or
    a number in [0, 1]; > 0.5 counts as correct); each distinct path is evaluated once.

    Each simulation descends from the root while a node is fully expanded, choosing a uniformly
    random child with probability ``random_child_p`` and otherwise the child maximising

        UCB = mean reward + ucb_c * sqrt(ln N / n) - length_penalty * len(path) / L

    (``N`` the simulations so far, as in the official code; ``n`` the child's visits); it expands
    one untried action of the node it stops at (a node is evaluated before it is expanded),
    evaluates the new path and backs the reward up to the root. The shortest correct path seen is
    kept. ``stop_saving``: stop once a correct path ``stop_saving`` blocks shorter than ``L`` is
    found (the official search stops at 2; None runs every simulation). Many examples at once,
    with batched evaluation: ``mcts_layer_paths_batched``.
    """
    n_layers = _check_num_layers(num_layers)
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable(path: list[int]) -> bool, got {type(evaluate).__name__}")
    opts = (
        num_simulations,
        ucb_c,
        length_penalty,
        random_child_p,
        max_len,
        max_skip,
        max_repeat,
        stop_saving,
    )
    _check_mcts_options(n_layers, *opts)
    gen = _search(n_layers, *opts, seed)
    try:
        path = next(gen)
        while True:
            path = gen.send(evaluate(path))
    except StopIteration as done:
        return done.value


def mcts_layer_paths_batched(
    num_layers: int,
    num_examples: int,
    evaluate_many: Callable[[list[int], list[list[int]]], Sequence[bool | float] | Tensor],
    num_simulations: int = MCTS_SIMULATIONS,
    *,
    ucb_c: float = UCB_C,
    length_penalty: float = LENGTH_PENALTY,
    random_child_p: float = RANDOM_CHILD_P,
    max_len: int = MAX_PATH_LEN,
    max_skip: int = MAX_SKIP,
    max_repeat: int = MAX_REPEAT,
    stop_saving: int | None = None,
    seed: int = 0,
    seed_per_example: bool = True,
) -> list[LayerPathSearch]:
    """``mcts_layer_paths`` for ``num_examples`` examples at once: the searches advance in lockstep,
    and each round's paths are scored by one call ``evaluate_many(examples, paths)`` (example
    indices and their paths, one reward each; e.g. one forward of those examples, each row along
    its own path, with ``LayerRouters.forcing``). Example ``i``'s search uses seed ``seed + i``
    (the official search draws every example's action order from one running random state), or
    ``seed`` for every example with ``seed_per_example=False`` (the same action order everywhere);
    either way its result equals ``mcts_layer_paths(...)`` with that seed on that example.
    """
    n_layers = _check_num_layers(num_layers)
    positive_int("num_examples", num_examples)
    if not callable(evaluate_many):
        raise TypeError(
            f"evaluate_many must be callable(examples, paths) -> rewards, got {type(evaluate_many).__name__}"
        )
    opts = (
        num_simulations,
        ucb_c,
        length_penalty,
        random_child_p,
        max_len,
        max_skip,
        max_repeat,
        stop_saving,
    )
    _check_mcts_options(n_layers, *opts)
    gens = [_search(n_layers, *opts, seed + i if seed_per_example else seed) for i in range(num_examples)]
    results: list[LayerPathSearch | None] = [None] * num_examples
    pending: dict[int, list[int]] = {}
    for i, gen in enumerate(gens):
        pending[i] = next(gen)  # the plain path is always evaluated first
    while pending:
        examples = list(pending)
        rewards = evaluate_many(examples, [pending[i] for i in examples])
        if isinstance(rewards, Tensor):
            rewards = rewards.tolist()
        if len(rewards) != len(examples):
            raise ValueError(
                f"evaluate_many must return one reward per path ({len(examples)}), got {len(rewards)}"
            )
        for i, r in zip(examples, rewards, strict=True):
            try:
                pending[i] = gens[i].send(r)
            except StopIteration as done:
                results[i] = done.value
                del pending[i]
    return results  # type: ignore[return-value]


# -- the decision ---------------------------------------------------------------------------------
