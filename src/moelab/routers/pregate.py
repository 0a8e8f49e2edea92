"""Read-ME pre-gating: a small causal transformer over the token ids picks each token's expert
before the backbone runs, and every routed layer uses that same choice.

Paper and code: Cai et al., *Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of Experts
with System Co-Design* (NeurIPS 2024); VITA-Group/READ-ME,
``src/transformers/models/llama/modeling_llama.py`` (``cluster_predictor_class``) and
``moe_fication/train_red.py`` (commit 1df7e684). What we take from them:

- the router sees **token ids only**: its own embedding, then ``n_layers = 2`` pre-norm blocks
  of ``n_heads = 2``-head causal self-attention with RoPE and a one-hidden-layer MLP of width
  ``d_router`` (SiLU), every linear with a bias, RMSNorm (eps 1e-6), a final RMSNorm and a
  linear head to ``E`` logits; ``d_router = 64`` (``train_red.py``'s ``embedding_dim`` and
  ``inter_dim``; RoPE base 10000, LLaMA's);
- the decision is ``argmax`` of the logits (top-1) and the **same expert is used in every
  layer**; it depends on ids ``<= t`` only (causal), so it is known before the backbone runs.

Where we differ (``docs/methods/pregate.md``, "our choices"): the official pre-gate copies the
LM's embedding and is trained by distillation with the backbone frozen, on oracle cluster ids
computed from a dense FFN's activations, alternating with finetuning the backbone under the
frozen pre-gate. Our experts are trained from scratch, not carved out of a dense FFN, so there
is no oracle: the pre-gate learns its own embedding, end to end, through the gate weight
(default ``gate="prob"``: Switch's ``p_i`` gate, which trained better than the paper's weight 1
with a straight-through gradient, ``gate="straight_through"``; ``gate="one"`` is the paper's
weight 1, through which the task loss cannot train the pre-gate). The attention logits are scaled by ``1/sqrt(head_dim)`` (the official
code divides by ``attn_normalizer = 1``: pass ``attn_normalizer=1.0`` for it).

State: the ``PreGate`` module is owned (registered, saved, counted) by the first linked
``PreGateRouter`` of a model; later layers' routers hold a plain reference (``Router.link``,
``moelab.core.router.share``). The decision is computed once per forward and kept in
``ctx.slot(pregate)``; each layer builds its ``Routing`` from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.core.checks import positive_float, positive_int, top_k_in_range
from moelab.core.context import RoutingContext
from moelab.core.router import Router, register_router, share
from moelab.core.routing import Routing

GATES = ("prob", "straight_through", "one")


# --------------------------------------------------------------------------------- pure functions
def rope_rotate(x_BHSD: Tensor, positions_BS: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotary position embedding (Su et al. 2021) of ``x [B, H, S, hd]`` at ``positions [B, S]``.

    LLaMA's half-split layout (``rotate_half``), as Read-ME's ``LlamaRotaryEmbedding``: channel
    ``i < hd/2`` pairs with ``i + hd/2`` and both turn by ``position * theta^(-2i/hd)``. Computed in
    fp32 for any position (no table, so no maximum length).
    """
    hd = x_BHSD.shape[-1]
    half = hd // 2
    inv_freq = theta ** (-torch.arange(0, half, device=x_BHSD.device, dtype=torch.float32) * 2.0 / hd)
    angles = positions_BS.to(torch.float32)[:, None, :, None] * inv_freq  # [B, 1, S, hd/2]
    cos, sin = angles.cos().to(x_BHSD.dtype), angles.sin().to(x_BHSD.dtype)
    x1, x2 = x_BHSD[..., :half], x_BHSD[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def pregate_gate(logits_TE: Tensor, top_k: int = 1, gate: str = "prob") -> tuple[Tensor, Tensor, Tensor]:
    """The experts and combine weights of pre-gate logits. Returns ``(probs [T,E], weight [T,k],
    index [T,k])``.

    ``index`` is the top-k of ``softmax(logits)`` (``argmax`` for ``k = 1``, Read-ME). ``weight``:

    - ``"one"``: ``1/k`` each (``1`` for the paper's top-1), no gradient: the router then learns
      nothing from the task loss;
    - ``"straight_through"``: the value of ``"one"``, the gradient of ``"prob"``
      (``p + (1/k - p).detach()``);
    - ``"prob"``: the softmax probabilities at the chosen experts (Switch's ``p_i`` gate).
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    probs = torch.softmax(logits_TE.float(), dim=-1)
    p_top, index = torch.topk(probs, top_k, dim=-1)
    if gate == "prob":
        weight = p_top
    elif gate == "one":
        weight = torch.full_like(p_top, 1.0 / top_k)
    else:
        weight = p_top + (1.0 / top_k - p_top).detach()
    return probs, weight, index


# --------------------------------------------------------------------------------- the pre-gate
@dataclass(frozen=True)
class PreGateDecision:
    """One forward's pre-gating, for ``T`` tokens in batch-major order.

    Attributes:
        logits: ``[T, E]`` fp32 pre-gate logits.
        probs: ``[T, E]`` their softmax.
        weight: ``[T, k]`` combine weights (``pregate_gate``).
        index: ``[T, k]`` long experts.
    """

    logits: Tensor
    probs: Tensor
    weight: Tensor
    index: Tensor


class PreGateBlock(nn.Module):
    """One pre-norm block of Read-ME's pre-gate: causal MHA with RoPE, then a ``d -> d -> d`` SiLU MLP."""

    def __init__(self, d: int, n_heads: int, attn_scale: float, rope_theta: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d // n_heads
        self.attn_scale = attn_scale
        self.rope_theta = rope_theta
        self.attn_norm = nn.RMSNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d, bias=True)
        self.out = nn.Linear(d, d, bias=True)
        self.mlp_norm = nn.RMSNorm(d, eps=1e-6)
        self.up = nn.Linear(d, d, bias=True)
        self.down = nn.Linear(d, d, bias=True)

    def forward(self, h_BSD: Tensor, positions_BS: Tensor) -> Tensor:
        b, s, d = h_BSD.shape
        q, k, v = (
            self.qkv(self.attn_norm(h_BSD)).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )
        q, k = rope_rotate(q, positions_BS, self.rope_theta), rope_rotate(k, positions_BS, self.rope_theta)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.attn_scale)
        h_BSD = h_BSD + self.out(a.transpose(1, 2).reshape(b, s, d))
        return h_BSD + self.down(F.silu(self.up(self.mlp_norm(h_BSD))))


