"""Softmax top-k routing: Switch (k=1), GShard (k=2), Mixtral (renormalised), DeepSeek-V2 (not).

Papers:
- Fedus, Zoph, Shazeer. *Switch Transformers* (JMLR 2022): k=1, gate = p_i, router in fp32,
  multiplicative jitter U(1-eps, 1+eps) with eps=1e-2, capacity factor 1.0-1.25 train / 2.0 eval.
- Lepikhin et al. *GShard* (ICLR 2021): k=2, gates renormalised over the two, the second expert
  dispatched with probability proportional to its gate (mesh-tensorflow ``second_policy="random"``).
- Jiang et al. *Mixtral of Experts* (2024): k=2, softmax over the top-k logits (= renormalised).
- DeepSeek-AI. *DeepSeek-V2* (2024): top-k of the full softmax, not renormalised, times a
  routed scaling factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.checks import float_in, positive_float, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.routers.capacity import SAME_AS_TRAINING, Capacity, token_choice_routing

SECOND_EXPERT_POLICIES = ("all", "sampling")


def softmax_topk(logits_TE: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax, then top-k. Returns ``(probs [T,E], weight [T,k], index [T,k])``.

    ``normalize=True`` divides the k weights by their sum (Mixtral/GShard); ``False`` keeps the
    raw probabilities (Switch, DeepSeek-V2).
    """
    probs = torch.softmax(logits_TE, dim=-1)
    weight, index = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return probs, weight, index


def sample_second_expert(
    weight_TK: Tensor, threshold: float = 0.5, generator: torch.Generator | None = None
) -> Tensor:
    """GShard's stochastic second expert: ``[T, k]`` bool keep mask.

    With the top-2 gates renormalised to ``g1 + g2 = 1``, the second expert is kept with
    probability ``min(1, g2 / threshold)`` (mesh-tensorflow's "random" policy, whose default
    threshold is 0.2; threshold 0.5 gives ``2*g2``, the rule of fairseq's GShard gate). The first expert is always kept; with k > 2 the rule applies to every slot after
    the first, each against its own renormalised gate.
    """
    g = weight_TK / weight_TK.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    u = torch.rand(g.shape, generator=generator, device=g.device, dtype=g.dtype)
    keep = u < g / max(threshold, 1e-9)
    keep[:, 0] = True
    return keep


@register_router(
    "topk",
    paper="Switch (Fedus et al. 2022); GShard (Lepikhin et al. 2021); Mixtral (Jiang et al. 2024); DeepSeek-V2 (2024)",
    summary="softmax top-k: k=1 Switch, k=2 GShard/Mixtral; renormalised or not; jitter; capacity",
)
class TopKRouter(Router):
    """Token-choice softmax top-k router.

    Args:
        d_model, num_experts: input width ``d`` and ``E``.
        top_k: experts per token (``k``); default 2 (GShard, Mixtral).
        normalize: renormalise the k gates to sum to 1. Default (None): True for k > 1
            (Mixtral, GShard), False for k = 1 (Switch, where a renormalised single gate is 1
            and the router would get no gradient from the task loss).
        scale: multiply the gates (DeepSeek-V2's ``routed_scaling_factor``); default 1.0.
        jitter: multiplicative input noise ``x * U(1-eps, 1+eps)`` in training (Switch uses 1e-2);
            default 0 (off).
        second_expert_policy: ``"all"`` keeps every chosen expert; ``"sampling"`` keeps slots
            after the first stochastically in training (GShard). Default ``"all"``.
        second_expert_threshold: the sampling threshold; 0.5 keeps the second expert with
            probability ``2*g2`` (fairseq's GShard gate; mesh-tensorflow defaults to 0.2).
        capacity_factor: per-expert capacity ``ceil(cf * T * k / E)`` in training; None is
            dropless (default, as in Mixtral/DeepSeek).
        eval_capacity_factor: the same at eval time; ``"same"`` (default) uses
            ``capacity_factor``, None evaluates dropless. Switch uses 1.0-1.25 in training and
            2.0 at eval.
        drop_policy: which requests an over-full expert keeps: ``"batch_priority"`` (default;
            V-MoE / ST-MoE), ``"probs"`` (Megatron) or ``"position"`` (GShard); see
            ``moelab.routers.capacity``.
        bias: add a learnable bias to the logits (default False, as in all four papers).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        normalize: bool | None = None,
        scale: float = 1.0,
        jitter: float = 0.0,
        second_expert_policy: str = "all",
        second_expert_threshold: float = 0.5,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None | str = SAME_AS_TRAINING,
        drop_policy: str = "batch_priority",
        bias: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.normalize = (top_k > 1) if normalize is None else bool(normalize)
        self.scale = positive_float("scale", scale)
        self.jitter = float_in("jitter", jitter, 0.0, 1.0)
        if second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, got {second_expert_policy!r}"
            )
        self.second_expert_policy = second_expert_policy
        self.second_expert_threshold = positive_float("second_expert_threshold", second_expert_threshold)
        self.capacity = Capacity(capacity_factor, eval_capacity_factor, drop_policy)
        self._init_gate(bias)

    # Presets named after the papers, so a comparison script reads like the literature.
    @classmethod
    def switch(cls, d_model: int, num_experts: int, **kw) -> TopKRouter:
        """Switch Transformer: k = 1, jitter 1e-2, capacity factor 1.25 in training and 2.0 at eval.

        With k = 1 the three drop policies differ only in which tokens an over-full expert keeps;
        the preset uses ``"position"``, the token order of Switch's mesh-tensorflow dispatch.
        """
        kw = {
            "top_k": 1,
            "normalize": False,
            "jitter": 1e-2,
            "capacity_factor": 1.25,
            "eval_capacity_factor": 2.0,
            "drop_policy": "position",
            **kw,
        }
        return cls(d_model, num_experts, **kw)

    @classmethod
    def gshard(cls, d_model: int, num_experts: int, **kw) -> TopKRouter:
        """GShard: k = 2 renormalised, sampled second expert, capacity ``2T/E`` in GShard's terms
        (a per-token factor of 2, which is ``capacity_factor = 1.0`` in moelab's ``cf * T * k / E``),
        first-come ``"position"`` drops."""
        kw = {"second_expert_policy": "sampling", "capacity_factor": 1.0, "drop_policy": "position", **kw}
        return cls(d_model, num_experts, top_k=2, normalize=True, **kw)

    @classmethod
    def mixtral(cls, d_model: int, num_experts: int, **kw) -> TopKRouter:
        return cls(d_model, num_experts, top_k=kw.pop("top_k", 2), normalize=True, **kw)

    @classmethod
    def deepseek_v2(cls, d_model: int, num_experts: int, top_k: int = 6, **kw) -> TopKRouter:
        return cls(d_model, num_experts, top_k=top_k, normalize=False, **kw)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        logits = self.router_logits(x_TD)
        probs, weight, index = softmax_topk(logits, self.top_k, self.normalize)
        raw = weight
        if self.scale != 1.0:
            weight = weight * self.scale
        keep = None
        if self.training and self.second_expert_policy == "sampling" and self.top_k > 1:
            keep = sample_second_expert(weight.detach(), self.second_expert_threshold)
        return token_choice_routing(
            index,
            weight,
            self.num_experts,
            logits=logits,
            probs=probs,
            capacity_factor=self.capacity.factor_for(self.training),
            drop_policy=self.capacity.drop_policy,
            keep_TK=keep,
            priority_TK=raw,
        )

    @property
    def causal_at_eval(self) -> bool:
        return self.capacity.dropless_at_eval

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, normalize={self.normalize}, {self.capacity.describe()}"
