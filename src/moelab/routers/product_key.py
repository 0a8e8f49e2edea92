"""Product-key top-k: the exact top-k of ``a[i] + b[j]`` over ``n * n`` pairs from ``2 k + k^2`` work.

Papers and code:
- Lample et al. *Large Memory Layers with Product Keys* (2019), Sec. 3.2: a query is split in two
  halves, each scored against ``n`` sub-keys; the key of pair ``(i, j)`` is the concatenation of
  sub-keys ``i`` and ``j``, so its score is ``a[i] + b[j]``. The top-k pairs lie among the
  ``k x k`` pairs of each side's top-k, so ``N = n^2`` keys are searched with ``O(n + k^2)`` work.
- He, *Mixture of A Million Experts* (PEER, 2024), Sec. 2: the same retrieval over ``N ~ 10^6``
  single-neuron experts, k = 16 per head (lucidrains/PEER-pytorch; OmniMoE, flash-algo/omni-moe,
  uses it with ``n = floor(sqrt(N))``).

Expert ``(i, j)`` has flat index ``i * n + j``. Ties are broken by lower index, on each side and
among the candidate sums, so the result is one well-defined total order: descending value, then
ascending flat index. That makes the candidate search exact (proof: if ``i`` is not among side
``a``'s top ``c = min(k, n)``, then ``k`` indices ``i'`` rank ahead of it, and every ``(i', j)``
ranks ahead of ``(i, j)``: a larger sum, or an equal sum and a lower flat index). In floating point
two sums with different summands can round to the same value; the argument then still gives the
right *values*, but which of the rounded-equal pairs comes first may differ from a brute force.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.checks import positive_int


def _sorted_desc(scores_TC: Tensor) -> tuple[Tensor, Tensor]:
    """Values and indices sorted by value descending, ties by lower index (a stable sort)."""
    return torch.sort(scores_TC, dim=-1, descending=True, stable=True)


def product_key_topk(scores_a_TN: Tensor, scores_b_TN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-``k`` of ``scores_a[t, i] + scores_b[t, j]`` over all ``n * n`` pairs ``(i, j)``.

    Args:
        scores_a_TN: ``[T, n]`` scores of the first sub-key set (float).
        scores_b_TN: ``[T, n]`` scores of the second sub-key set (same shape and dtype).
        k: how many pairs, ``1 <= k <= n * n``. Each side keeps ``min(k, n)`` candidates.

    Returns:
        ``values [T, k]`` (sorted descending; ties by lower flat index) and ``index [T, k]`` long,
        the flat pair index ``i * n + j``. ``values`` are gathered sums, so they carry gradient to
        both score tensors. Exact (see the module docstring): only ``min(k, n)^2`` candidate sums
        are formed, never ``[T, n * n]``.
    """
    for name, s in (("scores_a_TN", scores_a_TN), ("scores_b_TN", scores_b_TN)):
        if not isinstance(s, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(s).__name__}")
        if s.dim() != 2 or not s.is_floating_point():
            raise ValueError(
                f"{name} must be a 2-D float tensor [T, n], got shape {tuple(s.shape)} dtype {s.dtype}"
            )
    if scores_a_TN.shape != scores_b_TN.shape:
        raise ValueError(
            f"scores_a_TN and scores_b_TN must have the same shape [T, n], got "
            f"{tuple(scores_a_TN.shape)} and {tuple(scores_b_TN.shape)}"
        )
    if scores_a_TN.dtype != scores_b_TN.dtype:
        raise ValueError(
            f"scores_a_TN and scores_b_TN must share a dtype, got {scores_a_TN.dtype} and {scores_b_TN.dtype}"
        )
    t, n = scores_a_TN.shape
    if n < 1:
        raise ValueError("scores_a_TN must have at least one sub-key (n >= 1), got n = 0")
    positive_int("k", k)
    if k > n * n:
        raise ValueError(f"k must be <= n * n = {n * n} (the number of pairs), got {k}")

    c = min(k, n)
    value_a_TC, index_a_TC = _sorted_desc(scores_a_TN)
    value_b_TC, index_b_TC = _sorted_desc(scores_b_TN)
    value_a_TC, index_a_TC = value_a_TC[:, :c], index_a_TC[:, :c]
    value_b_TC, index_b_TC = value_b_TC[:, :c], index_b_TC[:, :c]

    # All c x c candidate sums and their flat indices.
    cand_value_TM = (value_a_TC.unsqueeze(2) + value_b_TC.unsqueeze(1)).reshape(t, c * c)
    cand_index_TM = (index_a_TC.unsqueeze(2) * n + index_b_TC.unsqueeze(1)).reshape(t, c * c)
    # Order the candidates by flat index first (indices are distinct, so this is unambiguous);
    # the stable descending sort by value then breaks ties by lower index.
    by_index_TM = cand_index_TM.argsort(dim=-1)
    cand_index_TM = cand_index_TM.gather(1, by_index_TM)
    cand_value_TM = cand_value_TM.gather(1, by_index_TM)
    _, best_TM = _sorted_desc(cand_value_TM.detach())
    best_TK = best_TM[:, :k]
    return cand_value_TM.gather(1, best_TK), cand_index_TM.gather(1, best_TK)
