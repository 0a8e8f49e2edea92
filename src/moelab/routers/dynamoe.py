"""DynaMoE: a per-token number of experts, capped by a per-layer capacity that follows a schedule
over depth.

Paper: Gülmez, *DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive Capacity
for Mixture-of-Experts Neural Networks* (arXiv 2603.01697, 2026). No code was found; the spec is
the abstract plus third-party notes (PAPERS.md section 6):

- each token ``t`` gets ``k_t`` experts, ``k_min <= k_t <= k_max^l``, chosen by thresholding its
  softmax gate probabilities ("percentile-thresholded gating"; the exact formula was not found);
- the layer capacity ``k_max^l`` follows a schedule over depth: uniform, descending, ascending,
  pyramid (peak in the middle), wave, and a sixth one (sources disagree; ours is "valley").

Our choices (docs/methods/dynamoe.md): the three thresholding rules of ``dynamic_topk``, linear
schedules rounded half up, the wave's period, and renormalising the kept gates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moelab.core.checks import float_in, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing

SCHEDULES = ("uniform", "descending", "ascending", "pyramid", "valley", "wave")
RULES = ("threshold", "percentile", "batch_percentile")


# --------------------------------------------------------------------------------- pure functions
def schedule_shape(name: str, num_layers: int, *, wave_period: int = 2) -> list[float]:
    """Each layer's place between the low (0) and high (1) capacity, for schedule ``name``.

    ``l = 0 .. L-1`` over the routed layers, ``u = l / (L - 1)``:
    uniform 1; descending ``1 - u``; ascending ``u``; pyramid ``min(l, L-1-l) / floor((L-1)/2)``
    (1 at the middle layer(s), 0 at both ends); valley ``1 - pyramid``; wave
    ``(1 + cos(2 pi l / wave_period)) / 2`` (high at layer 0; period 2 alternates high, low).
    A single layer is at 1 for every schedule (an unlinked router is the only routed layer), and
    so are both layers of a two-layer pyramid or valley (no middle to peak at).
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    n = positive_int("num_layers", num_layers)
    period = positive_int("wave_period", wave_period)
    if period < 2:
        raise ValueError(f"wave_period must be >= 2 layers, got {period}")
    if n == 1 or name == "uniform":
        return [1.0] * n
    if name == "descending":
        return [1.0 - i / (n - 1) for i in range(n)]
    if name == "ascending":
        return [i / (n - 1) for i in range(n)]
    if name in ("pyramid", "valley"):
        half = (n - 1) // 2
        if half == 0:  # two layers: no middle, both are ends and peaks alike
            return [1.0] * n
        peak = [min(i, n - 1 - i) / half for i in range(n)]
        return peak if name == "pyramid" else [1.0 - s for s in peak]
    return [(1.0 + math.cos(2.0 * math.pi * i / period)) / 2.0 for i in range(n)]  # wave


def capacity_schedule(
    name: str, num_layers: int, k_low: int, k_high: int, *, wave_period: int = 2
) -> list[int]:
    """``k_max^l`` for ``l = 0 .. L-1``: ``k_low + round_half_up((k_high - k_low) * s_l)`` with
    ``s_l = schedule_shape(name, L)``. ``capacity_schedule("descending", 4, 1, 4) == [4, 3, 2, 1]``.
    """
    k_low = positive_int("k_low", k_low)
    k_high = positive_int("k_high", k_high)
    if k_low > k_high:
        raise ValueError(f"k_low must be <= k_high ({k_high}), got {k_low}")
    span = k_high - k_low
    # round(..., 9) first: cos() leaves 0.4999999999 where the exact value is 1/2.
    return [
        k_low + math.floor(round(span * s, 9) + 0.5)
        for s in schedule_shape(name, num_layers, wave_period=wave_period)
    ]


