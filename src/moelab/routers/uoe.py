"""Union of Experts' patch-wise data selection: per token a top-k mask, then per sequence each
expert takes its best-scored tokens, up to a capacity.

Paper and code: Yang, Lian and Li, *Union of Experts: Adapting Hierarchical Routing to Equivalently
Decomposed Transformer* (arXiv 2503.02495, 2025); official code YujiaoYang-work/UoE,
``language_modeling/model/mlp/UoME_DS.py`` (``SwitchGate``, ``preprocess``, ``U_MLP``), which this
router follows. With ``x`` the layer input ``[B, S, d]``:

    p = softmax(W_r x + b_r)                              [B, S, E]   (per token, over experts)
    m = p * topk_mask_k(p)                                            (k of E experts per token)
    score = m / (sum_b m + eps)                                       (over the batch: ``normalize``)
    max_len = min(S, ceil(capacity * S * k / E))
    expert e, sequence b: the max_len positions s of largest score[b, s, e]

The official gate multiplies ``score`` by ``int(capacity * B)``, a positive constant that leaves
the ranking unchanged (omitted). ``U_MLP`` hard-codes ``max_len = int(S * 0.5)``, which is the
formula above at its configuration (``E = 4, k = 2, capacity = 1``); ``ceil`` keeps one token at
``S = 1``. Its ``topk`` ranks every position, those with score 0 (tokens that did not choose the
expert) included, so an expert always takes ``max_len`` tokens per sequence, its choosers first
(``pad_to_capacity=True``, the default); ``pad_to_capacity=False`` keeps only its choosers.

The gate only *selects*: the official code never multiplies the expert outputs by it, so the
routing's weights are 1 and no gradient reaches the router through the output (there is no
auxiliary loss either: ``SwitchGate``'s ``use_aux_loss`` branch is empty, so the official router
keeps its initial weights). ``scale_by_gate=True`` weights each output by ``p`` (our option),
which trains the router through the output; an auxiliary loss on ``routing.probs`` also trains it.

Where the official model runs it: Transformer-XL's decoder hands ``U_MLP`` its ``[S, B, d]``
layout, so in the WikiText-103 / LM1B runs the "sequence" axis of the code above is the batch:
each expert picks, at each position, ``max_len`` of the ``B`` sequences, and the scores are
normalised over positions. ``axis="batch"`` runs that variant; ``axis="sequence"`` (default) is
the paper's and the code's stated per-sequence selection.

Not causal: a token's selection depends on the other tokens of its sequence (later ones
included) and, through the normalisation, on the other sequences of the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moelab.core.checks import positive_float, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing

AXES = ("sequence", "batch")


def uoe_capacity(length: int, top_k: int, num_experts: int, capacity: float = 1.0) -> int:
    """``max_len = min(L, ceil(capacity * L * k / E))``: tokens one expert takes per sequence.

    ``L`` is the length of the axis the expert selects along (the sequence length). The official
    ``U_MLP`` uses ``int(L * 0.5)``, this formula at ``k / E = 1/2``, capacity 1.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    c = capacity * length * top_k / num_experts
    # Float rounding must not add a slot (as expert_choice_capacity).
    return min(length, int(math.ceil(c - 1e-9 * max(1.0, c))))


