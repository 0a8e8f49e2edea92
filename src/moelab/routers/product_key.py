"""Product-key retrieval: the exact top-k of ``a[i] + b[j]`` over ``n * n`` pairs, and the two routers
built on it, PEER (``peer``) and OmniMoE (``omni``), over pools of ``N = n^2`` experts.

Papers and code:
- Lample et al. *Large Memory Layers with Product Keys* (2019), Sec. 3.2: a query is split in two
  halves, each scored against ``n`` sub-keys; the key of pair ``(i, j)`` is the concatenation of
  sub-keys ``i`` and ``j``, so its score is ``a[i] + b[j]``. The top-k pairs lie among the
  ``k x k`` pairs of each side's top-k, so ``N = n^2`` keys are searched with ``O(n + k^2)`` work.
- He, *Mixture of A Million Experts* (PEER, 2024), Sec. 2: the same retrieval over ``N ~ 10^6``
  single-neuron experts, per head, with a BatchNorm'd query and a softmax over each head's k
  (lucidrains/PEER-pytorch ``PEER.py``): ``PEERRouter``, ``peer_topk``.
- OmniMoE (flash-algo/omni-moe ``OmniMoE_Pytorch``): two BatchNorm'd softmaxes over
  ``n = floor(sqrt(N))``; pair ``(i, j)`` has probability ``p_x[i] p_y[j]``, ranked in log space
  by the same retrieval: ``OmniRouter``, ``omni_topk``.

Expert ``(i, j)`` has flat index ``i * n + j``. Ties are broken by lower index, on each side and
among the candidate sums, so the result is one well-defined total order: descending value, then
ascending flat index. That makes the candidate search exact (proof: if ``i`` is not among side
``a``'s top ``c = min(k, n)``, then ``k`` indices ``i'`` rank ahead of it, and every ``(i', j)``
ranks ahead of ``(i, j)``: a larger sum, or an equal sum and a lower flat index; likewise the pair
at ranks ``(r, s)`` of the two sorted sides has ``(r + 1)(s + 1) - 1`` pairs ahead of it, so only
rank pairs with ``(r + 1)(s + 1) <= k`` are candidates). In floating point two sums with different
summands can round to the same value; the argument then still gives the right *values*, but which
of the rounded-equal pairs comes first may differ from a brute force.

Neither router forms ``[T, N]`` logits or probabilities: their ``Routing`` is COO only.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from moelab.core.checks import float_in, positive_float, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing


@functools.lru_cache(maxsize=64)
def _candidate_ranks_cpu(k: int, c: int) -> tuple[Tensor, Tensor]:
    pairs = [(r, s) for r in range(c) for s in range(c) if (r + 1) * (s + 1) <= k]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def _candidate_ranks(k: int, c: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``[M]`` rank pairs ``(r, s)``, ``r, s < c``, with ``(r + 1)(s + 1) <= k``, row-major."""
    rank_a, rank_b = _candidate_ranks_cpu(k, c)
    return rank_a.to(device), rank_b.to(device)


def _sorted_desc(scores_TC: Tensor) -> tuple[Tensor, Tensor]:
    """Values and indices sorted by value descending, ties by lower index (a stable sort)."""
    return torch.sort(scores_TC, dim=-1, descending=True, stable=True)


