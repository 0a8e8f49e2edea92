"""The semantic cache: a hit just above and a miss just below the 0.82 threshold (vectors placed by
a fake embedder), exact model / parameter matching, TTL expiry with an injected clock, LRU eviction
order, counters, the backend protocol, and that the gateway modules import no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moelab.gateway.cache import CacheBackend, CacheEntry, MemoryCacheBackend, SemanticCache


class FakeEmbedder:
    name, dim = "fake", 3

    def __init__(self):
        self.table = {"base": np.array([1.0, 0.0, 0.0])}

    def at(self, text: str, cos: float) -> str:
        """Register ``text`` at cosine ``cos`` from "base"."""
        self.table[text] = np.array([cos, np.sqrt(1 - cos * cos), 0.0])
        return text

    def embed(self, texts):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(**kw) -> tuple[SemanticCache, FakeEmbedder, Clock]:
    emb, clock = FakeEmbedder(), Clock()
    return SemanticCache(embedder=emb, clock=clock, **kw), emb, clock


def test_hit_just_above_and_miss_just_below_082():
    cache, emb, _ = make()
    assert cache.threshold == 0.82 and cache.ttl_s == 7200  # vLLM-SR defaults
    cache.put("base", "m", {"answer": 42})
    hit = cache.lookup(emb.at("above", 0.8201), "m")
    assert hit is not None and hit.entry.response == {"answer": 42}
    assert hit.similarity == pytest.approx(0.8201, abs=1e-6)
    assert cache.lookup(emb.at("below", 0.8199), "m") is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_model_and_parameters_must_match_exactly():
    cache, _, _ = make()
    cache.put("base", "m", "r1", params={"temperature": 0.0, "max_tokens": 5})
    assert (
        cache.lookup("base", "m", {"max_tokens": 5, "temperature": 0.0}) is not None
    )  # key order irrelevant
    assert cache.lookup("base", "m", {"max_tokens": 6, "temperature": 0.0}) is None
    assert cache.lookup("base", "other-model", {"max_tokens": 5, "temperature": 0.0}) is None
    assert cache.lookup("base", "m") is None


def test_best_of_several_matches_wins():
    cache, emb, _ = make()
    cache.put(emb.at("near", 0.95), "m", "near answer")
    cache.put(emb.at("nearer", 0.99), "m", "nearer answer")
    assert cache.lookup("base", "m").entry.response == "nearer answer"


def test_ttl_expiry_with_an_injected_clock():
    cache, _, clock = make(ttl_s=100)
    cache.put("base", "m", "r")
    clock.now += 100
    assert cache.lookup("base", "m") is not None  # age == ttl: still valid
    clock.now += 0.001
    assert cache.lookup("base", "m") is None
    assert cache.expirations == 1 and len(cache) == 0


def test_lru_eviction_order():
    cache, emb, clock = make(max_entries=3)
    for i, name in enumerate("abc"):
        clock.now = 1000.0 + i
        cache.put(emb.at(name, 0.1 * i), f"m-{name}", name)
    clock.now = 1010.0
    assert cache.lookup("a", "m-a") is not None  # a is now the most recently used
    clock.now = 1011.0
    cache.put(emb.at("d", 0.5), "m-d", "d")  # evicts b, the least recently used
    assert sorted(e.prompt for e in cache.backend.items()) == ["a", "c", "d"]
    clock.now = 1012.0
    cache.put(emb.at("e", 0.6), "m-e", "e")  # then c
    assert sorted(e.prompt for e in cache.backend.items()) == ["a", "d", "e"]
    assert cache.evictions == 2


def test_new_entry_survives_a_coarse_clock():
    cache, emb, _ = make(max_entries=2)  # the clock never moves: every last_used ties
    for name in "xyz":
        cache.put(emb.at(name, 0.3), "m", name)
    assert "z" in {e.prompt for e in cache.backend.items()} and len(cache) == 2


def test_entries_round_trip_through_json_and_the_backend_protocol():
    cache, _, _ = make()
    entry = cache.put("base", "m", {"choices": [1]}, params={"t": 1})
    back = CacheEntry.from_dict(json.loads(json.dumps(entry.to_dict())))
    assert back.key == entry.key and back.response == entry.response
    assert np.allclose(back.embedding, entry.embedding)
    assert isinstance(MemoryCacheBackend(), CacheBackend)
    with pytest.raises(TypeError, match="backend"):
        SemanticCache(embedder=FakeEmbedder(), backend={})
    with pytest.raises(ValueError, match="lacks"):
        CacheEntry.from_dict({"key": "k"})


def test_a_precomputed_embedding_is_used_once():
    cache, emb, _ = make()
    calls = []
    embed = emb.embed
    emb.embed = lambda texts: calls.append(texts) or embed(texts)
    vec = cache.embed(emb.at("q", 0.9))
    assert cache.lookup("q", "m", embedding=vec) is None
    cache.put("q", "m", "r", embedding=vec)
    assert cache.lookup("base", "m").similarity == pytest.approx(0.9, abs=1e-6)
    assert calls == [["q"], ["base"]]  # once for q, once for the later lookup
    with pytest.raises(ValueError, match="embedding"):
        cache.lookup("q", "m", embedding=np.array([np.nan, 1.0, 0.0]))


def test_hashing_embedder_end_to_end():
    cache = SemanticCache(embedder="hashing")
    cache.put("What is the capital of France?", "m", "Paris")
    assert cache.lookup("what is the capital of france", "m").entry.response == "Paris"
    assert cache.lookup("Explain quantum tunnelling to a child", "m") is None
    assert cache.stats() == {"entries": 1, "hits": 1, "misses": 1, "evictions": 0, "expirations": 0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.2}, "threshold"),
        ({"ttl_s": -1}, "ttl_s"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_entries": 2.5}, "max_entries"),
    ],  # fmt: skip
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SemanticCache(embedder="hashing", **kwargs)


def test_modules_import_without_torch():
    code = (
        "import sys\n"
        "import moelab.gateway.cache, moelab.gateway.policies.bandit, moelab.gateway.policies.signals, "
        "moelab.gateway.policies.r1\n"
        "bad = [m for m in ('torch', 'fastapi', 'pydantic') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
