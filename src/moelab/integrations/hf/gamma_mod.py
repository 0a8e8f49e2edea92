"""``moelab.hf.gamma_mod``: γ-MoD conversion of a transformers Llama-family model.

The same method as ``moelab.depth.gamma_mod`` (Luo et al., ICLR 2025; official code
``Yaxin9Luo/Gamma-MOD`` ``llava_llama_mod.py``, which patches ``LlamaDecoderLayer.forward`` the same
way): the chosen decoder layers run on the tokens one shared ``Linear(hidden, 2, bias=False)``
router selects, applied to ``input_layernorm(h)``; the MLP output is multiplied by ``p``.

    model = AutoModelForCausalLM.from_pretrained(...)        # Llama, SmolLM2, Qwen2, Mistral, ...
    gm = moelab.hf.gamma_mod.convert(model, layers="arank", input_ids=samples)   # in place
    model(ids, labels=ids).loss + gm.aux_loss                 # train the router (and the model)
    moelab.hf.gamma_mod.remove(model)                          # the original model, exactly

Each converted layer's ``forward`` is replaced by an instance attribute (the class and the
weights are untouched; ``remove`` deletes it). The layer gathers its selected tokens per sequence
(``[B, k, d]``, position order), gives the attention their position ids and rotary embeddings
(true positions, or ``0 .. k-1`` with ``position_mode="compact"``, the official code's) and a
causal mask among them, runs attention and MLP on them and writes them back; the others pass
unchanged. With a ``DynamicCache`` (``generate``) only the selected tokens' keys and values are
cached; the module remembers each cached entry's position and validity (a row that skipped the
layer at a step stores a masked entry), so later queries attend to exactly the tokens that ran.

Limits (each refused with a ``ValueError``): eager or SDPA attention only (the mask is an additive
float mask); no sliding-window layers; layer 0 is never converted (transformers reads the past
length from layer 0's cache); caches other than ``DynamicCache``. A padding mask given to the
model is honoured (the last query's row of the model's mask says which keys are padding).

Protected tokens: set ``gm.token_types`` to a ``[B, L]`` integer tensor (types by position, e.g.
the prompt's); a token at position ``p < L`` is protected when ``token_types[b, p]`` is in
``protected_types``; tokens beyond ``L`` (generated ones) are not.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.context import RoutingContext
from moelab.depth.gamma_mod import (
    ARANK_MOD,
    GammaMoD,
    gamma_mod_aux_loss,
    mod_routing,
    protected_of,
    select_layers_by_arank,
)
from moelab.depth.gather import gather_tokens, ragged_index, routing_selection

ATTRIBUTE = "gamma_mod"  # where the router module hangs on the converted model


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder (``LlamaModel``) of a ``*ForCausalLM`` or the decoder itself: the module with
    ``layers`` and ``rotary_emb``."""
    for m in (getattr(model, "model", None), model):
        if (
            isinstance(m, nn.Module)
            and isinstance(getattr(m, "layers", None), nn.ModuleList)
            and hasattr(m, "rotary_emb")
        ):
            return m
    raise ValueError(
        f"{type(model).__name__} is not a Llama-family decoder: expected .model.layers and .model.rotary_emb"
    )


def _check_layer(layer: nn.Module, i: int) -> None:
    needed = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
    missing = [n for n in needed if not isinstance(getattr(layer, n, None), nn.Module)]
    if missing or not hasattr(layer.self_attn, "layer_idx"):
        raise ValueError(
            f"decoder layer {i} ({type(layer).__name__}) is not Llama-like: missing {missing or ['self_attn.layer_idx']}"
        )
    if "forward" in layer.__dict__:
        raise ValueError(f"decoder layer {i} already has a patched forward: remove that patch first")