def _top_desc(scores_TN: Tensor, c: int, *, scratch: bool = False) -> tuple[Tensor, Tensor]:
    """The first ``c`` of each row in the order (value descending, index ascending), ``[T, c]``.

    The same as ``_sorted_desc(scores)[:, :c]`` without sorting whole rows: ``topk`` finds each
    row's ``c`` largest in descending order; how it orders equal values, and which of several equal
    values at the boundary it takes, is unspecified. A row is exact when its ``c`` values are
    distinct and no entry left out equals the ``c``-th (one ``max`` over the row with the chosen
    entries masked); the rows that fail (ties: rare for real scores) are sorted in full. ``O(n)``
    per row instead of ``O(n log n)``; finding the tied rows costs one device sync on GPU.
    ``scratch=True`` lets the mask write into ``scores_TN`` (a temporary of the caller's; it is
    restored before returning), saving a copy.
    """
    t, n = scores_TN.shape
    if 2 * c >= n:
        value_TN, index_TN = _sorted_desc(scores_TN)
        return value_TN[:, :c], index_TN[:, :c]
    s_TN = scores_TN.detach()
    top_TC, index_TC = torch.topk(s_TN, c, dim=-1)  # sorted descending
    rest_TN = s_TN if scratch else s_TN.clone()
    rest_TN.scatter_(1, index_TC, float("-inf"))
    tied_T = (top_TC[:, :-1] == top_TC[:, 1:]).any(-1) | (rest_TN.amax(-1) == top_TC[:, -1])
    rows = tied_T.nonzero().squeeze(1)
    if scratch:
        rest_TN.scatter_(1, index_TC, top_TC)  # the caller's scores as they were
    if rows.numel():
        index_TC[rows] = _sorted_desc(s_TN[rows])[1][:, :c]
    return scores_TN.gather(1, index_TC), index_TC


