"""Dr.LLM layer routers on a transformers Llama-family model (SmolLM2, Llama, Qwen2, Mistral).

    from moelab.integrations.hf.drllm import apply_drllm, remove_drllm
    patch = apply_drllm(model)        # model: a *ForCausalLM whose decoder has .layers
    out = model(ids)                   # each decoder layer runs 0 / 1 / 2 times per sequence
    remove_drllm(model)                # the model is exactly as before

``apply_drllm`` leaves every weight, module and the decoder's layer loop in place. It gives each
decoder layer an instance-level ``forward`` that asks the layer's router (``moelab.depth.
layer_router.LayerRouters``) for each sequence's decision and calls the layer's own forward that
many times, and registers the routers as ``model.drllm`` (a ``DrLLMPatch``). A pre-hook on the
decoder reads the 2-D ``attention_mask`` so that the routers' window pooling skips padding.
``remove_drllm`` deletes the instance attributes, the hooks and ``model.drllm``: the state dict,
the modules and the forward are the original ones again.

Decoding (``model.generate`` with a ``DynamicCache``): the decisions are made at prefill and kept
for that cache object, so every decode step follows the prefill's path. A layer that every row
skips stores zero keys/values (never attended: no row runs it) so that the cache's length, read
by the model for positions and masks, stays right; a repeated layer's second application keeps
its keys and values in a second ``DynamicCache`` (same layer index). Rows with different
decisions: without a cache the layer runs on the rows that execute it only; with a cache it runs
on every row and the other rows keep their input (their cache entries are never read by a row
that uses them). Beam search (which reorders the cache) is not supported.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.context import RoutingContext
from moelab.core.routed import RoutedLayer
from moelab.depth.layer_router import (
    NUM_WINDOWS,
    ROUTER_HIDDEN,
    LayerRouters,
    decision_routing,
    decisions_of_routing,
    penalized_decisions,
)

_CACHE_KEYS = ("cache", "past_key_values")


def decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """``(decoder, decoder.layers)`` of a Llama-family ``*ForCausalLM`` (or of its decoder)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (nn.Module), got {type(model).__name__}")
    decoder = None
    for cand in (getattr(model, "model", None), model):
        if isinstance(cand, nn.Module) and isinstance(getattr(cand, "layers", None), nn.ModuleList):
            decoder = cand
            break
    if decoder is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder with a .layers ModuleList (a Llama-family model is needed)"
        )
    layers = decoder.layers
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if (
            attn is None
            or not hasattr(attn, "layer_idx")
            or not hasattr(attn, "head_dim")
            or not hasattr(attn, "k_proj")
        ):
            raise ValueError(
                f"decoder layer {i} ({type(layer).__name__}) is not a Llama-family layer (self_attn with layer_idx, head_dim, k_proj)"
            )
    return decoder, layers


def _rows(obj: Any, idx: Tensor, batch: int) -> Any:
    """``obj`` restricted to batch rows ``idx``: tensors whose first dimension is the batch, also
    inside tuples and lists; anything else unchanged."""
    if isinstance(obj, Tensor):
        return obj[idx] if obj.dim() >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_rows(o, idx, batch) for o in obj)
    return obj


