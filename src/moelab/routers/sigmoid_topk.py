"""Sigmoid top-k with auxiliary-loss-free balancing and group-limited routing (DeepSeek-V3).

Paper: DeepSeek-AI, *DeepSeek-V3 Technical Report* (2024), section 2.1.2; the bias rule is from
Wang et al., *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts* (2024).

- scores ``s = sigmoid(x W^T)``;
- selection by ``top-k(s + b)``, where ``b`` is a per-expert bias that only steers selection;
- gates ``g_i = s_i / sum_selected s`` (normalised), times ``routed_scaling_factor``;
- after every optimizer step, ``b_i <- b_i + gamma * sign(mean_load - load_i)``, gamma = 1e-3,
  outside autograd;
- node/group-limited routing: experts are split into ``num_groups`` groups; a group's score is
  the sum of its two best biased scores; only the best ``topk_groups`` groups are eligible.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moelab.core.checks import float_in, positive_float, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.routers.capacity import SAME_AS_TRAINING, Capacity, token_choice_routing


def group_limited_mask(choice_TE: Tensor, num_groups: int, topk_groups: int) -> Tensor:
    """``[T, E]`` bool: experts inside each token's best ``topk_groups`` groups.

    A group scores the sum of its top-2 ``choice`` values (top-1 if a group has one expert).
    """
    t, e = choice_TE.shape
    grouped = choice_TE.view(t, num_groups, e // num_groups)
    top = min(2, e // num_groups)
    group_score = grouped.topk(top, dim=-1).values.sum(-1)  # [T, G]
    best = group_score.topk(topk_groups, dim=-1).indices  # [T, topk_groups]
    gmask = torch.zeros(t, num_groups, dtype=torch.bool, device=choice_TE.device)
    gmask.scatter_(1, best, True)
    return gmask.unsqueeze(-1).expand(t, num_groups, e // num_groups).reshape(t, e)


def sigmoid_topk(
    logits_TE: Tensor,
    top_k: int,
    expert_bias_E: Tensor | None = None,
    *,
    normalize: bool = True,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSeek-V3 selection. Returns ``(scores [T,E], weight [T,k], index [T,k])``.

    The bias steers selection only; the gates are the unbiased sigmoid scores.
    """
    scores = torch.sigmoid(logits_TE)
    choice = scores if expert_bias_E is None else scores + expert_bias_E
    if num_groups > 1:
        allowed = group_limited_mask(choice, num_groups, topk_groups)
        choice = choice.masked_fill(~allowed, float("-inf"))
    index = torch.topk(choice, top_k, dim=-1).indices
    weight = scores.gather(1, index)
    if normalize:
        weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
    return scores, weight, index


def bias_update(expert_bias_E: Tensor, load_E: Tensor, rate: float) -> Tensor:
    """Aux-loss-free update: ``b + rate * sign(mean(load) - load)``. Returns the new bias."""
    load = load_E.to(expert_bias_E.dtype)
    return expert_bias_E + rate * torch.sign(load.mean() - load)


@register_router(
    "sigmoid_topk",
    paper="DeepSeek-V3 (DeepSeek-AI 2024); Aux-loss-free balancing (Wang et al. 2024)",
    summary="sigmoid scores, bias-steered top-k with sign-rule bias updates, group-limited routing",
)
class SigmoidTopKRouter(Router):
    """DeepSeek-V3's router.

    Args:
        top_k: experts per token; default 2 for small models (DeepSeek-V3 uses 8 of 256).
        normalize: renormalise the selected sigmoid scores (V3: True).
        scale: ``routed_scaling_factor`` (V3: 2.5; default 1.0 for small models, our choice).
        num_groups, topk_groups: group-limited routing (V3: 8 groups, 4 kept; default 1/1 = off).
        bias_update_rate: gamma of the sign rule (V3: 1e-3). 0 disables aux-loss-free balancing.
        capacity_factor, eval_capacity_factor, drop_policy: as in ``TopKRouter`` (V3 is dropless).

    The bias lives in the buffer ``expert_bias`` (fp32). During training forwards the router
    accumulates each expert's load; ``step_end()`` (called by ``moelab.step_end(model)`` after the
    optimizer step) applies the sign rule to the load summed since the last step, all-reduced
    across data-parallel ranks so every replica keeps the same bias.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        normalize: bool = True,
        scale: float = 1.0,
        num_groups: int = 1,
        topk_groups: int = 1,
        bias_update_rate: float = 1e-3,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None | str = SAME_AS_TRAINING,
        drop_policy: str = "batch_priority",
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.normalize = bool(normalize)
        self.scale = positive_float("scale", scale)
        self.num_groups = positive_int("num_groups", num_groups)
        if num_experts % num_groups:
            raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
        self.topk_groups = positive_int("topk_groups", topk_groups)
        if topk_groups > num_groups:
            raise ValueError(f"topk_groups must be <= num_groups={num_groups}, got {topk_groups}")
        if topk_groups * (num_experts // num_groups) < top_k:
            raise ValueError(
                f"top_k={top_k} exceeds the experts in {topk_groups} of {num_groups} groups "
                f"({topk_groups * (num_experts // num_groups)})"
            )
        self.bias_update_rate = float_in("bias_update_rate", bias_update_rate, 0.0, float("inf"))
        self.capacity = Capacity(capacity_factor, eval_capacity_factor, drop_policy)
        self._init_gate(bias=False)
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # Load since the last step_end; not part of the checkpointed state that matters, but kept
        # as a buffer so it moves with the module and resumes exactly.
        self.register_buffer("load_since_step", torch.zeros(num_experts))

    def _apply(self, fn, recurse: bool = True):
        # ``model.to(torch.bfloat16)`` must not cast the bias and the load: a gamma = 1e-3 step
        # is below bf16's resolution near 0.5, and bf16 counts are inexact above 256.
        super()._apply(fn, recurse)
        for name in ("expert_bias", "load_since_step"):
            buf = getattr(self, name)
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits = self.router_logits(x_TD)
        scores, weight, index = sigmoid_topk(
            logits,
            self.top_k,
            self.expert_bias,
            normalize=self.normalize,
            num_groups=self.num_groups,
            topk_groups=self.topk_groups,
        )
        raw = weight
        if self.scale != 1.0:
            weight = weight * self.scale
        if self.training and self.bias_update_rate > 0:
            with torch.no_grad():
                self.load_since_step += torch.bincount(index.reshape(-1), minlength=self.num_experts).float()
        return token_choice_routing(
            index,
            weight,
            self.num_experts,
            logits=logits,
            probs=scores,
            capacity_factor=self.capacity.factor_for(self.training),
            drop_policy=self.capacity.drop_policy,
            priority_TK=raw,
        )

    @torch.no_grad()
    def step_end(self) -> None:
        if self.bias_update_rate == 0:
            return
        load = self.load_since_step.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if load.sum() > 0:
            self.expert_bias.copy_(bias_update(self.expert_bias, load, self.bias_update_rate))
        self.load_since_step.zero_()

    @property
    def causal_at_eval(self) -> bool:
        return self.capacity.dropless_at_eval

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, groups={self.topk_groups}/{self.num_groups}, "
            f"bias_update_rate={self.bias_update_rate}, {self.capacity.describe()}"
        )
