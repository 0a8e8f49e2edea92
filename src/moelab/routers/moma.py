"""MoMa: modality-aware experts, expert choice with a sigmoid router inside each modality group.

Paper: Lin et al., *MoMa: Efficient Early-Fusion Pre-training with Mixture of Modality-Aware
Experts* (2024, arXiv:2407.21770), Sec. 2.2-2.4. Reimplementation read: KempnerForge
``kempnerforge/model/moma.py`` (``ExpertChoiceSigmoidRouter``: Eq. 1 and the Gumbel-sigmoid of
Eq. 5). No official code.

- **Modality groups.** The ``E`` experts are split into one group per token type (text, image):
  group ``g`` owns the contiguous experts ``[o_g, o_g + E_g)``. A token of type ``g`` is only ever
  routed inside group ``g`` (deterministic first level).
- **Expert choice, sigmoid.** Inside a group, scores ``s = sigmoid(x W_gᵀ)`` (independent per
  expert); each expert takes the ``C_g = ceil(c_e * T_g)`` tokens of its group with the largest
  scores, ``c_e = capacity_factor / E_g`` (paper: ``c_e = 1/4`` with 4 experts, i.e.
  ``capacity_factor = 1``, one expert per token on average); a token's output is the
  score-weighted sum of the experts that chose it, and a token no expert chose rides the residual.
- **Gumbel-sigmoid** in training only: ``sigmoid(z + G' - G'')`` with independent Gumbel(0, 1)
  ``G', G''`` (Eq. 5); it perturbs the selection and the gates alike.
- **Causal inference.** Expert choice ranks the whole batch, later tokens included, so it is not
  causal. MoMa trains auxiliary routers that predict, from the token alone, whether each expert
  of its group selects it: here one linear classifier per expert on the detached input
  (stop-gradient), binary cross-entropy against the expert-choice selection (``routing.aux
  ["moma_predictor"]``). In eval mode with ``causal_inference=True`` the predictor selects
  (``sigmoid > threshold``) and the router's clean sigmoid score gates: routing is then causal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.core.checks import float_in, positive_float, positive_int
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.routers.expert_choice import expert_choice, expert_choice_capacity

PREDICTOR_AUX = "moma_predictor"  # the name of the predictor's BCE in ``Routing.aux``


# --------------------------------------------------------------------------------- token types
def require_token_types(ctx: RoutingContext, num_tokens: int, who: str) -> Tensor:
    """``ctx.token_types`` as a ``[T]`` long tensor, or a ``ValueError`` naming it.

    Token-type routers (``moma``, ``promoe``) cannot route without them: ``MoELM.forward(ids,
    token_types=[B, S])`` sets them, a lone layer takes ``RoutingContext(token_types=...)``.
    """
    types = ctx.token_types
    if types is None:
        raise ValueError(
            f"{who} routes by token type and needs ctx.token_types ([T] = [{num_tokens}] long); pass "
            "token_types=[B, S] to MoELM.forward, or ctx=RoutingContext(token_types=...) to the layer"
        )
    if (
        not isinstance(types, Tensor)
        or types.dim() != 1
        or types.shape[0] != num_tokens
        or types.is_floating_point()
        or types.dtype == torch.bool
        or types.is_complex()
    ):
        got = (
            f"{types.dtype} of shape {tuple(types.shape)}"
            if isinstance(types, Tensor)
            else type(types).__name__
        )
        raise ValueError(f"{who}: ctx.token_types must be a [T] = [{num_tokens}] integer tensor, got {got}")
    return types.long()


# --------------------------------------------------------------------------------- pure functions
def gumbel_sigmoid(logits: Tensor) -> Tensor:
    """``sigmoid(z + G' - G'')`` with independent Gumbel(0, 1) noises (MoMa Eq. 5)."""
    tiny = torch.finfo(logits.dtype).tiny

    def gumbel() -> Tensor:
        u = torch.rand_like(logits).clamp(tiny, 1.0 - 1e-7)  # no log(0), no log(-log(1)) = -inf
        return -torch.log(-torch.log(u))

    return torch.sigmoid(logits + gumbel() - gumbel())


def group_expert_ids(group_sizes: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """``[E]`` long: the group of each expert (groups own contiguous blocks, in order)."""
    sizes = torch.as_tensor(list(group_sizes), dtype=torch.long, device=device)
    return torch.arange(len(group_sizes), device=device).repeat_interleave(sizes)


def modality_expert_choice(
    scores_TE: Tensor, group_T: Tensor, group_sizes: Sequence[int], capacity_factor: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Expert choice inside each modality group (MoMa Sec. 2.2).

    Args:
        scores_TE: ``[T, E]`` scores (MoMa: sigmoids); only each token's own group's columns are read.
        group_T: ``[T]`` long, each token's group in ``[0, len(group_sizes))``.
        group_sizes: ``E_g`` per group; group ``g`` owns experts ``[o_g, o_g + E_g)``, ``o_g`` the
            sum of the earlier sizes, and ``sum(E_g) = E``.
        capacity_factor: ``c``: each expert of group ``g`` takes ``C_g = min(T_g, ceil(T_g c / E_g))``
            of the ``T_g`` tokens of its group (``c_e = c / E_g`` in the paper's terms).
    Returns:
        ``(token [N], expert [N], weight [N])``: group by group, expert-major inside a group,
        best first; ``weight`` is the score (differentiable). ``N = sum_g E_g C_g``.
    """
    tokens, experts, weights = [], [], []
    offset = 0
    for g, size in enumerate(group_sizes):
        members = (group_T == g).nonzero().squeeze(1)  # this group's tokens, in order
        t_g = int(members.shape[0])
        if t_g:
            cap = expert_choice_capacity(t_g, size, capacity_factor)
            tok, exp, w = expert_choice(scores_TE[members, offset : offset + size], cap)
            tokens.append(members[tok])
            experts.append(exp + offset)
            weights.append(w)
        offset += size
    if not tokens:
        empty = torch.zeros(0, dtype=torch.long, device=scores_TE.device)
        return empty, empty.clone(), scores_TE.new_zeros(0)
    return torch.cat(tokens), torch.cat(experts), torch.cat(weights)


def predictor_bce(pred_logits_TE: Tensor, selected_TE: Tensor, in_group_TE: Tensor) -> Tensor:
    """Mean binary cross-entropy of the selection predictor over each token's own-group experts.

    ``pred_logits_TE`` ``[T, E]``; ``selected_TE`` ``[T, E]`` bool, whether expert choice picked the
    pair (the target); ``in_group_TE`` ``[T, E]`` bool, the pairs that count. 0 without any pair.
    """
    logits = pred_logits_TE[in_group_TE].float()
    if logits.numel() == 0:
        return pred_logits_TE.sum().float() * 0.0
    return F.binary_cross_entropy_with_logits(logits, selected_TE[in_group_TE].float())


def predicted_selection(
    pred_logits_TE: Tensor, scores_TE: Tensor, in_group_TE: Tensor, threshold: float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal selection: the own-group experts whose predictor says ``sigmoid > threshold``.

    Returns ``(token [N], expert [N], weight [N])``, token-major; ``weight`` is ``scores_TE`` at the
    selected pairs. A token with no predicted expert has no entry (it rides the residual).
    """
    chosen = (torch.sigmoid(pred_logits_TE.float()) > threshold) & in_group_TE
    token, expert = chosen.nonzero(as_tuple=True)
    return token, expert, scores_TE[token, expert]


def check_groups(groups: object, num_experts: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(types, sizes)``: which token type each group serves and its number of experts.

    ``groups``: None (``E`` split evenly over types 0 and 1), a sequence of sizes indexed by type
    (``[4, 4]``), or a dict ``{type: size}`` (``{0: 4, 1: 4}``, or ``{"0": 4, "1": 4}`` as JSON
    gives it back; groups ordered by type). Sizes must be ints >= 1 summing to ``num_experts``.
    """
    if groups is None:
        if num_experts < 2 or num_experts % 2:
            raise ValueError(
                f"groups=None splits num_experts evenly over 2 token types; num_experts={num_experts} "
                "is not even (>= 2): pass groups=[sizes by type] or {type: size}"
            )
        return (0, 1), (num_experts // 2, num_experts // 2)
    if isinstance(groups, Mapping):
        # a config read back from JSON has string keys: "0" is type 0
        items = [(int(k) if isinstance(k, str) and k.isdigit() else k, v) for k, v in groups.items()]
    elif isinstance(groups, Sequence) and not isinstance(groups, (str, bytes)):
        items = list(enumerate(groups))
    else:
        raise TypeError(
            f"groups must be None, a list of sizes by type or a dict {{type: size}}, got {type(groups).__name__}"
        )
    if not items:
        raise ValueError("groups must name at least one token type")
    for key, size in items:
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise ValueError(f"groups: token types must be ints >= 0, got {key!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"groups[{key}] must be an int >= 1 (experts of that type), got {size!r}")
    items.sort()
    sizes = tuple(s for _, s in items)
    if sum(sizes) != num_experts:
        raise ValueError(f"groups sizes {dict(items)} sum to {sum(sizes)}, but num_experts={num_experts}")
    return tuple(k for k, _ in items), sizes


# --------------------------------------------------------------------------------- the router
@register_router(
    "moma",
    paper="MoMa (Lin et al. 2024, arXiv:2407.21770), Sec. 2.2-2.4",
    summary="experts split by token type; expert choice with sigmoid scores inside each group; causal predictor at eval",
)
class MoMaRouter(Router):
    """MoMa's modality-aware expert-choice router (module docstring).

    Needs ``ctx.token_types`` ([T] long). Args:
        d_model, num_experts: ``d`` and ``E`` (all groups together).
        top_k: accepted for a uniform config; when given and ``capacity_factor`` is not, it sets
            ``capacity_factor = top_k`` (the same average number of experts per token).
        groups: experts per token type: None (default, ``E`` split evenly over types 0 and 1:
            the paper's 4 text + 4 image), ``[4, 4]`` by type, or ``{0: 4, 1: 4}``.
        capacity_factor: ``c``, experts per token on average inside each group (``c_e = c / E_g``);
            default 1 (paper: ``c_e = 1/4`` with 4 experts per modality).
        gumbel_noise: Gumbel-sigmoid scores in training (Eq. 5); default True.
        causal_inference: in eval mode, select with the predictor (causal) instead of expert
            choice over the batch; default True.
        threshold: the predictor's selection threshold on its sigmoid; default 0.5 (our choice).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int | None = None,
        *,
        groups: Sequence[int] | Mapping[int, int] | None = None,
        capacity_factor: float | None = None,
        gumbel_noise: bool = True,
        causal_inference: bool = True,
        threshold: float = 0.5,
    ) -> None:
        super().__init__(d_model, num_experts)
        if top_k is not None:
            positive_int("top_k", top_k)
            if top_k > num_experts:
                raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        self.group_types, self.group_sizes = check_groups(groups, num_experts)
        if capacity_factor is None:
            capacity_factor = float(top_k) if top_k is not None else 1.0
        self.capacity_factor = positive_float("capacity_factor", capacity_factor)
        self.gumbel_noise = bool(gumbel_noise)
        self.causal_inference = bool(causal_inference)
        self.threshold = float_in("threshold", threshold, 0.0, 1.0)
        if self.threshold == 0.0:
            raise ValueError("threshold must be in (0, 1), got 0.0")
        self._init_gate()
        # One linear classifier per expert: does expert e choose this token? (the auxiliary router)
        self.predictor = nn.Linear(d_model, num_experts)
        # token type -> group index (-1: a type no group serves); a buffer so that it follows .to()
        table = torch.full((max(self.group_types) + 1,), -1, dtype=torch.long)
        table[list(self.group_types)] = torch.arange(len(self.group_types))
        self.register_buffer("type_to_group", table, persistent=False)
        self.register_buffer("expert_group", group_expert_ids(self.group_sizes), persistent=False)
        # for ``metrics()``: the predictor's agreement with expert choice in the last training
        # forward, and the experts per token of the eval forwards since the last training one
        self._agreement: Tensor | None = None
        self._eval_counts: tuple[int, int] | None = None  # (assignments, tokens)

    def groups_of(self, token_types_T: Tensor) -> Tensor:
        """``[T]`` long group index of each token; a type no group serves is a ``ValueError``."""
        types = token_types_T.to(self.type_to_group.device)
        if types.numel():
            lo, hi = int(types.min()), int(types.max())
            bad = lo < 0 or hi >= self.type_to_group.shape[0]
            group = self.type_to_group[types.clamp(0, self.type_to_group.shape[0] - 1)]
            if bad or bool((group < 0).any()):
                raise ValueError(
                    f"moma: ctx.token_types holds types in [{lo}, {hi}], but the groups serve types "
                    f"{list(self.group_types)} only (set groups=...)"
                )
            return group
        return types

    def predictor_logits(self, x_TD: Tensor) -> Tensor:
        """``[T, E]`` fp32 logits of the selection predictor, on the detached input (stop-gradient)."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.detach().float(), self.predictor.weight.float(), self.predictor.bias.float())

    @property
    def needs_token_types(self) -> bool:
        return True

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        t = x_TD.shape[0]
        group_T = self.groups_of(require_token_types(ctx, t, "moma")).to(x_TD.device)
        in_group = self.expert_group.unsqueeze(0) == group_T.unsqueeze(1)  # [T, E]
        logits = self.router_logits(x_TD)
        clean = torch.sigmoid(logits)
        probs = clean * in_group  # a token's out-of-group experts are impossible
        aux: dict[str, Tensor] = {}
        if not self.training and self.causal_inference:
            token, expert, weight = predicted_selection(
                self.predictor_logits(x_TD), clean, in_group, self.threshold
            )
        else:
            scores = gumbel_sigmoid(logits) if self.training and self.gumbel_noise else clean
            token, expert, weight = modality_expert_choice(
                scores, group_T, self.group_sizes, self.capacity_factor
            )
            selected = torch.zeros_like(in_group)
            selected[token, expert] = True
            pred = self.predictor_logits(x_TD)
            aux[PREDICTOR_AUX] = predictor_bce(pred, selected, in_group)
            if self.training:
                self._record_agreement(pred, selected, in_group)
        if self.training:
            self._eval_counts = None  # the next eval pass starts afresh
        else:
            done = self._eval_counts or (0, 0)
            self._eval_counts = (done[0] + int(token.shape[0]), done[1] + t)
        return Routing(
            token_index=token,
            expert_index=expert,
            weight=weight,
            num_tokens=t,
            num_experts=self.num_experts,
            logits=logits,
            probs=probs,
            aux=aux,
            validate=False,
        )

    @torch.no_grad()
    def _record_agreement(self, pred_logits_TE: Tensor, selected_TE: Tensor, in_group_TE: Tensor) -> None:
        if not in_group_TE.numel():
            return
        said = torch.sigmoid(pred_logits_TE) > self.threshold
        agree = ((said == selected_TE) & in_group_TE).sum()
        self._agreement = agree.double() / in_group_TE.sum().clamp_min(1).double()

    def metrics(self) -> dict[str, float]:
        """``moma_predictor_accuracy``: the share of own-group (token, expert) pairs on which the
        predictor agrees with expert choice, in the last training forward; ``moma_eval_experts_per_token``:
        assignments per token over the eval forwards since the last training forward (with the
        predictor this is the eval compute, expert choice's being ``capacity_factor``). NaN when
        not measured."""
        nan = float("nan")
        acc = nan if self._agreement is None else float(self._agreement)
        per_tok = nan
        if self._eval_counts is not None and self._eval_counts[1] > 0:
            per_tok = self._eval_counts[0] / self._eval_counts[1]
        return {"moma_predictor_accuracy": acc, "moma_eval_experts_per_token": per_tok}

    @property
    def causal_at_eval(self) -> bool:
        return self.causal_inference  # without the predictor, each expert ranks the whole batch

    def extra_repr(self) -> str:
        groups = dict(zip(self.group_types, self.group_sizes, strict=True))
        return (
            f"{super().extra_repr()}, groups={groups}, capacity_factor={self.capacity_factor}, "
            f"gumbel_noise={self.gumbel_noise}, causal_inference={self.causal_inference}"
        )