class PreGate(nn.Module):
    """Read-ME's pre-gating router: token ids ``[B, S]`` -> logits ``[B, S, E]`` (module docstring).

    Args:
        vocab_size: size of its embedding table (the LM's vocabulary).
        num_experts: ``E``, the number of clusters (experts) it chooses among.
        top_k: experts per token; 1 in Read-ME.
        d_router: embedding and hidden width; 64 (``train_red.py``).
        n_layers, n_heads: 2 and 2 (the paper).
        rope_theta: RoPE base; 10000 (LLaMA's ``rope_theta``, which the official pre-gate reuses).
        attn_normalizer: attention logits are divided by it; None (default, ours) is
            ``sqrt(head_dim)``, the official code uses 1.
        gate: how the chosen experts are weighted (``pregate_gate``); default ``"prob"`` (ours).
        embed_std: std of the embedding's normal init; default 1.0 (ours; Read-ME copies the
            LM's embedding).
    """

    def __init__(
        self,
        vocab_size: int,
        num_experts: int,
        top_k: int = 1,
        *,
        d_router: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
        rope_theta: float = 10000.0,
        attn_normalizer: float | None = None,
        gate: str = "prob",
        embed_std: float = 1.0,
    ) -> None:
        super().__init__()
        self.vocab_size = positive_int("vocab_size", vocab_size)
        self.num_experts = positive_int("num_experts", num_experts)
        self.top_k = top_k_in_range(top_k, num_experts)
        self.d_router = positive_int("d_router", d_router)
        self.n_layers = positive_int("n_layers", n_layers)
        self.n_heads = positive_int("n_heads", n_heads)
        if d_router % n_heads or (d_router // n_heads) % 2:
            raise ValueError(
                f"d_router must be a multiple of n_heads with an even head width (RoPE rotates pairs), "
                f"got d_router={d_router}, n_heads={n_heads}"
            )
        self.rope_theta = positive_float("rope_theta", rope_theta)
        self.attn_normalizer = positive_float("attn_normalizer", attn_normalizer, allow_none=True)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.gate = gate
        self.embed_std = positive_float("embed_std", embed_std)
        head_dim = d_router // n_heads
        scale = 1.0 / (math.sqrt(head_dim) if self.attn_normalizer is None else self.attn_normalizer)
        self.embed = nn.Embedding(vocab_size, d_router)
        self.blocks = nn.ModuleList(
            PreGateBlock(d_router, n_heads, scale, self.rope_theta) for _ in range(n_layers)
        )
        self.norm = nn.RMSNorm(d_router, eps=1e-6)
        self.head = nn.Linear(d_router, num_experts, bias=True)
        # Learned from scratch (ours; Read-ME copies the LM's first d_router embedding columns).
        # A unit-scale embedding outweighs the attention branch in the residual stream at init,
        # so the first decisions follow the token itself (as hash routing) rather than the
        # average of the prefix; N(0, 0.02) made them nearly constant along a sequence and
        # trained worse (docs/methods/pregate.md). Linears keep nn.Linear's init.
        nn.init.normal_(self.embed.weight, std=self.embed_std)

    def config(self) -> dict[str, Any]:
        """The constructor arguments (layers sharing one pre-gate must agree on them)."""
        return {
            "vocab_size": self.vocab_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "d_router": self.d_router,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "rope_theta": self.rope_theta,
            "attn_normalizer": self.attn_normalizer,
            "gate": self.gate,
            "embed_std": self.embed_std,
        }

    def check_ids(self, ids: object, name: str = "token_ids", check_range: bool = True) -> Tensor:
        """``ids`` as long, or a clear error: an integer tensor with values in ``[0, vocab_size)``
        (the range check, a device sync, is skipped with ``check_range=False``)."""
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"{name} must be an integer tensor (torch.long), got {ids.dtype}")
        if check_range and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(
                    f"{name} must lie in [0, vocab_size={self.vocab_size}), got [{lo}, {hi}]: build the "
                    "pregate router with the model's vocab_size (router_kwargs={'vocab_size': ...})"
                )
        return ids.long()

    def forward(self, ids_BS: Tensor, positions_BS: Tensor | None = None) -> Tensor:
        """``[B, S, E]`` fp32 logits; token ``t`` of a row sees ids ``<= t`` of that row only.

        ``positions_BS``: each token's position for RoPE (default ``arange(S)`` in every row).
        """
        ids_BS = self.check_ids(ids_BS, "ids")
        if ids_BS.dim() != 2:
            raise ValueError(f"ids must be [B, S], got shape {tuple(ids_BS.shape)}")
        b, s = ids_BS.shape
        dev = self.head.weight.device
        ids_BS = ids_BS.to(dev)
        if positions_BS is None:
            positions_BS = torch.arange(s, device=dev).expand(b, s)
        # Outside autocast, as Router.router_logits: fp32 unless the model itself was cast.
        with torch.autocast(device_type=dev.type, enabled=False):
            h = self.embed(ids_BS)
            if s:  # attention over an empty sequence is skipped (T = 0 still yields [B, 0, E])
                for blk in self.blocks:
                    h = blk(h, positions_BS.to(dev))
            return self.head(self.norm(h)).float()

    def decide(self, ids_BS: Tensor, positions_BS: Tensor | None = None) -> PreGateDecision:
        """The experts of every token of ``ids [B, S]`` (batch-major ``T = B S``): logits, then
        ``pregate_gate`` with this pre-gate's ``top_k`` and ``gate``."""
        logits = self(ids_BS, positions_BS).reshape(-1, self.num_experts)
        probs, weight, index = pregate_gate(logits, self.top_k, self.gate)
        return PreGateDecision(logits=logits, probs=probs, weight=weight, index=index)

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"gate={self.gate!r}"
        )


