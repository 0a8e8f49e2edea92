"""ReMix: LoRA experts with fixed equal weights, the router trained by RLOO (REINFORCE leave-one-out).

Paper: Qiu et al., *ReMix: Reinforcement Routing for Mixtures of LoRAs in LLM Finetuning*
(ICLR 2026, arXiv 2603.10160; no code published). For a frozen projection ``W0``, ``N`` LoRA
experts and a token ``x``::

    pi(. | x) = softmax(W_g x)                                  the router, a policy over experts
    S         ~ pi, k distinct experts     (training)           top-k of pi   (inference)
    y         = W0 x + sum_{i in S} c * scaling * B_i A_i x     c constant: no learned gate

The weights ``c`` carry no gradient, so the router learns from the loss as a policy: with ``M``
subsets ``S_1..S_M`` sampled for the same batch and rewards ``R_m = -loss(S_m)``,

    grad E[R] ~ (1/M) sum_m (R_m - mean_{m' != m} R_{m'}) grad log pi(S_m | x).

Our choices where the paper summaries are silent (see ``docs/methods/remix.md``):

- **Sampling**: Plackett-Luce, i.e. ``k`` sequential draws without replacement from ``pi``
  renormalised over the experts not yet drawn (drawn at once with the Gumbel top-k trick, Kool
  et al. 2019). ``log pi(S | x)`` is the probability of that ordered draw,
  ``sum_j [z_{i_j} - logsumexp(z over experts not in i_1..i_{j-1})]``: the draw order is the
  action, the reward depends on the set only, so REINFORCE on it stays unbiased.
- **c = 1/k** (``expert_weight``; the paper calls it a constant): the mixture is the mean of the
  chosen experts, so its scale does not change with ``k``.
- **Rewards per sequence** when ``loss_fn`` returns per-sequence losses ``[B]``, the policy's log
  probability of a sequence being the sum over its tokens and over every ReMix layer; one reward
  per batch when it returns a scalar.
- **The policy gradient trains only the routers**: ``log pi`` is taken on the layer input
  detached, so the surrogate never reaches the LoRA experts through later layers' inputs (they
  learn from the loss, pathwise).

``ReMixRouter`` (registered router ``remix``) does the sampling; ``ReMixLoRA`` is ``RoutedLoRA``
with it; ``remix_rloo_step`` runs the ``M`` sampled forwards and returns the loss and the RLOO
surrogate; ``effective_num_experts`` / ``router_effective_num_experts`` measure ESS = 1/sum w^2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import positive_float, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.lora.layer import RoutedLoRA
from moelab.lora.presets import MIXTURE_PRESETS, MixturePreset

REMIX_TOP_K = 2  # our choice (the MoLE baseline's k; PAPERS.md: "choose k")
REMIX_NUM_SAMPLES = 4  # M, our choice (the paper's M was not found; RLOO needs M >= 2)
SAMPLING_MODES = ("auto", "sample", "topk")


# ---------------------------------------------------------------------------------- pure math
def plackett_luce_log_prob(logits_TE: Tensor, index_TK: Tensor) -> Tensor:
    """``[T]``: ``log pi(i_1, ..., i_k | x)`` of the ordered draw ``index [T, k]`` without
    replacement from ``softmax(logits)``: ``sum_j [z_{i_j} - logsumexp(z over the experts not in
    i_1..i_{j-1})]`` (Plackett-Luce). Differentiable in ``logits``."""
    if logits_TE.dim() != 2 or index_TK.dim() != 2 or index_TK.shape[0] != logits_TE.shape[0]:
        raise ValueError(
            f"logits must be [T, E] and index [T, k] with the same T, got {tuple(logits_TE.shape)} "
            f"and {tuple(index_TK.shape)}"
        )
    logits_TE = logits_TE.float()
    chosen_TK = logits_TE.gather(1, index_TK)
    drawn_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
    total_T = logits_TE.new_zeros(logits_TE.shape[0])
    for j in range(index_TK.shape[1]):
        remaining_TE = logits_TE.masked_fill(drawn_TE, float("-inf"))
        total_T = total_T + chosen_TK[:, j] - torch.logsumexp(remaining_TE, dim=1)
        drawn_TE = drawn_TE.scatter(1, index_TK[:, j : j + 1], True)
    return total_T


def sample_without_replacement(logits_TE: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """``[T, k]`` long: per token, ``k`` distinct experts drawn in order without replacement from
    ``softmax(logits)`` (Plackett-Luce), by the Gumbel top-k trick: the top-k of ``z + Gumbel``
    is such a draw, in draw order (Kool, van Hoof, Welling, ICML 2019)."""
    if logits_TE.dim() != 2:
        raise ValueError(f"logits must be [T, E], got {tuple(logits_TE.shape)}")
    k = top_k_in_range(k, logits_TE.shape[1])
    u = torch.rand(logits_TE.shape, generator=generator, device=logits_TE.device, dtype=torch.float32)
    gumbel_TE = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    return torch.topk(logits_TE.detach().float() + gumbel_TE, k, dim=1).indices


def rloo_advantages(rewards_MB: Tensor) -> Tensor:
    """``[M, B]``: ``R_m - mean_{m' != m} R_{m'}`` for each column (the leave-one-out baseline;
    Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free"). Needs ``M >= 2``."""
    if rewards_MB.dim() != 2 or rewards_MB.shape[0] < 2:
        raise ValueError(f"rewards must be [M, B] with M >= 2 samples, got {tuple(rewards_MB.shape)}")
    m = rewards_MB.shape[0]
    others_MB = (rewards_MB.sum(0, keepdim=True) - rewards_MB) / (m - 1)
    return rewards_MB - others_MB


def rloo_surrogate(losses_MB: Tensor, log_probs_MB: Tensor) -> Tensor:
    """Scalar whose gradient is the RLOO estimate of ``grad E[loss]`` through the policy, averaged
    over the ``B`` columns: ``-(1/(M B)) sum_{m,b} A_mb log pi(S_mb)`` with the advantages
    ``A = rloo_advantages(-losses)`` held constant. Minimising it ascends the reward ``-loss``.

    Args:
        losses_MB: ``[M, B]`` the loss of each sample ``m`` and sequence ``b`` (detached here).
        log_probs_MB: ``[M, B]`` ``log pi(S_mb | x)`` of the sampled subsets (with grad).
    """
    if losses_MB.shape != log_probs_MB.shape:
        raise ValueError(
            f"losses and log_probs must have the same [M, B] shape, got {tuple(losses_MB.shape)} "
            f"and {tuple(log_probs_MB.shape)}"
        )
    advantages_MB = rloo_advantages(-losses_MB.detach().float())
    return -(advantages_MB * log_probs_MB.float()).mean()


def effective_num_experts(weights: Tensor | Routing) -> Tensor:
    """ESS = ``1 / sum_e w_e^2`` per token, averaged over tokens (a scalar tensor).

    ``weights``: ``[..., E]`` combine weights (a dense routing) or a ``Routing`` (its ``dense()``
    view). Each token's weights are first normalised to sum to 1, so ESS counts experts: ``k``
    for ``k`` equal weights (ReMix), 1 when one expert carries all the weight. Tokens with no
    weight (dropped) are left out; 0 when there is none.
    """
    if isinstance(weights, Routing):
        weights = weights.dense()
    if not isinstance(weights, Tensor) or weights.dim() < 1 or not weights.is_floating_point():
        raise TypeError(f"weights must be a float tensor [..., E] or a moelab Routing, got {weights!r:.80}")
    if weights.shape[-1] == 0:
        raise ValueError(
            f"weights must have E >= 1 experts in its last dimension, got {tuple(weights.shape)}"
        )
    w_TE = weights.detach().float().abs().reshape(-1, weights.shape[-1])
    total_T = w_TE.sum(1)
    kept_TE = w_TE[total_T > 0] / total_T[total_T > 0, None]
    if kept_TE.shape[0] == 0:
        return w_TE.new_zeros(())
    return (1.0 / kept_TE.square().sum(1)).mean()


def router_effective_num_experts(distribution: Tensor | Routing) -> Tensor:
    """ESS of a router's full distribution ``pi(. | x)`` over all ``E`` experts, averaged over
    tokens: ``probs [..., E]``, or a ``Routing`` (its ``probs``, else ``softmax(logits)``). A
    softmax router whose mass collapses onto one expert gives 1; a uniform one gives ``E``."""
    if isinstance(distribution, Routing):
        probs = distribution.probs
        if probs is None and distribution.logits is not None:
            probs = torch.softmax(distribution.logits.float(), dim=-1)
        if probs is None:
            raise ValueError("router_effective_num_experts: the routing carries neither probs nor logits")
        distribution = probs
    return effective_num_experts(distribution)


# ---------------------------------------------------------------------------------- the router
@register_router(
    "remix",
    paper="ReMix (Qiu et al., ICLR 2026, arXiv 2603.10160)",
    summary="k experts sampled without replacement from softmax(Wx) (top-k at eval), each with a fixed "
    "equal weight; trained by RLOO (moelab.lora.remix_rloo_step)",
)
class ReMixRouter(Router):
    """ReMix's router: ``k`` distinct experts per token, each with the constant weight ``c``.

    Args:
        d_model, num_experts: ``d`` and ``N``.
        top_k: ``k`` experts per token; default 2 (our choice).
        expert_weight: ``c``; default (None) ``1 / k`` (our choice: the paper says "constant").
        mode: ``"auto"`` samples in training and takes the top-k of ``pi`` in eval (the paper);
            ``"sample"`` / ``"topk"`` force one.
        bias: a learnable logit bias (default False).

    Each routing carries ``logits`` and ``probs = pi`` (fp32, computed on the detached input: the
    weights are constants, so only ``log pi`` needs a gradient, and it trains the router alone).
    While ``recording`` (``remix_rloo_step``) each sampling forward appends
    ``(log pi(S | x) [T], batch_shape)`` to ``self.recorded``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = REMIX_TOP_K,
        *,
        expert_weight: float | None = None,
        mode: str = "auto",
        bias: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.expert_weight = (
            1.0 / self.top_k if expert_weight is None else positive_float("expert_weight", expert_weight)
        )
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode must be one of {SAMPLING_MODES}, got {mode!r}")
        self.mode = mode
        self.recorded: list[tuple[Tensor, tuple[int, int] | None]] | None = None
        self._last_probs: Tensor | None = None
        self._init_gate(bias)

    @property
    def sampling(self) -> bool:
        """Whether the next forward samples (else it takes the top-k of ``pi``)."""
        return self.mode == "sample" or (self.mode == "auto" and self.training)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        logits_TE = self.router_logits(x_TD.detach())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        num_tokens, k = x_TD.shape[0], self.top_k
        if self.sampling:
            index_TK = sample_without_replacement(logits_TE, k)
            if self.recorded is not None:
                self.recorded.append((plackett_luce_log_prob(logits_TE, index_TK), ctx.batch_shape))
        else:
            index_TK = torch.topk(logits_TE, k, dim=1).indices
        self._last_probs = probs_TE.detach()
        # Constant weights: no gradient reaches the router through the forward (the paper's point).
        weight = torch.full((num_tokens * k,), self.expert_weight, device=x_TD.device, dtype=torch.float32)
        token_index = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
        return Routing(
            token_index=token_index,
            expert_index=index_TK.reshape(-1),
            weight=weight,
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            logits=logits_TE,
            probs=probs_TE,
            top_k=k,
            validate=False,
        )

    def metrics(self) -> dict[str, float]:
        """``routing_ess`` (ESS of the weights used: ``k``) and ``router_ess`` (ESS of ``pi``, mean
        over the last forward's tokens)."""
        out = {"routing_ess": float(self.top_k)}
        if self._last_probs is not None and self._last_probs.shape[0]:
            out["router_ess"] = float(effective_num_experts(self._last_probs))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, expert_weight={self.expert_weight:g}, mode={self.mode!r}"


# ---------------------------------------------------------------------------------- the preset and layer
REMIX_PRESET = MixturePreset(
    name="remix",
    paper="ReMix (Qiu et al., ICLR 2026, arXiv 2603.10160; no code published)",
    summary="k LoRA experts with fixed equal weights, sampled from softmax(Wx) in training (top-k at "
    "inference); router trained by RLOO with reward -loss over M sampled subsets",
    router="remix",
    top_k=REMIX_TOP_K,
)
# A hook into the shared preset table (presets.py is not ours to edit): ``apply(method="remix")``
# and ``RoutedLoRA(method="remix")`` resolve through MIXTURE_PRESETS.
MIXTURE_PRESETS.setdefault("remix", REMIX_PRESET)
registry.register("lora", "remix", paper=REMIX_PRESET.paper, summary=REMIX_PRESET.summary)(
    MIXTURE_PRESETS["remix"]
)


class ReMixLoRA(RoutedLoRA):
    """``RoutedLoRA`` with a ``ReMixRouter``: ``y = W0 x + b + sum_{i in S} c * scaling * B_i A_i x``.

    Args:
        base, num_experts, rank, alpha, dropout, backend, dispatcher, check_finite: as ``RoutedLoRA``.
        top_k: ``k``; default 2 (our choice).
        expert_weight: ``c``; default ``1 / k`` (our choice).
        mode: the router's ``"auto"`` (sample in training, top-k in eval), ``"sample"`` or ``"topk"``.
        aux_losses, aux_loss_kwargs: extra losses on the routing (default none: ReMix has none).

    ``moelab.lora.apply(model, targets, method="remix")`` builds the same layers as plain
    ``RoutedLoRA`` with a ``remix`` router (what ``remix_rloo_step`` looks for is the router).
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int,
        rank: int,
        *,
        top_k: int = REMIX_TOP_K,
        expert_weight: float | None = None,
        mode: str = "auto",
        alpha: float | None = None,
        dropout: float = 0.0,
        aux_losses: dict[str, float] | None = None,
        aux_loss_kwargs: dict[str, dict] | None = None,
        backend: str = "auto",
        dispatcher: Any = "local",
        check_finite: bool = False,
    ) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch nn.Linear, got {type(base).__name__}")
        num_experts = positive_int("num_experts", num_experts)
        router = ReMixRouter(base.in_features, num_experts, top_k, expert_weight=expert_weight, mode=mode)
        super().__init__(
            base,
            num_experts,
            rank,
            alpha=alpha,
            dropout=dropout,
            router=router,
            top_k=top_k,
            aux_losses=aux_losses,
            aux_loss_kwargs=aux_loss_kwargs,
            method="remix",
            backend=backend,
            dispatcher=dispatcher,
            check_finite=check_finite,
        )


# ---------------------------------------------------------------------------------- RLOO training step
def remix_routers(model: nn.Module) -> dict[str, ReMixRouter]:
    """``{qualified name: ReMixRouter}`` of ``model`` (``model`` itself included), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, ReMixRouter)}