def rule_threshold(probs_TE: Tensor, rule: str, value: float) -> Tensor:
    """``[T, 1]`` (or ``[1, 1]``) threshold ``tau`` that an expert's probability must reach.

    - ``"threshold"``: ``tau = value`` (a probability);
    - ``"percentile"``: ``tau_t`` = the ``value``-th percentile (0-100) of token ``t``'s own ``E``
      probabilities, linearly interpolated between order statistics (numpy's default);
    - ``"batch_percentile"``: ``tau`` = the ``value``-th percentile of all ``T * E`` probabilities
      of the batch (one threshold for every token: non-causal).
    """
    if rule == "threshold":
        return probs_TE.new_full((1, 1), float(value))
    if rule == "percentile":
        return _percentile(probs_TE, value)
    if rule == "batch_percentile":
        return _percentile(probs_TE.reshape(1, -1), value)
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def _percentile(rows_TN: Tensor, q: float) -> Tensor:
    """Each row's ``q``-th percentile (linear interpolation), ``[T, 1]``. Sorting, not
    ``torch.quantile``, which refuses inputs over 2^24 elements."""
    n = rows_TN.shape[-1]
    s = torch.sort(rows_TN, dim=-1).values
    pos = q / 100.0 * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[:, lo : lo + 1] + (pos - lo) * (s[:, hi : hi + 1] - s[:, lo : lo + 1])


def dynamic_topk(probs_TE: Tensor, rule: str, value: float, k_min: int, k_max: int) -> Tensor:
    """DynaMoE's per-token expert choice: ``[T, E]`` bool mask.

    ``n_t`` = the number of experts with ``p_te >= tau`` (``rule_threshold``), ``k_t =
    clamp(n_t, k_min, k_max)``, and token ``t`` keeps its ``k_t`` most probable experts (ties go to
    the lower expert index). Every rule keeps a top set of the token's probabilities, so the
    clipping only changes how many: too few are topped up, too many cut.
    """
    if not isinstance(probs_TE, Tensor) or probs_TE.dim() != 2:
        got = tuple(probs_TE.shape) if isinstance(probs_TE, Tensor) else type(probs_TE).__name__
        raise ValueError(f"probs_TE must be a [T, E] tensor, got {got}")
    t, e = probs_TE.shape
    k_min = top_k_in_range(k_min, e, "k_min")
    k_max = top_k_in_range(k_max, e, "k_max")
    if k_min > k_max:
        raise ValueError(f"k_min must be <= k_max ({k_max}), got {k_min}")
    _check_rule_value(rule, value)
    p = probs_TE.detach()
    if t == 0:
        return torch.zeros(0, e, dtype=torch.bool, device=p.device)
    count_T = (p >= rule_threshold(p, rule, value)).sum(-1).clamp(k_min, k_max)
    order_TE = torch.sort(p, dim=-1, descending=True, stable=True).indices
    keep_sorted = torch.arange(e, device=p.device) < count_T[:, None]
    return torch.zeros_like(keep_sorted).scatter(1, order_TE, keep_sorted)


def _check_rule_value(rule: str, value: object) -> float:
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "threshold":
        return float_in("value", value, 0.0, 1.0, hi_open=False)
    return float_in("value", value, 0.0, 100.0, hi_open=False)


def mask_routing(
    mask_TE: Tensor, weight_TE: Tensor, *, logits: Tensor | None = None, probs: Tensor | None = None
) -> Routing:
    """A plain COO ``Routing`` (``top_k=None``) of the ``True`` entries of ``mask_TE``, token-major,
    with combine weights ``weight_TE`` at those entries."""
    token_index, expert_index = mask_TE.nonzero(as_tuple=True)
    return Routing(
        token_index=token_index,
        expert_index=expert_index,
        weight=weight_TE[token_index, expert_index],
        num_tokens=mask_TE.shape[0],
        num_experts=mask_TE.shape[1],
        logits=logits,
        probs=probs,
        validate=False,
    )


