"""``signals``: rule-based routing on parallel request signals (vLLM Semantic Router, PAPERS.md
item 27; config layout after vllm-project/semantic-router ``config/config.yaml``).

Every request is scored by all configured signals (none short-circuits another, as in vLLM-SR):

- ``keywords``: word / n-gram match of listed keywords, case-insensitive by default; ``operator``
  OR (any keyword) or AND (all); optional fuzzy match (difflib ratio >= ``fuzzy_threshold``, default
  0.82, vLLM-SR's ``fuzzy_threshold: 82``);
- ``embeddings``: cosine similarity of the prompt to example phrases (``candidates``), aggregated by
  ``max`` or ``mean``, fires at ``>= threshold``; default 0.75 (vLLM-SR ``technical_support``; its
  other example uses 0.72);
- ``length``: an estimate of the prompt's tokens (``RouteRequest.input_tokens``, else
  ``ceil(chars / 4)``, our choice) within ``[min_tokens, max_tokens]`` (``"32K"`` style allowed);
- ``language``: a torch-free detector (``detect_language``: Unicode script, then stopwords for
  Latin-script languages; our choice), fires when the detected language is ``language`` (default:
  the signal's name) with confidence ``>= threshold`` (0.3, lingua-go's default vLLM-SR names).

Decisions are Boolean rules over named signals, ``{"operator": "AND"|"OR"|"NOT", "conditions":
[...]}`` with leaves ``{"type": "keyword"|"embedding"|"length"|"language", "name": ...}``; the
highest ``priority`` decision whose rule holds (config order on ties) routes to its ``model``;
``default_model`` (else the first candidate) when none fires.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moelab.gateway.embed import Embedder, get_embedder
from moelab.gateway.policy import Decision, RequestRouter, RouteRequest, register_policy

DEFAULT_EMBED_THRESHOLD = 0.75  # vLLM-SR config.yaml, embeddings.technical_support (0.72 elsewhere)
DEFAULT_FUZZY_THRESHOLD = 0.82  # vLLM-SR config.yaml, keywords: fuzzy_threshold 82 (of 100)
DEFAULT_LANGUAGE_THRESHOLD = 0.3  # vLLM-SR: lingua-go's default minimum confidence
SIGNAL_TYPES = {"keywords": "keyword", "embeddings": "embedding", "length": "length", "language": "language"}
OPERATORS = ("AND", "OR", "NOT")
_WORD = re.compile(r"\w+", re.UNICODE)


# ---- signals as pure functions -----------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """Rough token count, ``ceil(len(text) / 4)`` (OpenAI's rule of thumb for English; our choice)."""
    return math.ceil(len(text) / 4)


def words(text: str, case_sensitive: bool = False) -> list[str]:
    return _WORD.findall(text if case_sensitive else text.lower())


def keyword_in(keyword: Sequence[str], tokens: Sequence[str], fuzzy: float | None = None) -> bool:
    """Whether the word sequence ``keyword`` occurs contiguously in ``tokens``; with ``fuzzy``, a
    window of as many words whose text has difflib ratio >= ``fuzzy`` also counts."""
    n = len(keyword)
    if n == 0:
        return False
    target = " ".join(keyword)
    for i in range(len(tokens) - n + 1):
        window = tokens[i : i + n]
        if list(window) == list(keyword):
            return True
        if fuzzy is not None and difflib.SequenceMatcher(None, " ".join(window), target).ratio() >= fuzzy:
            return True
    return False


# script ranges -> language, checked on letters (first matching wins; kana before Han for Japanese)
_SCRIPTS = [
    ("ja", re.compile(r"[\u3040-\u30ff]")),
    ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff]")),
    ("zh", re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")),
    ("ru", re.compile(r"[\u0400-\u04ff]")),
    ("ar", re.compile(r"[\u0600-\u06ff]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
    ("el", re.compile(r"[\u0370-\u03ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
]
_STOPWORDS = {
    "en": "the and is are was of to in that it for on with as this be not you what how do does can".split(),
    "es": "el la los las de que y en un una es por para con no se su del al lo como pero más qué".split(),
    "fr": "le la les de des et est un une que qui dans pour pas sur ce il elle au du avec vous je".split(),
    "de": "der die das und ist nicht ein eine zu den von mit sich des auf für ich wie was sie es".split(),
    "it": "il lo la gli le di che è e un una per non con sono del della come anche ma si mi".split(),
    "pt": "o a os as de que e do da em um uma para não com por se mais como mas você é".split(),
    "nl": "de het een en van is dat niet op te zijn met voor er ik je hoe wat ook als".split(),
}
_STOP_SETS = {lang: set(ws) for lang, ws in _STOPWORDS.items()}


def detect_language(text: str) -> tuple[str, float]:
    """``(code, confidence)``: a non-Latin script by its share of the letters; else the Latin-script
    language whose stopwords are most frequent, confidence = its share of all stopword hits;
    ``("und", 0.0)`` when nothing is recognised."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "und", 0.0
    for code, pattern in _SCRIPTS:
        hits = sum(1 for c in letters if pattern.match(c))
        if code == "ja" and hits:  # Japanese mixes kana with Han: count both
            hits += sum(1 for c in letters if _SCRIPTS[2][1].match(c))
        if hits / len(letters) >= 0.3:
            return code, min(hits / len(letters), 1.0)
    tokens = words(text)
    counts = {lang: sum(1 for t in tokens if t in stops) for lang, stops in _STOP_SETS.items()}
    total = sum(counts.values())
    if total == 0:
        return "und", 0.0
    best = max(counts, key=lambda lang: counts[lang])  # dict order breaks ties (en first)
    return best, counts[best] / total


def parse_tokens(value: Any, name: str) -> int | None:
    """A token count: an int, ``"32K"`` (x1000) / ``"1M"`` (x1,000,000), or None (no bound)."""
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", value)
        if not m:
            raise ValueError(f"{name} must be an int or like '32K', got {value!r}")
        return int(m[1]) * {"": 1, "k": 1000, "m": 1_000_000}[m[2].lower()]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


# ---- configuration -----------------------------------------------------------------------------


@dataclass
class SignalSpec:
    """One configured signal: its type (``keyword``/``embedding``/``length``/``language``), name
    and validated parameters."""

    type: str
    name: str
    params: dict[str, Any]


def _take(entry: dict[str, Any], where: str, allowed: dict[str, Any]) -> dict[str, Any]:
    unknown = set(entry) - set(allowed) - {"name"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")
    return {k: entry.get(k, default) for k, default in allowed.items()}


def _threshold(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}")
    return float(value)


def parse_signal(kind: str, entry: Any, index: int) -> SignalSpec:
    where = f"signals.{kind}[{index}]"
    if not isinstance(entry, dict):
        raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} needs a non-empty 'name'")
    where = f"signals.{kind}[{index}] ({name!r})"
    if kind == "keywords":
        p = _take(entry, where, {"keywords": None, "operator": "OR", "case_sensitive": False, "fuzzy": False,
                                 "fuzzy_threshold": DEFAULT_FUZZY_THRESHOLD})  # fmt: skip
        kws = p["keywords"]
        if not isinstance(kws, list) or not kws or not all(isinstance(k, str) and k.strip() for k in kws):
            raise ValueError(
                f"{where}: 'keywords' must be a non-empty list of non-empty strings, got {kws!r}"
            )
        if p["operator"] not in ("AND", "OR"):
            raise ValueError(f"{where}: 'operator' must be 'AND' or 'OR', got {p['operator']!r}")
        p["fuzzy_threshold"] = _threshold(p["fuzzy_threshold"], f"{where}: 'fuzzy_threshold'")
        p["phrases"] = [words(k, p["case_sensitive"]) for k in kws]
    elif kind == "embeddings":
        p = _take(
            entry, where, {"candidates": None, "threshold": DEFAULT_EMBED_THRESHOLD, "aggregation": "max"}
        )
        cands = p["candidates"]
        if (
            not isinstance(cands, list)
            or not cands
            or not all(isinstance(c, str) and c.strip() for c in cands)
        ):
            raise ValueError(
                f"{where}: 'candidates' must be a non-empty list of example phrases, got {cands!r}"
            )
        if p["aggregation"] not in ("max", "mean"):
            raise ValueError(f"{where}: 'aggregation' must be 'max' or 'mean', got {p['aggregation']!r}")
        p["threshold"] = _threshold(p["threshold"], f"{where}: 'threshold'")
    elif kind == "length":
        p = _take(entry, where, {"min_tokens": None, "max_tokens": None})
        p["min_tokens"] = parse_tokens(p["min_tokens"], f"{where}: 'min_tokens'")
        p["max_tokens"] = parse_tokens(p["max_tokens"], f"{where}: 'max_tokens'")
        if p["min_tokens"] is None and p["max_tokens"] is None:
            raise ValueError(f"{where}: give 'min_tokens' and/or 'max_tokens'")
        if None not in (p["min_tokens"], p["max_tokens"]) and p["min_tokens"] > p["max_tokens"]:
            raise ValueError(f"{where}: min_tokens {p['min_tokens']} > max_tokens {p['max_tokens']}")
    elif kind == "language":
        p = _take(entry, where, {"language": name, "threshold": DEFAULT_LANGUAGE_THRESHOLD})
        if not isinstance(p["language"], str) or not p["language"]:
            raise ValueError(
                f"{where}: 'language' must be a language code such as 'en', got {p['language']!r}"
            )
        p["threshold"] = _threshold(p["threshold"], f"{where}: 'threshold'")
    else:
        raise ValueError(f"signals: unknown signal family {kind!r}; expected one of {sorted(SIGNAL_TYPES)}")
    return SignalSpec(SIGNAL_TYPES[kind], name, p)


def parse_rule(rule: Any, known: set[tuple[str, str]], where: str) -> dict[str, Any]:
    """Validate a rule tree; returns it normalised (operators upper-case)."""
    if not isinstance(rule, dict):
        raise TypeError(
            f"{where} must be a dict (a leaf {{type, name}} or {{operator, conditions}}), got {rule!r}"
        )
    if "operator" in rule or "conditions" in rule:
        if set(rule) - {"operator", "conditions"}:
            raise ValueError(f"{where}: unknown keys {sorted(set(rule) - {'operator', 'conditions'})}")
        op = rule.get("operator")
        op = op.upper() if isinstance(op, str) else op
        if op not in OPERATORS:
            raise ValueError(f"{where}: operator must be one of {OPERATORS}, got {rule.get('operator')!r}")
        conds = rule.get("conditions")
        if not isinstance(conds, list) or not conds:
            raise ValueError(f"{where}: 'conditions' must be a non-empty list")
        if op == "NOT" and len(conds) != 1:
            raise ValueError(f"{where}: NOT takes exactly one condition, got {len(conds)}")
        return {
            "operator": op,
            "conditions": [parse_rule(c, known, f"{where}.conditions[{i}]") for i, c in enumerate(conds)],
        }
    if set(rule) != {"type", "name"}:
        raise ValueError(
            f"{where}: a leaf condition has exactly the keys 'type' and 'name', got {sorted(rule)}"
        )
    if not isinstance(rule["type"], str) or not isinstance(rule["name"], str):
        raise ValueError(f"{where}: 'type' and 'name' must be strings, got {rule!r}")
    key = (rule["type"], rule["name"])
    if key not in known:
        raise ValueError(f"{where}: unknown signal {rule['type']}:{rule['name']}; configured: "
                         f"{sorted(f'{t}:{n}' for t, n in known)}")  # fmt: skip
    return {"type": rule["type"], "name": rule["name"]}


DECISION_KEYS = {"name", "model", "rules", "priority", "description"}


def parse_decision(d: Any, index: int, known: set[tuple[str, str]]) -> dict[str, Any]:
    """Validate one decision; returns ``{name, model, priority, rules, order}``."""
    where = f"decisions[{index}]"
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
    if set(d) - DECISION_KEYS:
        raise ValueError(
            f"{where}: unknown keys {sorted(set(d) - DECISION_KEYS)}; allowed {sorted(DECISION_KEYS)}"
        )
    for key in ("name", "model"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise ValueError(f"{where}: {key!r} must be a non-empty str, got {d.get(key)!r}")
    prio = d.get("priority", 0)
    if isinstance(prio, bool) or not isinstance(prio, (int, float)):
        raise ValueError(f"{where} ({d['name']!r}): 'priority' must be a number, got {prio!r}")
    if "rules" not in d:
        raise ValueError(f"{where} ({d['name']!r}): missing 'rules'")
    rule = parse_rule(d["rules"], known, f"{where}.rules")
    return {"name": d["name"], "model": d["model"], "priority": prio, "rules": rule, "order": index}


def eval_rule(
    rule: dict[str, Any], fired: dict[tuple[str, str], bool], conf: dict[tuple[str, str], float]
) -> tuple[bool, float]:
    """(holds, confidence) of a rule tree. Confidence, for reporting: a leaf's signal confidence,
    AND = min, OR = max over the children that hold (else over all), NOT = 1 - child."""
    if "operator" not in rule:
        key = (rule["type"], rule["name"])
        return fired[key], conf[key]
    parts = [eval_rule(c, fired, conf) for c in rule["conditions"]]
    if rule["operator"] == "AND":
        return all(h for h, _ in parts), min(c for _, c in parts)
    if rule["operator"] == "OR":
        held = [c for h, c in parts if h]
        return bool(held), max(held or [c for _, c in parts])
    holds, c = parts[0]
    return not holds, 1.0 - c


# ---- the policy --------------------------------------------------------------------------------


@register_policy(
    "signals",
    paper="vLLM Semantic Router / Workload-Router-Pool (vllm-project/semantic-router, 2025)",
    summary="keyword, embedding, length and language signals -> Boolean decisions with priorities -> a model",
)
class SignalsRouter(RequestRouter):
    """Rule-based router (see the module docstring).

    Args:
        signals: ``{"keywords": [...], "embeddings": [...], "length": [...], "language": [...]}``,
            each a list of dicts with a ``name`` (unique within its family).
        decisions: list of ``{"name", "model", "rules", "priority" (default 0)}``.
        default_model: the model when no decision fires (None: the first candidate).
        embedder: for embedding signals, ``"minilm"`` (default, loaded lazily), ``"hashing"`` or an
            object with ``embed``.
    """

    def __init__(
        self,
        signals: dict[str, list[dict[str, Any]]] | None = None,
        decisions: list[dict[str, Any]] | None = None,
        default_model: str | None = None,
        embedder: str | Embedder = "minilm",
    ) -> None:
        signals = {} if signals is None else signals
        if not isinstance(signals, dict):
            raise TypeError(f"signals must be a dict family -> list of signals, got {type(signals).__name__}")
        self.signals: list[SignalSpec] = []
        for kind, entries in signals.items():
            if kind not in SIGNAL_TYPES:
                raise ValueError(
                    f"signals: unknown signal family {kind!r}; expected one of {sorted(SIGNAL_TYPES)}"
                )
            if not isinstance(entries, list):
                raise TypeError(f"signals.{kind} must be a list, got {type(entries).__name__}")
            self.signals += [parse_signal(kind, e, i) for i, e in enumerate(entries)]
        known = [(s.type, s.name) for s in self.signals]
        dupes = sorted({f"{t}:{n}" for t, n in known if known.count((t, n)) > 1})
        if dupes:
            raise ValueError(f"signals: duplicate names {dupes}")
        decisions = [] if decisions is None else decisions
        if not isinstance(decisions, list):
            raise TypeError(f"decisions must be a list, got {type(decisions).__name__}")
        self.decisions = [parse_decision(d, i, set(known)) for i, d in enumerate(decisions)]
        names = [d["name"] for d in self.decisions]
        if len(set(names)) != len(names):
            raise ValueError(f"decisions: duplicate names {sorted({n for n in names if names.count(n) > 1})}")
        # highest priority first; config order on ties
        self.decisions.sort(key=lambda d: (-d["priority"], d["order"]))
        if default_model is not None and not isinstance(default_model, str):
            raise TypeError(f"default_model must be a str or None, got {type(default_model).__name__}")
        self.default_model = default_model
        self.embedder = get_embedder(embedder)  # MiniLM loads its weights on the first embed only
        self._examples: dict[str, np.ndarray] = {}

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.embedder.embed(texts), dtype=np.float64)

    def evaluate(
        self, prompt: str, input_tokens: int | None = None
    ) -> dict[tuple[str, str], tuple[bool, float]]:
        """Every signal on ``prompt``: ``{(type, name): (fired, confidence)}``."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        out: dict[tuple[str, str], tuple[bool, float]] = {}
        lowered, exact = words(prompt), None
        query = None
        ntok = estimate_tokens(prompt) if input_tokens is None else int(input_tokens)
        lang = None
        for s in self.signals:
            p = s.params
            if s.type == "keyword":
                if p["case_sensitive"] and exact is None:
                    exact = words(prompt, True)
                toks = exact if p["case_sensitive"] else lowered
                fuzzy = p["fuzzy_threshold"] if p["fuzzy"] else None
                hits = [keyword_in(ph, toks, fuzzy) for ph in p["phrases"]]
                fired = all(hits) if p["operator"] == "AND" else any(hits)
                out[(s.type, s.name)] = (fired, sum(hits) / len(hits))
            elif s.type == "embedding":
                if s.name not in self._examples:
                    self._examples[s.name] = self._embed(p["candidates"])
                if query is None:
                    query = self._embed([prompt])[0]
                ex = self._examples[s.name]
                sims = ex @ query / np.maximum(np.linalg.norm(ex, axis=1) * np.linalg.norm(query), 1e-12)
                sim = float(sims.max() if p["aggregation"] == "max" else sims.mean())
                out[(s.type, s.name)] = (sim >= p["threshold"], sim)
            elif s.type == "length":
                lo, hi = p["min_tokens"], p["max_tokens"]
                fired = (lo is None or ntok >= lo) and (hi is None or ntok <= hi)
                out[(s.type, s.name)] = (fired, 1.0 if fired else 0.0)
            else:
                if lang is None:
                    lang = detect_language(prompt)
                conf = lang[1] if lang[0] == p["language"] else 0.0
                out[(s.type, s.name)] = (lang[0] == p["language"] and conf >= p["threshold"], conf)
        return out

    def route(self, request: RouteRequest) -> Decision:
        if not request.models:
            raise ValueError("request.models is empty: the signals policy needs at least one candidate model")
        values = self.evaluate(request.prompt, request.input_tokens)
        fired = {k: v[0] for k, v in values.items()}
        conf = {k: v[1] for k, v in values.items()}
        candidates = {m.name for m in request.models}
        info: dict[str, Any] = {"signals": {f"{t}:{n}": f for (t, n), f in fired.items()}}
        skipped = []
        for d in self.decisions:
            holds, c = eval_rule(d["rules"], fired, conf)
            if not holds:
                continue
            if d["model"] not in candidates:  # e.g. removed by the caller's allow-list: try the next
                skipped.append(d["name"])
                continue
            info.update(decision=d["name"], priority=d["priority"], skipped=skipped)
            return Decision(d["model"], self.name, float(c), info=info)
        model = self.default_model if self.default_model in candidates else request.models[0].name
        info.update(decision=None, skipped=skipped)
        return Decision(model, self.name, float("nan"), info=info)
