"""γ-MoD: mixture-of-depths layers chosen by attention rank, one router shared by all of them.

Luo et al., *γ-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language Models*
(ICLR 2025, arXiv 2410.13859); official code ``Yaxin9Luo/Gamma-MOD``,
``gamma_mod/model/language_model/llava_llama_mod.py`` (the routed decoder layer, training and
inference forwards) and ``llava_llama.py::compute_attention_rank`` (ARank, ``moelab.analysis.arank``).

γ-MoD converts an existing model. Layers whose attention maps have a low rank (ARank) become
mixture-of-depths (MoD) layers; the other layers are left alone. Every MoD layer reads the same
router, one ``Linear(d, 2, bias=False)``, applied to the layer's input after the layer's own input
norm (``blk.attn_norm``; the official code uses ``self.input_layernorm``):

    logits_t = W · attn_norm(x_t)        p_t = softmax(logits_t)[1]

Training (per sequence, top-k): masked routing adds 1 to ``p_t`` of protected tokens (the
question tokens in the paper; here the tokens whose ``ctx.token_types`` is in ``protected_types``)
so that they are always among the chosen, and each sequence keeps

    k = ceil(S - (1 - capacity) * N_routable)

tokens (``N_routable``: its tokens that are not protected; the official code's
``capacity_factor = 1 - 0.5 * N_img+instr / S``). The chosen tokens run the whole block, attention
and MLP, on the per-sequence gather at their true positions; the MLP output is multiplied by
``p_t`` (unmasked: ``self.mlp(h) * r_weights``, the router's gradient path); the others pass
unchanged. Auxiliary loss: ``CE(logits, 1[chosen])``, mean over tokens, summed over MoD layers,
times ``aux_coef`` (0.01).

Inference (``rule="paper"``, the official ``MoDLlamaDecoderLayer_forward_inference``): a prefill
keeps the tokens with ``p > 0.005``; a decode token (a session that has seen tokens, one new token)
skips the layer when ``p < 0.5``. The two thresholds differ, so a cached generation equals an
uncached full-sequence forward only when every token is judged by one rule: ``rule="causal"``
applies the decode rule (``p >= decode_threshold``) to every token, prefill and decode alike.
Each token's decision then depends on its own hidden state only, which depends on earlier tokens
only, so cached decoding equals uncached greedy decoding (``tests/depth/test_gamma_mod.py``).
``rule="topk"`` keeps the training top-k at evaluation (not causal: for measuring a converted
model at exactly its capacity).

Pure functions (``gamma_mod_topk_count``, ``gamma_mod_selection``, ``gamma_mod_aux_loss``,
``lowest_arank_layers``) are shared with ``moelab.integrations.hf.gamma_mod`` (the same conversion
for a transformers Llama-family model). ``GammaMoD`` is the depth router (registered
``"gamma_mod"``); ``convert`` turns a trained ``MoELM`` into a γ-MoD model; ``select_layers_by_arank``
picks the layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab import registry
from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.depth.base import DepthRouter
from moelab.depth.gather import (
    compute_routing,
    gather_tokens,
    gathered_context,
    ragged_index,
    routing_selection,
)
from moelab.models.blocks import KVCache, Rope, block_cache

PAPER = "γ-MoD (Luo et al., ICLR 2025, arXiv 2410.13859; code Yaxin9Luo/Gamma-MOD)"
CAPACITY = 0.5  # the official scripts' --capacity_factor 0.5
AUX_COEF = 0.01  # the official --router_aux_loss_coef 0.01
PREFILL_THRESHOLD = 0.005  # MoDLlamaDecoderLayer_forward_inference: p > 0.005 kept at prefill
DECODE_THRESHOLD = 0.5  # ... a decode token skips the layer when p < 0.5
RULES = ("paper", "causal", "topk")
GATES = ("mlp", "none")
POSITION_MODES = ("true", "compact")
ARANK_MOD = "arank_mod"  # the official mod_mode: every layer but {0, 1, 2, last}


# -- layer choice ---------------------------------------------------------------------------------
def arank_mod_layers(n_layers: int) -> list[int]:
    """The official ``mod_mode="arank_mod"`` layers: all but the first three and the last."""
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
    return [i for i in range(n_layers) if i not in {0, 1, 2, n_layers - 1}]


def _layer_list(layers: object, n_layers: int, name: str = "layers") -> list[int]:
    """Sorted unique layer indices in ``[0, n_layers)`` (negative ones count from the end)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"{name} must be a list of layer indices, got {layers!r}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise ValueError(f"{name} must hold ints in [0, {n_layers}) (negative from the end), got {i!r}")
        out.append(i % n_layers)
    return sorted(set(out))


