"""FTP's per-block sparsity schedule search: a small genetic algorithm over per-block sparsities
whose mean is the target (FTP's first stage; the paper gives no details, every setting here is
our choice, documented in docs/methods/ftp.md). Pure: it takes ``evaluate(schedule) -> loss``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moelab.core.checks import positive_int


def project_schedule(values: Sequence[float], target: float, max_sparsity: float = 0.9) -> list[float]:
    """The closest schedule (Euclidean) to ``values`` whose mean is ``target`` with every entry in
    ``[0, max_sparsity]``: ``clip(v - lambda, 0, max_sparsity)``, ``lambda`` found by bisection."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("values must hold at least one sparsity")
    if not all(math.isfinite(x) for x in v):
        raise ValueError(f"values must be finite, got {v}")
    if not 0.0 < max_sparsity < 1.0:
        raise ValueError(f"max_sparsity must lie in (0, 1), got {max_sparsity}")
    if not 0.0 <= target <= max_sparsity:
        raise ValueError(f"target must lie in [0, max_sparsity={max_sparsity}], got {target}")

    def mean_at(lam: float) -> float:
        return sum(min(max(x - lam, 0.0), max_sparsity) for x in v) / len(v)

    lo, hi = min(v) - max_sparsity, max(v)  # mean_at(lo) = max_sparsity >= target >= 0 = mean_at(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean_at(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    lam = 0.5 * (lo + hi)
    return [min(max(x - lam, 0.0), max_sparsity) for x in v]


@dataclass(frozen=True)
class ScheduleSearch:
    """What ``search_sparsity_schedule`` found: the best schedule, its loss, the best loss after
    each generation (``history[0]``: the initial population) and how many schedules were evaluated."""

    schedule: list[float]
    loss: float
    history: list[float]
    evaluations: int


def search_sparsity_schedule(
    evaluate: Callable[[list[float]], float],
    num_blocks: int,
    target: float,
    *,
    population: int = 12,
    generations: int = 8,
    elite: int = 2,
    tournament: int = 3,
    crossover_rate: float = 0.9,
    mutation_rate: float = 0.3,
    mutation_scale: float = 0.1,
    init_scale: float = 0.1,
    max_sparsity: float = 0.9,
    seed: int = 0,
) -> ScheduleSearch:
    """FTP's sparsity scheduler: a genetic search over per-block sparsities with mean ``target``
    that minimises ``evaluate(schedule) -> loss`` (FTP: the val loss of the model pruned by the
    static router at that schedule).

    The population starts from the uniform schedule and ``population - 1`` perturbations of it
    (Gaussian, ``init_scale``). Each generation keeps the ``elite`` best, then breeds the rest:
    two parents by tournament (the best of ``tournament`` drawn at random), uniform crossover with
    probability ``crossover_rate`` (else a copy of the first), each gene mutated with probability
    ``mutation_rate`` by ``N(0, mutation_scale^2)``, and the child projected back onto the
    constraint (``project_schedule``). Every schedule is evaluated once (cached). The paper gives
    the method, not its settings: all defaults are our choice. Deterministic for a ``seed``.
    """
    if not callable(evaluate):
        raise TypeError(f"evaluate must be callable(schedule) -> loss, got {type(evaluate).__name__}")
    positive_int("num_blocks", num_blocks)
    positive_int("population", population)
    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 0:
        raise ValueError(f"generations must be an int >= 0, got {generations!r}")
    if isinstance(elite, bool) or not isinstance(elite, int) or not 0 <= elite <= population:
        raise ValueError(f"elite must be an int in [0, population={population}], got {elite!r}")
    positive_int("tournament", tournament)
    for name, p in (("crossover_rate", crossover_rate), ("mutation_rate", mutation_rate)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    for name, p in (("mutation_scale", mutation_scale), ("init_scale", init_scale)):
        if not p >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {p}")
    project_schedule([target], target, max_sparsity)  # validates target and max_sparsity
    rng = random.Random(seed)
    cache: dict[tuple[float, ...], float] = {}

    def fitness(schedule: list[float]) -> float:
        key = tuple(round(x, 9) for x in schedule)
        if key not in cache:
            loss = float(evaluate(list(schedule)))
            if math.isnan(loss):
                raise ValueError(f"evaluate returned NaN for schedule {schedule}")
            cache[key] = loss
        return cache[key]

    uniform = [float(target)] * num_blocks
    pop = [uniform] + [
        project_schedule(
            [target + rng.gauss(0.0, init_scale) for _ in range(num_blocks)], target, max_sparsity
        )
        for _ in range(population - 1)
    ]
    scores = [fitness(p) for p in pop]
    history = [min(scores)]

    def pick() -> list[float]:
        contenders = [rng.randrange(len(pop)) for _ in range(tournament)]
        return pop[min(contenders, key=lambda i: scores[i])]

    for _ in range(generations):
        order = sorted(range(len(pop)), key=lambda i: scores[i])
        children = [pop[i] for i in order[:elite]]
        while len(children) < population:
            a, b = pick(), pick()
            if rng.random() < crossover_rate:
                child = [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]
            else:
                child = list(a)
            child = [x + rng.gauss(0.0, mutation_scale) if rng.random() < mutation_rate else x for x in child]
            children.append(project_schedule(child, target, max_sparsity))
        pop = children
        scores = [fitness(p) for p in pop]
        history.append(min(scores))
    best = min(range(len(pop)), key=lambda i: scores[i])
    return ScheduleSearch(
        schedule=list(pop[best]), loss=scores[best], history=history, evaluations=len(cache)
    )


# -- the router ---------------------------------------------------------------------------------------
