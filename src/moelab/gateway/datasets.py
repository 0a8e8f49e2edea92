"""The packaged routing tables (``moelab/gateway/data/``, see its README): RouteLLM's GSM8K, MMLU and
MT-Bench correctness for one weak/strong pair, and LLMRouter's 9-model table. Read with ``csv`` and
``gzip`` into ``RoutingTable``s; torch-free.

- ``load_table(name, decontaminate=True)``: one packaged table;
- ``table_from_csv(path)``: a user's own table (``moelab gateway train``);
- ``model_infos(table)``: the table's models as the gateway's ``ModelInfo``s.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from moelab.gateway.policy import ModelInfo
from moelab.gateway.table import RoutingTable

TABLES = ("routellm_gsm8k", "routellm_mmlu", "routellm_mtbench", "llmrouter")
# RouteLLM's model pair. The MT-Bench CSV stores only weak/strong scores; its names are those of
# RouteLLM's MT-Bench evaluation (the same pair as GSM8K and MMLU).
ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTELLM_STRONG = "gpt-4-1106-preview"

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # MMLU passages exceed csv's 128 KiB default


def _data_file(name: str) -> bytes:
    return resources.files("moelab.gateway").joinpath("data", name).read_bytes()


def _read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def contaminated_ids() -> dict[str, list[int]]:
    """RouteLLM's contaminated prompt ids per benchmark (``gsm8k``, ``mmlu``, ``mt_bench``)."""
    raw = json.loads(_data_file("routellm_contaminated_ids.json"))
    return {k: [int(i) for i in raw[k]] for k in ("gsm8k", "mmlu", "mt_bench")}


def llmrouter_prices() -> dict[str, tuple[float, float]]:
    """LLMRouter's candidates: model -> (input, output) USD per 1M tokens (``default_llm.json``)."""
    raw = json.loads(_data_file("llmrouter_models.json"))["models"]
    return {
        k: (float(v["input_price_usd_per_1m_tokens"]), float(v["output_price_usd_per_1m_tokens"]))
        for k, v in raw.items()
    }


def _routellm(name: str, decontaminate: bool) -> RoutingTable:
    rows = _read_csv(gzip.decompress(_data_file(f"{name}.csv.gz")).decode("utf-8"))
    bench = {"routellm_gsm8k": "gsm8k", "routellm_mmlu": "mmlu", "routellm_mtbench": "mt_bench"}[name]
    dropped = set(contaminated_ids()[bench]) if decontaminate else set()
    rows = [r for r in rows if int(r["id"]) not in dropped]
    graded = name == "routellm_mtbench"
    wcol, scol = ("weak_score", "strong_score") if graded else ("weak_correct", "strong_correct")
    weak = rows[0]["weak_model"] if not graded else ROUTELLM_WEAK
    strong = rows[0]["strong_model"] if not graded else ROUTELLM_STRONG
    quality = np.array([[float(r[wcol]), float(r[scol])] for r in rows])
    meta = {
        "source": "RouteLLM",
        "weak": weak,
        "strong": strong,
        "quality": "GPT-4 judge score 1-10 (mean of 2 turns)" if graded else "0/1 correctness",
        "decontaminated": decontaminate,
        "dropped_ids": sorted(dropped),
        "cost_unit": "none upstream: weak 0, strong 1",
    }
    return RoutingTable(
        name=name,
        prompts=[r["prompt"] for r in rows],
        models=[weak, strong],
        quality=quality,
        cost=np.array([0.0, 1.0]),
        ids=np.array([int(r["id"]) for r in rows]),
        task=[r["subject"] for r in rows] if name == "routellm_mmlu" else None,
        meta=meta,
    )