def product_key_topk(scores_a_TN: Tensor, scores_b_TN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-``k`` of ``scores_a[t, i] + scores_b[t, j]`` over all ``n * n`` pairs ``(i, j)``.

    Args:
        scores_a_TN: ``[T, n]`` scores of the first sub-key set (float).
        scores_b_TN: ``[T, n]`` scores of the second sub-key set (same shape and dtype).
        k: how many pairs, ``1 <= k <= n * n``. Each side keeps ``min(k, n)`` candidates.

    Returns:
        ``values [T, k]`` (sorted descending; ties by lower flat index) and ``index [T, k]`` long,
        the flat pair index ``i * n + j``. ``values`` are gathered sums, so they carry gradient to
        both score tensors. Exact (see the module docstring): only the ``min(k, n)`` best of each
        side are combined, and of those only the rank pairs ``(r, s)`` with ``(r + 1)(s + 1) <= k``
        (about ``k (1 + ln k)`` sums), never ``[T, n * n]``.
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
    value_a_TC, index_a_TC = _top_desc(scores_a_TN, c)
    value_b_TC, index_b_TC = _top_desc(scores_b_TN, c)
    return product_key_merge(value_a_TC, index_a_TC, value_b_TC, index_b_TC, n, k)


def product_key_merge(
    value_a_TC: Tensor, index_a_TC: Tensor, value_b_TC: Tensor, index_b_TC: Tensor, n: int, k: int
) -> tuple[Tensor, Tensor]:
    """The top-``k`` pairs from each side's best ``c = min(k, n)`` sub-keys (``product_key_topk``'s
    second half): ``value_*_TC`` sorted descending, ties by lower index, and their ``index_*_TC``
    in ``[0, n)``. Returns ``values [T, k]`` (gathered sums, differentiable) and flat ``index [T, k]``."""
    t, c = value_a_TC.shape
    # The candidate sums: rank pairs (r, s) of the two sorted sides with (r + 1)(s + 1) <= k. The
    # pair at ranks (r, s) has (r + 1)(s + 1) - 1 pairs ranking ahead of it (every (r', s') with
    # r' <= r, s' <= s: a sum at least as large, and if equal a lower flat index), so no other pair
    # can be in the top k: about k (1 + ln k) candidates instead of min(k, n)^2.
    rank_a_M, rank_b_M = _candidate_ranks(k, c, value_a_TC.device)
    cand_value_TM = value_a_TC[:, rank_a_M] + value_b_TC[:, rank_b_M]
    cand_index_TM = index_a_TC[:, rank_a_M] * n + index_b_TC[:, rank_b_M]
    # The best k candidates by value: a topk of k + 1 is exact on rows whose k + 1 largest values are
    # distinct; rows with equal values among them are ordered exactly, ties by lower flat index.
    m = cand_value_TM.shape[1]
    top_TK1, best_TK1 = torch.topk(cand_value_TM.detach(), min(k + 1, m), dim=-1)
    best_TK = best_TK1[:, :k].contiguous()
    rows = (top_TK1[:, :-1] == top_TK1[:, 1:]).any(-1).nonzero().squeeze(1)
    if rows.numel():
        best_TK[rows] = _best_by_value_then_index(cand_value_TM[rows].detach(), cand_index_TM[rows], k)
    return cand_value_TM.gather(1, best_TK), cand_index_TM.gather(1, best_TK)


def _best_by_value_then_index(value_RM: Tensor, index_RM: Tensor, k: int) -> Tensor:
    """``[R, k]`` positions of the best ``k`` entries by value descending, ties by lower ``index``."""
    # order by flat index first (indices are distinct); the stable sort by value keeps that among ties
    by_index_RM = index_RM.argsort(dim=-1)
    _, best_RM = _sorted_desc(value_RM.gather(1, by_index_RM))
    return by_index_RM.gather(1, best_RM[:, :k])


# ---------------------------------------------------------------------------------------------------
# Routers over product-key pools: PEER (multi-head product keys) and OmniMoE (Cartesian-product
# router). Both return a COO ``Routing`` over ``N`` experts without ever forming ``[T, N]``.
# ---------------------------------------------------------------------------------------------------


def router_dtype(x: Tensor) -> torch.dtype:
    """The dtype router math runs in: at least fp32 (bf16/fp16 inputs are promoted, float64 kept)."""
    return torch.promote_types(x.dtype, torch.float32)


def batch_norm_rows(
    x_TC: Tensor,
    mean_C: Tensor,
    var_C: Tensor,
    weight_C: Tensor | None = None,
    bias_C: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias``, column-wise over ``[T, C]`` rows.

    BatchNorm's normalisation with the statistics given: the batch's (training) or the running
    ones (eval). ``weight``/``bias`` None: no affine transform (OmniMoE's ``affine=False``).
    """
    y_TC = (x_TC - mean_C) * torch.rsqrt(var_C + eps)
    if weight_C is not None:
        y_TC = y_TC * weight_C
    if bias_C is not None:
        y_TC = y_TC + bias_C
    return y_TC


class RowBatchNorm(nn.Module):
    """``nn.BatchNorm1d`` over the rows (tokens) of ``[T, C]``, with the same buffers and defaults.

    Training: batch mean and biased variance normalise (gradient flows through them); the running
    statistics move by ``momentum`` towards the batch mean and the *unbiased* variance, as
    ``nn.BatchNorm1d`` does. Eval: the running statistics normalise, so each row depends on
    itself alone. Two differences, both ours:

    - fewer than two rows in training (``T = 1``: no batch variance; ``nn.BatchNorm1d`` raises,
      ``T = 0``: it would write NaN into the running statistics): normalise with the running
      statistics, as at eval, and leave them unchanged;
    - the math runs in the input's dtype with the buffers cast to it (the router passes fp32 or
      float64), so a bf16 model keeps fp32 routing.
    """

    def __init__(self, num_features: int, *, affine: bool = True, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = positive_int("num_features", num_features)
        self.eps = positive_float("eps", eps)
        self.momentum = float_in("momentum", momentum, 0.0, 1.0, hi_open=False)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x_TC: Tensor) -> Tensor:
        dtype = x_TC.dtype
        t = x_TC.shape[0]
        if self.training and t >= 2:
            mean_C = x_TC.mean(0)
            var_C = (x_TC - mean_C).square().mean(0)  # (Tensor.var over dim 0 is far slower on CPU)
            with torch.no_grad():
                self.running_mean.lerp_(mean_C.detach().to(self.running_mean.dtype), self.momentum)
                unbiased = var_C.detach() * (t / (t - 1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean_C, var_C = self.running_mean.to(dtype), self.running_var.to(dtype)
        w = None if self.weight is None else self.weight.to(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        return batch_norm_rows(x_TC, mean_C, var_C, w, b, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, affine={self.affine}, eps={self.eps}, momentum={self.momentum}"


class _SubKeyTopC(torch.autograd.Function):
    """``subkey_topc``'s autograd: the forward scores every sub-key, the backward only the chosen."""

    @staticmethod
    def forward(ctx, q_THC: Tensor, keys_HNC: Tensor, c: int) -> tuple[Tensor, Tensor]:
        t, h, _ = q_THC.shape
        n = keys_HNC.shape[1]
        # head-major rows [H, T, n]: one batched GEMM, no transposed copy of the scores
        scores_RN = torch.bmm(q_THC.transpose(0, 1), keys_HNC.transpose(1, 2)).view(h * t, n)
        value_RC, index_RC = _top_desc(scores_RN, c, scratch=True)
        del scores_RN
        ctx.save_for_backward(q_THC, keys_HNC, index_RC)
        ctx.mark_non_differentiable(index_RC)
        return value_RC.view(h, t, c).transpose(0, 1), index_RC.view(h, t, c).transpose(0, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value_THC: Tensor, _grad_index: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        q_THC, keys_HNC, index_RC = ctx.saved_tensors
        t, h, half = q_THC.shape
        n, c = keys_HNC.shape[1], index_RC.shape[1]
        # row r = (head, token) picks sub-keys index_RC[r] of its head: flat rows of [H * n, half]
        offset_R1 = (torch.arange(h, device=index_RC.device) * n).repeat_interleave(t).unsqueeze(1)
        flat_RC = index_RC + offset_R1
        g_RC = grad_value_THC.transpose(0, 1).reshape(h * t, c).to(keys_HNC.dtype)
        keys_flat = keys_HNC.reshape(h * n, half)
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:  # dq[t, h] = sum_j g[t, h, j] keys[h, index_j]
            bag_R = nn.functional.embedding_bag(flat_RC, keys_flat, per_sample_weights=g_RC, mode="sum")
            grad_q = bag_R.view(h, t, half).transpose(0, 1)
        if ctx.needs_input_grad[1]:  # dkeys[h, i] = sum over rows choosing i of g q: the bag's weight gradient
            with torch.enable_grad():
                table = keys_flat.detach().requires_grad_(True)
                bag_R = nn.functional.embedding_bag(flat_RC, table, per_sample_weights=g_RC, mode="sum")
                q_R = q_THC.transpose(0, 1).reshape(h * t, half)
                (grad_flat,) = torch.autograd.grad(bag_R, table, q_R)
            grad_keys = grad_flat.view(h, n, half)
        return grad_q, grad_keys, None


def subkey_topc(q_THC: Tensor, keys_HNC: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Each head's best ``c`` sub-keys for each token: ``q[t, h] . keys[h, i]`` over ``i < n``.

    Args:
        q_THC: ``[T, H, d_half]`` query halves.
        keys_HNC: ``[H, n, d_half]`` sub-keys (one set per head).
        c: how many per (token, head), ``c < n / 2`` for the partial selection (else a full sort).

    Returns ``value [T, H, c]`` (descending, ties by lower index) and ``index [T, H, c]``. The
    backward goes through the ``c`` chosen scores only: ``dq = sum_j g_j keys[i_j]`` and the
    sub-keys' gradient scattered from ``g_j q``, as two ``embedding_bag`` reductions of ``c`` rows
    per (token, head), instead of two ``[T, H, n]`` GEMMs and a zero-filled ``[T, H, n]`` score
    gradient (PEER's scores at ``N = 2^20``: n = 1024 per side, c = 16).
    """
    if q_THC.dim() != 3 or keys_HNC.dim() != 3 or q_THC.shape[1] != keys_HNC.shape[0] or q_THC.shape[2] != keys_HNC.shape[2]:
        raise ValueError(
            f"q_THC must be [T, H, d] and keys_HNC [H, n, d] with the same H and d, got "
            f"{tuple(q_THC.shape)} and {tuple(keys_HNC.shape)}"
        )
    positive_int("c", c)
    if c > keys_HNC.shape[1]:
        raise ValueError(f"c must be <= n = {keys_HNC.shape[1]} (the sub-keys per head), got {c}")
    return _SubKeyTopC.apply(q_THC, keys_HNC, c)


def peer_topk(
    scores_a_THN: Tensor, scores_b_THN: Tensor, k: int, *, non_competing: bool = False
) -> tuple[Tensor, Tensor]:
    """PEER's retrieval: per head, the top-``k`` experts of ``a[h, i] + b[h, j]`` and their weights.

    Args:
        scores_a_THN, scores_b_THN: ``[T, H, n]`` scores of each head's query halves against its
            two sub-key sets.
        k: experts per head, ``1 <= k <= n^2``.
        non_competing: False (paper): ``softmax`` over the ``k`` retrieved scores of each head.
            True (lucidrains/PEER-pytorch's default): ``relu`` of each score, no competition.

    Returns:
        ``weight [T, H*k]`` and ``index [T, H*k]`` (flat ``i * n + j``), head-major: head ``h``'s
        experts are columns ``h*k .. h*k+k-1``, each head's sorted by descending score. Heads are
        independent, so two heads may retrieve the same expert (its weights then add up).
    """
    if scores_a_THN.dim() != 3 or scores_a_THN.shape != scores_b_THN.shape:
        raise ValueError(
            f"scores_a_THN and scores_b_THN must be [T, H, n] of one shape, got "
            f"{tuple(scores_a_THN.shape)} and {tuple(scores_b_THN.shape)}"
        )
    t, h, n = scores_a_THN.shape
    values, index = product_key_topk(scores_a_THN.reshape(t * h, n), scores_b_THN.reshape(t * h, n), k)
    weight = torch.relu(values) if non_competing else torch.softmax(values, dim=-1)
    return weight.reshape(t, h * k), index.reshape(t, h * k)


def omni_topk(logits_x_TN: Tensor, logits_y_TN: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """OmniMoE's Cartesian-product routing: the top-``k`` of ``p_x[i] * p_y[j]`` and those products.

    ``p_x = softmax(logits_x)``, ``p_y = softmax(logits_y)`` over ``n`` each; pair ``(i, j)`` is
    expert ``i * n + j`` with probability ``p_x[i] p_y[j]`` (a distribution over all ``n^2``
    pairs). Ranked in log space, ``log p_x[i] + log p_y[j]``, with ``product_key_topk`` (exact).

    Returns:
        ``weight [T, k] = exp(score)``, the pair probabilities, **not** renormalised over the
        ``k`` (flash-algo/omni-moe); ``index [T, k]`` long.
    """
    lp_x = torch.log_softmax(logits_x_TN, dim=-1)
    lp_y = torch.log_softmax(logits_y_TN, dim=-1)
    values, index = product_key_topk(lp_x, lp_y, k)
    return torch.exp(values), index


class PoolUsage:
    """Which experts of the pool the eval-mode forwards since the last training forward routed to.

    ``metrics()["expert_usage"]``: that fraction of the ``N`` experts (PEER's paper reports it, with
    and without the query BatchNorm), NaN before any eval forward. ``moelab compare`` reads the
    routers' metrics after the final evaluation, so it is the usage over the final val windows. A
    ``[N]`` bool mask, updated per eval forward from the ``T * k`` routed indices.
    """

    _used_N: Tensor | None = None

    def _record_usage(self, index: Tensor) -> None:
        if self.training:
            self._used_N = None
            return
        if self._used_N is None or self._used_N.device != index.device:
            self._used_N = torch.zeros(self.num_experts, dtype=torch.bool, device=index.device)
        self._used_N[index.reshape(-1)] = True

    def metrics(self) -> dict[str, float]:
        used = float("nan") if self._used_N is None else float(self._used_N.sum()) / self.num_experts
        return {"expert_usage": used}


def square_root(num_experts: int) -> int:
    """``n`` with ``n * n == num_experts``, else ``ValueError`` naming ``num_experts``."""
    n = math.isqrt(positive_int("num_experts", num_experts))
    if n * n != num_experts:
        raise ValueError(
            f"num_experts must be a perfect square n^2 (product keys index experts by pairs (i, j) of "
            f"n sub-keys each), got {num_experts}; nearest squares: {n * n} and {(n + 1) ** 2}"
        )
    return n


@register_router(
    "peer",
    paper="He 2024, Mixture of A Million Experts (PEER); lucidrains/PEER-pytorch; Lample et al. 2019 (product keys)",
    summary="multi-head product-key retrieval over N = n^2 experts: per head, BatchNorm'd query, top-k of "
    "sub-key sums, softmax over the k; heads summed (never forms [T, N])",
)
class PEERRouter(PoolUsage, Router):
    """PEER's router (module docstring; docs/methods/peer.md).

    Per head ``h``: ``q_h = BN(W_q x)_h`` (``d_key`` wide), split in halves ``q_h^a, q_h^b``;
    ``a[i] = q_h^a . K^a_{h,i}``, ``b[j] = q_h^b . K^b_{h,j}``; the top-``k`` pairs ``(i, j)`` by
    ``a[i] + b[j]`` (``product_key_topk``, exact) are experts ``i * n + j`` with weights
    ``softmax`` over those ``k`` scores. Every head's ``k`` experts enter the routing: ``H * k``
    entries per token, summed by the layer.

    Args:
        d_model, num_experts: ``d`` and ``N = n^2`` (a perfect square).
        top_k: experts per head ``k``; default 16 (the paper).
        heads: ``H``; default 8 (the paper's and lucidrains' default).
        d_key: each head's query width, split in two halves of ``d_key / 2``; must be even;
            default ``d_model`` rounded up to even (lucidrains: ``dim_key = dim // 2`` per half).
        query_batchnorm: BatchNorm (affine, over ``H * d_key`` channels) on the queries; default
            True (the paper, after Lample et al.'s product-key memory; lucidrains has none).
        non_competing_scores: ``relu`` scores instead of the softmax over each head's ``k``;
            default False (the paper). lucidrains/PEER-pytorch defaults to True *with one expert
            per head* (its per-head count then only sets the candidates per side, which does not
            change an exact top-1): ``top_k=1, non_competing_scores=True`` here.

    Parameters: ``query_weight [H * d_key, d]`` (bias-free, ``nn.Linear`` init), ``query_norm``
    (``RowBatchNorm``), ``sub_keys_a``, ``sub_keys_b`` ``[H, n, d_key / 2]`` (``N(0, 0.02^2)``,
    lucidrains). ``causal_at_eval`` is True: at eval the BatchNorm uses running statistics; in
    training its batch statistics make each token's routing depend on the whole batch.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 16,
        *,
        heads: int = 8,
        d_key: int | None = None,
        query_batchnorm: bool = True,
        non_competing_scores: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.num_keys = square_root(num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.heads = positive_int("heads", heads)
        if d_key is None:
            d_key = d_model + d_model % 2
        self.d_key = positive_int("d_key", d_key)
        if self.d_key % 2:
            raise ValueError(
                f"d_key must be even (each head's query is split into two halves of d_key / 2, one per "
                f"sub-key set), got {d_key}"
            )
        self.query_batchnorm = _flag("query_batchnorm", query_batchnorm)
        self.non_competing_scores = _flag("non_competing_scores", non_competing_scores)
        width = self.heads * self.d_key
        self.query_weight = nn.Parameter(torch.empty(width, d_model))
        # nn.Linear's default init (lucidrains' to_queries is a bias-free nn.Linear)
        nn.init.kaiming_uniform_(self.query_weight, a=math.sqrt(5))
        self.query_norm = RowBatchNorm(width) if self.query_batchnorm else None
        half = self.d_key // 2
        self.sub_keys_a = nn.Parameter(torch.empty(self.heads, self.num_keys, half))
        self.sub_keys_b = nn.Parameter(torch.empty(self.heads, self.num_keys, half))
        nn.init.normal_(self.sub_keys_a, std=0.02)  # lucidrains: keys ~ N(0, 0.02^2)
        nn.init.normal_(self.sub_keys_b, std=0.02)

    def queries(self, x_TD: Tensor) -> Tensor:
        """``[T, H, d_key]`` queries (after the BatchNorm when on), in ``router_dtype(x)``."""
        dtype = router_dtype(x_TD)
        q_TQ = nn.functional.linear(x_TD.to(dtype), self.query_weight.to(dtype))
        if self.query_norm is not None:
            q_TQ = self.query_norm(q_TQ)
        return q_TQ.view(x_TD.shape[0], self.heads, self.d_key)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            q_THK = self.queries(x_TD)
            t, half, k = q_THK.shape[0], self.d_key // 2, self.top_k
            c = min(k, self.num_keys)
            # each side: [T, H, half] x [H, n, half] -> the best c of [T, H, n], never [T, N]; the
            # backward reads only the c chosen sub-keys (subkey_topc); then peer_topk's merge
            value_a, index_a = subkey_topc(q_THK[..., :half], self.sub_keys_a.to(q_THK.dtype), c)
            value_b, index_b = subkey_topc(q_THK[..., half:], self.sub_keys_b.to(q_THK.dtype), c)
            values, index = product_key_merge(
                value_a.reshape(-1, c), index_a.reshape(-1, c), value_b.reshape(-1, c), index_b.reshape(-1, c),
                self.num_keys, k,
            )
            values = values.view(t, self.heads, k)
            weight = torch.relu(values) if self.non_competing_scores else torch.softmax(values, dim=-1)
            weight, index = weight.reshape(t, self.heads * k), index.reshape(t, self.heads * k)
        self._record_usage(index)
        return Routing.from_topk(index, weight, self.num_experts, validate=False)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k} per head, heads={self.heads}, d_key={self.d_key}, "
            f"query_batchnorm={self.query_batchnorm}, non_competing_scores={self.non_competing_scores}"
        )


@register_router(
    "omni",
    paper="OmniMoE (flash-algo/omni-moe, OmniMoE_Pytorch): Cartesian-product router over atomic experts",
    summary="two BatchNorm'd softmaxes over n = floor(sqrt(N)) each; top-K of p_x[i] p_y[j] over pairs, "
    "weights the pair probabilities, not renormalised (never forms [T, N])",
)
class OmniRouter(PoolUsage, Router):
    """OmniMoE's Cartesian-product router (module docstring; docs/methods/omni.md).

    ``a = BN(W_x x)``, ``b = BN(W_y x)`` (``n`` each, BatchNorm without affine); expert
    ``i * n + j`` has probability ``softmax(a)_i softmax(b)_j``; the top-``K`` pairs (exact, from
    ``min(K, n)`` candidates per side) are routed with those probabilities as weights, not
    renormalised.

    Args:
        d_model, num_experts: ``d`` and ``N``. ``n = floor(sqrt(N))`` as the official code: with a
            non-square ``N`` the experts ``n^2 .. N-1`` are never routed to (a warning-free no-op;
            use a square ``N``).
        top_k: ``K``; default 16 (the official README's ``num_experts_per_token``). At most ``n^2``.

    Parameters: ``weight_x``, ``weight_y`` ``[n, d]`` (bias-free ``nn.Linear``'s, official
    ``router_gate_x/y``), ``norm_x``, ``norm_y`` (``RowBatchNorm(n, affine=False)``, official
    ``router_norm_x/y``). ``causal_at_eval`` is True (running statistics at eval; batch statistics
    in training make a token's routing depend on the batch).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 16) -> None:
        super().__init__(d_model, num_experts)
        self.num_keys = math.isqrt(num_experts)
        usable = self.num_keys * self.num_keys
        self.top_k = top_k_in_range(top_k, num_experts)
        if self.top_k > usable:
            raise ValueError(
                f"top_k must be <= floor(sqrt(num_experts))^2 = {usable} (the experts the product of two "
                f"{self.num_keys}-way softmaxes can reach), got {top_k}"
            )
        self.weight_x = nn.Parameter(torch.empty(self.num_keys, d_model))
        self.weight_y = nn.Parameter(torch.empty(self.num_keys, d_model))
        for w in (self.weight_x, self.weight_y):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's default, as the official code
        self.norm_x = RowBatchNorm(self.num_keys, affine=False)
        self.norm_y = RowBatchNorm(self.num_keys, affine=False)

    def side_logits(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """``(a [T, n], b [T, n])``: each side's BatchNorm'd logits, in ``router_dtype(x)``."""
        dtype = router_dtype(x_TD)
        x = x_TD.to(dtype)
        a = self.norm_x(nn.functional.linear(x, self.weight_x.to(dtype)))
        b = self.norm_y(nn.functional.linear(x, self.weight_y.to(dtype)))
        return a, b

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            a, b = self.side_logits(x_TD)
            weight, index = omni_topk(a, b, self.top_k)
        self._record_usage(index)
        return Routing.from_topk(index, weight, self.num_experts, validate=False)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, n={self.num_keys}"


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value
