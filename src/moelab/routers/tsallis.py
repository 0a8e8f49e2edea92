"""DynMoLE's hybrid router: top-p routing, widened to every expert for uncertain tokens, judged by
Tsallis entropy; and its Tsallis entropy loss.

Paper and code: Li et al., *DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning with a Hybrid
Routing Mechanism* (2025); official code mikecovlee/DynMoLE,
``moe_peft/adapters/dynmole/{model,config}.py`` (``_dynamic_routing``,
``_dynamic_load_balancing_loss_func``) and ``moe_peft/common/moe_utils.py`` (``tsallis_entropy``),
which this module follows:

- ``p = softmax(W_g h)``; sort ``p`` descending and keep the experts whose cumulative sum is
  ``<= top_p``, and always the ``keep_top_k`` most probable;
- ``S_q(p)`` is the Tsallis entropy of ``p + eps``, divided by its maximum over ``E`` experts
  (``(1 - E^(1-q)) / (q - 1)``), so it lies in ``[0, 1]``; a token with ``S_q > threshold``
  activates **every** expert (only when ``threshold < 1``: the code's guard);
- the gates are ``p * mask``, not renormalised;
- training adds ``dyn_coef * mean_t S_q(p_t)`` (``dyn_coef = 1e-2``) to the loss: the loss
  ``tsallis_entropy`` below, plus a Switch-style balance term (``aux_coef = 1e-3``).

Defaults from the code's ``DynMoleConfig.from_config``: ``entropy_threshold=0.9``, ``q=1.1``,
``eps=1e-5``, ``keep_top_k=2``, ``top_p=0.75``. The router works on any bank (DynMoLE's experts
are LoRA adapters; here they are whatever the layer's bank holds).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.checks import float_in, positive_float, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.losses.entropy import tsallis_entropy
from moelab.routers.dynamoe import mask_routing


# --------------------------------------------------------------------------------- pure functions
def tsallis_topp(
    probs_TE: Tensor,
    top_p: float = 0.75,
    keep_top_k: int = 2,
    entropy_threshold: float = 0.9,
    q: float = 1.1,
    *,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """DynMoLE's hybrid routing decision. Returns ``(mask [T, E] bool, entropy [T])``.

    Sorted descending, an expert is kept when the cumulative probability up to and including it
    is ``<= top_p``; the ``keep_top_k`` most probable are always kept (ties: lower index first);
    ``top_p = 1`` keeps every expert (the float32 cumsum can exceed 1 by round-off: ours).
    ``entropy = tsallis_entropy(probs, q, normalize=True, eps=eps)``; when
    ``entropy_threshold < 1``, tokens with ``entropy > entropy_threshold`` keep every expert (the
    code's guard: a threshold ``>= 1``, ``inf`` included, turns broadcasting off).
    """
    if not isinstance(probs_TE, Tensor) or probs_TE.dim() != 2:
        got = tuple(probs_TE.shape) if isinstance(probs_TE, Tensor) else type(probs_TE).__name__
        raise ValueError(f"probs_TE must be a [T, E] tensor, got {got}")
    e = probs_TE.shape[1]
    top_p = float_in("top_p", top_p, 0.0, 1.0, hi_open=False)
    keep_top_k = top_k_in_range(keep_top_k, e, "keep_top_k")
    entropy_threshold = _threshold(entropy_threshold)
    p = probs_TE.detach()
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    if top_p >= 1.0:  # cumsum <= 1 holds for every expert; float round-off must not drop the tail
        keep_sorted = torch.ones_like(sorted_p, dtype=torch.bool)
    else:
        keep_sorted = sorted_p.cumsum(-1) <= top_p
    keep_sorted[:, :keep_top_k] = True
    mask = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    entropy = tsallis_entropy(probs_TE, q, normalize=True, eps=eps)
    if entropy_threshold < 1.0:
        mask = mask | (entropy.detach() > entropy_threshold)[:, None]
    return mask, entropy


def _threshold(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value <= 0:
        raise ValueError(f"entropy_threshold must be a number > 0 (inf: never broadcast), got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------- the router
@register_router(
    "tsallis_topp",
    paper="DynMoLE (Li et al. 2025); official code mikecovlee/DynMoLE moe_peft/adapters/dynmole",
    summary="softmax top-p (>= top_k kept); all experts when the Tsallis entropy exceeds a threshold; gates p*mask",
)
class TsallisTopPRouter(Router):
    """DynMoLE's hybrid router (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: the fewest experts a token keeps (the code's ``keep_top_k``); default 2 (code).
        top_p: cumulative-probability budget; default 0.75 (code).
        entropy_threshold: normalised Tsallis entropy above which a token activates every
            expert; default 0.9 (code); ``>= 1`` (e.g. ``inf``) never broadcasts.
        q: the Tsallis entropic index; default 1.1 (code's ``entropy_index``).
        eps: added to ``p`` inside the entropy; default 1e-5 (code).
        normalize: renormalise the kept gates to sum to 1; default False (the code gates with
            ``p * mask``).

    ``metrics()`` gives, over the training forwards since the last call, the mean number of
    experts per token and the fraction of tokens that activated every expert.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        top_p: float = 0.75,
        entropy_threshold: float = 0.9,
        q: float = 1.1,
        eps: float = 1e-5,
        normalize: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.top_p = float_in("top_p", top_p, 0.0, 1.0, hi_open=False)
        self.entropy_threshold = _threshold(entropy_threshold)
        self.q = positive_float("q", q)
        self.eps = float_in("eps", eps, 0.0, 1.0)
        self.normalize = bool(normalize)
        self._sums: Tensor | None = None  # [active experts, broadcast tokens], on the device
        self._tokens = 0
        # The code's kaiming_uniform_(a=sqrt(router_init_range=5.0)) is nn.Linear's init: ours too.
        self._init_gate()

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits = self.router_logits(x_TD)
        probs = torch.softmax(logits, dim=-1)
        mask, _ = tsallis_topp(probs, self.top_p, self.top_k, self.entropy_threshold, self.q, eps=self.eps)
        weight = probs * mask
        if self.normalize:
            weight = weight / weight.sum(-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        if self.training:
            self._record(mask)
        return mask_routing(mask, weight, logits=logits, probs=probs)

    def _record(self, mask_TE: Tensor) -> None:
        counts = mask_TE.sum(-1)
        s = torch.stack([counts.sum(), (counts == mask_TE.shape[1]).sum()])
        self._sums = s if self._sums is None else self._sums + s
        self._tokens += mask_TE.shape[0]

    def metrics(self) -> dict[str, float]:
        """``{"mean_active_experts", "all_experts_fraction"}`` over the training forwards since
        the last call (NaN if none). Resets the count."""
        out = {"mean_active_experts": float("nan"), "all_experts_fraction": float("nan")}
        if self._sums is not None and self._tokens:
            active, everyone = self._sums.tolist()
            out = {
                "mean_active_experts": active / self._tokens,
                "all_experts_fraction": everyone / self._tokens,
            }
        self._sums, self._tokens = None, 0
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, top_p={self.top_p}, "
            f"entropy_threshold={self.entropy_threshold}, q={self.q}"
        )
