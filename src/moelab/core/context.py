"""``RoutingContext`` and ``Session``: what travels along a model's depth, and across its forwards.

Plain routers ignore the context. Others need more than ``x``:

- a per-sequence router (mixture-of-depths, per-sequence expert choice) needs the batch shape;
- a recurrent router carries a hidden state from layer to layer (a *slot* of its own);
- a router that reads earlier layers' decisions needs their routings (``history``);
- a router of pruned tokens needs each kept token's original position;
- decoding needs state that outlives one forward (KV caches of recursion, lookahead windows):
  that is the ``Session``.

One context per forward. A model makes it (or takes the caller's) and hands it to every routed
layer; a layer derives what is particular to it with ``ctx.replace(...)`` (its ``batch_shape``,
its ``layer_index``), which shares the carry (history, slots, session) and leaves the caller's
fields untouched. The one thing a routed layer adds to the context is its routing, appended to
``history``.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from moelab.core.routing import Routing


class Session:
    """State that lasts across forward calls of one model, e.g. while decoding a sequence.

    ``slot(owner)`` is a dict private to ``owner`` (a module). Slots are held weakly by owner, so
    a session never keeps a deleted model alive. ``num_seen_tokens`` counts the positions the
    session has been advanced over (``advance``), the offset of the next forward's first token.
    """

    def __init__(self) -> None:
        self._slots: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
        self.num_seen_tokens = 0

    def slot(self, owner: object) -> dict[str, Any]:
        """The dict that ``owner`` keeps in this session (created empty on first use)."""
        return _slot_of(self._slots, owner, "Session.slot")

    def advance(self, num_tokens: int) -> None:
        """Record that ``num_tokens`` more positions have been processed."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
        self.num_seen_tokens += num_tokens

    def reset(self) -> None:
        """Forget everything (a new sequence)."""
        self._slots = weakref.WeakKeyDictionary()
        self.num_seen_tokens = 0

    def __repr__(self) -> str:
        return f"Session(owners={len(self._slots)}, num_seen_tokens={self.num_seen_tokens})"


def _slot_of(table: Any, owner: object, where: str) -> dict[str, Any]:
    if owner is None or isinstance(owner, (str, int, float, bytes, tuple)):
        raise TypeError(
            f"{where} is keyed by the owning module (pass self), got {type(owner).__name__} {owner!r}"
        )
    slot = table.get(owner)
    if slot is None:
        slot = table[owner] = {}
    return slot


@dataclass
class RoutingContext:
    """Per-forward information shared by the routed layers of a model.

    Attributes:
        batch_shape: ``(B, S)`` of the layer input when it was ``[B, S, d]``; None for a flat
            ``[T, d]`` input (then the tokens are one sequence). Per-sequence losses and
            per-sequence routers read it.
        layer_index: index of the routed layer being run (a model derives it per layer).
        token_ids: ``[T]`` long input ids, or None (pre-gating routers and traces read them).
        token_types: ``[T]`` long modality / token-type ids, or None.
        positions: ``[T]`` long original position of each token in its sequence, or None (then
            tokens are at ``arange(S)``). Set when tokens were pruned or reordered.
        step: the training step, for routers with schedules; None at inference.
        history: the routings of earlier routed layers in this forward, in order.
        session: state across forwards (decoding), or None.
    """

    batch_shape: tuple[int, int] | None = None
    layer_index: int = 0
    token_ids: Tensor | None = None
    token_types: Tensor | None = None
    positions: Tensor | None = None
    step: int | None = None
    history: list[Routing] = field(default_factory=list)
    session: Session | None = None
    _slots: dict[Any, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.batch_shape is not None:
            bs = self.batch_shape
            if (
                not isinstance(bs, tuple)
                or len(bs) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in bs)
            ):
                raise ValueError(f"batch_shape must be a (B, S) tuple of ints >= 0, got {bs!r}")
        if self.session is not None and not isinstance(self.session, Session):
            raise TypeError(f"session must be a moelab Session or None, got {type(self.session).__name__}")

    @property
    def seq_len(self) -> int | None:
        """``S`` when the batch shape is known, else None."""
        return None if self.batch_shape is None else self.batch_shape[1]

    def slot(self, owner: object) -> dict[str, Any]:
        """The dict that ``owner`` (a module) keeps for this forward: a recurrent router's hidden
        state, pre-computed decisions, ... Keyed by the module itself, so two routers never share
        one by accident of naming."""
        return _slot_of(self._slots, owner, "RoutingContext.slot")

    def replace(self, **changes: Any) -> RoutingContext:
        """A context with ``changes`` applied that shares this one's carry (history, slots, session)."""
        if "history" in changes or "_slots" in changes:
            raise ValueError("replace() shares history and slots; it cannot change them")
        new = dataclasses.replace(self, **changes)
        new.history = self.history
        new._slots = self._slots
        return new


def check_context(ctx: object, argument: str = "ctx") -> RoutingContext:
    """``ctx`` if it is a ``RoutingContext``; None gives a fresh one; anything else a ``TypeError``."""
    if ctx is None:
        return RoutingContext()
    if not isinstance(ctx, RoutingContext):
        raise TypeError(f"{argument} must be a moelab RoutingContext or None, got {type(ctx).__name__}")
    return ctx
