"""``HFMoE``: a ``moelab.MoE`` that sits where a transformers MoE block was.

It is the moelab layer itself (same forward, tracing, aux losses); on top it

- returns what the parent decoder layer expects (gpt-oss: ``(hidden, router_scores)``);
- feeds transformers' ``output_router_logits`` collection with the router logits, so the
  models' own load-balancing loss keeps working;
- routes with the model-wide ``RoutingContext`` of the current forward (token ids, the routing
  history and per-router slots for routers that carry state across layers), provided by
  ``ContextFeeder``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from moelab.core.context import RoutingContext
from moelab.layers.moe import MoE

try:  # transformers' per-forward output collector (private; absent in other versions)
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - depends on the transformers version
    _active_collector = None


class ContextFeeder:
    """Makes one ``RoutingContext`` per forward of a model, holding the input token ids.

    A forward pre-hook on the model reads ``input_ids`` (keyword or first positional argument)
    and opens a context; a forward hook closes it. ``HFMoE`` layers derive their own context from
    ``current`` (``ctx.replace(layer_index=...)``). Nested calls (a wrapper model calling its
    inner model) keep the outermost context.
    """

    def __init__(self) -> None:
        self.current: RoutingContext | None = None
        self._depth = 0
        self._handles: list[Any] = []

    def attach(self, model: nn.Module) -> None:
        self._handles.append(model.register_forward_pre_hook(self._open, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._close, always_call=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.current, self._depth = None, 0

    @staticmethod
    def input_ids(args: tuple, kwargs: dict) -> Tensor | None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], Tensor) and not args[0].is_floating_point():
            ids = args[0]
        return ids if isinstance(ids, Tensor) else None

    def _open(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth == 1:
            ids = self.input_ids(args, kwargs)
            shape = tuple(ids.shape) if ids is not None and ids.dim() == 2 else None
            self.current = RoutingContext(token_ids=None if ids is None else ids.reshape(-1), batch_shape=shape)

    def _close(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self.current = None


def feeder_of(model: nn.Module) -> ContextFeeder:
    """The model's ``ContextFeeder``, attached on first use (one per model)."""
    feeder = model.__dict__.get("_moelab_context_feeder")
    if feeder is None:
        feeder = ContextFeeder()
        feeder.attach(model)
        model.__dict__["_moelab_context_feeder"] = feeder
    return feeder


def record_router_logits(logits: Tensor | None) -> None:
    """Append ``logits`` to transformers' ``router_logits`` collection when the model asked for it."""
    if _active_collector is None or logits is None:
        return
    collected = _active_collector.get()
    if collected is not None and "router_logits" in collected:
        collected["router_logits"].append(logits)


class HFMoE(MoE):
    """``moelab.MoE`` in place of a transformers MoE block.

    Args (beyond ``MoE``'s):
        layer_index: index among the model's routed layers (``RoutingContext.layer_index``).
        returns_scores: return ``(hidden, router_scores)`` like gpt-oss's block; the scores are
            the ``[T, k]`` combine weights of a top-k routing, else the ``[T, E]`` dense weights.
        family: the transformers family it replaced (``"olmoe"``), for ``repr`` and docs.
    """

    def __init__(
        self,
        *args: Any,
        layer_index: int = 0,
        returns_scores: bool = False,
        family: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.layer_index = int(layer_index)
        self.returns_scores = bool(returns_scores)
        self.family = family
        self._feeder: ContextFeeder | None = None

    def set_feeder(self, feeder: ContextFeeder) -> None:
        self._feeder = feeder

    def use_state_dict_names(self, aliases: dict[str, str | None]) -> None:
        """Save and load under the replaced block's key names.

        ``aliases`` maps a key of this layer (``"router.weight"``) to the original block's key
        (``"gate.weight"``), or to None for moelab-only state that the original has no slot for
        (it is left out of ``state_dict`` and kept as is when a state dict lacks it). A patched
        model's ``state_dict`` then has the unpatched model's keys, so ``save_pretrained`` writes a
        checkpoint the original class loads, and an original state dict loads into the patch.
        """
        first = not hasattr(self, "_aliases")
        self._aliases = dict(aliases)
        if first:
            self.register_state_dict_post_hook(HFMoE._save_as_original)
            self.register_load_state_dict_pre_hook(HFMoE._load_from_original)

    @staticmethod
    def _save_as_original(module: HFMoE, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for ours, theirs in module._aliases.items():
            if prefix + ours in state_dict:
                value = state_dict.pop(prefix + ours)
                if theirs is not None:
                    state_dict[prefix + theirs] = value

    @staticmethod
    def _load_from_original(module: HFMoE, state_dict: dict, prefix: str, *args: Any) -> None:
        for ours, theirs in module._aliases.items():
            if theirs is not None and prefix + theirs in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
            elif theirs is None and prefix + ours not in state_dict:
                owner, _, leaf = ours.rpartition(".")
                state_dict[prefix + ours] = getattr(module.get_submodule(owner), leaf).detach()

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        ctx = self._feeder.current if self._feeder is not None else None
        if ctx is None:
            ctx = RoutingContext(layer_index=self.layer_index)
        else:
            ids = ctx.token_ids
            if ids is not None and ids.numel() != hidden_states.shape[:-1].numel():
                ids = None  # the hidden states are not aligned with the input ids
            ctx = ctx.replace(layer_index=self.layer_index, token_ids=ids)
        y, routing = self.forward_routed(hidden_states, ctx)
        record_router_logits(routing.logits)
        if not self.returns_scores:
            return y
        scores = routing.weight.view(-1, routing.top_k) if routing.top_k is not None else routing.dense()
        return y, scores

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, family={self.family!r}, layer_index={self.layer_index}"
