"""The semantic cache (vLLM Semantic Router's ``semantic_cache`` plugin, PAPERS.md item 27).

A request is answered from the cache when an earlier request to the *same model with the same
parameters* had a prompt whose embedding has cosine similarity ``>= threshold`` with this one and
is younger than ``ttl_s``. Defaults from vLLM-SR's ``config/config.yaml``:
``similarity_threshold: 0.82``, ``ttl_seconds: 7200``. When full, the least recently used entry is
evicted (``max_entries``, our choice: 1000). Torch-free; MiniLM loads lazily on the first embed.

Storage goes through ``CacheBackend``, a small protocol, so that the server can keep entries in
Redis (shared by workers) instead of in this process (``MemoryCacheBackend``):

- ``items() -> list[CacheEntry]``: every stored entry (any order);
- ``get(key) -> CacheEntry | None``;
- ``put(entry)``: insert or replace the entry with ``entry.key``;
- ``touch(key, now)``: set that entry's ``last_used`` to ``now`` (LRU); a missing key is ignored;
- ``delete(key)``: remove it; a missing key is ignored;
- ``__len__()``: the number of stored entries.

``CacheEntry.to_dict()`` / ``CacheEntry.from_dict(d)`` give a JSON-able form for such backends.
Expiry and eviction are decided here, not by the backend (a backend may also expire keys itself,
e.g. Redis ``EXPIRE ttl_s``; that only removes what this class would ignore anyway).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from moelab.gateway.embed import Embedder, get_embedder

# vLLM-SR config/config.yaml, semantic_cache: similarity_threshold 0.82, ttl_seconds 7200
DEFAULT_THRESHOLD = 0.82
DEFAULT_TTL_S = 7200.0
DEFAULT_MAX_ENTRIES = 1000  # our choice (vLLM-SR's in-memory backend bounds entries too)


@dataclass
class CacheEntry:
    """One cached answer.

    ``key``: unique id (``entry_key(model, params_key, prompt)``); ``model``: the model that
    answered; ``params_key``: canonical JSON of the request parameters that change the answer
    (``params_key_of``); ``prompt``: the prompt text; ``embedding``: ``[d]`` float32, L2-normalised;
    ``response``: the JSON-able answer (an OpenAI response body); ``created`` / ``last_used``: clock
    seconds.
    """

    key: str
    model: str
    params_key: str
    prompt: str
    embedding: np.ndarray = field(repr=False)
    response: Any = field(repr=False)
    created: float = 0.0
    last_used: float = 0.0

    def __post_init__(self) -> None:
        self.embedding = np.asarray(self.embedding, dtype=np.float32).reshape(-1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the embedding as a list of floats)."""
        return {
            "key": self.key, "model": self.model, "params_key": self.params_key, "prompt": self.prompt,
            "embedding": [float(x) for x in self.embedding], "response": self.response,
            "created": float(self.created), "last_used": float(self.last_used),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheEntry:
        missing = {
            "key",
            "model",
            "params_key",
            "prompt",
            "embedding",
            "response",
            "created",
            "last_used",
        } - set(d)
        if missing:
            raise ValueError(f"cache entry dict lacks {sorted(missing)}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@runtime_checkable
class CacheBackend(Protocol):
    """Where ``SemanticCache`` keeps its entries (see the module docstring)."""

    def items(self) -> list[CacheEntry]: ...

    def get(self, key: str) -> CacheEntry | None: ...

    def put(self, entry: CacheEntry) -> None: ...

    def touch(self, key: str, now: float) -> None: ...

    def delete(self, key: str) -> None: ...

    def __len__(self) -> int: ...


class MemoryCacheBackend:
    """In-process storage: a dict key -> ``CacheEntry``."""

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}

    def items(self) -> list[CacheEntry]:
        return list(self._entries.values())

    def get(self, key: str) -> CacheEntry | None:
        return self._entries.get(key)

    def put(self, entry: CacheEntry) -> None:
        if not isinstance(entry, CacheEntry):
            raise TypeError(f"entry must be a CacheEntry, got {type(entry).__name__}")
        self._entries[entry.key] = entry

    def touch(self, key: str, now: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.last_used = float(now)

    def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


def params_key_of(params: dict[str, Any] | None) -> str:
    """Canonical JSON (sorted keys) of the request parameters an answer depends on; ``""`` for none."""
    if params is None:
        return ""
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict or None, got {type(params).__name__}")
    return json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)


def entry_key(model: str, params_key: str, prompt: str) -> str:
    """A stable id for (model, parameters, prompt): blake2b hex, 32 chars."""
    raw = json.dumps([model, params_key, prompt], separators=(",", ":"))
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def _positive(name: str, value: Any, *, integer: bool = False) -> Any:
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive {'int' if integer else 'number'}, got {value!r}")
    return value


@dataclass
class CacheHit:
    """A lookup's answer: the entry and its similarity to the query prompt."""

    entry: CacheEntry
    similarity: float


class SemanticCache:
    """Embedding-similarity cache with TTL and LRU eviction.

    Args:
        embedder: ``"minilm"`` (default, as vLLM-SR uses a sentence embedder; loaded lazily),
            ``"hashing"`` (torch-free, lexical) or an object with ``embed(texts) -> [N, d]``.
        threshold: minimum cosine similarity for a hit, in (0, 1]; default 0.82 (vLLM-SR).
        ttl_s: seconds an entry stays valid; default 7200 (vLLM-SR).
        max_entries: capacity; the least recently used entry is evicted beyond it (our choice 1000).
        backend: a ``CacheBackend``; default a new ``MemoryCacheBackend``.
        clock: a function returning seconds (``time.time``); tests inject a fake one.

    Counters ``hits``, ``misses``, ``evictions``, ``expirations`` count this object's lookups and
    removals (the server exports them as Prometheus counters).
    """

    def __init__(
        self,
        embedder: str | Embedder = "minilm",
        threshold: float = DEFAULT_THRESHOLD,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        backend: CacheBackend | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 < threshold <= 1.0
        ):
            raise ValueError(f"threshold must be a cosine similarity in (0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.ttl_s = float(_positive("ttl_s", ttl_s))
        self.max_entries = int(_positive("max_entries", max_entries, integer=True))
        self.embedder = get_embedder(embedder)
        if backend is None:
            backend = MemoryCacheBackend()
        if not isinstance(backend, CacheBackend):
            raise TypeError(
                f"backend must implement CacheBackend (items/get/put/touch/delete/__len__), got {backend!r}"
            )
        self.backend = backend
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {clock!r}")
        self.clock = clock
        self.hits = self.misses = self.evictions = self.expirations = 0

    def __len__(self) -> int:
        return len(self.backend)

    def embed(self, prompt: str) -> np.ndarray:
        """``[d]`` unit-length embedding of ``prompt`` (pass it to ``lookup`` and ``put`` to embed
        a request once)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        vec = np.asarray(self.embedder.embed([prompt]), dtype=np.float32)[0]
        return vec / max(float(np.linalg.norm(vec)), 1e-30)  # unit length: lookups are dot products

    def _check(self, embedding: Any) -> np.ndarray:
        vec = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(vec)) or vec.size == 0:
            raise ValueError(f"embedding must be a finite [d] vector, got shape {np.shape(embedding)}")
        return vec / max(float(np.linalg.norm(vec)), 1e-30)

    def _expired(self, entry: CacheEntry, now: float) -> bool:
        return now - entry.created > self.ttl_s

    def purge_expired(self, now: float | None = None) -> int:
        """Delete the entries older than ``ttl_s``; returns how many."""
        now = self.clock() if now is None else now
        gone = [e.key for e in self.backend.items() if self._expired(e, now)]
        for key in gone:
            self.backend.delete(key)
        self.expirations += len(gone)
        return len(gone)

    def lookup(
        self,
        prompt: str,
        model: str,
        params: dict[str, Any] | None = None,
        embedding: np.ndarray | None = None,
    ) -> CacheHit | None:
        """The most similar live entry for ``model`` and ``params`` with similarity >= threshold
        (its ``last_used`` is refreshed), or None (a miss). ``embedding``: ``self.embed(prompt)``
        if already computed."""
        if not isinstance(model, str):
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        pkey = params_key_of(params)
        now = self.clock()
        query = self.embed(prompt) if embedding is None else self._check(embedding)
        live: list[CacheEntry] = []
        for entry in self.backend.items():
            if entry.model != model or entry.params_key != pkey:
                continue
            if self._expired(entry, now):
                self.backend.delete(entry.key)
                self.expirations += 1
                continue
            live.append(entry)
        best: CacheHit | None = None
        if live:
            # stored embeddings are unit vectors (put normalises them): one matrix product
            sims = np.stack([e.embedding for e in live]) @ query
            i = int(np.argmax(sims))
            if sims[i] >= self.threshold:
                best = CacheHit(live[i], float(sims[i]))
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.backend.touch(best.entry.key, now)
        best.entry.last_used = now
        return best

    def put(
        self,
        prompt: str,
        model: str,
        response: Any,
        params: dict[str, Any] | None = None,
        embedding: np.ndarray | None = None,
    ) -> CacheEntry:
        """Store ``response`` for (prompt, model, params); evicts expired, then LRU entries beyond
        ``max_entries``. Returns the stored entry. ``embedding``: as in ``lookup``."""
        if not isinstance(model, str):
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        pkey = params_key_of(params)
        now = self.clock()
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        vec = self.embed(prompt) if embedding is None else self._check(embedding)
        entry = CacheEntry(entry_key(model, pkey, prompt), model, pkey, prompt, vec, response, now, now)
        self.backend.put(entry)
        if len(self.backend) > self.max_entries:
            self.purge_expired(now)
            # the new entry is never the victim, even when a coarse clock ties it with older ones
            live = sorted(
                (e for e in self.backend.items() if e.key != entry.key),
                key=lambda e: (e.last_used, e.created),
            )
            for victim in live[: max(len(live) + 1 - self.max_entries, 0)]:
                self.backend.delete(victim.key)
                self.evictions += 1
        return entry

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.backend), "hits": self.hits, "misses": self.misses,
            "evictions": self.evictions, "expirations": self.expirations,
        }  # fmt: skip