class HFGammaMoD(GammaMoD):
    """The shared router and the rules of a γ-MoD transformers model (``convert`` builds it).

    ``GammaMoD``'s options and routing (``route``); ``forward(layer, hidden_states, ...)`` is one
    converted decoder layer's forward (the patched layers call it). ``aux_loss`` sums the layers'
    CE losses of the last forward, times ``aux_coef`` (reset when the decoder starts a forward).
    ``token_types``: ``[B, L]`` types by position (module docstring) or None.
    """

    def __init__(self, hidden_size: int, n_layers: int, layers: Sequence[int] | str, **options: Any) -> None:
        super().__init__(hidden_size, n_layers, layers, **options)
        if 0 in self.layers:
            raise ValueError(
                "layer 0 cannot be a γ-MoD layer of a transformers model: transformers reads the past length "
                "(positions, masks) from layer 0's KV cache"
            )
        self.token_types: Tensor | None = None
        # cache object -> {layer index: (positions [B, L], valid [B, L]) of the entries it holds}
        self.__dict__["_cached"] = weakref.WeakKeyDictionary()
        self.__dict__["_rotary"] = None  # the decoder's rotary embedding (not a submodule of this one)

    def reset(self) -> None:
        """Start a forward: no auxiliary loss, no FLOPs yet."""
        self.aux_loss = torch.zeros((), device=self.router.weight.device)
        self.flops = 0.0

    def protected_at(self, positions_BS: Tensor) -> Tensor | None:
        """``[B, S]`` bool protected tokens at these positions, from ``token_types`` (or None)."""
        types = self.token_types
        if types is None or not self.protected_types:
            return None
        b, s = positions_BS.shape
        if (
            not isinstance(types, Tensor)
            or types.dim() != 2
            or types.is_floating_point()
            or types.shape[0] != b
        ):
            got = tuple(types.shape) if isinstance(types, Tensor) else type(types).__name__
            raise ValueError(
                f"token_types must be an integer [B={b}, L] tensor of types by position, got {got}"
            )
        inside = positions_BS < types.shape[1]
        at = types.to(positions_BS.device).gather(1, positions_BS.clamp(max=types.shape[1] - 1))
        protected = protected_of(at.reshape(-1), self.protected_types, b, s)
        return protected & inside

    def forward(  # type: ignore[override]
        self,
        layer: nn.Module,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        b, s, d = hidden_states.shape
        li = int(layer.self_attn.layer_idx)
        dev = hidden_states.device
        table = self.cached_entries(cache)
        prior = None if table is None else table.get(li)
        if prior is None:
            prior = (
                torch.zeros(b, 0, dtype=torch.long, device=dev),
                torch.zeros(b, 0, dtype=torch.bool, device=dev),
            )
        if cache is not None and cache.get_seq_length(li) != prior[0].shape[1]:
            raise ValueError(
                f"layer {li}'s KV cache holds {cache.get_seq_length(li)} entries, γ-MoD recorded {prior[0].shape[1]}: "
                "the cache was filled outside this conversion"
            )
        decode = s == 1 and table is not None and li in table
        if position_ids is None:
            start = cache.get_seq_length(0) if cache is not None else 0
            position_ids = torch.arange(start, start + s, device=dev)[None]
        pos_BS = position_ids.to(dev).expand(b, s)
        key_ok = self.key_padding(attention_mask, b, s)

        h = layer.input_layernorm(hidden_states)
        logits, _, selected, weight = self.route(h, self.protected_at(pos_BS), decode)
        if self.training:
            self.aux_loss = self.aux_loss + self.aux_coef * gamma_mod_aux_loss(logits, selected)
        routing = mod_routing(selected, weight, logits)
        ran = self.routed(
            routing, RoutingContext(batch_shape=(b, s), layer_index=li), hidden_states.reshape(b * s, d)
        )
        if ran is not routing:
            selected, weight = routing_selection(ran, b, s, weight)
        if not bool(selected.any()):
            if table is not None:
                table[li] = prior
            return hidden_states

        index, valid = ragged_index(selected)
        k = index.shape[1]
        prior_pos, prior_valid = prior
        if self.position_mode == "compact":
            q_pos = prior_valid.sum(dim=1, keepdim=True) + torch.arange(k, device=dev)[None, :]
        else:
            q_pos = pos_BS.gather(1, index)
        cos, sin = self.rotary_for(gather_tokens(h, index), q_pos, index, position_embeddings, b)
        k_valid_new = valid if key_ok is None else valid & key_ok.gather(1, index)
        k_pos = torch.cat((prior_pos, q_pos), dim=1)
        k_valid = torch.cat((prior_valid, k_valid_new), dim=1)
        allowed = ((k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]) | ~valid[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=h.dtype, device=dev)
        mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)[:, None]
        attn_out, _ = layer.self_attn(
            hidden_states=gather_tokens(h, index),
            attention_mask=mask,
            position_ids=q_pos,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=(cos, sin),
            **kwargs,
        )
        if table is not None:
            table[li] = (k_pos, k_valid)
        hid = gather_tokens(hidden_states, index) + attn_out
        y = layer.mlp(layer.post_attention_layernorm(hid))
        if self.gate != "none":
            y = y * gather_tokens(weight[..., None], index)
        out = (hid + y) * valid[..., None].to(hid.dtype)
        full = torch.zeros_like(hidden_states).scatter_add(1, index[..., None].expand(-1, -1, d), out)
        return torch.where(selected[..., None], full, hidden_states)

    def cached_entries(self, cache: Any) -> dict[int, tuple[Tensor, Tensor]] | None:
        """This module's record of ``cache``'s entries, by layer (None without a cache)."""
        if cache is None:
            return None
        from transformers import DynamicCache

        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"γ-MoD layers cache their selected tokens in a DynamicCache, got {type(cache).__name__}"
            )
        table = self.__dict__["_cached"]
        if cache not in table:
            table[cache] = {}
        return table[cache]

    @staticmethod
    def key_padding(attention_mask: Tensor | None, b: int, s: int) -> Tensor | None:
        """``[B, S]`` bool: which of this call's tokens are real keys (not padding), read from the
        last query's row of the model's 4-D mask (bool: True = attend; float: 0 = attend)."""
        if attention_mask is None or not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4:
            return None
        row = attention_mask[:, 0, -1, -s:]
        ok = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
        return ok.expand(b, s)

    def rotary_for(
        self,
        x_BKD: Tensor,
        q_pos_BK: Tensor,
        index_BK: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None,
        b: int,
    ) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` of the selected tokens: gathered from the decoder's (true positions) or
        recomputed by its rotary embedding at ``q_pos`` (compact positions)."""
        if self.position_mode == "true" and position_embeddings is not None:
            cos, sin = position_embeddings
            idx = index_BK[..., None].expand(-1, -1, cos.shape[-1])
            return cos.expand(b, -1, -1).gather(1, idx), sin.expand(b, -1, -1).gather(1, idx)
        rotary = self.__dict__["_rotary"]
        if rotary is None:
            raise ValueError("no rotary embedding to compute the selected tokens' positions with")
        return rotary(x_BKD, position_ids=q_pos_BK)


def gamma_mod_of(model: nn.Module) -> HFGammaMoD | None:
    """The ``HFGammaMoD`` of a converted model, or None."""
    m = getattr(model, ATTRIBUTE, None)
    return m if isinstance(m, HFGammaMoD) else None


def convert(
    model: nn.Module,
    layers: Sequence[int] | str = ARANK_MOD,
    *,
    input_ids: Tensor | None = None,
    count: int | float | None = None,
    exclude: str | Iterable[int] = ARANK_MOD,
    **options: Any,
) -> HFGammaMoD:
    """Convert a transformers Llama-family ``*ForCausalLM`` to γ-MoD in place; returns the router module.

    Args:
        model: e.g. ``LlamaForCausalLM`` (SmolLM2), eager or SDPA attention.
        layers: decoder-layer indices, ``"arank_mod"`` (all but 0, 1, 2, last; the official
            mode) or ``"arank"`` (the ``count`` lowest-ARank layers on ``input_ids`` outside
            ``exclude``; layer 0 is always excluded here).
        options: ``moelab.depth.gamma_mod.GammaMoD``'s (``capacity``, ``protected_types``, ``rule``,
            ``gate``, ``gate_protected``, ``position_mode``, thresholds, ``aux_coef``).

    The module hangs at ``model.gamma_mod`` (so ``model.parameters()`` holds the router, on the
    model's device and dtype); base weights are untouched. ``remove(model)`` undoes everything.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (nn.Module), got {type(model).__name__}")
    if gamma_mod_of(model) is not None:
        raise ValueError("the model is already γ-MoD converted: moelab.hf.gamma_mod.remove(model) first")
    decoder = decoder_of(model)
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        raise ValueError(
            f"γ-MoD layers need eager or sdpa attention (an additive mask), the model uses {impl!r}"
        )
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(config, "use_sliding_window", False):
        raise ValueError(f"γ-MoD supports full-attention layers only, the model has {sorted(kinds)}")
    n = len(decoder.layers)
    if isinstance(layers, str) and layers == "arank":
        if input_ids is None:
            raise ValueError("layers='arank' needs input_ids (the samples ARank is measured on)")
        base = {0, 1, 2, n - 1} if exclude == ARANK_MOD else {int(i) % n for i in exclude}
        layers = select_layers_by_arank(model, input_ids, count, sorted(base | {0}))
    elif input_ids is not None or count is not None:
        raise ValueError("input_ids and count choose layers by ARank: pass layers='arank' with them")
    ref = next(decoder.parameters())
    gm = HFGammaMoD(int(config.hidden_size), n, layers, **options)
    gm.to(device=ref.device, dtype=ref.dtype)
    gm.train(model.training)  # a new module trains; the model may be in eval mode
    gm.reset()
    gm.__dict__["_rotary"] = decoder.rotary_emb
    for i in gm.layers:
        _check_layer(decoder.layers[i], i)
    patched = []
    for i in gm.layers:
        layer = decoder.layers[i]
        layer.forward = _layer_forward(gm, layer)
        patched.append(layer)
    gm.__dict__["_patched"] = patched
    gm.__dict__["_hook"] = decoder.register_forward_pre_hook(lambda module, args: gm.reset())
    setattr(model, ATTRIBUTE, gm)
    return gm


def _layer_forward(gm: HFGammaMoD, layer: nn.Module) -> Any:
    # the converted layer's forward: the decoder's keyword arguments, on to the shared module
    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:
            raise TypeError("a γ-MoD decoder layer takes hidden_states positionally and the rest by keyword")
        if "past_key_values" in kwargs:  # transformers' older name of ``cache``
            kwargs["cache"] = kwargs.pop("past_key_values")
        return gm(layer, hidden_states, **kwargs)

    return forward


def remove(model: nn.Module) -> nn.Module:
    """Undo ``convert``: the layers' own forwards, no router, no hook. Returns ``model``."""
    gm = gamma_mod_of(model)
    if gm is None:
        raise ValueError("the model is not γ-MoD converted (no model.gamma_mod)")
    for layer in gm.__dict__["_patched"]:
        layer.__dict__.pop("forward", None)
    gm.__dict__["_hook"].remove()
    delattr(model, ATTRIBUTE)
    return model


__all__ = ["HFGammaMoD", "convert", "decoder_of", "gamma_mod_of", "remove"]
