"""ProMoE: conditional routing to an unconditional expert, prototypical routing, and the routing
contrastive loss (RCL).

Paper: *ProMoE: Towards Effective Mixture-of-Experts for Diffusion Transformers* (Alibaba Vision
Lab). Official code read: ali-vilab/ProMoE ``models/models_ProMoE_TC.py`` (``SparseMoeBlock``:
``compute_router``, ``compute_routing_contrastive_loss``) and ``configs/004_ProMoE_L.yaml``.

- **Conditional routing.** Tokens of the "unconditional" kind (in the DiT: the tokens of samples
  whose class label was dropped for classifier-free guidance) all go to one dedicated expert, the
  bank's last (``E - 1``), with weight 1. Here "unconditional" is a token type,
  ``unconditional_type`` (default 0, text: see ``docs/methods/promoe.md`` for the adaptation).
- **Prototypical routing.** The other tokens are scored by cosine similarity against ``P = E - 1``
  learnable prototypes, ``s_te = cos(x_t, P_e)`` (init ``N(0, 0.02)``); the gates are ``s``
  itself (``"identity"``, the paper's), ``softmax(s)`` or ``sigmoid(s)``; each token takes its
  top-k (``k = 1`` in the paper), not renormalised.
- **RCL.** For each prototype ``e`` that received tokens (any of their top-k slots), ``m_e`` is
  the mean of those tokens' router inputs; ``L = CE(cos(P_e, m_e') / tau, e = e')`` over the valid
  prototypes (InfoNCE: each prototype is pulled to its own tokens' centroid, pushed from the
  others'); ``tau = 0.07``, coefficient ``lambda = 1``. Registered as the loss ``rcl``.
- The paper's always-on shared expert is the layer's ``shared_experts=1``, not the router's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.core.checks import positive_float, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router
from moelab.core.routing import Routing
from moelab.losses.rcl import X_KEY, routing_contrastive_loss  # noqa: F401  (re-exported)
from moelab.routers.moma import require_token_types

WEIGHT_MODES = ("identity", "softmax", "sigmoid")
MAX_RECORDED_TOKENS = 1 << 20  # (expert, token id) pairs kept per eval pass for ``metrics()``


# --------------------------------------------------------------------------------- pure functions
def prototype_scores(x_TD: Tensor, prototypes_PD: Tensor) -> Tensor:
    """``[T, P]`` fp32 cosine similarities ``cos(x_t, P_e)`` (ProMoE's prototypical routing)."""
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        return F.normalize(x_TD.float(), dim=-1) @ F.normalize(prototypes_PD.float(), dim=-1).t()


def prototype_gates(scores_TP: Tensor, mode: str = "identity") -> Tensor:
    """The gates from the cosine scores: ``"identity"`` (``s``), ``"softmax"`` over prototypes,
    or ``"sigmoid"`` (official ``router_weight_mode``)."""
    if mode == "identity":
        return scores_TP
    if mode == "softmax":
        return torch.softmax(scores_TP, dim=-1)
    if mode == "sigmoid":
        return torch.sigmoid(scores_TP)
    raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {mode!r}")


def expert_label_purity(expert_T: Tensor, label_T: Tensor) -> dict[str, float]:
    """How well experts separate labels (a class, a token type), over tokens with one expert each.

    ``purity = sum_e max_c n_ec / N`` (1: every expert sees one label) and
    ``nmi = I(expert; label) / sqrt(H(expert) H(label))`` (0 when an entropy is 0), plug-in
    estimates from the contingency table ``n_ec``. Ignores pairs where either id is negative.
    """
    e, c = expert_T.long().flatten().cpu(), label_T.long().flatten().cpu()
    if e.shape != c.shape:
        raise ValueError(
            f"expert_T and label_T must have the same length, got {tuple(e.shape)} and {tuple(c.shape)}"
        )
    ok = (e >= 0) & (c >= 0)
    e, c = e[ok], c[ok]
    n = e.shape[0]
    if n == 0:
        return {"purity": float("nan"), "nmi": float("nan"), "tokens": 0}
    table = torch.zeros(int(e.max()) + 1, int(c.max()) + 1, dtype=torch.float64)
    table.index_put_((e, c), torch.ones(n, dtype=torch.float64), accumulate=True)
    joint = table / n
    pe, pc = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = float((joint[nz] * (joint[nz] / (pe[:, None] * pc[None, :])[nz]).log()).sum())
    he = float(-(pe[pe > 0] * pe[pe > 0].log()).sum())
    hc = float(-(pc[pc > 0] * pc[pc > 0].log()).sum())
    nmi = mi / math.sqrt(he * hc) if he > 0 and hc > 0 else 0.0
    return {"purity": float(table.max(1).values.sum()) / n, "nmi": nmi, "tokens": n}


# --------------------------------------------------------------------------------- the router
@register_router(
    "promoe",
    paper="ProMoE (ali-vilab/ProMoE, models_ProMoE_TC.py)",
    summary="one token type to a dedicated expert (weight 1); others top-k by cosine to learnable prototypes",
)
class ProMoERouter(Router):
    """ProMoE's token-choice router (module docstring).

    Args:
        d_model, num_experts: ``d`` and ``E``; with an unconditional type, ``E`` counts the
            unconditional expert (the last) and ``P = E - 1`` experts have prototypes.
        top_k: experts per routed token; default 1 (the paper's configs).
        unconditional_type: the token type sent to expert ``E - 1`` with weight 1; default 0
            (text, our choice: the image tokens get the prototypes); None: no unconditional
            expert, every token is routed by the ``P = E`` prototypes (needs no token types).
        weight_mode: ``"identity"`` (default, the paper's), ``"softmax"`` or ``"sigmoid"``.
        init_std: the prototypes' init ``N(0, init_std)``; default 0.02 (official ``_init_weights``).

    It leaves its input in ``ctx.slot(self)["x_TD"]`` for the ``rcl`` loss of the same forward.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        *,
        unconditional_type: int | None = 0,
        weight_mode: str = "identity",
        init_std: float = 0.02,
    ) -> None:
        super().__init__(d_model, num_experts)
        if unconditional_type is not None and (
            isinstance(unconditional_type, bool)
            or not isinstance(unconditional_type, int)
            or unconditional_type < 0
        ):
            raise ValueError(f"unconditional_type must be an int >= 0 or None, got {unconditional_type!r}")
        self.unconditional_type = unconditional_type
        self.num_prototypes = num_experts - (unconditional_type is not None)
        if self.num_prototypes < 1:
            raise ValueError(
                f"num_experts must be >= 2 with an unconditional expert (unconditional_type="
                f"{unconditional_type}): {num_experts} leaves no expert for the prototypes"
            )
        self.top_k = top_k_in_range(top_k, self.num_prototypes)
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES}, got {weight_mode!r}")
        self.weight_mode = weight_mode
        self.init_std = positive_float("init_std", init_std)
        self.prototypes = nn.Parameter(torch.empty(self.num_prototypes, d_model))
        nn.init.normal_(self.prototypes, mean=0.0, std=self.init_std)
        self._reset_eval_record()

    @property
    def unconditional_expert(self) -> int | None:
        """The index of the unconditional expert (``E - 1``), or None."""
        return None if self.unconditional_type is None else self.num_experts - 1

    @property
    def needs_token_types(self) -> bool:
        return self.unconditional_type is not None

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        t, k, e = x_TD.shape[0], self.top_k, self.num_experts
        ctx.slot(self)[X_KEY] = x_TD  # for ``rcl`` (its means are over the router's input)
        scores = prototype_scores(x_TD, self.prototypes)  # [T, P]
        weight, index = torch.topk(prototype_gates(scores, self.weight_mode), k, dim=-1)
        # probs: what the official load-balance loss reads (softmax of the cosines), one-hot on
        # the unconditional expert for unconditional tokens.
        probs = torch.softmax(scores, dim=-1)
        if self.unconditional_type is None:
            self._record(x_TD, index[:, 0], None, ctx.token_ids)
            return Routing.from_topk(index, weight, e, probs=probs, validate=False)
        uncond = require_token_types(ctx, t, "promoe").to(x_TD.device) == self.unconditional_type  # [T]
        self._record(x_TD, index[:, 0], ~uncond, ctx.token_ids)
        probs = torch.cat([probs * ~uncond.unsqueeze(1), uncond.unsqueeze(1).float()], dim=1)
        first = torch.arange(k, device=x_TD.device) == 0
        index = torch.where(uncond.unsqueeze(1), torch.full_like(index, e - 1), index)
        weight = torch.where(uncond.unsqueeze(1), first.to(weight.dtype).expand(t, k), weight)
        if k == 1:
            return Routing.from_topk(index, weight, e, probs=probs, validate=False)
        # k > 1: an unconditional token has one entry (the expert runs once), the others k
        keep = ~uncond.unsqueeze(1) | first.unsqueeze(0)  # [T, k]
        token = torch.arange(t, device=x_TD.device).unsqueeze(1).expand(t, k)
        return Routing(
            token_index=token[keep],
            expert_index=index[keep],
            weight=weight[keep],
            num_tokens=t,
            num_experts=e,
            probs=probs,
            validate=False,
        )

    # -- what metrics() reports: the routing of the last eval pass --------------------------------
    def _reset_eval_record(self) -> None:
        self._sums_PD: Tensor | None = None  # sum of the routed tokens' x per prototype (top-1)
        self._counts_P: Tensor | None = None
        self._pairs: list[tuple[Tensor, Tensor]] = []  # (top-1 prototype, token id), capped
        self._num_pairs = 0
        self._in_eval_pass = False

    @torch.no_grad()
    def _record(
        self, x_TD: Tensor, top1_T: Tensor, routed_T: Tensor | None, token_ids: Tensor | None
    ) -> None:
        """In eval mode, accumulate the routed tokens' top-1 prototypes, their ``x`` sums and
        token ids; the first eval forward after a training one starts afresh."""
        if self.training:
            self._in_eval_pass = False
            return
        if not self._in_eval_pass:
            self._reset_eval_record()
            self._in_eval_pass = True
        ids = token_ids if isinstance(token_ids, Tensor) and token_ids.shape == top1_T.shape else None
        if routed_T is not None:
            x_TD, top1_T = x_TD[routed_T], top1_T[routed_T]
            ids = None if ids is None else ids[routed_T.to(ids.device)]
        p = self.num_prototypes
        sums = torch.zeros(p, self.d_model, device=x_TD.device).index_add(0, top1_T, x_TD.float())
        counts = torch.bincount(top1_T, minlength=p)
        self._sums_PD = sums if self._sums_PD is None else self._sums_PD + sums
        self._counts_P = counts if self._counts_P is None else self._counts_P + counts
        if ids is not None and self._num_pairs < MAX_RECORDED_TOKENS:
            self._pairs.append((top1_T, ids.long()))
            self._num_pairs += top1_T.shape[0]

    def metrics(self) -> dict[str, float]:
        """Over the routed (conditional) tokens of the last eval pass (NaN before any):

        - ``promoe_token_nmi``, ``promoe_token_purity``: ``expert_label_purity`` of the top-1
          prototype against the token id (an image token's id is its patch's grey level);
        - ``promoe_centroid_cos``: the mean over prototypes with tokens of ``cos(P_e, m_e)``,
          ``m_e`` the mean of the tokens routed to ``e`` (the RCL's positive pairs: RCL raises it).
        """
        nan = float("nan")
        out = {"promoe_token_nmi": nan, "promoe_token_purity": nan, "promoe_centroid_cos": nan}
        if self._counts_P is not None and bool((self._counts_P > 0).any()):
            valid = self._counts_P > 0
            means = self._sums_PD[valid] / self._counts_P[valid].unsqueeze(1)
            cos = F.cosine_similarity(self.prototypes.detach().float()[valid], means, dim=-1)
            out["promoe_centroid_cos"] = float(cos.mean())
        if self._pairs:
            top1 = torch.cat([a for a, _ in self._pairs])
            ids = torch.cat([b.to(top1.device) for _, b in self._pairs])
            stats = expert_label_purity(top1, ids)
            out["promoe_token_nmi"], out["promoe_token_purity"] = stats["nmi"], stats["purity"]
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, top_k={self.top_k}, unconditional_type={self.unconditional_type}, "
            f"weight_mode={self.weight_mode!r}"
        )