@contextmanager
def recording(routers: dict[str, ReMixRouter]) -> Iterator[dict[str, list]]:
    """Make each router keep ``(log pi(S | x), batch_shape)`` of its sampling forwards while the
    block runs; yields ``{name: the router's list}`` (the caller may clear them between forwards).
    The previous state comes back on exit."""
    before = {name: r.recorded for name, r in routers.items()}
    for r in routers.values():
        r.recorded = []
    try:
        yield {name: r.recorded for name, r in routers.items()}
    finally:
        for name, r in routers.items():
            r.recorded = before[name]


def _sequence_log_probs(records: dict[str, list], num_columns: int | None, device: torch.device) -> Tensor:
    """``[B]`` (or ``[1]`` when ``num_columns`` is None): the log probability of one forward's
    sampled subsets, summed over tokens of each sequence and over every router's record."""
    total = torch.zeros(1 if num_columns is None else num_columns, device=device)
    count = 0
    for name, entries in records.items():
        for log_prob_T, batch_shape in entries:
            count += 1
            if num_columns is None:
                total = total + log_prob_T.sum().to(device)
                continue
            if batch_shape is None or batch_shape[0] != num_columns:
                raise ValueError(
                    f"loss_fn returned {num_columns} per-sequence losses, but router {name!r} routed "
                    f"{log_prob_T.shape[0]} tokens with batch shape {batch_shape}; return a scalar "
                    "loss for one reward per batch, or feed the model [B, S] inputs"
                )
            total = total + log_prob_T.view(batch_shape).sum(1).to(device)
    if count == 0:
        raise ValueError(
            "remix_rloo_step: no ReMix router sampled during loss_fn(model, batch); put the model in "
            "training mode (model.train()) or set the routers' mode='sample', and make loss_fn run the model"
        )
    return total