class DrLLMPatch(RoutedLayer):
    """The Dr.LLM routers of a transformers model and the state of its patched layer loop (module
    docstring). ``layer_routers``: the routers (``forcing``, ``last_logits``); after a forward,
    ``last_decisions [B, L]``. Each layer's decision is emitted as a ``Routing`` (tokens -> {skip,
    execute, repeat}) through ``self.routed``, so ``moelab.trace`` and routing transforms see it."""

    def __init__(self, layer_routers: LayerRouters) -> None:
        super().__init__()
        self.layer_routers = layer_routers
        self.aux_loss = torch.zeros(())
        self.last_decisions: Tensor | None = None
        # kept out of the module's state: what apply_drllm installed, and per-cache decisions
        self.__dict__["_installed"] = []
        self.__dict__["_hooks"] = []
        self.__dict__["_stored"] = weakref.WeakKeyDictionary()
        self.__dict__["_repeat_caches"] = weakref.WeakKeyDictionary()
        self.__dict__["_fwd"] = None

    @property
    def num_layers(self) -> int:
        return self.layer_routers.num_layers

    def forcing(self, decisions_BL: Any) -> Any:
        """``LayerRouters.forcing``: run along ``decisions [B, L]`` while the context is open."""
        return self.layer_routers.forcing(decisions_BL)

    # -- the decoder's forward ------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.__dict__["_fwd"] = {
            "ids": ids if isinstance(ids, Tensor) else None,
            "mask": mask if isinstance(mask, Tensor) and mask.dim() == 2 else None,
            "decisions": [None] * self.num_layers,
            "cache": None,
            "ctx": None,
        }
        self.layer_routers.begin()
        for r in self.layer_routers.routers:
            r.flops = 0.0

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        fwd = self.__dict__["_fwd"]
        self.__dict__["_fwd"] = None
        if fwd is None or any(d is None for d in fwd["decisions"]):
            return
        decisions = torch.stack(fwd["decisions"], dim=1)
        self.last_decisions = decisions
        cache = fwd["cache"]
        if cache is not None and cache not in self.__dict__["_stored"]:
            self.__dict__["_stored"][cache] = decisions

    def _state(self, hidden: Tensor) -> dict[str, Any]:
        fwd = self.__dict__["_fwd"]
        if fwd is None:  # a layer called outside the decoder: decide without padding information
            fwd = {
                "ids": None,
                "mask": None,
                "decisions": [None] * self.num_layers,
                "cache": None,
                "ctx": None,
            }
        if fwd["ctx"] is None:
            b, s = hidden.shape[:2]
            ids = fwd["ids"]
            token_ids = ids.reshape(-1) if isinstance(ids, Tensor) and ids.numel() == b * s else None
            fwd["ctx"] = RoutingContext(batch_shape=(b, s), token_ids=token_ids)
        return fwd

    def run_layer(
        self,
        index: int,
        layer: nn.Module,
        original: Callable[..., Any],
        hidden: Tensor,
        args: tuple,
        kwargs: dict,
    ) -> Any:
        """Layer ``index``'s patched forward: decide (or follow the cache's stored path), emit the
        routing, run ``original`` 0, 1 or 2 times per sequence."""
        b, s, d = hidden.shape
        fwd = self._state(hidden)
        key = next((k for k in _CACHE_KEYS if kwargs.get(k) is not None), None)
        cache = kwargs[key] if key is not None else None
        if cache is not None:
            fwd["cache"] = cache
        stored = self.__dict__["_stored"].get(cache) if cache is not None else None
        logits = None
        if stored is not None and stored.shape[0] == b:
            dec = stored[:, index].to(hidden.device)
        else:
            mask = fwd["mask"]
            if mask is not None and (mask.shape[0] != b or mask.shape[1] < s):
                mask = None
            dec, logits = self.layer_routers.decide(
                index, hidden, None if mask is None else mask[:, -s:].bool()
            )
        routing = decision_routing(dec, s, logits)
        out = self.routed(routing, fwd["ctx"].replace(layer_index=index), hidden.reshape(-1, d))
        if out is not routing:
            dec = decisions_of_routing(out, b, s)
        fwd["decisions"][index] = dec
        extra: tuple = ()
        for a in range(2):
            rows = dec > a
            if not bool(rows.any()):
                if a == 0 and cache is not None:
                    self._fill_skipped(layer, cache, b, s, hidden)
                break
            kw = dict(kwargs)
            if cache is not None and a == 1:
                kw[key] = self._repeat_cache(cache)  # type: ignore[index]
            if bool(rows.all()):
                hidden, extra = _split(original(hidden, *args, **kw))
            elif cache is None:
                idx = rows.nonzero().squeeze(1)
                sub, extra = _split(original(hidden[idx], *_rows(args, idx, b), **_rows(kw, idx, b)))
                hidden = hidden.index_copy(0, idx, sub.to(hidden.dtype))
            else:
                full, extra = _split(original(hidden, *args, **kw))
                hidden = torch.where(rows[:, None, None], full, hidden)
        return (hidden, *extra) if extra else hidden

    def _repeat_cache(self, cache: Any) -> Any:
        from transformers.cache_utils import DynamicCache

        store = self.__dict__["_repeat_caches"]
        second = store.get(cache)
        if second is None:
            second = store[cache] = DynamicCache()
        return second

    @staticmethod
    def _fill_skipped(layer: nn.Module, cache: Any, b: int, s: int, like: Tensor) -> None:
        # no row runs this layer (now or at any step of this sequence): store zeros so that the
        # cache's length, which the model reads for positions and masks, counts these tokens
        attn = layer.self_attn
        n_kv = attn.k_proj.out_features // attn.head_dim
        zeros = like.new_zeros(b, n_kv, s, attn.head_dim)
        cache.update(zeros, zeros.clone(), attn.layer_idx)

    # -- installing ---------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        decoder, layers = decoder_layers(model)
        for i, layer in enumerate(layers):
            previous = layer.__dict__.get("forward")
            original = layer.forward  # the bound forward (or an earlier instance-level one)

            def routed_forward(
                hidden_states: Tensor,
                *args: Any,
                _i: int = i,
                _layer: nn.Module = layer,
                _orig: Callable = original,
                **kwargs: Any,
            ) -> Any:
                return self.run_layer(_i, _layer, _orig, hidden_states, args, kwargs)

            layer.__dict__["forward"] = routed_forward
            self.__dict__["_installed"].append((layer, previous, routed_forward))
        self.__dict__["_hooks"].extend(
            [
                decoder.register_forward_pre_hook(self._begin, with_kwargs=True),
                decoder.register_forward_hook(self._end, with_kwargs=True),
            ]
        )

    def uninstall(self) -> None:
        for layer, previous, ours in reversed(self.__dict__["_installed"]):
            if layer.__dict__.get("forward") is ours:
                if previous is None:
                    del layer.__dict__["forward"]
                else:
                    layer.__dict__["forward"] = previous
        self.__dict__["_installed"] = []
        for h in self.__dict__["_hooks"]:
            h.remove()
        self.__dict__["_hooks"] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "DrLLMPatch is not called: it routes the decoder layers of the model it was applied to"
        )


