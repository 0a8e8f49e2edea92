"""One string-keyed registry for every method moelab implements. Imports nothing but the stdlib.

Routers, losses, executors, dispatchers, banks, layers and analyses register here with the paper
they come from, so that ``moelab list`` and ``moelab.list_methods()`` describe the whole library
from one place. The module is torch-free on purpose: the gateway (model-level routing, no torch)
registers its routers here too, and ``moelab list`` can print without importing torch.

Kinds are open: ``register_kind("policy", "cache and offload policies")`` adds one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# kind -> one-line description, in the order ``moelab list`` shows them.
_KINDS: dict[str, str] = {
    "router": "maps hidden states to a Routing (token -> experts)",
    "loss": "auxiliary loss over a Routing",
    "bank": "a set of experts run on expert-sorted rows",
    "dispatcher": "moves rows to where their experts are (and back)",
    "executor": "computes the experts on a Routing: dispatch -> bank -> combine",
    "layer": "a routed layer built on the contract",
    "analysis": "a measurement of routing",
    "architecture": "how routed layers are arranged across a model (MoELMConfig settings)",
    "depth": "routes tokens to depth: which blocks run on which tokens, and how often",
    "attention": "routes queries to keys: which key blocks or heads each query attends with",
    "lora": "a mixture of LoRA adapters over a model's projections (moelab.lora.apply presets)",
    "placement": "where experts live: which rank holds each expert or replica (expert-parallel planners)",
    "request_router": "routes requests across LLM endpoints (the gateway's policies: model-level routing)",
}

# Where moelab's own methods of each kind register themselves. A lookup that misses imports the
# kind's module first, so ``import moelab`` stays cheap and a method is one file plus its
# registration line.
BUILTIN_MODULES: dict[str, str] = {
    "router": "moelab.routers",
    "loss": "moelab.losses",
    "bank": "moelab.experts",
    "dispatcher": "moelab.ops",
    "executor": "moelab.ops",
    "layer": "moelab.layers",
    "analysis": "moelab.analysis",
    "architecture": "moelab.models",
    "depth": "moelab.depth",
    "attention": "moelab.attention",
    "lora": "moelab.lora",
    "placement": "moelab.parallel",
    "request_router": "moelab.gateway.policies",
}

# Further modules of moelab that register methods of a kind from a higher level (dispatchers that
# need the placement planners live in moelab.parallel, above moelab.ops).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {"dispatcher": ("moelab.parallel",)}

# Third-party packages moelab integrates with, and the moelab module that integrates each. A
# model whose class comes from the package gets the integration imported on first need (its
# import registers what it adds, e.g. a tracer); the core never imports the package itself.
INTEGRATIONS: dict[str, str] = {"transformers": "moelab.integrations.hf"}


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, what kind of part it is, its paper and a one-line summary."""

    name: str
    kind: str
    paper: str
    summary: str
    obj: Any  # the class or function that implements it


_METHODS: dict[tuple[str, str], MethodInfo] = {}


def kinds() -> tuple[str, ...]:
    """The registered kinds, in display order."""
    return tuple(_KINDS)


def kind_description(kind: str) -> str:
    return _KINDS[check_kind(kind)]


def register_kind(kind: str, description: str) -> None:
    """Add a kind of method (``moelab list`` shows it after the built-in ones)."""
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"kind must be an identifier string, got {kind!r}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"description must be a non-empty str, got {description!r}")
    _KINDS.setdefault(kind, description)


def check_kind(kind: object) -> str:
    """``kind`` itself if registered; a plural (``routers``) is read as its singular."""
    if isinstance(kind, str):
        if kind in _KINDS:
            return kind
        if kind.endswith("s") and kind[:-1] in _KINDS:
            return kind[:-1]
    raise ValueError(f"kind must be one of {', '.join(_KINDS)}; got {kind!r}")


def register(kind: str, name: str, *, paper: str, summary: str) -> Callable[[Any], Any]:
    """Decorator registering ``obj`` under ``(kind, name)``.

    Names are unique per kind; registering the same name twice is an error unless it is the same
    object (module re-import).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}; got {kind!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    def deco(obj: Any) -> Any:
        key = (kind, name)
        old = _METHODS.get(key)
        if old is not None and getattr(old.obj, "__qualname__", None) != getattr(obj, "__qualname__", None):
            raise ValueError(f"{kind} {name!r} is already registered by {old.obj!r}")
        _METHODS[key] = MethodInfo(name=name, kind=kind, paper=paper, summary=summary, obj=obj)
        return obj

    return deco


def register_subclass(kind: str, name: str, base: type, *, paper: str, summary: str) -> Callable[[type], type]:
    """Class decorator: register a subclass of ``base`` under ``(kind, name)`` and set its ``name``."""

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"register_{kind} expects a {base.__name__} subclass, got {cls!r}")
        cls.name = name
        return register(kind, name, paper=paper, summary=summary)(cls)

    return deco


def get(kind: str, name: str) -> MethodInfo:
    info = _METHODS.get((kind, name))
    if info is None:
        _load_kind(kind)
        info = _METHODS.get((kind, name))
    if info is None:
        known = ", ".join(names(kind)) or "none"
        raise ValueError(f"unknown {kind} {name!r}; registered {kind} names: {known}")
    return info


def names(kind: str) -> list[str]:
    _load_kind(kind)
    return sorted(n for k, n in _METHODS if k == kind)


def _load_kind(kind: str) -> None:
    module = BUILTIN_MODULES.get(kind)
    if module is not None:
        importlib.import_module(module)
    for extra in EXTRA_MODULES.get(kind, ()):
        importlib.import_module(extra)


def list_methods(kind: str | None = None) -> list[MethodInfo]:
    """Every method registered so far (optionally of one kind), sorted by kind then name.

    Only what has been imported is registered; ``moelab.list_methods()`` imports moelab's own
    method modules first.
    """
    if kind is not None:
        kind = check_kind(kind)
    order = list(_KINDS)
    rows = [m for m in _METHODS.values() if kind is None or m.kind == kind]
    return sorted(rows, key=lambda m: (order.index(m.kind), m.name))


def load_builtin() -> None:
    """Import every module that registers moelab's own methods (this imports torch)."""
    for kind in BUILTIN_MODULES:
        _load_kind(kind)


def integration_for(obj: object) -> str | None:
    """The moelab integration module for ``obj``'s class (by the package it comes from), or None."""
    for cls in type(obj).__mro__:
        top = cls.__module__.partition(".")[0]
        if top in INTEGRATIONS:
            return INTEGRATIONS[top]
    return None