# --------------------------------------------------------------------------------- the router
@register_router(
    "dynamoe",
    paper="DynaMoE (Gülmez 2026, arXiv 2603.01697); thresholding rule and sixth schedule are ours",
    summary="softmax; per-token k_t in [k_min, k_max^l] by thresholding; k_max^l from a depth schedule",
)
class DynaMoERouter(Router):
    """DynaMoE's router (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: the highest layer capacity ``k_high`` of the schedule (uniform: every layer's
            ``k_max``); default 2 (``moelab.MoE`` passes its ``top_k``).
        schedule: ``k_max^l`` over the routed layers: one of ``SCHEDULES``; default "uniform".
        k_low: the lowest layer capacity of a non-uniform schedule; default 1 (the paper's
            per-token minimum).
        k_min: the fewest experts a token gets; default 1 (the paper).
        rule: ``"threshold"`` (default, our choice), ``"percentile"`` or ``"batch_percentile"``
            (``rule_threshold``).
        value: the rule's parameter: a probability for ``"threshold"`` (default ``1 / E``: keep
            the experts above the uniform probability; ours), a percentile 0-100 for the others
            (default 75; ours).
        normalize: renormalise the kept gates to sum to 1 per token; default True (ours).
        wave_period: the wave schedule's period in layers; default 2 (ours).

    ``metrics()`` gives the mean number of experts per token over the training forwards since the
    last call, and this layer's capacity.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        schedule: str = "uniform",
        k_low: int = 1,
        k_min: int = 1,
        rule: str = "threshold",
        value: float | None = None,
        normalize: bool = True,
        wave_period: int = 2,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.k_low = top_k_in_range(k_low, num_experts, "k_low")
        self.k_min = top_k_in_range(k_min, num_experts, "k_min")
        if self.k_low > self.top_k:
            raise ValueError(f"k_low must be <= top_k ({self.top_k}), got {self.k_low}")
        if self.k_min > self.k_low:
            raise ValueError(f"k_min must be <= k_low ({self.k_low}), got {self.k_min}")
        self.schedule = schedule
        self.wave_period = wave_period
        schedule_shape(schedule, 1, wave_period=wave_period)  # checks both
        if value is None:
            value = 1.0 / num_experts if rule == "threshold" else 75.0
        self.value = _check_rule_value(rule, value)
        self.rule = rule
        self.normalize = bool(normalize)
        self.position, self.num_layers = 0, 1
        self.capacity = self.top_k  # k_max^l; an unlinked router is the only routed layer
        self._active_sum: Tensor | None = None
        self._active_tokens = 0
        self._init_gate()

    def link(self, position: int, layers: Sequence[nn.Module]) -> None:
        self.position, self.num_layers = position, len(layers)
        caps = capacity_schedule(
            self.schedule, len(layers), self.k_low, self.top_k, wave_period=self.wave_period
        )
        self.capacity = caps[position]

    @property
    def causal_at_eval(self) -> bool:
        # One percentile over the whole batch makes a token's count depend on the other tokens.
        return self.rule != "batch_percentile"

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits = self.router_logits(x_TD)
        probs = torch.softmax(logits, dim=-1)
        mask = dynamic_topk(probs, self.rule, self.value, self.k_min, self.capacity)
        weight = probs * mask
        if self.normalize:
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        if self.training:
            self._record(mask)
        return mask_routing(mask, weight, logits=logits, probs=probs)

    def _record(self, mask_TE: Tensor) -> None:
        n = mask_TE.sum()  # stays on the device: no sync per forward
        self._active_sum = n if self._active_sum is None else self._active_sum + n
        self._active_tokens += mask_TE.shape[0]

    def metrics(self) -> dict[str, float]:
        """``{"mean_active_experts", "capacity"}``: experts per token over the training forwards
        since the last call (NaN if none), and ``k_max^l``. Resets the count."""
        mean = float("nan")
        if self._active_sum is not None and self._active_tokens:
            mean = float(self._active_sum) / self._active_tokens
        self._active_sum, self._active_tokens = None, 0
        return {"mean_active_experts": mean, "capacity": float(self.capacity)}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, schedule={self.schedule!r}, "
            f"capacity={self.capacity}, rule={self.rule!r}, value={self.value:g}"
        )
