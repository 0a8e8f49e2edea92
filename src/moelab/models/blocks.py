"""The parts of ``MoELM``'s transformer blocks: RoPE, attention with a KV cache, SwiGLU, the block.

Attention takes each token's *position* explicitly, so a block can run on any subset of a
sequence's tokens (mixture-of-depths, recursion, token pruning: the per-sequence gather
``[B, k, d]`` of spine v2) and still rotate and mask by the tokens' true places:

- ``positions [B, S]``: where each query sits (None: ``0 .. S-1``, the plain causal case);
- ``valid [B, S]``: which rows are real (False marks padding of a ragged gather);
- ``cache`` (``KVCache``): keys/values written by earlier calls (decoding), each with its
  position and validity. A query at position p attends to the valid keys at positions <= p.

Without validity or a cache the block takes the fast path
(``scaled_dot_product_attention(is_causal=True)``; ``positions`` must then increase along each
row, as a gather in position order does); otherwise it builds the boolean mask above. Both give
the same result on the same tokens (a test checks it).

With ``MoELMConfig(attention="uoe_attention")`` a block's attention is Union of Experts' selective
multi-head attention (``moelab.attention.selective_heads.SelectiveHeadAttention``, a routed layer:
tokens -> heads) instead: it rotates by the same RoPE tables at the tokens' true positions, takes
no ``valid``, cache or session (no KV cache: decode with ``moelab.generate(..., use_cache=False)``)
and counts its own FLOPs and auxiliary loss.

Every block reports what its last forward cost: ``Attention.flops`` and ``DenseFFN.flops`` are the
forward FLOPs (multiply-adds x 2) accumulated since ``moelab.core.flops.reset_flops``; a block that
runs on k of T tokens costs k tokens' worth.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.attention.moba import MoBAAttention, moba_decode
from moelab.attention.selective_heads import SelectiveHeadAttention
from moelab.core.context import RoutingContext
from moelab.core.flops import routed_flops
from moelab.core.router import router_arguments
from moelab.layers.moe import MoE
from moelab.models.config import MoELMConfig

Rope = tuple[Tensor, Tensor]  # cos, sin: [max_len, head_dim // 2]


def rope_tables(head_dim: int, max_len: int, theta: float) -> Rope:
    """``cos, sin`` of shape ``[max_len, head_dim // 2]`` (Su et al. 2021, RoFormer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, S, hd]`` by position (half-split layout, as LLaMA in transformers).

    ``cos``/``sin``: ``[S, hd/2]`` (every row at the same positions) or ``[B, 1, S, hd/2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of the tokens one attention has processed, for decoding.

    ``k``, ``v``: ``[B, H, L, hd]``; ``positions [B, L]`` long; ``valid [B, L]`` bool (a row that
    skipped this attention at some step is stored invalid, so ragged batches share one tensor).
    Empty until the first ``update``.
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.positions: Tensor | None = None
        self.valid: Tensor | None = None
        self.extra: dict[
            str, Tensor
        ] = {}  # what an attention variant keeps besides K/V (MoBA's raw key tail)

    def __len__(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def update(
        self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Append one call's keys/values; returns everything cached (this call's included)."""
        if self.k is None:
            self.k, self.v, self.positions, self.valid = k, v, positions, valid
        else:
            if k.shape[0] != self.k.shape[0]:
                raise ValueError(f"KVCache holds batch {self.k.shape[0]}, got keys of batch {k.shape[0]}")
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
            self.positions = torch.cat((self.positions, positions), dim=1)
            self.valid = torch.cat((self.valid, valid), dim=1)
        return self.k, self.v, self.positions, self.valid  # type: ignore[return-value]

    def read(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Everything cached, without adding to it (MoR's step-1 KV sharing reads this way)."""
        if self.k is None:
            raise ValueError("KVCache is empty: nothing was cached for this attention yet")
        return self.k, self.v, self.positions, self.valid  # type: ignore[return-value]


def block_cache(ctx: RoutingContext, block: nn.Module, key: Any = 0) -> KVCache | None:
    """The KV cache of ``block`` (its application ``key``: a recursion runs a block several times
    per forward) in the context's session, created empty on first use; None without a session."""
    if ctx.session is None:
        return None
    slot = ctx.session.slot(block)
    cache = slot.get(key)
    if cache is None:
        cache = slot[key] = KVCache()
    return cache


def attention_mask(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor, q_valid: Tensor | None = None) -> Tensor:
    """``[B, 1, Sq, Sk]`` bool: query i may attend key j iff key j is valid and sits at or before i.

    Padding queries (``q_valid`` False) may attend everything: their rows are discarded, and a row
    with no allowed key would be NaN."""
    mask = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    if q_valid is not None:
        mask = mask | ~q_valid[:, :, None]
    return mask[:, None]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE, computed by ``scaled_dot_product_attention``.

    ``forward(x [B, S, d], rope, positions=None, valid=None, cache=None, read_only=False)``: see
    the module docstring. ``read_only``: attend to ``cache`` as it is plus this call's own keys,
    without storing them (MoR's step-1 KV sharing at later recursion steps).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        attention: str = "sdpa",
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.flops = 0.0
        self.moba: nn.Module | None = None
        if attention == "moba":  # MoBA block-sparse attention (moelab.attention.moba)
            kw = dict(attention_kwargs or {})
            kernel = kw.pop("key_conv", None)
            self.moba = MoBAAttention(
                key_conv_size=kernel, num_kv_heads=n_heads, head_dim=self.head_dim, **kw
            )
        elif attention != "sdpa":
            raise ValueError(
                f"attention must be 'sdpa' or 'moba', got {attention!r} ('uoe_attention' is its own "
                "layer, SelectiveHeadAttention, which Block builds)"
            )

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        positions: Tensor | None = None,
        valid: Tensor | None = None,
        cache: KVCache | None = None,
        read_only: bool = False,
    ) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        if self.moba is not None:
            return self._moba_forward(x, q, k, v, rope, positions, valid, cache, read_only)
        if cache is None and valid is None:
            # every row real and no cache: positions increase along each row (a gather keeps
            # position order), so causal masking by position is the lower triangle
            if positions is None:
                pc, ps = cos[:s], sin[:s]
            else:
                pc, ps = cos[positions][:, None], sin[positions][:, None]
            q, k = apply_rope(q, pc, ps), apply_rope(k, pc, ps)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            keys = (s + 1) / 2  # each query's keys, on average
        else:
            if positions is None:
                start = 0 if cache is None or cache.positions is None else int(cache.positions.max()) + 1
                positions = torch.arange(start, start + s, device=x.device).expand(b, s)
            if valid is None:
                valid = torch.ones(b, s, dtype=torch.bool, device=x.device)
            pc, ps = cos[positions][:, None], sin[positions][:, None]  # [B, 1, S, hd/2]
            q, k = apply_rope(q, pc, ps), apply_rope(k, pc, ps)
            k_pos, k_valid = positions, valid
            if cache is not None:
                if read_only:
                    ck, cv, cp, cval = cache.read()
                    k, v = torch.cat((ck, k), dim=2), torch.cat((cv, v), dim=2)
                    k_pos, k_valid = torch.cat((cp, positions), dim=1), torch.cat((cval, valid), dim=1)
                else:
                    k, v, k_pos, k_valid = cache.update(k, v, positions, valid)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask(positions, k_pos, k_valid, valid)
            )
            keys = float(k.shape[2])  # a masked SDPA scores every key (and no count costs a sync)
        self.flops += 2.0 * b * s * (4 * d * d + 2 * d * keys)  # projections + scores and values
        return self.out(y.transpose(1, 2).reshape(b, s, d))

    def _moba_forward(
        self,
        x: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rope: Rope,
        positions: Tensor | None,
        valid: Tensor | None,
        cache: KVCache | None,
        read_only: bool,
    ) -> Tensor:
        """MoBA on a whole sequence in order (prefill or training), or on new tokens against the
        cache (decoding: ``moba_decode``, each new query gating over the cached key blocks). The key
        convolution runs on the rotated keys; decoding keeps its last ``kernel - 1`` inputs in the
        cache (``cache.extra["moba_key_tail"]``)."""
        if valid is not None or read_only or (positions is not None and cache is None):
            raise ValueError(
                "attention='moba' runs on whole sequences in position order; a depth router's gathered "
                "tokens (positions/valid) or read-only caches are not supported with it"
            )
        b, s, d = x.shape
        moba = self.moba
        start = 0 if cache is None else len(cache)  # MoBA caches every token, in order
        pc, ps = rope[0][start : start + s], rope[1][start : start + s]
        q, k = apply_rope(q, pc, ps), apply_rope(k, pc, ps)
        if cache is None:
            y = moba(q, k, v)
            keys = min((s + 1) / 2, moba.top_k * moba.block_size)
        else:
            if moba.key_conv is not None:
                tail = cache.extra.get("moba_key_tail")
                width = moba.key_conv.kernel_size - 1
                if tail is None:
                    tail = k.new_zeros(b, k.shape[1], width, k.shape[3])
                k_in = k
                k = moba.key_conv(k_in, tail)
                cache.extra["moba_key_tail"] = torch.cat((tail, k_in), dim=2)[
                    :, :, k_in.shape[2] + tail.shape[2] - width :
                ]
            pos = torch.arange(start, start + s, device=x.device).expand(b, s)
            k_all, v_all, _, _ = cache.update(k, v, pos, torch.ones(b, s, dtype=torch.bool, device=x.device))
            y = moba_decode(q, k_all, v_all, moba.block_size, moba.top_k, moba.scale)
            keys = min(float(k_all.shape[2]), moba.top_k * moba.block_size)
        self.flops += 2.0 * b * s * (4 * d * d + 2 * d * keys)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class DenseFFN(nn.Module):
    """SwiGLU MLP (Shazeer 2020): ``down(silu(gate x) * up x)``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.flops = 0.0

    def forward(self, x: Tensor) -> Tensor:
        self.flops += 2.0 * x[..., 0].numel() * 3 * self.down.in_features * self.down.out_features
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def routed_ffn(cfg: MoELMConfig, num_experts: int | None = None) -> nn.Module:
    """The routed FFN of an MoE block: a ``moelab.MoE`` with ``cfg.router``, or, when ``cfg.router``
    names a registered routed layer other than ``moe`` (``"soft"``), that layer, built with the
    same arguments (its options in ``router_kwargs``). A router that takes ``vocab_size`` gets the
    model's. ``num_experts``: this layer's ``E`` (default ``cfg.num_experts``; Pyramid-MoE's
    ``experts_per_layer``)."""
    e = cfg.num_experts if num_experts is None else num_experts
    router_kwargs = dict(cfg.router_kwargs)
    if cfg.router in registry.names("router") and "vocab_size" not in router_kwargs:
        # routers over token ids (Read-ME's pre-gate) embed the model's vocabulary
        accepted = router_arguments(registry.get("router", cfg.router).obj)
        if accepted is not None and "vocab_size" in accepted:
            router_kwargs["vocab_size"] = cfg.vocab_size
    kwargs = dict(
        shared_experts=cfg.shared_experts,
        aux_losses=dict(cfg.aux_losses),
        aux_loss_kwargs={k: dict(v) for k, v in cfg.aux_loss_kwargs.items()},
        backend=cfg.backend,
    )
    if cfg.router != "moe" and cfg.router in registry.names("layer"):
        layer_cls = registry.get("layer", cfg.router).obj
        return layer_cls(cfg.d_model, e, cfg.top_k, cfg.expert_hidden, router_kwargs=router_kwargs, **kwargs)
    return MoE(
        cfg.d_model, e, cfg.top_k, cfg.expert_hidden, router=cfg.router, router_kwargs=router_kwargs, **kwargs
    )


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a dense or routed FFN.

    The FFN of block ``index`` is a routed layer (``routed_ffn``) when ``cfg.is_moe_layer(index)``,
    a dense SwiGLU MLP otherwise. The attention is ``Attention`` (``"sdpa"``, ``"moba"``), or for
    ``cfg.attention == "uoe_attention"`` a ``SelectiveHeadAttention`` (``cfg.attention_kwargs``
    to its constructor) that runs with the block's context (``layer_index`` = ``index``, as the
    routed FFN), so traces and ``ctx.history`` see its token -> head routing before the FFN's.

    ``forward(x [B, S, d], rope, ctx, positions=None, valid=None, cache=None, read_only=False)``
    returns the block output ``[B, S, d]`` (the residual included). The optional arguments go to
    ``Attention`` (see the module docstring); a depth router runs a block on its selected tokens
    through them.
    """

    def __init__(self, cfg: MoELMConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn: nn.Module
        if cfg.attention == "uoe_attention":
            self.attn = SelectiveHeadAttention(cfg.d_model, cfg.n_heads, **dict(cfg.attention_kwargs))
        else:
            self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention, cfg.attention_kwargs)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.ffn: nn.Module = routed_ffn(cfg, cfg.experts_at(index))
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.dense_hidden or 4 * cfg.d_model)
        self.ffn_tokens = 0  # tokens the routed FFN ran on since moelab.core.flops.reset_flops

    @property
    def flops(self) -> float:
        """The routed FFN's forward FLOPs since ``reset_flops``, derived on read from the tokens it
        ran and its routed layers' assignments (``moelab.core.flops.routed_flops``); a dense FFN
        and the attention count their own."""
        return routed_flops(self.ffn, self.ffn_tokens) if self.is_moe else 0.0

    def forward(
        self,
        x: Tensor,
        rope: Rope,
        ctx: RoutingContext,
        positions: Tensor | None = None,
        valid: Tensor | None = None,
        cache: KVCache | None = None,
        read_only: bool = False,
    ) -> Tensor:
        # the routed layers' view: this block's index and the [B, S] the flat tokens come from
        layer_ctx = ctx.replace(layer_index=self.index, batch_shape=(x.shape[0], x.shape[1]))
        if isinstance(self.attn, SelectiveHeadAttention):
            self._check_selective_call(ctx, valid, cache, read_only)
            x = x + self.attn(self.attn_norm(x), layer_ctx, rope=rope, positions=positions)
        else:
            x = x + self.attn(self.attn_norm(x), rope, positions, valid, cache, read_only)
        h = self.ffn_norm(x)
        if self.is_moe:
            y = self.ffn(h, layer_ctx)
            self.ffn_tokens += x.shape[0] * x.shape[1]
            # Chain-of-Experts (paper default): the block output is x_C = norm(x) + y, the residual x
            # is dropped; every other layer keeps the pre-norm residual
            return (x if getattr(self.ffn, "keeps_block_residual", True) else h) + y
        return x + self.ffn(h)

    @staticmethod
    def _check_selective_call(
        ctx: RoutingContext, valid: Tensor | None, cache: KVCache | None, read_only: bool
    ) -> None:
        """What ``SelectiveHeadAttention`` cannot do inside a block: decode against a KV cache, or
        run on a depth router's padded gather."""
        if cache is not None or ctx.session is not None:
            raise ValueError(
                "attention='uoe_attention' (SelectiveHeadAttention) has no KV cache, so it cannot decode "
                "with a Session or cache; use moelab.generate(model, input_ids, max_new_tokens, "
                "use_cache=False), which recomputes the whole sequence for every new token"
            )
        if valid is not None or read_only:
            raise ValueError(
                "attention='uoe_attention' runs on whole sequences; a depth router's padded gather "
                "(valid) or read-only cache is not supported with it"
            )