def resolve_layers(layers: object, n_layers: int) -> list[int]:
    """The MoD layers: ``"arank_mod"`` (every layer but {0, 1, 2, last}) or a list of indices."""
    if layers is None or layers == ARANK_MOD:
        out = arank_mod_layers(n_layers)
        if not out:
            raise ValueError(
                f"layers='arank_mod' leaves no layer of {n_layers} (it excludes 0, 1, 2 and the last): "
                "pass the layers as a list"
            )
        return out
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'arank_mod' or a list of layer indices, got {layers!r}")
    out = _layer_list(layers, n_layers)
    if not out:
        raise ValueError("layers must name at least one layer")
    return out


def lowest_arank_layers(
    scores: Sequence[float],
    count: int | float | None = None,
    exclude: str | Iterable[int] = ARANK_MOD,
    highest: bool = False,
) -> list[int]:
    """The ``count`` layers of lowest ARank (``highest=True``: highest) among those not excluded, sorted.

    Args:
        scores: ARank of every layer, in depth order (``moelab.analysis.arank_per_layer``).
        count: an int (that many layers), a float in (0, 1] (that fraction of the candidate
            layers, rounded, at least one) or None (every candidate: the official ``arank_mod``).
        exclude: ``"arank_mod"`` (layers 0, 1, 2 and the last, as the official code) or indices
            (negative from the end); ``()`` for none.
        highest: pick the highest-ARank layers instead (a control arm).

    Ties go to the lower layer index.
    """
    if isinstance(scores, Tensor):
        scores = scores.tolist()
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence) or not scores:
        raise ValueError(f"scores must be a non-empty sequence of per-layer ARank values, got {scores!r}")
    vals = [float(s) for s in scores]
    if any(v != v for v in vals):
        raise ValueError(f"scores must not be NaN, got {vals}")
    n = len(vals)
    if isinstance(exclude, str):
        if exclude != ARANK_MOD:
            raise ValueError(f"exclude must be 'arank_mod' or a list of layer indices, got {exclude!r}")
        excluded = {0, 1, 2, n - 1}
    else:
        excluded = set(_layer_list(exclude, n, "exclude"))
    candidates = [i for i in range(n) if i not in excluded]
    if not candidates:
        raise ValueError(f"every one of the {n} layers is excluded ({sorted(excluded)}): no candidate left")
    if count is None:
        k = len(candidates)
    elif isinstance(count, bool) or not isinstance(count, (int, float)):
        raise TypeError(f"count must be an int, a float in (0, 1] or None, got {count!r}")
    elif isinstance(count, int):
        if not 1 <= count <= len(candidates):
            raise ValueError(f"count must lie in [1, {len(candidates)}] (the candidate layers), got {count}")
        k = count
    else:
        if not 0.0 < count <= 1.0:
            raise ValueError(f"count as a fraction must lie in (0, 1], got {count}")
        k = max(1, round(count * len(candidates)))
    sign = -1.0 if highest else 1.0
    order = sorted(candidates, key=lambda i: (sign * vals[i], i))
    return sorted(order[:k])


