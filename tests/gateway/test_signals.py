"""The ``signals`` request router: each signal on hand-made prompts, a table of rule cases
(AND / OR / NOT, priorities, defaults) checked by hand, the embedding threshold with a fake
embedder, and configuration errors."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.gateway.policies.signals import SignalsRouter, detect_language, estimate_tokens, keyword_in, words
from moelab.gateway.policy import ModelInfo, RouteRequest, build_policy

MODELS = [ModelInfo("small"), ModelInfo("coder"), ModelInfo("big"), ModelInfo("zh-model")]


def route(router: SignalsRouter, prompt: str, models=MODELS, input_tokens=None):
    return router.route(RouteRequest(prompt, list(models), input_tokens=input_tokens))


@pytest.mark.parametrize(
    "keyword, prompt, fuzzy, want",
    [
        ("code", "Please review my CODE.", None, True),  # case-insensitive
        ("code", "how to decode base64", None, False),  # whole words only
        ("neural network", "train a Neural   Network fast", None, True),  # n-gram, any spacing
        ("neural network", "a network of neural cells", None, False),  # order matters
        ("password", "I forgot my pasword", None, False),
        ("password", "I forgot my pasword", 0.82, True),  # ratio 2*7/15 = 0.93
        ("password", "I forgot my pass", 0.82, False),  # ratio 2*4/12 = 0.67
    ],
)
def test_keyword_match(keyword, prompt, fuzzy, want):
    assert keyword_in(words(keyword), words(prompt), fuzzy) is want


RULES = {
    "signals": {
        "keywords": [
            {"name": "code", "keywords": ["code", "function", "debug"]},
            {"name": "urgent_and_prod", "keywords": ["urgent", "production"], "operator": "AND"},
        ],
        "length": [{"name": "long", "min_tokens": 50}],
        "language": [{"name": "zh"}],
    },
    "decisions": [
        {"name": "chinese", "priority": 300, "model": "zh-model", "rules": {"type": "language", "name": "zh"}},
        {"name": "urgent_code", "priority": 200, "model": "big",
         "rules": {"operator": "AND", "conditions": [{"type": "keyword", "name": "code"},
                                                     {"type": "keyword", "name": "urgent_and_prod"}]}},
        {"name": "code_short", "priority": 100, "model": "coder",
         "rules": {"operator": "AND", "conditions": [{"type": "keyword", "name": "code"},
                                                     {"operator": "NOT", "conditions": [{"type": "length", "name": "long"}]}]}},
        {"name": "long_or_urgent", "priority": 50, "model": "big",
         "rules": {"operator": "OR", "conditions": [{"type": "length", "name": "long"},
                                                    {"type": "keyword", "name": "urgent_and_prod"}]}},
    ],
    "default_model": "small",
}  # fmt: skip

LONG = " and more words" * 20  # 300 chars: 75 estimated tokens


@pytest.mark.parametrize(
    "prompt, want_model, want_decision",
    [
        ("hello there", "small", None),  # nothing fires: default
        ("debug this function", "coder", "code_short"),  # code AND NOT long
        ("debug this function" + LONG, "big", "long_or_urgent"),  # code but long: code_short fails, OR holds
        ("urgent: production is down", "big", "long_or_urgent"),  # AND keyword signal needs both words
        ("urgent: the stage is down", "small", None),  # only one of the AND keywords
        ("urgent production code bug", "big", "urgent_code"),  # priority 200 beats 100 and 50
        ("这个函数有错误，请帮我调试代码", "zh-model", "chinese"),  # priority 300
    ],
)
def test_rule_table(prompt, want_model, want_decision):
    d = route(SignalsRouter(**RULES, embedder="hashing"), prompt)
    assert (d.model, d.info["decision"]) == (want_model, want_decision)


def test_equal_priorities_keep_config_order_and_missing_models_are_skipped():
    cfg = {
        "signals": {"keywords": [{"name": "hi", "keywords": ["hi"]}]},
        "decisions": [
            {"name": "first", "model": "coder", "rules": {"type": "keyword", "name": "hi"}},
            {"name": "second", "model": "big", "rules": {"type": "keyword", "name": "hi"}},
        ],
    }
    r = SignalsRouter(**cfg, embedder="hashing")
    assert route(r, "hi").info["decision"] == "first"
    d = route(r, "hi", models=[ModelInfo("big"), ModelInfo("small")])  # coder not a candidate
    assert (d.model, d.info["decision"], d.info["skipped"]) == ("big", "second", ["first"])
    assert (
        route(r, "nothing", models=[ModelInfo("small"), ModelInfo("big")]).model == "small"
    )  # no default: first


class FakeEmbedder:
    """Maps known texts to fixed vectors (to place a prompt exactly above or below a threshold)."""

    name, dim = "fake", 3

    def __init__(self, table):
        self.table = table

    def embed(self, texts):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def at_cosine(c: float) -> np.ndarray:
    return np.array([c, np.sqrt(1 - c * c), 0.0])


def test_embedding_signal_threshold_and_aggregation():
    table = {"reset my password": np.array([1.0, 0, 0]), "billing": np.array([0, 0, 1.0]),
             "above": at_cosine(0.7501), "below": at_cosine(0.7499)}  # fmt: skip
    sig = {"embeddings": [{"name": "account", "candidates": ["reset my password", "billing"]}]}
    dec = [{"name": "acct", "model": "big", "rules": {"type": "embedding", "name": "account"}}]
    r = SignalsRouter(sig, dec, default_model="small", embedder=FakeEmbedder(table))
    d = route(r, "above")
    assert d.model == "big" and d.score == pytest.approx(0.7501, abs=1e-6)  # max over candidates
    assert route(r, "below").model == "small"  # default threshold 0.75 (vLLM-SR)
    mean = SignalsRouter({"embeddings": [{**sig["embeddings"][0], "aggregation": "mean", "threshold": 0.37}]},
                         dec, default_model="small", embedder=FakeEmbedder(table))  # fmt: skip
    # mean over candidates: (0.7501 + 0) / 2 = 0.375 >= 0.37
    assert route(mean, "above").model == "big"


def test_length_signal():
    r = SignalsRouter({"length": [{"name": "mid", "min_tokens": 10, "max_tokens": "1K"}]},
                      [{"name": "m", "model": "big", "rules": {"type": "length", "name": "mid"}}], "small", "hashing")  # fmt: skip
    assert estimate_tokens("x" * 40) == 10 and estimate_tokens("x" * 41) == 11
    assert route(r, "x" * 36).model == "small"  # ceil(36 / 4) = 9 tokens
    assert route(r, "x" * 37).model == "big"  # 10 tokens
    assert route(r, "x" * 4000).model == "big"  # 1000 tokens: max_tokens is inclusive
    assert route(r, "x" * 4001).model == "small"
    assert route(r, "short", input_tokens=500).model == "big"  # the server's estimate wins


@pytest.mark.parametrize(
    "text, lang",
    [
        ("What is the capital of France and how do I get there?", "en"),
        ("¿Dónde está la estación de tren y cuánto cuesta el billete para los niños?", "es"),
        ("Je voudrais savoir où est la gare et quel est le prix pour les enfants.", "fr"),
        ("Ich möchte wissen, wie ich zum Bahnhof komme und was die Fahrkarte für die Kinder kostet.", "de"),
        ("请问火车站在哪里？", "zh"),
        ("駅はどこですか？切符はいくらですか。", "ja"),
        ("Где находится вокзал?", "ru"),
        ("12345 !!!", "und"),
    ],
)
def test_detect_language(text, lang):
    assert detect_language(text)[0] == lang


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"decisions": [{"name": "d", "model": "m", "rules": {"type": "keyword", "name": "nope"}}]},
            "unknown signal keyword:nope",
        ),
        (
            {
                "decisions": [
                    {
                        "name": "d",
                        "model": "m",
                        "rules": {"operator": "XOR", "conditions": [{"type": "keyword", "name": "k"}]},
                    }
                ]
            },
            "operator",
        ),
        (
            {
                "decisions": [
                    {
                        "name": "d",
                        "model": "m",
                        "rules": {"operator": "NOT", "conditions": [{"type": "keyword", "name": "k"}] * 2},
                    }
                ]
            },
            "exactly one",
        ),
        ({"decisions": [{"name": "d", "rules": {"type": "keyword", "name": "k"}}]}, "'model'"),
        (
            {"decisions": [{"name": "d", "model": "m", "rules": {"type": "keyword", "name": "k"}}] * 2},
            "duplicate",
        ),
        (
            {
                "decisions": [
                    {"name": "d", "model": "m", "priority": "high", "rules": {"type": "keyword", "name": "k"}}
                ]
            },
            "priority",
        ),
        ({"signals": {"regex": []}}, "unknown signal family"),
        ({"signals": {"keywords": [{"name": "k", "keywords": []}]}}, "keywords"),
        ({"signals": {"keywords": [{"name": "k", "keywords": ["a"], "operator": "NOR"}]}}, "operator"),
        ({"signals": {"keywords": [{"name": "k", "keywords": ["a"], "treshold": 1}]}}, "unknown keys"),
        ({"signals": {"embeddings": [{"name": "e", "candidates": ["a"], "threshold": 1.5}]}}, "threshold"),
        ({"signals": {"length": [{"name": "l", "min_tokens": 10, "max_tokens": 5}]}}, "min_tokens"),
        ({"signals": {"length": [{"name": "l", "min_tokens": "lots"}]}}, "min_tokens"),
        (
            {"signals": {"keywords": [{"name": "k", "keywords": ["a"]}, {"name": "k", "keywords": ["b"]}]}},
            "duplicate",
        ),
    ],
)
def test_config_errors_are_clear(kwargs, match):
    base = {"signals": {"keywords": [{"name": "k", "keywords": ["a"]}]}}
    with pytest.raises((ValueError, TypeError), match=match):
        SignalsRouter(**{**base, **kwargs}, embedder="hashing")


def test_built_by_name_from_yaml_like_dicts():
    r = build_policy("signals", **RULES, embedder="hashing")
    assert route(r, "debug this function").model == "coder"
    with pytest.raises(ValueError, match="embedder"):
        SignalsRouter(embedder="word2vec")
