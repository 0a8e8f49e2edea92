"""One string-keyed registry for every method moelab implements.

Routers, losses and execution backends register here with the paper they come from, so that
``moelab list`` and ``moelab.list_methods()`` describe the whole library from one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("router", "loss", "backend", "layer", "analysis")


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, what kind of part it is, its paper and a one-line summary."""

    name: str
    kind: str
    paper: str
    summary: str
    obj: Any  # the class or function that implements it


_METHODS: dict[tuple[str, str], MethodInfo] = {}


def register(kind: str, name: str, *, paper: str, summary: str) -> Callable[[Any], Any]:
    """Decorator registering ``obj`` under ``(kind, name)``.

    Names are unique per kind; registering the same name twice is an error unless it is the same
    object (module re-import).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(obj: Any) -> Any:
        key = (kind, name)
        old = _METHODS.get(key)
        if old is not None and getattr(old.obj, "__qualname__", None) != getattr(obj, "__qualname__", None):
            raise ValueError(f"{kind} {name!r} is already registered by {old.obj!r}")
        _METHODS[key] = MethodInfo(name=name, kind=kind, paper=paper, summary=summary, obj=obj)
        return obj

    return deco


def get(kind: str, name: str) -> MethodInfo:
    try:
        return _METHODS[(kind, name)]
    except KeyError:
        known = sorted(n for k, n in _METHODS if k == kind)
        raise ValueError(f"unknown {kind} {name!r}; registered {kind} names: {known}") from None


def names(kind: str) -> list[str]:
    return sorted(n for k, n in _METHODS if k == kind)


def list_methods(kind: str | None = None) -> list[MethodInfo]:
    """Every registered method (optionally of one kind), sorted by kind then name."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    rows = [m for m in _METHODS.values() if kind is None or m.kind == kind]
    return sorted(rows, key=lambda m: (KINDS.index(m.kind), m.name))