def _split(out: Any) -> tuple[Tensor, tuple]:
    """A decoder layer's output as ``(hidden, rest)`` (transformers 5 returns the tensor; older
    versions a tuple)."""
    if isinstance(out, tuple):
        return out[0], tuple(out[1:])
    return out, ()


def apply_drllm(
    model: nn.Module,
    *,
    hidden: int = ROUTER_HIDDEN,
    num_windows: int = NUM_WINDOWS,
    drop_remainder: bool = False,
    execute_at_init: bool = True,
    router_penalty: float = -0.5,
    dtype: torch.dtype | None = None,
) -> DrLLMPatch:
    """Add Dr.LLM routers to a transformers Llama-family model in place, without touching its
    weights (module docstring). The routers (``moelab.depth.layer_router.LayerRouter``, options as
    there, and ``router_penalty``: ``penalized_decisions``) live in ``model.drllm`` on the model's
    device, in ``dtype`` (default: the embedding's).
    Train them with ``moelab.depth.layer_router.train_layer_routers(model, ids, labels,
    attention_mask=...)``. Returns the patch; ``remove_drllm(model)`` undoes it."""
    if isinstance(getattr(model, "drllm", None), DrLLMPatch):
        raise ValueError("model already has Dr.LLM routers (model.drllm); remove_drllm(model) first")
    _, layers = decoder_layers(model)
    config = getattr(model, "config", None)
    d_model = getattr(config, "hidden_size", None)
    if not isinstance(d_model, int):
        raise ValueError("model.config.hidden_size must give the hidden width")
    ref = next(model.parameters())
    routers = LayerRouters(len(layers), d_model, hidden, num_windows, drop_remainder, execute_at_init)
    routers = routers.to(device=ref.device, dtype=dtype or model.get_input_embeddings().weight.dtype)
    penalized_decisions(torch.zeros(1, 3), router_penalty)  # validates it
    routers.router_penalty = float(router_penalty)
    patch = DrLLMPatch(routers)
    patch.install(model)
    model.add_module("drllm", patch)
    return patch


def remove_drllm(model: nn.Module) -> DrLLMPatch:
    """Undo ``apply_drllm``: the layers' forwards, the decoder's hooks and ``model.drllm`` are
    removed; returns the patch (its routers keep their weights)."""
    patch = getattr(model, "drllm", None)
    if not isinstance(patch, DrLLMPatch):
        raise ValueError(f"{type(model).__name__} has no Dr.LLM routers (apply_drllm was not called)")
    patch.uninstall()
    delattr(model, "drllm")
    return patch
