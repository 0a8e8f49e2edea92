"""The size limit of dense views in analysis, shared with ``moelab.core.routing``.

``Routing.require_dense(what)`` guards ``[T, E]`` views of a routing; analyses also build dense
arrays from top-k index tensors (``[T, E]`` masks, ``[T, E]`` next-use tables) and ``[E, E]``
matrices (co-activation). ``require_dense`` guards those with the same limit and the same message,
so a routing over ~10^6 experts gets a clear refusal naming the analysis, never an allocation
of gigabytes.
"""

from __future__ import annotations

import math

from moelab.core.routing import MAX_DENSE_ELEMENTS


def require_dense(what: str, dims: str, *sizes: int) -> None:
    """Raise ``ValueError`` if a dense array of shape ``sizes`` (named ``dims``, e.g. ``"[T, E]"``)
    that ``what`` needs has more than ``MAX_DENSE_ELEMENTS`` elements."""
    n = math.prod(int(s) for s in sizes)
    if n > MAX_DENSE_ELEMENTS:
        shape = ", ".join(f"{int(s)}" for s in sizes)
        raise ValueError(
            f"{what} needs a dense {dims} = [{shape}] array ({n:,} elements > {MAX_DENSE_ELEMENTS:,}); "
            "it does not support a routing this large (too many experts)"
        )


__all__ = ["MAX_DENSE_ELEMENTS", "require_dense"]
