"""MoFME's uncertainty-aware router (UaR), made well defined: Monte-Carlo dropout on the router.

Paper and code: Zhang et al., *Efficient Deweather Mixture-of-Experts with Uncertainty-aware
Feature-wise Linear Modulation* (MoFME, AAAI 2024, arXiv 2312.16610); official code
RoyZry98/MoFME-Pytorch ``models/moe/film.py`` (``Transformer_MoE_FiLM.forward``, 522deb82).

The router itself is MoFME's: ``Linear(d, E)`` (with bias) -> KeepTopK (the other logits set to
``-inf``) -> softmax, i.e. softmax top-k renormalised over the k chosen experts. The paper wants
"well-calibrated" router weights from several samples of the router (the code draws 5 during
training and whitens their deviations by their covariance). As released, that sampling is
degenerate (docs/methods/uar.md has the details): the router has no randomness, so the 5
samples are the same tensor, their covariance is 0 and the whitened deviations are
floating-point rounding blown up by ``(0 + 1e-5 I)^-1``; the sample list is never reset, so
layer ``i`` averages the samples of layers ``0..i``; and its ``einsum`` subscripts only match
when batch size, tokens and experts agree (it raises otherwise).

What this router does instead (Gal & Ghahramani 2016, MC dropout), per token, in training:

    z_s = W (m_s ⊙ x) / (1 - p) + b,  m_s ~ Bernoulli(1 - p)^d       s = 1..S   (S = 5, the code's)
    p_s = softmax(z_s)                                                (full distribution per sample)
    p̄ = (1/S) Σ_s p_s,   σ_e = sqrt( Σ_s (p_{s,e} - p̄_e)² / (S - 1) )    (mean and spread per expert)
    chosen = topk(p̄ - κ σ, k)   ("lcb")   or   topk(p̄, k)   ("mean", default)
    w_e = p̄_e / Σ_{e' ∈ chosen} p̄_{e'}    for e in chosen            (KeepTopK -> softmax on p̄)

``logits`` of the routing are the mean of the ``z_s`` (the deterministic logits in expectation);
``probs`` are ``p̄``. At eval the router is deterministic (``z = W x + b``), exactly MoFME's
router, unless ``mc_eval=True``. With ``dropout = 0`` it is MoFME's router in training too (one
pass, no sampling). Every sample of a token depends on that token alone: causal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.core.checks import float_in, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing

COMBINES = ("mean", "lcb")


def mc_dropout_logits(
    x_TD: Tensor, weight_ED: Tensor, bias_E: Tensor | None, samples: int, dropout: float
) -> Tensor:
    """``[S, T, E]`` logits of ``S`` Monte-Carlo dropout samples of a linear router.

    Sample ``s`` drops each input feature of each token independently with probability
    ``dropout`` (inverted dropout: survivors scaled by ``1 / (1 - dropout)``), then applies the
    gate: ``W (m_s ⊙ x) / (1 - p) + b``. Dropping input feature ``j`` of a token is dropping column
    ``j`` of ``W`` for that token: MC dropout of the router's weights, one draw per token and sample.
    """
    samples = positive_int("samples", samples)
    dropout = float_in("dropout", dropout, 0.0, 1.0)
    return torch.stack(
        [
            torch.nn.functional.linear(torch.nn.functional.dropout(x_TD, dropout, training=True), weight_ED, bias_E)
            for _ in range(samples)
        ]
    )


def uar_combine(
    probs_STE: Tensor, top_k: int, combine: str = "mean", kappa: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Combine ``S`` sampled router distributions ``[S, T, E]`` into a top-k routing.

    Returns ``(mean [T, E], std [T, E], weight [T, k], index [T, k])``: the Monte-Carlo mean
    ``p̄`` and the per-expert sample standard deviation ``σ`` (``S - 1`` in the denominator; 0 when
    ``S = 1``; detached: it selects experts, it is not trained through); the experts, the top-k of ``p̄`` (``"mean"``) or of ``p̄ - kappa σ`` (``"lcb"``: a
    lower confidence bound, preferring experts the samples agree on); their weights, ``p̄`` at the
    chosen experts renormalised to sum to 1 (MoFME's KeepTopK -> softmax applied to ``p̄``).
    """
    if not isinstance(probs_STE, Tensor) or probs_STE.dim() != 3:
        got = tuple(probs_STE.shape) if isinstance(probs_STE, Tensor) else type(probs_STE).__name__
        raise ValueError(f"probs_STE must be a [S, T, E] tensor, got {got}")
    top_k = top_k_in_range(top_k, probs_STE.shape[-1])
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    kappa = float_in("kappa", kappa, 0.0, float("inf"))
    mean = probs_STE.mean(0)
    s = probs_STE.shape[0]
    with torch.no_grad():  # std only selects (sqrt has no gradient at 0); written out, as torch.std
        # over the leading dim is a slow strided reduction on CPU
        std = ((probs_STE - mean).square().sum(0) / (s - 1)).sqrt() if s > 1 else torch.zeros_like(mean)
    score = mean.detach() if combine == "mean" else mean.detach() - kappa * std
    index = torch.topk(score, top_k, dim=-1).indices
    chosen = mean.gather(-1, index)
    weight = chosen / chosen.sum(-1, keepdim=True).clamp_min(torch.finfo(chosen.dtype).tiny)
    return mean, std, weight, index