# --------------------------------------------------------------------------------- the router
@register_router(
    "pregate",
    paper="Read-ME (Cai et al. 2024), pre-gating router (VITA-Group/READ-ME)",
    summary="a 2-layer causal transformer over token ids picks each token's expert before the backbone; same choice in every layer",
)
class PreGateRouter(Router):
    """Read-ME pre-gating as a moelab router (module docstring).

    It reads ``ctx.token_ids`` (``[T]``, batch-major; ``MoELM`` passes them) and
    ``ctx.batch_shape`` (``(B, S)``; None: the ``T`` tokens are one sequence), never ``x``.
    ``ctx.positions``, when set, are the RoPE positions.

    Args:
        d_model, num_experts: ``d`` (unused by the routing: only the ids are read) and ``E``.
        top_k: experts per token; default 1 (Read-ME).
        vocab_size: the token-id vocabulary; default 256 (moelab's byte tokenizer and
            ``MoELMConfig``'s default; pass the model's for a BPE vocabulary).
        d_router, n_layers, n_heads, rope_theta, attn_normalizer, gate, embed_std: the
            ``PreGate``'s.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        *,
        vocab_size: int = 256,
        d_router: int = 64,
        n_layers: int = 2,
        n_heads: int = 2,
        rope_theta: float = 10000.0,
        attn_normalizer: float | None = None,
        gate: str = "prob",
        embed_std: float = 1.0,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.pregate = PreGate(
            vocab_size,
            num_experts,
            top_k,
            d_router=d_router,
            n_layers=n_layers,
            n_heads=n_heads,
            rope_theta=rope_theta,
            attn_normalizer=attn_normalizer,
            gate=gate,
            embed_std=embed_std,
        )
        self.top_k = self.pregate.top_k

    @property
    def owns_pregate(self) -> bool:
        """Whether the pre-gate is registered here (the first linked router, or an unlinked one)."""
        return "pregate" in self._modules

    def link(self, position: int, layers: Sequence[nn.Module]) -> None:
        """The first pre-gate router of ``layers`` keeps its pre-gate; later ones share it."""
        owner = next(
            (r for r in (getattr(layer, "router", None) for layer in layers) if isinstance(r, PreGateRouter)),
            None,
        )
        if owner is None or owner is self:
            return
        mine, theirs = self.pregate.config(), owner.pregate.config()
        if mine != theirs:
            diff = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
            raise ValueError(
                f"pregate routers of one model share one pre-gate and must agree on its settings; "
                f"layer {position} differs from the first pre-gate layer in (this, first): {diff}"
            )
        if self.owns_pregate:
            del self._modules["pregate"]
        share(self, "pregate", owner.pregate)

    def route(self, x_TD: Tensor, ctx: RoutingContext) -> Routing:
        decision = self.decision(ctx, x_TD.shape[0])
        return Routing.from_topk(
            decision.index,
            decision.weight,
            self.num_experts,
            logits=decision.logits,
            probs=decision.probs,
            validate=False,
        )

    def decision(self, ctx: RoutingContext, num_tokens: int) -> PreGateDecision:
        """This forward's decision: computed by the first layer that asks, then reused from
        ``ctx.slot(pregate)`` by every later layer (the same tokens, the same pre-gate weights)."""
        ids_BS, positions_BS = self._sequences(ctx, num_tokens)
        slot = ctx.slot(self.pregate)
        # A context is one forward; the key still guards against a reused context: other ids or
        # positions (by identity), an optimizer step in between (parameters are updated in place,
        # which bumps their version counters), a first call under no_grad.
        same_tensors = (ctx.token_ids, ctx.positions)
        key = (
            tuple(ids_BS.shape),
            torch.is_grad_enabled(),
            tuple(p._version for p in self.pregate.parameters()),
        )
        cached = slot.get("tensors")
        if (
            cached is not None
            and all(a is b for a, b in zip(cached, same_tensors, strict=True))
            and slot["key"] == key
        ):
            return slot["decision"]
        decision = self.pregate.decide(ids_BS, positions_BS)
        slot["tensors"], slot["key"], slot["decision"] = same_tensors, key, decision
        return decision

    def _sequences(self, ctx: RoutingContext, num_tokens: int) -> tuple[Tensor, Tensor | None]:
        ids = ctx.token_ids
        if ids is None:
            raise ValueError(
                "the pregate router routes by token ids: ctx.token_ids must be a [T] long tensor "
                "(MoELM passes them; for a lone MoE pass RoutingContext(token_ids=ids.reshape(-1)))"
            )
        ids = self.pregate.check_ids(ids, "ctx.token_ids", check_range=False)  # decide() checks values
        if ids.dim() != 1 or ids.shape[0] != num_tokens:
            raise ValueError(
                f"ctx.token_ids must be [T] with T={num_tokens} (one id per routed token), got shape {tuple(ids.shape)}"
            )
        shape = ctx.batch_shape
        if shape is None:
            shape = (1, num_tokens)  # a flat input is one sequence
        elif shape[0] * shape[1] != num_tokens:
            raise ValueError(f"ctx.batch_shape={shape} does not hold the T={num_tokens} routed tokens")
        positions = ctx.positions
        if positions is not None:
            if not isinstance(positions, Tensor) or positions.shape != (num_tokens,):
                got = tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__
                raise ValueError(f"ctx.positions must be [T] with T={num_tokens}, got {got}")
            positions = positions.reshape(shape)
        return ids.reshape(shape), positions

    def extra_repr(self) -> str:
        shared = "" if self.owns_pregate else ", pregate shared"
        return f"{super().extra_repr()}, top_k={self.top_k}{shared}"
