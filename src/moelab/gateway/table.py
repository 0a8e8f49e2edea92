"""``RoutingTable``: per-query quality of each candidate model, the offline data request routers
are trained and evaluated on (RouteLLM's GSM8K / MMLU / MT-Bench tables, LLMRouter's 9 models).

Torch-free (numpy only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoutingTable:
    """``N`` prompts x ``M`` models.

    Attributes:
        name: e.g. ``"routellm_gsm8k"``.
        prompts: ``N`` prompt texts.
        models: ``M`` model names (columns of ``quality``).
        quality: ``[N, M]`` float, the quality of model ``m``'s answer to prompt ``n`` (0/1
            correctness, a [0, 1] score, or a 1-10 judge score).
        cost: ``[M]`` float, the cost of one call of each model in the table's unit (USD per
            1M tokens for LLMRouter; RouteLLM tables have no prices: 0 weak, 1 strong).
        ids: ``N`` row ids of the source file.
        split: ``N`` strings (``"train"``/``"test"``) or None.
        task: ``N`` strings (the source task / MMLU subject) or None.
    """

    name: str
    prompts: list[str]
    models: list[str]
    quality: np.ndarray
    cost: np.ndarray
    ids: np.ndarray
    split: list[str] | None = None
    task: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.quality = np.asarray(self.quality, dtype=np.float64)
        self.cost = np.asarray(self.cost, dtype=np.float64)
        self.ids = np.asarray(self.ids)
        n, m = len(self.prompts), len(self.models)
        if self.quality.shape != (n, m):
            raise ValueError(f"quality must be [N={n}, M={m}], got {self.quality.shape}")
        if self.cost.shape != (m,):
            raise ValueError(f"cost must be [M={m}], got {self.cost.shape}")
        if self.ids.shape != (n,):
            raise ValueError(f"ids must be [N={n}], got {self.ids.shape}")
        for name in ("split", "task"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"{name} must have N={n} entries, got {len(v)}")

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, index: Sequence[int] | np.ndarray) -> RoutingTable:
        """The sub-table of the given row positions (an index array or a boolean mask)."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return RoutingTable(
            self.name, [self.prompts[i] for i in idx], list(self.models), self.quality[idx], self.cost,
            self.ids[idx], pick(self.split), pick(self.task), dict(self.meta),
        )  # fmt: skip

    def where_split(self, split: str) -> RoutingTable:
        if self.split is None:
            raise ValueError(f"table {self.name!r} has no split column")
        return self.rows(np.array([s == split for s in self.split], dtype=bool))

    def column(self, model: str) -> int:
        try:
            return self.models.index(model)
        except ValueError:
            raise ValueError(f"model must be one of {self.models}, got {model!r}") from None
