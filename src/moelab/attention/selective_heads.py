"""Union of Experts, the attention part: selective multi-head attention (SMHA), heads as experts.

Paper and code: Yang, Lian and Li, *Union of Experts: Adapting Hierarchical Routing to Equivalently
Decomposed Transformer* (arXiv 2503.02495, 2025); official code YujiaoYang-work/UoE,
``language_modeling/model/attention/SMHA_v3.py`` (``SwitchGate``, ``preprocess``,
``SparseSelfAttention``, over ``model/layer/layers_v2.py``), which this module follows. The MLP
part is ``moelab.layers.uoe`` (layer ``uoe``); together they make a UoE block.

Multi-head attention is already a union of experts: cut ``W_q, W_k, W_v`` by columns (head ``h``
owns columns ``[h Dh, (h + 1) Dh)``) and ``W_o`` by the matching rows, and

    MHA(x) = sum_h W_o[:, h] attn(x W_q[h], x W_k[h], x W_v[h])

exactly. SMHA lets each token choose some heads and runs each head only on the tokens that chose
it. With ``x`` one sequence ``[S, d]`` and ``H`` heads:

    p        = softmax(W_r x + b_r)                         [S, H]   per token, over heads
    m        = topk_mask_k(p)                                        k = H / 2 heads per token
    I_h      = the positions s with m[s, h], ascending               (the tokens head h takes)
    o_h[I_h] = softmax(q_h k_hᵀ / sqrt(Dh) + causal mask by position) v_h,   all on I_h only
    y[s]     = sum_{h : s in I_h} w[s, h] W_o[:, h] o_h[s]           (+ b_o)

``w = 1``: the official code never multiplies the head outputs by the gate (the gate only
selects, as in the MLP part), so the gate gets no gradient; ``scale_by_gate=True`` uses
``w = p[s, h]`` (our option). With ``k = H`` every token takes every head and ``y = MHA(x)``.

The official ``preprocess`` batches the selection as a rectangle: every head of every sequence
takes ``max_len`` tokens, ``max_len`` the largest number of tokens any head was chosen by in the
batch, and a head chosen by fewer is *padded* with tokens that did not choose it (its ``topk``
over the masked scores ranks those zeros last). ``pad_to_capacity=True`` runs that; the default
(False) runs only the tokens that chose the head, which is the paper's description and keeps the
layer causal (padding depends on later tokens and on the other sequences of the batch).
``capacity`` caps the tokens per head as the MLP part does (``ceil(capacity * S * k / H)``, the
best-scored choosers first; the official SMHA has no cap: ``capacity=None``).

Positions: a head attends among its tokens causally by their true positions (the gathered tokens
keep position order, so this is the official mask on the gathered sequence). Rotary embeddings are
optional (``forward(..., rope=(cos, sin))``); ``rope_positions="token"`` rotates by the tokens'
true positions (our default), ``"rank"`` by their rank within the head's gathered tokens, which is
what ``SMHA_v3`` does (it calls its rotary embedding without position ids).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.checks import (
    finite,
    hidden_states,
    positive_float,
    positive_int,
    same_device_dtype,
    top_k_in_range,
)
from moelab.core.context import RoutingContext, check_context
from moelab.core.routed import RoutedLayer
from moelab.core.routing import Routing
from moelab.layers.moe import aux_losses_of
from moelab.losses.registry import check_aux_loss_kwargs, check_aux_losses
from moelab.routers.uoe import uoe_capacity, uoe_scores

ROPE_POSITIONS = ("token", "rank")


# --------------------------------------------------------------------------------- pure functions
def uoe_head_gate(logits_TH: Tensor, heads_per_token: int) -> tuple[Tensor, Tensor]:
    """The official ``SwitchGate`` over heads: ``(probs [T, H], mask [T, H] bool)``.

    ``probs = softmax(logits)`` over the heads; ``mask`` marks each token's ``heads_per_token``
    most probable heads (``torch.topk``'s choice among exact ties).
    """
    if not isinstance(logits_TH, Tensor) or logits_TH.dim() != 2 or not logits_TH.is_floating_point():
        got = tuple(logits_TH.shape) if isinstance(logits_TH, Tensor) else type(logits_TH).__name__
        raise ValueError(f"logits_TH must be a floating [T, H] tensor, got {got}")
    k = top_k_in_range(heads_per_token, logits_TH.shape[1], name="heads_per_token")
    probs = torch.softmax(logits_TH, dim=-1)
    index = torch.topk(probs.detach(), k, dim=-1).indices
    mask = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device).scatter_(-1, index, True)
    return probs, mask


def uoe_select_head_tokens(
    probs_BSH: Tensor,
    heads_per_token: int,
    *,
    capacity: float | None = None,
    pad_to_capacity: bool = False,
    normalize: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """Which tokens each head takes, per sequence: ``select [B, S, H]`` bool.

    Each token marks its ``heads_per_token`` most probable heads (``uoe_head_gate``'s mask). Then,
    per sequence ``b`` and head ``h``, with ``max_len`` = ``ceil(capacity * S * k / H)`` (capped at
    ``S``), or, for ``capacity=None``, the largest number of markers any head has in any sequence
    (the official ``preprocess``):

    - ``pad_to_capacity=False``: the head takes the tokens that marked it, at most ``max_len`` of
      them (the best-scored). With ``capacity=None`` that is exactly the mask.
    - ``pad_to_capacity=True``: the head takes exactly ``max_len`` tokens, markers first.

    Ranking as the MLP part (``moelab.routers.uoe.patchwise_select``): marked first, then by the
    official gate's score (``p`` masked, divided by its sum over the batch plus ``eps`` when
    ``normalize``), then by position (ascending; the official ``topk`` leaves ties to the device).
    """
    if not isinstance(probs_BSH, Tensor) or probs_BSH.dim() != 3 or not probs_BSH.is_floating_point():
        got = tuple(probs_BSH.shape) if isinstance(probs_BSH, Tensor) else type(probs_BSH).__name__
        raise ValueError(f"probs_BSH must be a floating [B, S, H] tensor, got {got}")
    b, s, h = probs_BSH.shape
    k = top_k_in_range(heads_per_token, h, name="heads_per_token")
    capacity = positive_float("capacity", capacity, allow_none=True)
    _check_bool("pad_to_capacity", pad_to_capacity)
    _check_bool("normalize", normalize)
    eps = positive_float("eps", eps)
    with torch.no_grad():  # selection only: no gradient through a ranking
        score, mask = uoe_scores(probs_BSH.detach(), k, normalize=normalize, eps=eps)
        if capacity is None and not pad_to_capacity:
            return mask
        if capacity is None:
            max_len = int(mask.sum(1).max()) if mask.numel() else 0
        else:
            max_len = uoe_capacity(s, k, h, capacity)
        # scores are >= 0, so -1 puts every non-marker after every marker; the stable sort keeps
        # position order among equal keys
        key_BHS = torch.where(mask, score, -1.0).permute(0, 2, 1)
        order_BHM = torch.sort(key_BHS, dim=-1, descending=True, stable=True).indices[..., :max_len]
        take = (
            torch.ones_like(order_BHM, dtype=torch.bool)
            if pad_to_capacity
            else mask.permute(0, 2, 1).gather(-1, order_BHM)
        )
        select_BHS = torch.zeros(b, h, s, dtype=torch.bool, device=probs_BSH.device).scatter_(
            -1, order_BHM, take
        )
    return select_BHS.permute(0, 2, 1)


def head_token_positions(select_BSH: Tensor) -> tuple[Tensor, Tensor]:
    """Each head's tokens as a padded gather index: ``(pos [B, H, L] long, valid [B, H, L] bool)``.

    ``pos[b, h, :n]`` are the ``n`` positions ``s`` with ``select[b, s, h]``, ascending; the
    remaining ``L - n`` slots are ``valid=False`` with ``pos = 0`` (a safe index whose rows are
    masked out). ``L`` is the largest ``n`` over sequences and heads (0 when nothing is selected).
    """
    _check_select(select_BSH)
    b, s, h = select_BSH.shape
    sel_BHS = select_BSH.permute(0, 2, 1)
    length = int(sel_BHS.sum(-1).max()) if sel_BHS.numel() else 0
    arange = torch.arange(s, device=select_BSH.device)
    # unselected positions sort after every selected one (key S); sorted keys are unique below S
    key_BHS = torch.where(sel_BHS, arange, s)
    pos = torch.sort(key_BHS, dim=-1).values[..., :length]
    valid = pos < s
    return pos.masked_fill(~valid, 0), valid


def gathered_head_attention(
    q_BHLD: Tensor,
    k_BHLD: Tensor,
    v_BHLD: Tensor,
    pos_BHL: Tensor,
    valid_BHL: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> Tensor:
    """Attention of each (sequence, head) among its own gathered tokens: ``o [B, H, L, Dh]``.

    Query slot ``i`` attends key slot ``j`` of the same ``(b, h)`` iff ``valid[j]`` and, when
    ``causal``, ``pos[j] <= pos[i]`` (``pos``: the tokens' true positions). Invalid query slots
    give zeros. ``scale`` defaults to ``1 / sqrt(Dh)``.
    """
    for name, t in (("q_BHLD", q_BHLD), ("k_BHLD", k_BHLD), ("v_BHLD", v_BHLD)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape != q_BHLD.shape or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating [B, H, L, Dh] tensor shaped as q_BHLD, got {got}")
    if not isinstance(pos_BHL, Tensor) or tuple(pos_BHL.shape) != tuple(q_BHLD.shape[:3]):
        raise ValueError(f"pos_BHL must be [B, H, L] = {tuple(q_BHLD.shape[:3])}")
    if not isinstance(valid_BHL, Tensor) or valid_BHL.dtype != torch.bool or valid_BHL.shape != pos_BHL.shape:
        raise ValueError(f"valid_BHL must be a bool [B, H, L] = {tuple(q_BHLD.shape[:3])} tensor")
    _check_bool("causal", causal)
    if q_BHLD.shape[2] == 0:
        return q_BHLD.new_zeros(q_BHLD.shape)
    all_valid = bool(valid_BHL.all())
    if causal and _valid_prefix_increasing(pos_BHL, valid_BHL):
        # valid slots first, in position order (a gather in position order, as
        # head_token_positions makes): for every valid query the position mask is the lower
        # triangle, so the fused kernel's is_causal applies; invalid rows are zeroed below
        o = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, is_causal=True, scale=scale)
    elif not causal and all_valid:
        return F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, scale=scale)
    else:
        allowed = valid_BHL[:, :, None, :]
        if causal:
            allowed = allowed & (pos_BHL[:, :, None, :] <= pos_BHL[:, :, :, None])
        # an invalid query row may attend everything (a row with no allowed key would be NaN);
        # its output is zeroed below
        allowed = allowed | ~valid_BHL[:, :, :, None]
        o = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=allowed, scale=scale)
    return o if all_valid else o * valid_BHL[..., None].to(o.dtype)


def selective_head_attention(
    q_BHSD: Tensor,
    k_BHSD: Tensor,
    v_BHSD: Tensor,
    select_BSH: Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    positions_BS: Tensor | None = None,
) -> Tensor:
    """SMHA's core on ordinary per-head tensors: ``o [B, H, S, Dh]``.

    Head ``h`` of sequence ``b`` attends only among the tokens ``s`` with ``select[b, s, h]``
    (causally by position when ``causal``); ``o[b, h, s] = 0`` where ``select[b, s, h]`` is False.
    ``positions_BS``: the tokens' true positions (default ``0 .. S-1``), for the causal mask.
    Rotary embeddings at true positions commute with the gather: apply them to ``q, k`` first.
    With ``select`` all True this is ``scaled_dot_product_attention(q, k, v, is_causal=causal)``.
    """
    for name, t in (("q_BHSD", q_BHSD), ("k_BHSD", k_BHSD), ("v_BHSD", v_BHSD)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape != q_BHSD.shape or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating [B, H, S, Dh] tensor shaped as q_BHSD, got {got}")
    b, h, s, dh = q_BHSD.shape
    _check_select(select_BSH, (b, s, h))
    pos, valid = head_token_positions(select_BSH)
    token_pos = _positions(positions_BS, b, s, q_BHSD.device)
    index = pos[..., None].expand(-1, -1, -1, dh)
    qg, kg, vg = (t.gather(2, index) for t in (q_BHSD, k_BHSD, v_BHSD))
    pos_true = token_pos[:, None, :].expand(b, h, s).gather(2, pos)
    o = gathered_head_attention(qg, kg, vg, pos_true, valid, causal=causal, scale=scale)  # 0 on padding
    return q_BHSD.new_zeros(q_BHSD.shape).scatter_add(2, index, o)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_select(select_BSH: object, shape: tuple[int, int, int] | None = None) -> None:
    if not isinstance(select_BSH, Tensor) or select_BSH.dim() != 3 or select_BSH.dtype != torch.bool:
        got = (
            f"{tuple(select_BSH.shape)} {select_BSH.dtype}"
            if isinstance(select_BSH, Tensor)
            else type(select_BSH).__name__
        )
        raise ValueError(f"select_BSH must be a bool [B, S, H] tensor, got {got}")
    if shape is not None and tuple(select_BSH.shape) != shape:
        raise ValueError(f"select_BSH must be [B, S, H] = {shape}, got {tuple(select_BSH.shape)}")


def _positions(positions_BS: Tensor | None, b: int, s: int, device: torch.device) -> Tensor:
    """``[B, S]`` long true positions (``0 .. S-1`` by default), checked."""
    if positions_BS is None:
        return torch.arange(s, device=device).expand(b, s)
    if not isinstance(positions_BS, Tensor) or positions_BS.dtype != torch.long:
        got = positions_BS.dtype if isinstance(positions_BS, Tensor) else type(positions_BS).__name__
        raise TypeError(f"positions must be a torch.long tensor, got {got}")
    if tuple(positions_BS.shape) != (b, s):
        raise ValueError(f"positions must be [B, S] = [{b}, {s}], got {tuple(positions_BS.shape)}")
    if positions_BS.numel() and int(positions_BS.min()) < 0:
        raise ValueError("positions must be >= 0")
    return positions_BS.to(device)


def _valid_prefix_increasing(pos_BHL: Tensor, valid_BHL: Tensor) -> bool:
    """Along each row: no valid slot after an invalid one, and positions increase over the valid."""
    if pos_BHL.shape[-1] < 2:
        return True
    later_valid = valid_BHL[..., 1:]
    ok = ~later_valid | (valid_BHL[..., :-1] & (pos_BHL[..., 1:] > pos_BHL[..., :-1]))
    return bool(ok.all())


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, half-split layout (LLaMA in transformers; ``moelab.models.blocks.apply_rope``)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# --------------------------------------------------------------------------------- the layer
class SelectiveHeadAttention(RoutedLayer):
    """UoE's selective multi-head attention (module docstring; docs/methods/uoe_attention.md).

    Args:
        d_model: ``d``.
        n_heads: ``H``, the experts.
        heads_per_token: ``k``, heads each token chooses (official: ``H // 2``; at least 1).
        causal: causal attention by position among each head's tokens (official: True).
        capacity: None (official SMHA: no cap), or cap each head at ``ceil(capacity * S * k / H)``
            tokens per sequence (the MLP part's rule).
        pad_to_capacity: fill each head up to that many tokens with tokens that did not choose
            it (the official code's rectangular batching); default False.
        normalize, eps: the official gate's normalisation over the batch (ranks only the capped
            or padded choices; no effect with the defaults).
        scale_by_gate: multiply head ``h``'s output for a token by ``p[token, h]`` (our option;
            official: False, the gate only selects and gets no gradient).
        head_dim: ``Dh`` (default ``d / H``).
        bias: biases on the q/k/v projections (per-head slices) and a dense output bias added to
            every token (our choice; default False, as MoELM's attention).
        gate_bias: the gate ``nn.Linear(d, H)`` has a bias (official: yes).
        rope_positions: ``"token"`` (true positions) or ``"rank"`` (official ``SMHA_v3``), for a
            ``rope`` passed to ``forward``.
        aux_losses, aux_loss_kwargs: auxiliary losses on the gate's routing by name
            (``{"load_balance": 1e-2}``); default none, as the official code.
        check_finite: raise on NaN/Inf input.

    The weights are an ordinary MHA's: ``q_proj, k_proj, v_proj`` (``nn.Linear(d, H Dh)``, head
    ``h`` = rows ``[h Dh, (h + 1) Dh)``) and ``o_proj`` (``nn.Linear(H Dh, d)``); ``from_weights``
    builds the layer from an MHA's. ``gate`` is ``nn.Linear(d, H)``.

    ``forward(x [B, S, d] or [T, d], ctx=None, *, rope=None, positions=None) -> same shape``;
    ``forward_routed`` also returns the routing (tokens -> heads, ``E = H``). ``rope``: ``(cos,
    sin)`` tables ``[max_len, Dh / 2]`` (``moelab.models.blocks.rope_tables``), or None for none.
    ``positions``: ``[B, S]`` long true positions (default ``ctx.positions``, else ``0 .. S-1``).
    After each forward ``aux_loss`` holds the weighted auxiliary loss (0 without ``aux_losses``)
    and ``flops`` accumulates the forward FLOPs (``moelab.core.flops``).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        heads_per_token: int | None = None,
        *,
        causal: bool = True,
        capacity: float | None = None,
        pad_to_capacity: bool = False,
        normalize: bool = True,
        eps: float = 1e-8,
        scale_by_gate: bool = False,
        head_dim: int | None = None,
        bias: bool = False,
        gate_bias: bool = True,
        rope_positions: str = "token",
        aux_losses: dict[str, float] | None = None,
        aux_loss_kwargs: dict[str, dict] | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.n_heads = positive_int("n_heads", n_heads)
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"n_heads={n_heads} must divide d_model={d_model} (or give head_dim)")
            head_dim = d_model // n_heads
        self.head_dim = positive_int("head_dim", head_dim)
        if heads_per_token is None:
            heads_per_token = max(1, n_heads // 2)  # official SwitchGate: topk = num_experts // 2
        self.heads_per_token = top_k_in_range(heads_per_token, n_heads, name="heads_per_token")
        self.capacity = positive_float("capacity", capacity, allow_none=True)
        for name, value in (
            ("causal", causal),
            ("pad_to_capacity", pad_to_capacity),
            ("normalize", normalize),
            ("scale_by_gate", scale_by_gate),
            ("bias", bias),
            ("gate_bias", gate_bias),
            ("check_finite", check_finite),
        ):
            _check_bool(name, value)
        if rope_positions not in ROPE_POSITIONS:
            raise ValueError(f"rope_positions must be one of {ROPE_POSITIONS}, got {rope_positions!r}")
        self.causal, self.pad_to_capacity, self.normalize = causal, pad_to_capacity, normalize
        self.scale_by_gate, self.check_finite = scale_by_gate, check_finite
        self.rope_positions = rope_positions
        self.eps = positive_float("eps", eps)
        inner = self.n_heads * self.head_dim
        self.gate = nn.Linear(d_model, n_heads, bias=gate_bias)
        self.q_proj = nn.Linear(d_model, inner, bias=bias)
        self.k_proj = nn.Linear(d_model, inner, bias=bias)
        self.v_proj = nn.Linear(d_model, inner, bias=bias)
        self.o_proj = nn.Linear(inner, d_model, bias=bias)
        self.aux_coefficients = check_aux_losses(aux_losses)
        self.aux_loss_kwargs = check_aux_loss_kwargs(aux_loss_kwargs, self.aux_coefficients)
        self.aux_loss: Tensor = torch.zeros(())
        self.aux_terms: dict[str, Tensor] = {}
        self.flops = 0.0

    routed_kind = "attention"  # tokens -> heads: kept out of the trainer's expert statistics

    # the routed-layer surface other parts read (load_balance_seq_unbiased, moelab compare)
    @property
    def num_experts(self) -> int:
        return self.n_heads

    @property
    def top_k(self) -> int:
        return self.heads_per_token

    @property
    def causal_at_eval(self) -> bool:
        """True when a token's output depends on no later token: causal attention and a selection
        by the token's own gate (no cap, no padding: those rank whole sequences)."""
        return self.causal and self.capacity is None and not self.pad_to_capacity

    @classmethod
    def from_weights(
        cls, w_q: Tensor, w_k: Tensor, w_v: Tensor, w_o: Tensor, n_heads: int, **kwargs: Any
    ) -> SelectiveHeadAttention:
        """The layer whose heads are those of the MHA ``(w_q, w_k, w_v [H Dh, d], w_o [d, H Dh])``
        (``nn.Linear`` layout, head ``h`` = rows / columns ``[h Dh, (h + 1) Dh)``). A fresh gate;
        ``kwargs`` go to the constructor (not ``bias``: set the biases after building)."""
        for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
            if not isinstance(w, Tensor) or w.dim() != 2:
                got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                raise ValueError(f"{name} must be a 2-D weight, got {got}")
        inner, d = w_q.shape
        if w_k.shape != w_q.shape or w_v.shape != w_q.shape or tuple(w_o.shape) != (d, inner):
            raise ValueError(
                f"w_q, w_k, w_v must be [H Dh, d] and w_o [d, H Dh]; got {tuple(w_q.shape)}, "
                f"{tuple(w_k.shape)}, {tuple(w_v.shape)}, {tuple(w_o.shape)}"
            )
        if inner % positive_int("n_heads", n_heads):
            raise ValueError(f"n_heads={n_heads} must divide the projections' width {inner}")
        layer = cls(d, n_heads, head_dim=inner // n_heads, **kwargs)
        layer.to(device=w_q.device, dtype=w_q.dtype)
        with torch.no_grad():
            for proj, w in (
                (layer.q_proj, w_q),
                (layer.k_proj, w_k),
                (layer.v_proj, w_v),
                (layer.o_proj, w_o),
            ):
                proj.weight.copy_(w)
        return layer

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        ctx: RoutingContext | None = None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        return self.forward_routed(x, ctx, rope=rope, positions=positions)[0]

    def forward_routed(
        self,
        x: Tensor,
        ctx: RoutingContext | None = None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Routing]:
        """``(y, routing)``: the layer output and the token -> head routing that ran."""
        hidden_states(x, self.d_model, name="x")
        same_device_dtype(x, self.q_proj.weight, name="x", what="the SelectiveHeadAttention's parameters")
        if self.check_finite:
            finite(x, "x")
        ctx = check_context(ctx)
        if x.dim() == 3:
            b, s = x.shape[0], x.shape[1]
            if ctx.batch_shape != (b, s):
                ctx = ctx.replace(batch_shape=(b, s))
        elif ctx.batch_shape is not None and ctx.batch_shape[0] * ctx.batch_shape[1] == x.shape[0]:
            b, s = ctx.batch_shape
        else:
            b, s = 1, x.shape[0]  # a flat input is one sequence
            if ctx.batch_shape is not None:
                ctx = ctx.replace(batch_shape=None)
        t, h = b * s, self.n_heads
        x_TD = x.reshape(t, self.d_model)
        if positions is None and ctx.positions is not None:
            if not isinstance(ctx.positions, Tensor) or ctx.positions.numel() != t:
                raise ValueError(
                    f"ctx.positions must hold one position per token ({t}), got {ctx.positions!r}"
                )
            positions = ctx.positions.reshape(b, s)
        token_pos_BS = _positions(positions, b, s, x.device)
        cos_sin = self._check_rope(rope, token_pos_BS, s)

        # the gate: selection only, unless scale_by_gate or an auxiliary loss trains it
        logits = self.gate(x_TD)
        probs, mask = uoe_head_gate(logits, self.heads_per_token)
        select = uoe_select_head_tokens(
            probs.detach().view(b, s, h),
            self.heads_per_token,
            capacity=self.capacity,
            pad_to_capacity=self.pad_to_capacity,
            normalize=self.normalize,
            eps=self.eps,
        ).reshape(t, h)
        token, head = select.nonzero(as_tuple=True)  # token-major, heads ascending
        weight = probs[token, head] if self.scale_by_gate else probs.new_ones(token.shape[0]).detach()
        with torch.no_grad():
            taken = select.sum(0)
            requested = taken + (mask & ~select).sum(0)  # what the gate asked for before a cap
        exact_k = self.capacity is None and not self.pad_to_capacity  # select == mask: k per token
        routing = Routing(
            token_index=token,
            expert_index=head,
            weight=weight,
            num_tokens=t,
            num_experts=h,
            logits=logits,
            probs=probs,
            top_k=self.heads_per_token if exact_k else None,
            requested=requested,
            validate=False,
        )
        self.aux_terms, self.aux_loss = aux_losses_of(self, routing, ctx)
        ran = self.routed(routing, ctx, x_TD)
        if ran is not routing:  # a routing transform rewrote what runs
            token, head, weight = ran.token_index, ran.expert_index, ran.weight
            select = torch.zeros(t, h, dtype=torch.bool, device=x.device)
            select[token, head] = True
        weight_BSH = probs.new_zeros(t, h).index_put((token, head), weight.to(probs.dtype)).view(b, s, h)

        y = self._attend(
            x_TD.view(b, s, self.d_model), select.view(b, s, h), weight_BSH, token_pos_BS, cos_sin
        )
        if self.o_proj.bias is not None:
            y = y + self.o_proj.bias
        return y.reshape(x.shape), ran

    def _check_rope(self, rope: object, token_pos_BS: Tensor, s: int) -> tuple[Tensor, Tensor] | None:
        if rope is None:
            return None
        if not (
            isinstance(rope, (tuple, list)) and len(rope) == 2 and all(isinstance(r, Tensor) for r in rope)
        ):
            raise TypeError("rope must be a (cos, sin) pair of [max_len, head_dim / 2] tensors, or None")
        cos, sin = rope
        if self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != self.head_dim // 2:
            raise ValueError(
                f"rope tables must both be [max_len, head_dim / 2 = {self.head_dim // 2}], got "
                f"{tuple(cos.shape)} and {tuple(sin.shape)}"
            )
        if self.rope_positions == "rank":
            needed = s  # a head's ranks run up to its token count, at most S
        else:
            needed = int(token_pos_BS.max()) + 1 if token_pos_BS.numel() else 0
        if needed > cos.shape[0]:
            raise ValueError(f"rope tables cover {cos.shape[0]} positions; this input needs {needed}")
        return cos.to(token_pos_BS.device), sin.to(token_pos_BS.device)

    def _attend(
        self,
        x_BSD: Tensor,
        select_BSH: Tensor,
        weight_BSH: Tensor,
        token_pos_BS: Tensor,
        cos_sin: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """Gather each head's tokens, project them with that head's slices, attend, project back
        with the head's rows of ``W_o`` and add each head's rows into its tokens."""
        b, s, d = x_BSD.shape
        h, dh = self.n_heads, self.head_dim
        pos, valid = head_token_positions(select_BSH)  # [B, H, L]
        length = pos.shape[-1]
        y = x_BSD.new_zeros(b, s, d)
        if length == 0:
            return y
        batch = torch.arange(b, device=x_BSD.device)[:, None, None]
        x_BHLD = x_BSD[batch, pos]  # [B, H, L, d]: head h's tokens
        # per-head slices of the projections: [H, d, 3 Dh]
        w_qkv = torch.cat(
            [p.weight.view(h, dh, d) for p in (self.q_proj, self.k_proj, self.v_proj)], dim=1
        ).transpose(1, 2)
        qkv = torch.matmul(x_BHLD, w_qkv)  # [B, H, L, 3 Dh]
        if self.q_proj.bias is not None:
            qkv = qkv + torch.cat(
                [p.bias.view(h, 1, dh) for p in (self.q_proj, self.k_proj, self.v_proj)], dim=-1
            )
        q, k, v = qkv.split(dh, dim=-1)
        pos_true = token_pos_BS[:, None, :].expand(b, h, s).gather(2, pos)
        if cos_sin is not None:
            cos, sin = cos_sin
            if self.rope_positions == "token":
                rot = pos_true
            else:  # rank within the head's tokens (valid slots come first, in position order)
                rot = torch.arange(length, device=pos.device).expand(b, h, length)
            q, k = _rotate(q, cos[rot], sin[rot]), _rotate(k, cos[rot], sin[rot])
        o = gathered_head_attention(q, k, v, pos_true, valid, causal=self.causal)
        # the routing's weight (1 unless scale_by_gate or a transform) and 0 on padding slots
        w_BHL = weight_BSH.permute(0, 2, 1).gather(2, pos) * valid.to(weight_BSH.dtype)
        o = o * w_BHL[..., None].to(o.dtype)
        w_out = self.o_proj.weight.view(d, h, dh).permute(1, 2, 0)  # [H, Dh, d]
        y_BHLD = torch.matmul(o, w_out)
        y = y.index_put((batch.expand_as(pos), pos), y_BHLD.to(y.dtype), accumulate=True)
        # forward FLOPs (multiply-adds x 2): the gate per token, the four projections per (token,
        # head) taken, scores and values per attended pair (n (n + 1) / 2 per head when causal)
        n = valid.sum(-1).double()
        taken = float(n.sum())
        pairs = float((n * (n + 1) / 2 if self.causal else n * n).sum())
        self.flops += 2.0 * (b * s * d * h + taken * 4 * d * dh + pairs * 2 * dh)
        return y

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, heads_per_token={self.heads_per_token}, "
            f"head_dim={self.head_dim}, causal={self.causal}, capacity={self.capacity}, "
            f"pad_to_capacity={self.pad_to_capacity}, scale_by_gate={self.scale_by_gate}, "
            f"rope_positions={self.rope_positions!r}"
        )


registry.register(
    "attention",
    "uoe_attention",
    paper="Union of Experts (Yang et al. 2025, arXiv 2503.02495), SMHA; YujiaoYang-work/UoE SMHA_v3.py",
    summary="heads as experts: each token picks its top H/2 heads by a softmax gate; each head attends "
    "only among the tokens that picked it (causal by position); outputs unweighted",
)(SelectiveHeadAttention)