def uoe_scores(
    probs_PLE: Tensor, top_k: int, *, normalize: bool = True, eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """The official ``SwitchGate``: ``(score [P, L, E], mask [P, L, E] bool)``.

    ``probs_PLE``: per-token expert probabilities laid out ``[P, L, E]`` with ``L`` the axis each
    expert selects along and ``P`` the other one (``[B, S, E]`` for per-sequence selection).
    ``mask`` marks each token's ``top_k`` experts; ``score = probs * mask``, divided by its sum over
    ``P`` plus ``eps`` when ``normalize`` (the official gate's "sum(0)"; the constant factor
    ``int(capacity * P)`` is left out since it changes no ranking).
    """
    if not isinstance(probs_PLE, Tensor) or probs_PLE.dim() != 3:
        got = tuple(probs_PLE.shape) if isinstance(probs_PLE, Tensor) else type(probs_PLE).__name__
        raise ValueError(f"probs_PLE must be a [P, L, E] tensor, got {got}")
    top_k_in_range(top_k, probs_PLE.shape[-1])
    index = torch.topk(probs_PLE, top_k, dim=-1).indices
    mask = torch.zeros(probs_PLE.shape, dtype=torch.bool, device=probs_PLE.device).scatter_(-1, index, True)
    score = probs_PLE * mask
    if normalize:
        score = score / (score.sum(0, keepdim=True) + eps)
    return score, mask


def patchwise_select(
    score_PLE: Tensor, mask_PLE: Tensor, max_len: int, *, pad_to_capacity: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Each expert's ``max_len`` best positions in each row: ``(row [N], position [N], expert [N])``.

    For every row ``p`` and expert ``e`` the positions ``l`` are ranked by ``mask`` first (tokens
    that chose ``e``), then by ``score`` (descending), then by position (ascending, our tie rule:
    the official ``topk`` leaves ties to the device); the first ``max_len`` are kept. Without
    ``pad_to_capacity`` only positions with ``mask`` are kept, so an expert takes fewer when fewer
    chose it. Entries are ordered by row, then expert, then rank.
    """
    if score_PLE.dim() != 3 or mask_PLE.shape != score_PLE.shape:
        raise ValueError(
            f"score_PLE and mask_PLE must both be [P, L, E], got {tuple(score_PLE.shape)} and {tuple(mask_PLE.shape)}"
        )
    p, length, e = score_PLE.shape
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 0 <= max_len <= length:
        raise ValueError(f"max_len must be an int in [0, {length}], got {max_len!r}")
    # scores are >= 0, so -1 puts every non-chooser after every chooser
    key_PEL = torch.where(mask_PLE, score_PLE, -1.0).permute(0, 2, 1)
    rank_PEM = torch.sort(key_PEL, dim=-1, descending=True, stable=True).indices[..., :max_len]
    row = torch.arange(p, device=score_PLE.device).view(p, 1, 1).expand_as(rank_PEM)
    expert = torch.arange(e, device=score_PLE.device).view(1, e, 1).expand_as(rank_PEM)
    if pad_to_capacity:
        return row.reshape(-1), rank_PEM.reshape(-1), expert.reshape(-1)
    keep = mask_PLE.permute(0, 2, 1).gather(-1, rank_PEM)
    return row[keep], rank_PEM[keep], expert[keep]


@register_router(
    "uoe_select",
    paper="Union of Experts (Yang et al. 2025, arXiv 2503.02495); YujiaoYang-work/UoE UoME_DS.py",
    summary="per-token top-k mask, then per sequence each expert takes its top ceil(c*S*k/E) tokens; "
    "unweighted (gate selects only); non-causal",
)
class UoESelectRouter(Router):
    """UoE's patch-wise data selection (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``.
        top_k: experts each token marks (official config: 2 of 4).
        capacity: scales ``max_len = ceil(capacity * S * k / E)`` (official config: 1.0).
        pad_to_capacity: an expert always takes ``max_len`` tokens per sequence, non-choosers after
            its choosers (official ``topk`` over all positions, default); False: choosers only.
        normalize: divide the masked scores by their sum over the other axis (the batch for
            per-sequence selection), as the official gate; default True. False ranks by ``p``.
        scale_by_gate: weight each expert output by the token's softmax probability ``p`` of that
            expert (our option); default False: weight 1, the official gate only selects.
        axis: ``"sequence"`` (default: each expert selects within each sequence) or ``"batch"``
            (within each position, across the batch: what the official Transformer-XL runs do).
        eps: the normalisation's epsilon (official: 1e-8).
        gate_bias: the gate ``nn.Linear(d, E)`` has a bias (official: yes), initialised as
            ``nn.Linear``'s (uniform within ``1/sqrt(d)``).

    A ``[T, d]`` input without ``ctx.batch_shape`` is one sequence (``B = 1``). The routing is
    COO (``top_k=None``); ``requested`` counts, per expert, what it took plus the choosers it
    dropped.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity: float = 1.0,
        pad_to_capacity: bool = True,
        normalize: bool = True,
        scale_by_gate: bool = False,
        axis: str = "sequence",
        eps: float = 1e-8,
        gate_bias: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.capacity = positive_float("capacity", capacity)
        for name, value in (
            ("pad_to_capacity", pad_to_capacity),
            ("normalize", normalize),
            ("scale_by_gate", scale_by_gate),
            ("gate_bias", gate_bias),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        self.pad_to_capacity = pad_to_capacity
        self.normalize = normalize
        self.scale_by_gate = scale_by_gate
        self.axis = axis
        self.eps = positive_float("eps", eps)
        self._init_gate(bias=gate_bias)
        if self.bias is not None:
            # nn.Linear(d, E)'s default bias, as the official gate: it never trains there, so
            # its random start is part of the routing
            bound = 1 / math.sqrt(d_model)
            nn.init.uniform_(self.bias, -bound, bound)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        t, e = x_TD.shape[0], self.num_experts
        b, s = _batch_shape(t, ctx)
        logits = self.router_logits(x_TD)
        probs = torch.softmax(logits, dim=-1)
        with torch.no_grad():  # selection only: no gradient through the ranking
            probs_PLE = probs.detach().view(b, s, e)
            if self.axis == "batch":
                probs_PLE = probs_PLE.transpose(0, 1)
            score, mask = uoe_scores(probs_PLE, self.top_k, normalize=self.normalize, eps=self.eps)
            max_len = uoe_capacity(probs_PLE.shape[1], self.top_k, e, self.capacity)
            row, pos, expert = patchwise_select(score, mask, max_len, pad_to_capacity=self.pad_to_capacity)
            # back to flat token ids: token = b * S + s
            token = row * s + pos if self.axis == "sequence" else pos * s + row
            taken = torch.bincount(expert, minlength=e)
            chosen_taken = torch.bincount(expert[mask[row, pos, expert]], minlength=e)
            requested = taken + mask.sum((0, 1)) - chosen_taken
        weight = probs[token, expert] if self.scale_by_gate else probs.new_ones(token.shape[0])
        return Routing(
            token_index=token,
            expert_index=expert,
            weight=weight,
            num_tokens=t,
            num_experts=e,
            logits=logits,
            probs=probs,
            requested=requested,
            validate=False,
        )

    @property
    def causal_at_eval(self) -> bool:
        return False  # each expert ranks a whole sequence (and the batch normalises the scores)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, capacity={self.capacity}, "
            f"pad_to_capacity={self.pad_to_capacity}, normalize={self.normalize}, "
            f"scale_by_gate={self.scale_by_gate}, axis={self.axis!r}"
        )


def _batch_shape(num_tokens: int, ctx: RoutingContext) -> tuple[int, int]:
    """``(B, S)`` of the routed tokens: the context's, or one sequence of all ``T`` tokens."""
    if ctx.batch_shape is None:
        return 1, num_tokens
    b, s = ctx.batch_shape
    if b * s != num_tokens:
        raise ValueError(f"ctx.batch_shape={ctx.batch_shape} does not match the {num_tokens} routed tokens")
    return b, s
