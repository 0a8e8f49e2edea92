"""``Routing``: the one currency between a router and the experts.

A routing is a sparse token-to-expert assignment in COO form. Token-choice top-k is
``N = T*k`` entries; expert-choice is ``N = E*C``; a token dropped by capacity simply has no
entry (it rides the residual); a dynamic router gives each token its own count. Everything that
executes experts (``moelab.ops``) and everything that measures routing (``moelab.analysis``)
reads this object and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Largest T x E a dense view may have (2^26 elements: 256 MiB in fp32). Product-key pools have
# E ~ 10^6: their routings are COO only, and what needs a dense view refuses them clearly.
MAX_DENSE_ELEMENTS = 2**26


@dataclass(frozen=True)
class ExpertOrder:
    """Assignments sorted by expert, as grouped GEMMs consume them.

    Attributes:
        perm: ``[N]`` long. ``perm[j]`` is the assignment placed at sorted position ``j``;
            stable, so within one expert assignments keep their original order.
        counts: ``[E]`` long. Assignments per expert.
        offsets: ``[E]`` int32. Cumulative end of each expert's group (``grouped_mm``'s ``offs``).
        expert_index: ``[N]`` long, the sorted expert ids (``routing.expert_index[perm]``).
        token_index: ``[N]`` long, the token of each sorted assignment.
        weight: ``[N]`` float, the combine weight of each sorted assignment (differentiable).
    """

    perm: Tensor
    counts: Tensor
    offsets: Tensor
    expert_index: Tensor
    token_index: Tensor
    weight: Tensor


@dataclass(eq=False)
class Routing:
    """A sparse ``T x E`` assignment of tokens to experts.

    Attributes:
        token_index: ``[N]`` long, the flattened token of each assignment, in ``[0, T)``.
        expert_index: ``[N]`` long, the expert of each assignment, in ``[0, E)``.
        weight: ``[N]`` float, the combine weight. It carries the router's gradient.
        num_tokens: ``T``.
        num_experts: ``E``.
        logits: ``[T, E]`` router logits, or None (for losses and analysis). Optional: a router
            over ~10^6 experts never forms them.
        probs: ``[T, E]`` router probabilities (softmax, sigmoid, ...), or None.
        aux: losses or regularisers the router itself produced, by name (scalars).
        top_k: when set, the entries are token-major with exactly ``top_k`` per token, i.e.
            ``token_index == arange(T).repeat_interleave(top_k)``. Backends use it to combine
            with a reshape-and-sum instead of a scatter. None for anything else.
        requested: ``[E]`` long, assignments each expert was asked for before capacity dropped
            any, or None when nothing was dropped. ``drop_rate()`` and the Switch load-balance
            loss (which counts the router's choices, not what survived) read it.

    Construction checks shapes, dtypes and index ranges and raises ``ValueError``/``TypeError``
    naming the field. Pass ``validate=False`` from hot paths whose indices are correct by
    construction (the range check costs a device sync on GPU).
    """

    token_index: Tensor
    expert_index: Tensor
    weight: Tensor
    num_tokens: int
    num_experts: int
    logits: Tensor | None = None
    probs: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)
    top_k: int | None = None
    requested: Tensor | None = None
    validate: bool = field(default=True, repr=False)
    _order: ExpertOrder | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.validate:
            self.check()

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        # The expert order caches gathers of these fields: reassigning one must not leave it stale.
        if name in ("token_index", "expert_index", "weight", "num_experts"):
            object.__setattr__(self, "_order", None)

    # ------------------------------------------------------------------ validation
    def check(self) -> None:
        """Raise if any field is malformed. Called on construction unless ``validate=False``."""
        for name in ("num_tokens", "num_experts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"Routing.{name} must be an int, got {type(v).__name__}")
        if self.num_tokens < 0:
            raise ValueError(f"Routing.num_tokens must be >= 0, got {self.num_tokens}")
        if self.num_experts < 1:
            raise ValueError(f"Routing.num_experts must be >= 1, got {self.num_experts}")
        for name in ("token_index", "expert_index", "weight"):
            t = getattr(self, name)
            if not isinstance(t, Tensor):
                raise TypeError(f"Routing.{name} must be a Tensor, got {type(t).__name__}")
            if t.dim() != 1:
                raise ValueError(f"Routing.{name} must be 1-D [N], got shape {tuple(t.shape)}")
        n = self.token_index.shape[0]
        for name in ("expert_index", "weight"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"Routing.{name} has {getattr(self, name).shape[0]} entries, token_index has {n}"
                )
        for name in ("token_index", "expert_index"):
            if getattr(self, name).dtype != torch.long:
                raise TypeError(f"Routing.{name} must be torch.long, got {getattr(self, name).dtype}")
        if not self.weight.is_floating_point():
            raise TypeError(f"Routing.weight must be floating point, got {self.weight.dtype}")
        if n:
            lo, hi = int(self.token_index.min()), int(self.token_index.max())
            if lo < 0 or hi >= self.num_tokens:
                raise ValueError(f"Routing.token_index must lie in [0, {self.num_tokens}), got [{lo}, {hi}]")
            lo, hi = int(self.expert_index.min()), int(self.expert_index.max())
            if lo < 0 or hi >= self.num_experts:
                raise ValueError(
                    f"Routing.expert_index must lie in [0, {self.num_experts}), got [{lo}, {hi}]"
                )
        for name in ("logits", "probs"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (self.num_tokens, self.num_experts):
                raise ValueError(
                    f"Routing.{name} must be [T, E] = [{self.num_tokens}, {self.num_experts}], "
                    f"got {tuple(t.shape)}"
                )
        if self.top_k is not None:
            if self.top_k < 1 or n != self.num_tokens * self.top_k:
                raise ValueError(
                    f"Routing.top_k={self.top_k} needs N = T*top_k = {self.num_tokens * self.top_k} "
                    f"entries, got {n}"
                )
            # The combine fast path trusts this layout; a wrong claim would misplace rows silently.
            token_major = torch.arange(self.num_tokens, device=self.device).repeat_interleave(self.top_k)
            if not torch.equal(self.token_index, token_major):
                raise ValueError(
                    f"Routing.top_k={self.top_k} needs token-major entries "
                    "(token_index == arange(T).repeat_interleave(top_k)); pass top_k=None otherwise"
                )
        if self.requested is not None and tuple(self.requested.shape) != (self.num_experts,):
            raise ValueError(
                f"Routing.requested must be [E] = [{self.num_experts}], got {tuple(self.requested.shape)}"
            )

    # ------------------------------------------------------------------ derived views
    @property
    def num_assignments(self) -> int:
        """``N``, the number of (token, expert) entries."""
        return int(self.token_index.shape[0])

    @property
    def device(self) -> torch.device:
        return self.token_index.device

    def by_expert(self) -> ExpertOrder:
        """Sort the assignments by expert (stable). Computed once and cached."""
        if self._order is None:
            e = self.expert_index
            # Stable sort keeps token order inside each expert: deterministic and cache friendly.
            sorted_e, perm = torch.sort(e, stable=True)
            counts = torch.bincount(e, minlength=self.num_experts)
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            # The order is cached: if it is first built under no_grad (a load check before the
            # backend runs), the cached combine weight must still carry the router's gradient.
            with torch.enable_grad():
                weight = self.weight[perm]
            self._order = ExpertOrder(
                perm=perm,
                counts=counts,
                offsets=offsets,
                expert_index=sorted_e,
                token_index=self.token_index[perm],
                weight=weight,
            )
        return self._order

    def tokens_per_expert(self) -> Tensor:
        """``[E]`` long: how many assignments each expert received (after any capacity drop).

        The cached expert order's counts when it exists; otherwise a ``bincount``, without the
        sort ``by_expert`` does (a rank-space LoRA mixture and the load losses never need it)."""
        if self._order is not None:
            return self._order.counts
        return torch.bincount(self.expert_index, minlength=self.num_experts)

    def experts_per_token(self) -> Tensor:
        """``[T]`` long: how many experts each token was sent to (0 for a dropped token)."""
        return torch.bincount(self.token_index, minlength=self.num_tokens)

    def require_dense(self, what: str) -> None:
        """Raise ``ValueError`` if a ``[T, E]`` view of this routing would be too large for ``what``."""
        size = self.num_tokens * self.num_experts
        if size > MAX_DENSE_ELEMENTS:
            raise ValueError(
                f"{what} needs a dense [T, E] = [{self.num_tokens}, {self.num_experts}] view "
                f"({size:,} elements > {MAX_DENSE_ELEMENTS:,}); it does not support a routing this large"
            )

    def dense(self) -> Tensor:
        """``[T, E]`` combine-weight matrix (duplicates summed). For tests and analysis."""
        self.require_dense("Routing.dense()")
        out = self.weight.new_zeros(self.num_tokens, self.num_experts)
        flat = self.token_index * self.num_experts + self.expert_index
        return out.view(-1).index_add(0, flat, self.weight).view(self.num_tokens, self.num_experts)

    def mask(self) -> Tensor:
        """``[T, E]`` bool: which (token, expert) pairs are assigned."""
        self.require_dense("Routing.mask()")
        m = torch.zeros(self.num_tokens, self.num_experts, dtype=torch.bool, device=self.device)
        m[self.token_index, self.expert_index] = True
        return m

    def topk_index(self, fill: int = -1) -> Tensor:
        """``[T, kmax]`` long: each token's experts in entry order, padded with ``fill``.

        For token-choice routings this is the familiar ``top_k_index``; analysis reads it.
        """
        if self.top_k is not None:
            return self.expert_index.view(self.num_tokens, self.top_k)
        per_tok = self.experts_per_token()
        kmax = int(per_tok.max()) if self.num_tokens and self.num_assignments else 0
        out = torch.full((self.num_tokens, kmax), fill, dtype=torch.long, device=self.device)
        if kmax == 0:
            return out
        order = torch.sort(self.token_index, stable=True).indices
        tok = self.token_index[order]
        start = torch.cumsum(per_tok, 0) - per_tok
        slot = torch.arange(tok.shape[0], device=self.device) - start[tok]
        out[tok, slot] = self.expert_index[order]
        return out

    def drop_rate(self) -> float:
        """Fraction of requested assignments that capacity dropped (0.0 when none were)."""
        if self.requested is None:
            return 0.0
        req = int(self.requested.sum())
        return 0.0 if req == 0 else 1.0 - self.num_assignments / req

    def detach(self, device: torch.device | str | None = "cpu") -> Routing:
        """A copy with every tensor detached (and moved to ``device``), for traces."""

        def mv(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            t = t.detach()
            return t.to(device) if device is not None else t

        return Routing(
            token_index=mv(self.token_index),
            expert_index=mv(self.expert_index),
            weight=mv(self.weight),
            num_tokens=self.num_tokens,
            num_experts=self.num_experts,
            logits=mv(self.logits),
            probs=mv(self.probs),
            aux={k: mv(v) for k, v in self.aux.items()},
            top_k=self.top_k,
            requested=mv(self.requested),
            validate=False,
        )

    @classmethod
    def from_topk(
        cls,
        topk_index: Tensor,
        topk_weight: Tensor,
        num_experts: int,
        *,
        logits: Tensor | None = None,
        probs: Tensor | None = None,
        aux: dict[str, Tensor] | None = None,
        validate: bool = True,
    ) -> Routing:
        """Build a token-choice routing from ``[T, k]`` expert ids and weights."""
        if topk_index.dim() != 2:
            raise ValueError(f"topk_index must be [T, k], got shape {tuple(topk_index.shape)}")
        if topk_weight.shape != topk_index.shape:
            raise ValueError(
                f"topk_weight must match topk_index's shape {tuple(topk_index.shape)}, got {tuple(topk_weight.shape)}"
            )
        t, k = topk_index.shape
        token_index = torch.arange(t, device=topk_index.device).repeat_interleave(k)
        return cls(
            token_index=token_index,
            expert_index=topk_index.reshape(-1).long(),
            weight=topk_weight.reshape(-1),
            num_tokens=t,
            num_experts=num_experts,
            logits=logits,
            probs=probs,
            aux=dict(aux or {}),
            top_k=k if k > 0 else None,
            validate=validate,
        )


def cat_routings(routings: list[Routing]) -> Routing:
    """Concatenate routings of consecutive token batches into one (token indices offset).

    ``logits``/``probs`` are kept only if every part has them; ``top_k`` only if all agree;
    ``requested`` is summed (a part without drops contributes its received counts).
    """
    if not routings:
        raise ValueError("routings must be a non-empty list")
    e = routings[0].num_experts
    if any(r.num_experts != e for r in routings):
        raise ValueError("routings must share num_experts to be concatenated")
    offsets, total = [], 0
    for r in routings:
        offsets.append(total)
        total += r.num_tokens

    def cat_opt(name: str) -> Tensor | None:
        parts = [getattr(r, name) for r in routings]
        return None if any(p is None for p in parts) else torch.cat(parts, 0)

    ks = {r.top_k for r in routings}
    any_drop = any(r.requested is not None for r in routings)
    requested = None
    if any_drop:
        requested = sum(r.requested if r.requested is not None else r.tokens_per_expert() for r in routings)
    return Routing(
        token_index=torch.cat([r.token_index + o for r, o in zip(routings, offsets, strict=True)]),
        expert_index=torch.cat([r.expert_index for r in routings]),
        weight=torch.cat([r.weight for r in routings]),
        num_tokens=total,
        num_experts=e,
        logits=cat_opt("logits"),
        probs=cat_opt("probs"),
        top_k=ks.pop() if len(ks) == 1 else None,
        requested=requested,
        validate=False,
    )