def select_layers_by_arank(
    model: nn.Module,
    input_ids: Tensor,
    count: int | float | None = None,
    exclude: str | Iterable[int] = ARANK_MOD,
    highest: bool = False,
) -> list[int]:
    """``lowest_arank_layers`` of ``model``'s ARank on ``input_ids [B, S]`` (γ-MoD's layer choice).

    ``model``: a ``MoELM`` (a γ-MoD one is measured on its base schedule, every token through
    every block) or a transformers model (``moelab.analysis.arank_per_layer`` reads its attentions).
    """
    from moelab.analysis.arank import arank_per_layer

    depth = getattr(model, "depth", None)
    if depth is not None and not isinstance(depth, GammaMoD):
        raise ValueError(
            f"the model's blocks are scheduled by {type(depth).__name__}: ARank needs one attention map per layer"
        )
    if depth is not None:
        model.depth = None  # the base schedule: every block on every token
    try:
        scores = arank_per_layer(model, input_ids)
    finally:
        if depth is not None:
            model.depth = depth
    blocks = getattr(model, "blocks", None)
    n = (
        len(blocks)
        if isinstance(blocks, nn.ModuleList)
        else getattr(getattr(model, "config", None), "num_hidden_layers", len(scores))
    )
    if len(scores) != n:
        raise ValueError(f"got {len(scores)} attention maps from a model of {n} layers")
    return lowest_arank_layers(scores, count, exclude, highest)


# -- routing math ---------------------------------------------------------------------------------
def _check_probs(p_BS: object) -> Tensor:
    if not isinstance(p_BS, Tensor) or p_BS.dim() != 2 or not p_BS.is_floating_point():
        got = tuple(p_BS.shape) if isinstance(p_BS, Tensor) else type(p_BS).__name__
        raise ValueError(f"p must be a floating [B, S] tensor of router probabilities, got {got}")
    return p_BS


def _check_protected(protected_BS: object, p_BS: Tensor) -> Tensor:
    if protected_BS is None:
        return torch.zeros_like(p_BS, dtype=torch.bool)
    if (
        not isinstance(protected_BS, Tensor)
        or protected_BS.dtype != torch.bool
        or protected_BS.shape != p_BS.shape
    ):
        got = (
            f"{protected_BS.dtype} {tuple(protected_BS.shape)}"
            if isinstance(protected_BS, Tensor)
            else type(protected_BS).__name__
        )
        raise ValueError(
            f"protected must be a bool tensor of p's shape {tuple(p_BS.shape)} or None, got {got}"
        )
    return protected_BS


