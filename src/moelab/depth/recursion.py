"""Mixture-of-Recursions (Bae et al. 2025): a shared group of blocks run up to ``N_r`` times, with a
router deciding how many recursion steps each token gets.

Paper: S. Bae, Y. Kim, R. Bayat, et al., *Mixture-of-Recursions: Learning Dynamic Recursive Depths
for Adaptive Token-Level Computation* (2025). Code read: sudeshmu/mixture_of_recursions (a faithful
fork; the official raymin0223 repository was not available), ``model/mor_model/
{expert_choice_router,token_choice_router,util}.py`` and ``model/kv_caches/cache_utils.py``
(PAPERS.md A.2 and "Official code, run and read").

Parameter sharing (``sharing``):

- ``"middle_cycle"`` (paper default): block 0 and the last block are unique; the middle blocks
  ``blocks[1:-1]`` form the shared group, run ``N_r`` times (effective depth
  ``2 + (L - 2) * N_r`` for ``L`` unique blocks);
- ``"cycle"``: every block is in the shared group (effective depth ``L * N_r``).

One *recursion step* runs the whole shared group, block after block, on the step's active tokens,
gathered per sequence in position order (``moelab.depth.gather``), at their true positions.

Routers (``router``):

- ``"expert_choice"``: one bias-free ``Linear(d, 1)`` per step ``r``; gate
  ``g_r = alpha * sigmoid(w_r . x / temp)``. Step ``r`` keeps ``k_r = max(1, int(c_r * S))``
  tokens of each sequence (``S`` the full sequence length), the top-``k_r`` by ``g_r`` *among the
  tokens active at step r - 1* (nested), then ``H[sel] <- H[sel] + g * Block(H[sel])`` (``update=
  "block"``, the paper's and the code's: ``Block`` includes its residual) or ``H[sel] + g *
  (Block(H[sel]) - H[sel])`` (``update="delta"``, ours: the gate scales only the block's update).
  An auxiliary BCE of each step's logit against ``1[selected]`` (coefficient 1e-3) teaches the
  router to predict its own top-k: at evaluation a token continues iff its step router's logit is
  > 0 and it was active before (causal, so it decodes).
- ``"token_choice"``: one ``Linear(d, N_r)`` at the start; ``p = softmax``; the token's depth is
  ``argmax p + 1``; it runs steps ``1 .. depth`` ungated (``h_r = Group(h_{r-1})``), and its output is
  ``x + p_depth * h_depth`` (``"block"``, the code's) or ``x + p_depth * (h_depth - x)``
  (``"delta"``). Switch-style balance loss ``N_r * sum_i P_i f_i`` (``P_i`` the mean probability,
  ``f_i`` the fraction of tokens choosing depth ``i``), coefficient 0.1.
- ``"none"``: a plain recursive model, every token through every step, ``H <- Group(H)``.

KV caching (``kv``): ``"recursion"`` (each (shared block, step) has its own cache; only the tokens
active at step ``r`` write and read it) or ``"share_first"`` (steps ``r > 1`` attend, read only, to
the step-1 keys/values of the same block, plus their own step-``r`` key).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import positive_int
from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.depth.base import DepthRouter
from moelab.depth.gather import (
    gather_tokens,
    gathered_context,
    positions_of,
    ragged_index,
    scatter_update,
    topk_per_sequence,
)
from moelab.models.blocks import KVCache, Rope, block_cache

ROUTERS = ("expert_choice", "token_choice", "none")
SHARINGS = ("middle_cycle", "cycle")
GATINGS = ("weighted", "none")
UPDATES = ("block", "delta")
KV_MODES = ("recursion", "share_first")


# -- pure functions ---------------------------------------------------------------------------------
def recursion_layout(n_layers: int, sharing: str = "middle_cycle") -> tuple[list[int], list[int], list[int]]:
    """``(first, shared, last)`` block indices of ``n_layers`` unique blocks under ``sharing``.

    ``"middle_cycle"`` (MoR's default): ``[0], [1 .. L-2], [L-1]`` (needs ``L >= 3``);
    ``"cycle"``: ``[], [0 .. L-1], []``."""
    positive_int("n_layers", n_layers)
    if sharing == "middle_cycle":
        if n_layers < 3:
            raise ValueError(
                f"sharing='middle_cycle' needs n_layers >= 3 (unique first, shared middle, unique last), got {n_layers}"
            )
        return [0], list(range(1, n_layers - 1)), [n_layers - 1]
    if sharing == "cycle":
        return [], list(range(n_layers)), []
    raise ValueError(f"sharing must be one of {SHARINGS}, got {sharing!r}")


def default_capacities(num_recursions: int) -> tuple[float, ...]:
    """MoR's expert-choice capacities ``c_r = (N_r - r) / N_r``, ``r = 0 .. N_r-1`` (1, 2/3, 1/3 for
    ``N_r = 3``; PAPERS.md A.2)."""
    positive_int("num_recursions", num_recursions)
    return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))


def recursion_token_counts(capacities: Sequence[float], seq_len: int) -> list[int]:
    """Tokens per sequence kept at each step: ``k_r = max(1, int(c_r * S))`` with ``S`` the full
    sequence length (the official code's rounding), capped at ``S``."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
    # the small epsilon keeps int(c * S) exact where c * S is an integer up to rounding (2/3 * 3)
    return [min(seq_len, max(1, int(c * seq_len + 1e-9))) for c in capacities]


def warmed_capacity(capacity: float, step: int, warmup_steps: int) -> float:
    """The official capacity warm-up: from 1.0 at step 0 to ``capacity`` at ``warmup_steps``, along a
    cosine; ``capacity`` itself when ``warmup_steps`` is 0."""
    if warmup_steps <= 0:
        return capacity
    decay = 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / warmup_steps)))
    return capacity + (1.0 - capacity) * decay