@register_router(
    "uar",
    paper="MoFME uncertainty-aware router (Zhang et al., AAAI 2024, arXiv 2312.16610); MC dropout (Gal & Ghahramani 2016)",
    summary="linear (bias) -> KeepTopK -> softmax; in training the mean of S MC-dropout samples (top-k of the mean or of mean - kappa*std)",
)
class UncertaintyAwareRouter(Router):
    """MoFME's router with Monte-Carlo dropout sampling in training (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: experts per token; default 2 (MoFME runs k in {2, 4}).
        samples: ``S``, dropout samples per training forward; default 5 (the official
            ``estimate_time``).
        dropout: probability of dropping a router input feature; default 0.1 (our choice: the
            paper does not give one; 0 makes the router MoFME's deterministic one).
        combine: ``"mean"`` (default: top-k of the MC mean) or ``"lcb"`` (top-k of
            ``mean - kappa * std``); the weights are the renormalised mean in both.
        kappa: the ``"lcb"`` width in standard deviations; default 1.0 (our choice).
        mc_eval: also sample at eval (calibrated but random routing); default False
            (deterministic: the official eval path).
        bias: a bias on the gate; default True (the official ``nn.Linear(dim, num_expert)``).

    ``metrics()`` reports, for the last training forward: ``uar_std``, the mean over tokens of
    ``σ`` at the chosen experts, and ``uar_disagreement``, the share of (sample, token) pairs
    whose sample's top-1 expert differs from the mean's.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        samples: int = 5,
        dropout: float = 0.1,
        combine: str = "mean",
        kappa: float = 1.0,
        mc_eval: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.samples = positive_int("samples", samples)
        self.dropout = float_in("dropout", dropout, 0.0, 1.0)
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.combine = combine
        self.kappa = float_in("kappa", kappa, 0.0, float("inf"))
        if not isinstance(mc_eval, bool):
            raise TypeError(f"mc_eval must be a bool, got {mc_eval!r}")
        self.mc_eval = mc_eval
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        self._init_gate(bias)
        self._last: dict[str, float] = {}

    def sampling(self) -> bool:
        """Whether this forward draws MC-dropout samples (training, or eval with ``mc_eval``)."""
        return (self.training or self.mc_eval) and self.dropout > 0

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        if not self.sampling():
            logits = self.router_logits(x_TD)
            mean, std, weight, index = uar_combine(torch.softmax(logits, -1)[None], self.top_k)
        else:
            with torch.autocast(device_type=x_TD.device.type, enabled=False):  # fp32, as router_logits
                b = None if self.bias is None else self.bias.float()
                logits_STE = mc_dropout_logits(x_TD.float(), self.weight.float(), b, self.samples, self.dropout)
            probs_STE = torch.softmax(logits_STE, -1)
            mean, std, weight, index = uar_combine(probs_STE, self.top_k, self.combine, self.kappa)
            logits = logits_STE.mean(0)
            if self.training:
                self._record(probs_STE, mean, std, index)
        return Routing.from_topk(index, weight, self.num_experts, logits=logits, probs=mean, validate=False)

    @torch.no_grad()
    def _record(self, probs_STE: Tensor, mean: Tensor, std: Tensor, index: Tensor) -> None:
        if mean.shape[0] == 0:
            self._last = {}
            return
        top1 = mean.argmax(-1)
        self._last = {
            "uar_std": float(std.gather(-1, index).mean()),
            "uar_disagreement": float((probs_STE.argmax(-1) != top1).float().mean()),
        }

    def metrics(self) -> dict[str, float]:
        return dict(self._last)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, samples={self.samples}, dropout={self.dropout}, "
            f"combine={self.combine!r}, mc_eval={self.mc_eval}"
        )