def _check_fraction(name: str, value: object, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    ok = 0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must lie in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return float(value)


def gamma_mod_topk_count(seq_len: int, num_routable_B: Tensor, capacity: float = CAPACITY) -> Tensor:
    """``[B]`` long: tokens each sequence keeps in training, ``ceil(S - (1 - capacity) * N_routable)``.

    The official ``top_k = ceil(S * (1 - 0.5 * N_img+instr / S))`` with capacity 0.5; a sequence
    without protected tokens keeps ``ceil(capacity * S)``. (The official code keeps every token
    when ``S`` is shorter than its hard-coded image+instruction length; that case does not arise
    here, where the protected tokens are given.) Rounded as ``ceil(x - 1e-9)`` so that float error
    in ``(1 - capacity) * N`` never adds a token.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
    capacity = _check_fraction("capacity", capacity)
    if not isinstance(num_routable_B, Tensor) or num_routable_B.dim() != 1:
        raise ValueError(
            f"num_routable must be a [B] tensor, got {getattr(num_routable_B, 'shape', num_routable_B)!r}"
        )
    n = num_routable_B.double()
    if bool(((n < 0) | (n > seq_len)).any()):
        raise ValueError(f"num_routable must lie in [0, S={seq_len}], got {num_routable_B.tolist()}")
    k = torch.ceil(seq_len - (1.0 - capacity) * n - 1e-9)
    return k.clamp(0, seq_len).long()


def topk_rows(scores_BS: Tensor, k_B: Tensor) -> Tensor:
    """``[B, S]`` bool: each row's ``k_B[b]`` highest scores (ties: the earlier position first)."""
    b, s = scores_BS.shape
    order = torch.sort(scores_BS.detach().float(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s, device=order.device).expand(b, s))
    return rank < k_B.to(order.device)[:, None]


def gamma_mod_selection(
    p_BS: Tensor,
    protected_BS: Tensor | None = None,
    *,
    training: bool,
    rule: str = "paper",
    decode: bool = False,
    capacity: float = CAPACITY,
    prefill_threshold: float = PREFILL_THRESHOLD,
    decode_threshold: float = DECODE_THRESHOLD,
) -> Tensor:
    """``[B, S]`` bool: the tokens a γ-MoD layer runs (module docstring).

    Masked routing: the selection score is ``p + 1[protected]`` (the official ``+ mod_token_prob_mask``),
    so a protected token is never below a routable one and, at inference, always clears both
    thresholds (our choice: the official inference forward has no mask; we keep protection on).

    - ``training`` (or ``rule="topk"``): per-sequence top-k, ``k = gamma_mod_topk_count``;
    - ``rule="paper"``: ``score > prefill_threshold``, or ``score >= decode_threshold`` when ``decode``;
    - ``rule="causal"``: ``score >= decode_threshold`` for every token.
    """
    p_BS = _check_probs(p_BS)
    protected_BS = _check_protected(protected_BS, p_BS)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    score = p_BS.detach() + protected_BS.to(p_BS.dtype)
    if training or rule == "topk":
        k_B = gamma_mod_topk_count(p_BS.shape[1], (~protected_BS).sum(dim=1), capacity)
        return topk_rows(score, k_B)
    if rule == "paper" and not decode:
        return score > prefill_threshold
    return score >= decode_threshold


def gamma_mod_aux_loss(logits_BS2: Tensor, selected_BS: Tensor) -> Tensor:
    """The router's auxiliary loss of one layer: ``CE(logits, 1[selected])``, mean over tokens (fp32).

    The official ``F.cross_entropy(router_logits.view(-1, 2), router_targets.view(-1).long())``
    (multiplied by ``router_aux_loss_coef`` after summing over layers)."""
    if not isinstance(logits_BS2, Tensor) or logits_BS2.dim() != 3 or logits_BS2.shape[-1] != 2:
        raise ValueError(f"logits must be [B, S, 2], got {getattr(logits_BS2, 'shape', logits_BS2)!r}")
    if (
        not isinstance(selected_BS, Tensor)
        or selected_BS.dtype != torch.bool
        or selected_BS.shape != logits_BS2.shape[:2]
    ):
        raise ValueError(f"selected must be a bool [B, S] = {tuple(logits_BS2.shape[:2])} tensor")
    return F.cross_entropy(logits_BS2.reshape(-1, 2).float(), selected_BS.reshape(-1).long())


def mod_routing(selected_BS: Tensor, weight_BS: Tensor, logits_BS2: Tensor | None = None) -> Routing:
    """The ``Routing`` of one γ-MoD layer (``moelab.depth.gather.compute_routing``); ``logits`` the
    router's log-odds ``l_1 - l_0`` and ``probs`` ``p``, both ``[T, 1]``."""
    logits = probs = None
    if logits_BS2 is not None:
        lg = logits_BS2.reshape(-1, 2)
        logits = (lg[:, 1] - lg[:, 0])[:, None]
        probs = torch.softmax(lg.float(), dim=-1)[:, 1:].to(lg.dtype)
    return compute_routing(selected_BS, weight_BS, logits, probs)


def protected_of(token_types: Tensor | None, protected_types: Sequence[int], b: int, s: int) -> Tensor | None:
    """``[B, S]`` bool: tokens whose type is one of ``protected_types``; None when none can be."""
    if not protected_types or token_types is None:
        return None
    if not isinstance(token_types, Tensor) or token_types.numel() != b * s or token_types.is_floating_point():
        got = tuple(token_types.shape) if isinstance(token_types, Tensor) else type(token_types).__name__
        raise ValueError(f"token_types must be an integer tensor of {b} x {s} = {b * s} entries, got {got}")
    types = torch.tensor(list(protected_types), dtype=torch.long, device=token_types.device)
    return torch.isin(token_types.reshape(b, s).long(), types)


# -- the depth router -----------------------------------------------------------------------------
class GammaMoD(DepthRouter):
    """γ-MoD depth router over ``MoELM`` blocks (module docstring; docs/methods/gamma_mod.md).

    Args:
        d_model: residual width (the router is ``Linear(d_model, 2, bias=False)``).
        n_layers: the model's blocks.
        layers: the MoD layers: a list of block indices, or ``"arank_mod"`` (all but 0, 1, 2 and
            the last; the official mode). Pick them by ARank with ``select_layers_by_arank``.
        capacity: training keeps ``ceil(S - (1 - capacity) N_routable)`` per sequence (0.5).
        protected_types: token types (``ctx.token_types``, e.g. ``moelab.data.mixed``'s TEXT = 0)
            that are always kept (the paper's question tokens). Empty: none.
        aux_coef: weight of the summed CE auxiliary losses (0.01).
        rule: evaluation rule: ``"paper"``, ``"causal"`` or ``"topk"`` (module docstring).
        prefill_threshold, decode_threshold: 0.005 and 0.5 (the official inference forward).
        gate: ``"mlp"``: the MLP output is multiplied by ``p`` (official); ``"none"``: not at all.
        gate_protected: whether protected tokens' MLP output is multiplied by ``p`` too (True as
            the official code; False: protected tokens run the unchanged block).
        position_mode: ``"true"``: the selected tokens keep their positions (our default);
            ``"compact"``: they are renumbered ``0 .. k-1`` per layer, as the official code's
            ``new_position_ids = arange(top_k)``.
    """

    def __init__(
        self,
        d_model: int,
        n_layers: int,
        layers: Sequence[int] | str | None = ARANK_MOD,
        capacity: float = CAPACITY,
        protected_types: Sequence[int] = (),
        aux_coef: float = AUX_COEF,
        rule: str = "paper",
        prefill_threshold: float = PREFILL_THRESHOLD,
        decode_threshold: float = DECODE_THRESHOLD,
        gate: str = "mlp",
        gate_protected: bool = True,
        position_mode: str = "true",
    ) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("n_layers", n_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.layers = resolve_layers(layers, n_layers)
        self.n_layers = n_layers
        self.capacity = _check_fraction("capacity", capacity)
        if isinstance(protected_types, (str, bytes)) or not isinstance(protected_types, Iterable):
            raise TypeError(f"protected_types must be a list of token-type ids, got {protected_types!r}")
        types = list(protected_types)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in types):
            raise ValueError(f"protected_types must hold ints >= 0, got {types!r}")
        self.protected_types = sorted(set(types))
        if isinstance(aux_coef, bool) or not isinstance(aux_coef, (int, float)) or not aux_coef >= 0:
            raise ValueError(f"aux_coef must be a float >= 0, got {aux_coef!r}")
        self.aux_coef = float(aux_coef)
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.prefill_threshold = _check_fraction("prefill_threshold", prefill_threshold, low_open=False)
        self.decode_threshold = _check_fraction("decode_threshold", decode_threshold, low_open=False)
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        self.gate = gate
        if not isinstance(gate_protected, bool):
            raise TypeError(f"gate_protected must be a bool, got {type(gate_protected).__name__}")
        self.gate_protected = gate_protected
        if position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
        self.position_mode = position_mode
        self.router = nn.Linear(d_model, 2, bias=False)  # nn.Linear's default init, as the official code

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> GammaMoD:
        return cls(config.d_model, config.n_layers, **kwargs)

    def config_kwargs(self) -> dict[str, Any]:
        """The JSON-ready ``depth_kwargs`` that rebuild this router (``MoELMConfig.depth_kwargs``)."""
        return {
            "layers": list(self.layers),
            "capacity": self.capacity,
            "protected_types": list(self.protected_types),
            "aux_coef": self.aux_coef,
            "rule": self.rule,
            "prefill_threshold": self.prefill_threshold,
            "decode_threshold": self.decode_threshold,
            "gate": self.gate,
            "gate_protected": self.gate_protected,
            "position_mode": self.position_mode,
        }

    @property
    def causal_at_eval(self) -> bool:
        return self.rule != "topk"

    def extra_repr(self) -> str:
        return f"layers={self.layers}, capacity={self.capacity}, rule={self.rule!r}, gate={self.gate!r}"

    # -- routing ----------------------------------------------------------------------------------
    def route(
        self, h_BSD: Tensor, protected_BS: Tensor | None, decode: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(logits [B, S, 2], p [B, S], selected [B, S] bool, weight [B, S])`` of one MoD layer
        on its normed input ``h``: the router's decision before any routing transform."""
        logits = self.router(h_BSD)
        self.flops += 2.0 * self.router.in_features * 2 * h_BSD.shape[0] * h_BSD.shape[1]
        p = torch.softmax(logits.float(), dim=-1)[..., 1].to(h_BSD.dtype)
        selected = gamma_mod_selection(
            p,
            protected_BS,
            training=self.training,
            rule=self.rule,
            decode=decode,
            capacity=self.capacity,
            prefill_threshold=self.prefill_threshold,
            decode_threshold=self.decode_threshold,
        )
        if self.gate == "none":
            weight = torch.ones_like(p)
        elif protected_BS is not None and not self.gate_protected:
            weight = torch.where(protected_BS, torch.ones_like(p), p)
        else:
            weight = p
        return logits, p, selected, weight

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, blocks: nn.ModuleList, rope: Rope, ctx: RoutingContext, positions: Tensor | None
    ) -> Tensor:
        if len(blocks) <= self.layers[-1]:
            raise ValueError(f"γ-MoD layers {self.layers} need more than the model's {len(blocks)} blocks")
        b, s, _ = x.shape
        session = ctx.session
        decode = session is not None and session.num_seen_tokens > 0 and s == 1
        protected = protected_of(ctx.token_types, self.protected_types, b, s)
        aux = x.new_zeros((), dtype=torch.float32)
        mod = set(self.layers)
        for i, blk in enumerate(blocks):
            cache = block_cache(ctx, blk)
            if i not in mod:
                x = blk(x, rope, ctx, positions=positions, cache=cache)
                continue
            h = blk.attn_norm(x)
            logits, _, selected, weight = self.route(h, protected, decode)
            if self.training:
                aux = aux + gamma_mod_aux_loss(logits, selected)
            routing = mod_routing(selected, weight, logits)
            ran = self.routed(routing, ctx.replace(layer_index=i, batch_shape=(b, s)), x.reshape(b * s, -1))
            if ran is not routing:  # a routing transform decides what runs
                selected, weight = routing_selection(ran, b, s, weight)
            x = self.run_selected(x, h, blk, rope, ctx, positions, cache, selected, weight)
        self.aux_loss = aux * self.aux_coef
        return x

    def run_selected(
        self,
        x: Tensor,
        h: Tensor,
        blk: nn.Module,
        rope: Rope,
        ctx: RoutingContext,
        positions: Tensor | None,
        cache: KVCache | None,
        selected_BS: Tensor,
        weight_BS: Tensor,
    ) -> Tensor:
        """Block ``blk`` on the selected tokens of each sequence (the per-sequence gather), the
        MLP output times ``weight``; the other tokens pass unchanged. ``h``: ``blk.attn_norm(x)``."""
        b, s, _ = x.shape
        if not bool(selected_BS.any()):
            return x
        index, valid = ragged_index(selected_BS)
        k = index.shape[1]
        everything = k == s and bool(valid.all())
        all_valid = bool(valid.all())
        if self.position_mode == "compact":
            prior = cache.valid.sum(dim=1, keepdim=True) if cache is not None and len(cache) else 0
            pos = prior + torch.arange(k, device=x.device)[None, :].expand(b, k)
        elif everything and positions is None:
            pos = None  # every token in place: the block's own plain causal path
        else:
            pos = index if positions is None else positions.gather(1, index)
        x_sel = gather_tokens(x, index)
        a = blk.attn(gather_tokens(h, index), rope, pos, None if all_valid else valid, cache)
        hid = x_sel + a
        f_in = blk.ffn_norm(hid)
        if blk.is_moe:
            sub = gathered_context(ctx, index, s).replace(layer_index=blk.index, batch_shape=(b, k))
            y = blk.ffn(f_in, sub)
            blk.ffn_tokens += b * k
            # Chain-of-Experts drops the residual for norm(x) (as Block.forward)
            base = hid if getattr(blk.ffn, "keeps_block_residual", True) else f_in
        else:
            y = blk.ffn(f_in)
            base = hid
        if self.gate != "none":
            y = y * gather_tokens(weight_BS[..., None], index)
        out = base + y
        if everything:
            return out
        if not all_valid:
            out = out * valid[..., None].to(out.dtype)  # padding rows add nothing
        full = torch.zeros_like(x).scatter_add(1, index[..., None].expand(-1, -1, x.shape[-1]), out)
        return torch.where(selected_BS[..., None], full, x)


registry.register(
    "depth",
    "gamma_mod",
    paper=PAPER,
    summary="mixture-of-depths on the low-ARank layers of a converted model; one shared router, protected tokens always kept",
)(GammaMoD)


# -- conversion -----------------------------------------------------------------------------------
def convert(
    model: nn.Module,
    layers: Sequence[int] | str = ARANK_MOD,
    *,
    input_ids: Tensor | None = None,
    count: int | float | None = None,
    exclude: str | Iterable[int] = ARANK_MOD,
    **options: Any,
) -> nn.Module:
    """Turn a ``MoELM`` into a γ-MoD model in place (base weights untouched); returns it.

    Args:
        model: a ``MoELM`` without a depth router.
        layers: a list of block indices, ``"arank_mod"`` (all but 0, 1, 2, last) or ``"arank"``
            (``select_layers_by_arank(model, input_ids, count, exclude)``: the lowest-ARank ones).
        input_ids, count, exclude: for ``layers="arank"``.
        options: ``GammaMoD``'s other arguments (``capacity``, ``protected_types``, ``rule``, ...).

    Sets ``model.depth`` and ``model.config.depth = "gamma_mod"`` with ``depth_kwargs`` (the
    resolved layers and every option), so ``save_pretrained`` / ``from_pretrained`` round-trip.
    The new router is the only new parameter, on the model's device and dtype.
    """
    from moelab.models.lm import MoELM

    if not isinstance(model, MoELM):
        raise TypeError(
            f"model must be a moelab MoELM, got {type(model).__name__} (transformers: moelab.hf.gamma_mod.convert)"
        )
    if model.depth is not None:
        raise ValueError(f"the model already has a depth router ({type(model.depth).__name__})")
    if isinstance(layers, str) and layers == "arank":
        if input_ids is None:
            raise ValueError("layers='arank' needs input_ids (the samples ARank is measured on)")
        layers = select_layers_by_arank(model, input_ids, count, exclude)
    elif input_ids is not None or count is not None:
        raise ValueError("input_ids and count choose layers by ARank: pass layers='arank' with them")
    router = GammaMoD(model.config.d_model, model.config.n_layers, layers, **options)
    ref = model.embed.weight
    router.to(device=ref.device, dtype=ref.dtype)
    router.train(model.training)  # a new module trains; the model may be in eval mode
    model.config = dataclasses.replace(model.config, depth="gamma_mod", depth_kwargs=router.config_kwargs())
    model.depth = router
    return model


__all__ = [
    "ARANK_MOD",
    "GammaMoD",
    "arank_mod_layers",
    "convert",
    "gamma_mod_aux_loss",
    "gamma_mod_selection",
    "gamma_mod_topk_count",
    "lowest_arank_layers",
    "mod_routing",
    "protected_of",
    "resolve_layers",
    "select_layers_by_arank",
    "topk_rows",
]