def remix_rloo_step(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    num_samples: int = REMIX_NUM_SAMPLES,
) -> tuple[Tensor, Tensor]:
    """Run ``num_samples`` (``M``) forwards of ``loss_fn(model, batch)``, each with fresh subsets
    (sampled per token per ReMix layer, fixed within one forward), and return
    ``(loss, router_surrogate)``; train on ``(loss + router_surrogate).backward()``.

    - ``loss``: the mean of the ``M`` losses, with the graph: its gradient trains the LoRA experts
      (each forward's experts are its sample's), and nothing reaches the routers (constant weights).
    - ``router_surrogate``: ``rloo_surrogate(losses, log_probs)``. Its gradient is the RLOO
      estimator of ``grad E[loss]`` for the routers:
      ``-(1/M) sum_m (R_m - mean_{m' != m} R_{m'}) grad log pi(S_m | x)``, ``R = -loss``, averaged
      over sequences. Its value is not a loss to report.

    ``loss_fn`` returns per-sequence losses ``[B]`` (one reward per sequence; ``log pi`` of a
    sequence sums its tokens' over every ReMix layer: the model's inputs must be ``[B, S, ...]``)
    or a scalar (one reward for the batch). The ``M`` graphs are kept until backward.
    """
    routers = remix_routers(model)
    if not routers:
        raise ValueError(
            f"model: this {type(model).__name__} has no ReMix router (moelab.lora.apply(..., method='remix') "
            "or ReMixLoRA layers)"
        )
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable (model, batch) -> loss tensor, got {type(loss_fn).__name__}"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(
            f"num_samples must be an int >= 2 (RLOO needs a leave-one-out baseline), got {num_samples!r}"
        )
    losses, log_probs, shape = [], [], None
    with recording(routers) as records:
        for _ in range(num_samples):
            for entries in records.values():
                entries.clear()
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or loss.dim() > 1:
                raise ValueError(
                    "loss_fn must return a scalar tensor or per-sequence losses [B], got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, Tensor) else ''}"
                )
            if shape is not None and loss.shape != shape:
                raise ValueError(f"loss_fn returned shape {tuple(loss.shape)}, earlier {tuple(shape)}")
            shape = loss.shape
            columns = None if loss.dim() == 0 else loss.shape[0]
            log_probs.append(_sequence_log_probs(records, columns, loss.device))
            losses.append(loss.reshape(-1))
    losses_MB = torch.stack(losses)
    return losses_MB.mean(), rloo_surrogate(losses_MB, torch.stack(log_probs))