def _llmrouter() -> RoutingTable:
    rows = _read_csv(gzip.decompress(_data_file("llmrouter_9models.csv.gz")).decode("utf-8"))
    fixed = ("id", "split", "task", "query")
    models = [c for c in rows[0] if c not in fixed]
    prices = llmrouter_prices()
    return RoutingTable(
        name="llmrouter",
        prompts=[r["query"] for r in rows],
        models=models,
        quality=np.array([[float(r[m]) for m in models] for r in rows]),
        cost=np.array([sum(prices[m]) for m in models]),
        ids=np.array([int(r["id"]) for r in rows]),
        split=[r["split"] for r in rows],
        task=[r["task"] for r in rows],
        meta={
            "source": "LLMRouter",
            "quality": "per-task score in [0, 1]",
            "cost_unit": "USD per 1M input tokens + per 1M output tokens",
            "prices_per_1m": {m: list(prices[m]) for m in models},
        },
    )


def load_table(name: str, decontaminate: bool = True) -> RoutingTable:
    """A packaged routing table.

    Args:
        name: ``"routellm_gsm8k"`` (1,319 rows), ``"routellm_mmlu"`` (14,042, ``task`` = subject),
            ``"routellm_mtbench"`` (80, graded 1-10) or ``"llmrouter"`` (5,610, 9 models, ``split``
            and ``task``).
        decontaminate: drop RouteLLM's contaminated prompt ids first, as its ``benchmarks.py`` does
            before every metric (GSM8K 1319 -> 1307, MMLU 14042 -> 14037, MT-Bench 80 -> 72).
            LLMRouter has no such list (ignored there).
    Returns:
        RouteLLM tables: ``models = [weak, strong]``, ``cost = [0, 1]`` (no prices upstream),
        ``meta["weak"] / meta["strong"]`` the names. LLMRouter: the 9 models in file order,
        ``cost[m]`` = input + output price in USD per 1M tokens (``llmrouter_models.json``), the
        cost of a call with 1M tokens each way (per-query token counts are not in the data).
    """
    if name not in TABLES:
        raise ValueError(f"name must be one of {list(TABLES)}, got {name!r}")
    if not isinstance(decontaminate, bool):
        raise TypeError(f"decontaminate must be a bool, got {type(decontaminate).__name__}")
    return _llmrouter() if name == "llmrouter" else _routellm(name, decontaminate)


def table_from_csv(path: str | Path) -> RoutingTable:
    """A user's weak/strong table from a CSV with columns ``prompt``, ``weak_correct``,
    ``strong_correct`` (0/1 or graded scores; optional ``id``, ``weak_model``, ``strong_model``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path must be an existing CSV file, got {str(path)!r}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"prompt", "weak_correct", "strong_correct"}
    if not rows or not need <= set(rows[0]):
        have = sorted(rows[0]) if rows else []
        raise ValueError(f"the CSV needs columns {sorted(need)} and at least one row; {path} has {have}")
    try:
        quality = np.array([[float(r["weak_correct"]), float(r["strong_correct"])] for r in rows])
    except ValueError as e:
        raise ValueError(f"weak_correct/strong_correct must be numbers in {path}: {e}") from None
    weak = rows[0].get("weak_model") or "weak"
    strong = rows[0].get("strong_model") or "strong"
    ids = [int(r["id"]) for r in rows] if "id" in rows[0] else list(range(len(rows)))
    return RoutingTable(
        name=path.stem.removesuffix(".csv"), prompts=[r["prompt"] for r in rows], models=[weak, strong],
        quality=quality, cost=np.array([0.0, 1.0]), ids=np.array(ids),
        meta={"source": str(path), "weak": weak, "strong": strong},
    )  # fmt: skip


def model_infos(table: RoutingTable) -> list[ModelInfo]:
    """The table's models as ``ModelInfo``s (USD per 1k tokens): LLMRouter's own input/output
    prices; otherwise the table's cost split evenly (``cost / 2 / 1000`` each way). Tags
    ``weak``/``strong`` from ``meta``."""
    tags = {table.meta.get("weak"): ("weak",), table.meta.get("strong"): ("strong",)}
    prices = table.meta.get("prices_per_1m", {})
    out = []
    for m, c in zip(table.models, table.cost, strict=True):
        p_in, p_out = prices.get(m, (float(c) / 2.0, float(c) / 2.0))
        out.append(ModelInfo(name=m, cost_in=p_in / 1000.0, cost_out=p_out / 1000.0, tags=tags.get(m, ())))
    return out