def recursion_balance_loss(probs_TR: Tensor, choice_T: Tensor) -> Tensor:
    """Token-choice MoR's Switch-style balance loss ``N_r * sum_i P_i f_i``.

    ``probs_TR`` ``[T, N_r]`` the router's probabilities, ``choice_T`` ``[T]`` long the chosen depth
    index (0-based); ``P_i`` the mean probability of depth ``i``, ``f_i`` the fraction of tokens that
    chose it. 1 when both are uniform."""
    if probs_TR.dim() != 2 or choice_T.shape != probs_TR.shape[:1]:
        raise ValueError(
            f"probs must be [T, N_r] and choice [T], got {tuple(probs_TR.shape)} and {tuple(choice_T.shape)}"
        )
    t, r = probs_TR.shape
    if t == 0:
        return probs_TR.new_zeros(())
    p = probs_TR.float().mean(dim=0)
    f = torch.bincount(choice_T, minlength=r).to(p.dtype) / t
    return r * (p * f).sum()


def expert_choice_bce(logits_BS: Tensor, selected_BS: Tensor, among_BS: Tensor) -> Tensor:
    """The causal predictor's loss of one expert-choice step: ``BCE(logit, 1[selected])`` summed over
    the tokens that were candidates (``among``, the tokens active before the step) and divided by
    their count (the official code's normalisation)."""
    n = int(among_BS.sum())
    if n == 0:
        return logits_BS.new_zeros((), dtype=torch.float32)
    return (
        F.binary_cross_entropy_with_logits(
            logits_BS[among_BS].float(), selected_BS[among_BS].float(), reduction="sum"
        )
        / n
    )


# -- the depth router -------------------------------------------------------------------------------
class MixtureOfRecursions(DepthRouter):
    """Mixture-of-Recursions over a model's ``n_layers`` unique blocks (module docstring).

    Args:
        d_model: the model width ``d``.
        n_layers: the number of unique blocks the router schedules (``len(blocks)`` at forward).
        num_recursions: ``N_r`` (3, the paper's).
        router: ``"expert_choice"`` (the paper's best), ``"token_choice"`` or ``"none"`` (a plain
            recursive model).
        sharing: ``"middle_cycle"`` (paper) or ``"cycle"``.
        capacities: expert choice's ``c_r``, non-increasing in (0, 1] (default ``(N_r - r)/N_r``).
        alpha: expert choice's gate scale (0.1, the code's).
        temperature: the router input is ``x / temperature`` (1.0).
        gating: ``"weighted"`` (the gate multiplies the update, the paper's) or ``"none"`` (gate 1).
        update: ``"block"`` (``H + g * Block(H)``, paper and code) or ``"delta"`` (``H + g * (Block(H)
            - H)``, ours). ``gating="none", update="delta"`` runs the plain block: with
            ``num_recursions=1`` the model is exactly the plain model.
        kv: ``"recursion"`` or ``"share_first"`` (module docstring).
        bce_coef: expert choice's auxiliary BCE coefficient (1e-3, the code's).
        balance_coef: token choice's balance-loss coefficient (0.1, the paper's).
        capacity_warmup_steps: expert choice's cosine capacity warm-up from 1.0, over the training
            steps read from ``ctx.step`` (0: off, our default).
        init_std: the routers' initial weights ``N(0, init_std)`` (0.02, the code's
            ``initializer_range``).

    ``forward(x [B, S, d], blocks, rope, ctx, positions [B, S] | None) -> [B, S, d]``. After each
    forward: ``aux_loss`` (weighted, 0 at evaluation), ``aux_terms`` (unweighted, by name),
    ``last_depth`` ``[B, S]`` long (the recursion steps each token ran), ``last_stats``
    (``mean_depth``, ``compute_fraction`` = mean depth / N_r and, for expert choice in training,
    ``predictor_accuracy``: how often ``logit > 0`` agrees with the top-k among the candidates) and
    ``flops`` (the routers').
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        *,
        num_recursions: int = 3,
        router: str = "expert_choice",
        sharing: str = "middle_cycle",
        capacities: Sequence[float] | None = None,
        alpha: float = 0.1,
        temperature: float = 1.0,
        gating: str = "weighted",
        update: str = "block",
        kv: str = "recursion",
        bce_coef: float = 1e-3,
        balance_coef: float = 0.1,
        capacity_warmup_steps: int = 0,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.n_layers = positive_int("n_layers", n_layers)
        self.num_recursions = positive_int("num_recursions", num_recursions)
        for name, value, allowed in (
            ("router", router, ROUTERS),
            ("sharing", sharing, SHARINGS),
            ("gating", gating, GATINGS),
            ("update", update, UPDATES),
            ("kv", kv, KV_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.router_kind = router
        self.sharing = sharing
        self.gating = gating
        self.update = update
        self.kv = kv
        self.first, self.shared, self.last = recursion_layout(n_layers, sharing)
        self.alpha = _positive("alpha", alpha)
        self.temperature = _positive("temperature", temperature)
        self.bce_coef = _non_negative("bce_coef", bce_coef)
        self.balance_coef = _non_negative("balance_coef", balance_coef)
        if (
            isinstance(capacity_warmup_steps, bool)
            or not isinstance(capacity_warmup_steps, int)
            or capacity_warmup_steps < 0
        ):
            raise ValueError(f"capacity_warmup_steps must be an int >= 0, got {capacity_warmup_steps!r}")
        self.capacity_warmup_steps = capacity_warmup_steps
        init_std = _positive("init_std", init_std)
        if capacities is not None and router != "expert_choice":
            raise ValueError(f"capacities apply to router='expert_choice' only, got router={router!r}")
        self.capacities = self._checked_capacities(capacities)
        self.step_routers: nn.ModuleList | None = None
        self.depth_router: nn.Linear | None = None
        if router == "expert_choice":
            self.step_routers = nn.ModuleList(
                nn.Linear(d_model, 1, bias=False) for _ in range(num_recursions)
            )
            for lin in self.step_routers:
                nn.init.normal_(lin.weight, std=init_std)
        elif router == "token_choice":
            self.depth_router = nn.Linear(d_model, num_recursions, bias=False)
            nn.init.normal_(self.depth_router.weight, std=init_std)
        self.aux_terms: dict[str, Tensor] = {}
        self.last_depth: Tensor | None = None
        self.last_stats: dict[str, float] = {}

    def _checked_capacities(self, capacities: Sequence[float] | None) -> tuple[float, ...]:
        if capacities is None:
            return default_capacities(self.num_recursions)
        if isinstance(capacities, (str, bytes)) or not isinstance(capacities, Sequence):
            raise TypeError(
                f"capacities must be a sequence of {self.num_recursions} floats, got {type(capacities).__name__}"
            )
        caps = tuple(capacities)
        if len(caps) != self.num_recursions:
            raise ValueError(
                f"capacities must have num_recursions={self.num_recursions} entries, got {len(caps)}"
            )
        for c in caps:
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c <= 1.0:
                raise ValueError(f"every capacity must lie in (0, 1], got {caps}")
        if any(b > a for a, b in zip(caps[:-1], caps[1:], strict=True)):
            raise ValueError(f"capacities must be non-increasing (nested selection), got {caps}")
        return tuple(float(c) for c in caps)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> MixtureOfRecursions:
        """The router for a ``MoELMConfig`` (``depth="mor"``); ``kwargs`` are ``depth_kwargs``."""
        allowed = {
            n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY
        }
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(
                f"depth_kwargs for 'mor' got unknown option(s) {unknown}; allowed: {sorted(allowed)}"
            )
        return cls(config.d_model, config.n_layers, **kwargs)

    @property
    def effective_depth(self) -> int:
        """Blocks a token at full depth runs through: ``len(first) + len(shared) * N_r + len(last)``."""
        return len(self.first) + len(self.shared) * self.num_recursions + len(self.last)

    @property
    def causal_at_eval(self) -> bool:
        """True: at evaluation expert choice decides per token from its own router logit (> 0) and its
        earlier decisions, token choice from its own router; nothing reads later tokens."""
        return True

    def extra_repr(self) -> str:
        return (
            f"router={self.router_kind}, num_recursions={self.num_recursions}, sharing={self.sharing}, "
            f"layout={self.first}+{self.shared}x{self.num_recursions}+{self.last}, kv={self.kv}, "
            f"gating={self.gating}, update={self.update}"
            + (
                f", capacities={tuple(round(c, 4) for c in self.capacities)}, alpha={self.alpha}"
                if self.router_kind == "expert_choice"
                else ""
            )
        )

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        blocks: nn.ModuleList,
        rope: Rope,
        ctx: RoutingContext,
        positions: Tensor | None = None,
    ) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, S, d_model={self.d_model}], got {got}")
        if not isinstance(blocks, nn.ModuleList) or len(blocks) != self.n_layers:
            got = len(blocks) if isinstance(blocks, nn.ModuleList) else type(blocks).__name__
            raise ValueError(
                f"blocks must be the model's nn.ModuleList of n_layers={self.n_layers} blocks, got {got}"
            )
        if positions is not None and (positions.shape != x.shape[:2] or positions.dtype != torch.long):
            raise ValueError(
                f"positions must be a [B, S]={tuple(x.shape[:2])} long tensor, got {positions.dtype} {tuple(positions.shape)}"
            )
        self.aux_terms = {}
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        for i in self.first:
            x = blocks[i](x, rope, ctx, positions=positions, cache=block_cache(ctx, blocks[i]))
        # step-1 keys/values of each shared block for kv="share_first" without a session (a
        # throwaway cache of this forward, read at later steps like the session's would be)
        self._step1: dict[int, KVCache] = {}
        if self.router_kind == "expert_choice":
            x = self._expert_choice(x, blocks, rope, ctx, positions)
        else:
            x = self._token_choice(x, blocks, rope, ctx, positions)
        self._step1 = {}
        for i in self.last:
            x = blocks[i](x, rope, ctx, positions=positions, cache=block_cache(ctx, blocks[i]))
        return x

    # -- expert choice ------------------------------------------------------------------------------
    def _expert_choice(
        self, x: Tensor, blocks: nn.ModuleList, rope: Rope, ctx: RoutingContext, positions: Tensor | None
    ) -> Tensor:
        b, s, d = x.shape
        x_in_TD = x.reshape(-1, d)
        active = torch.ones(b, s, dtype=torch.bool, device=x.device)
        depth = torch.zeros(b, s, dtype=torch.long, device=x.device)
        gate_last = x.new_zeros(b, s)
        bce = x.new_zeros((), dtype=torch.float32)
        agree: list[float] = []
        step = ctx.step if (self.training and ctx.step is not None) else None
        caps = [
            warmed_capacity(c, step, self.capacity_warmup_steps) if step is not None else c
            for c in self.capacities
        ]
        counts = recursion_token_counts(caps, s) if s else [0] * self.num_recursions
        assert self.step_routers is not None
        for r in range(self.num_recursions):
            # the router scores the state entering step r; only the active tokens are candidates
            # (computed on all rows for simplicity; the FLOPs count the candidates, as the method does)
            logits_BS = self.step_routers[r](x / self.temperature).squeeze(-1)
            self.flops += 2.0 * d * float(active.sum())
            if self.training:
                index = topk_per_sequence(logits_BS, counts[r], among_BS=active)
                chosen = torch.zeros_like(active).scatter_(1, index, True)
                valid = None
                bce = bce + expert_choice_bce(logits_BS, chosen, active)
                # how often the causal rule (logit > 0) would have made the top-k's choice
                agree.append(float(((logits_BS > 0) == chosen)[active].float().mean()))
            else:
                # causal decisions: the BCE-trained logit says whether the token would be in the
                # top-k; a step at capacity 1 keeps every active token (its target is all ones)
                chosen = active if caps[r] >= 1.0 else active & (logits_BS > 0)
                index, valid = ragged_index(chosen)
                if valid.all():
                    valid = None
            if index.shape[1] == 0:
                break  # no token continues; nested selection keeps it so at every later step
            gate_BS = self.alpha * torch.sigmoid(logits_BS) if self.gating == "weighted" else None
            x = self._recursion_step(x, index, valid, chosen, gate_BS, r, blocks, rope, ctx, positions)
            depth = torch.where(chosen, r + 1, depth)
            if gate_BS is not None:
                gate_last = torch.where(chosen, gate_BS.to(gate_last.dtype), gate_last)
            active = chosen
        if self.training and self.bce_coef:
            self.aux_terms["bce"] = bce.detach()
            self.aux_loss = self.aux_loss + self.bce_coef * bce
        self.last_depth = depth.detach()
        self._record_stats(depth, agree)
        # the routing that ran: each token -> the last recursion step it reached, weight its gate
        # there (recorded after the fact: the nested decisions are made step by step)
        flat_depth = depth.reshape(-1)
        tokens = flat_depth.nonzero().squeeze(-1)
        weight = gate_last.reshape(-1)[tokens] if self.gating == "weighted" else x.new_ones(tokens.shape[0])
        routing = Routing(
            token_index=tokens,
            expert_index=flat_depth[tokens] - 1,
            weight=weight,
            num_tokens=b * s,
            num_experts=self.num_recursions,
        )
        self.routed(routing, ctx, x_in_TD)
        return x

    def _recursion_step(
        self,
        x: Tensor,
        index: Tensor,
        valid: Tensor | None,
        chosen: Tensor,
        gate_BS: Tensor | None,
        r: int,
        blocks: nn.ModuleList,
        rope: Rope,
        ctx: RoutingContext,
        positions: Tensor | None,
    ) -> Tensor:
        """One expert-choice step on the chosen tokens ``index [B, K]`` (position-sorted)."""
        b, s, _ = x.shape
        full = index.shape[1] == s and valid is None  # every token: no gather, no scatter
        x_sel = x if full else gather_tokens(x, index)
        pos = positions if full else positions_of(index, positions)
        h = self._run_group(
            x_sel, pos, valid, r, blocks, rope, ctx if full else gathered_context(ctx, index, s)
        )
        if gate_BS is None and self.update == "delta":
            # H <- Block(H) exactly (the plain block): replace, do not add a difference
            return h if full else _replace(x, index, h, valid, chosen)
        g = (
            None
            if gate_BS is None
            else (gate_BS if full else gate_BS.gather(1, index))[..., None].to(h.dtype)
        )
        upd = h if self.update == "block" else h - x_sel
        if g is not None:
            upd = g * upd
        return x + upd if full else scatter_update(x, index, upd, valid)

    # -- token choice and plain recursion ------------------------------------------------------------
    def _token_choice(
        self, x: Tensor, blocks: nn.ModuleList, rope: Rope, ctx: RoutingContext, positions: Tensor | None
    ) -> Tensor:
        b, s, d = x.shape
        t = b * s
        x_in = x
        x_TD = x.reshape(t, d)
        tokens = torch.arange(t, device=x.device)
        if self.router_kind == "token_choice":
            assert self.depth_router is not None
            logits_TR = self.depth_router(x_TD / self.temperature)
            self.flops += 2.0 * d * self.num_recursions * t
            probs_TR = logits_TR.float().softmax(dim=-1)
            choice_T = probs_TR.argmax(dim=-1)
            weight_T = probs_TR.gather(1, choice_T[:, None]).squeeze(1).to(x.dtype)
            routing = Routing(
                token_index=tokens,
                expert_index=choice_T,
                weight=weight_T,
                num_tokens=t,
                num_experts=self.num_recursions,
                logits=logits_TR,
                probs=probs_TR,
                top_k=1,
            )
            if self.training and self.balance_coef:
                balance = recursion_balance_loss(probs_TR, choice_T)
                self.aux_terms["balance"] = balance.detach()
                self.aux_loss = self.aux_loss + self.balance_coef * balance
        else:  # plain recursion: every token runs every step
            routing = Routing(
                token_index=tokens,
                expert_index=torch.full_like(tokens, self.num_recursions - 1),
                weight=x.new_ones(t),
                num_tokens=t,
                num_experts=self.num_recursions,
                top_k=1,
            )
        # run what the (possibly transformed) routing says: a token's depth is its expert + 1, none: 0
        routing = self.routed(routing, ctx, x_TD)
        if torch.unique(routing.token_index).numel() != routing.token_index.numel():
            raise ValueError(
                "a recursion routing gives each token at most one depth; a transform gave some tokens several"
            )
        depth = torch.zeros(t, dtype=torch.long, device=x.device).index_put(
            (routing.token_index,), routing.expert_index + 1
        )
        weight = x.new_zeros(t).index_put((routing.token_index,), routing.weight.to(x.dtype))
        depth_BS, weight_BS = depth.view(b, s), weight.view(b, s)
        h = x
        for r in range(self.num_recursions):
            active = depth_BS > r
            if s == 0 or not bool(active.any()):
                break
            if bool(active.all()):
                h = self._run_group(h, positions, None, r, blocks, rope, ctx)
                continue
            index, valid = ragged_index(active)
            v = None if valid.all() else valid
            h_sel = self._run_group(
                gather_tokens(h, index),
                positions_of(index, positions),
                v,
                r,
                blocks,
                rope,
                gathered_context(ctx, index, s),
            )
            h = _replace(h, index, h_sel, v, active)
        self.last_depth = depth_BS.detach()
        self._record_stats(depth_BS, [])
        ran = (depth_BS > 0)[..., None]
        if self.router_kind == "none" or self.gating == "none":
            # plain recursion (and ungated token choice with update="delta") ends at h itself
            if self.router_kind == "none" or self.update == "delta":
                return torch.where(ran, h, x_in)
            return torch.where(ran, x_in + h, x_in)
        w = weight_BS[..., None]
        out = x_in + w * h if self.update == "block" else x_in + w * (h - x_in)
        return torch.where(ran, out, x_in)

    def _record_stats(self, depth_BS: Tensor, agree: list[float]) -> None:
        mean = float(depth_BS.float().mean()) if depth_BS.numel() else 0.0
        self.last_stats = {"mean_depth": mean, "compute_fraction": mean / self.num_recursions}
        if agree:
            self.last_stats["predictor_accuracy"] = sum(agree) / len(agree)

    # -- the shared group and its caches ----------------------------------------------------------------
    def _run_group(
        self,
        h: Tensor,
        pos: Tensor | None,
        valid: Tensor | None,
        r: int,
        blocks: nn.ModuleList,
        rope: Rope,
        ctx: RoutingContext,
    ) -> Tensor:
        """The shared blocks, in order, on gathered tokens ``h [B, K, d]`` at recursion step ``r``
        (0-based), with the caches of ``self.kv``."""
        for j in self.shared:
            blk = blocks[j]
            if self.kv == "recursion" or self.num_recursions == 1:
                h = blk(
                    h,
                    rope,
                    ctx,
                    positions=pos,
                    valid=valid,
                    cache=block_cache(ctx, blk, ("recursion", r + 1)),
                )
            elif r == 0:
                cache = block_cache(ctx, blk, ("recursion", 1))
                if cache is None:
                    cache = self._step1[j] = KVCache()
                if pos is None:
                    start = 0 if len(cache) == 0 else int(cache.positions.max()) + 1  # type: ignore[union-attr]
                    pos = torch.arange(start, start + h.shape[1], device=h.device).expand(
                        h.shape[0], h.shape[1]
                    )
                h = blk(h, rope, ctx, positions=pos, valid=valid, cache=cache)
            else:
                step1 = (
                    block_cache(ctx, blk, ("recursion", 1)) if ctx.session is not None else self._step1.get(j)
                )
                if step1 is None or len(step1) == 0:
                    raise ValueError(
                        "kv='share_first': a later recursion step ran before step 1 cached its keys"
                    )
                h = _attend_step1(blk, h, pos, valid, step1, rope, ctx)
        return h


def _attend_step1(
    blk: nn.Module,
    h: Tensor,
    pos: Tensor | None,
    valid: Tensor | None,
    step1: KVCache,
    rope: Rope,
    ctx: RoutingContext,
) -> Tensor:
    """Run ``blk`` on ``h [B, K, d]`` attending to the step-1 keys/values ``step1`` (read only) plus
    each token's *own* key only.

    A decoded token sees exactly that (the earlier tokens' later-step keys are never stored), so a
    multi-token call must not let its tokens see each other's keys: each token becomes its own
    length-1 row ``[B*K, 1, d]`` over a copy of the cache repeated K times. One row needs no copy."""
    b, k, d = h.shape
    if pos is None:
        pos = torch.arange(k, device=h.device).expand(b, k)  # rows at 0 .. K-1 (a full, uncached call)
    if k == 1:
        return blk(h, rope, ctx, positions=pos, valid=valid, cache=step1, read_only=True)
    ck, cv, cp, cval = step1.read()
    per_token = KVCache()
    per_token.update(
        ck.repeat_interleave(k, dim=0),
        cv.repeat_interleave(k, dim=0),
        cp.repeat_interleave(k, dim=0),
        cval.repeat_interleave(k, dim=0),
    )
    out = blk(
        h.reshape(b * k, 1, d),
        rope,
        ctx,
        positions=pos.reshape(b * k, 1),
        valid=None if valid is None else valid.reshape(b * k, 1),
        cache=per_token,
        read_only=True,
    )
    return out.reshape(b, k, d)


def _replace(
    x_BSD: Tensor, index_BK: Tensor, h_BKD: Tensor, valid_BK: Tensor | None, chosen_BS: Tensor
) -> Tensor:
    """``x`` with the chosen positions replaced by ``h`` (bit-exact: the scatter adds to zeros, and a
    padding row adds nothing)."""
    placed = scatter_update(torch.zeros_like(x_BSD), index_BK, h_BKD, valid_BK)
    return torch.where(chosen_BS[..., None], placed, x_BSD)


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
    return float(value)


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    return float(value)


registry.register(
    "depth",
    "mor",
    paper="Mixture-of-Recursions (Bae et al. 2025); sudeshmu/mixture_of_recursions model/mor_model/",
    summary="a shared middle block group run up to N_r times; expert- or token-choice routers pick each token's recursion depth",
)(MixtureOfRecursions)
