"""``moelab gateway eval`` and ``moelab gateway train``: offline evaluation of the request routers
on the packaged routing tables, and training a ``threshold`` scorer on a user's own data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from moelab.cli.options import fail, make_console

gateway_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The gateway's offline tools.")

DEFAULT_DATA = "routellm_gsm8k,routellm_mmlu,routellm_mtbench,llmrouter"


def _split(spec: str) -> list[str]:
    return [x.strip() for x in spec.split(",") if x.strip()]


@gateway_app.command("eval")
def eval_cmd(
    data: Annotated[str, typer.Option(help="comma-separated packaged tables")] = DEFAULT_DATA,
    policies: Annotated[
        str | None,
        typer.Option(
            help="comma-separated NAME[:key=value...] specs (default: threshold with each scorer on the "
            "RouteLLM tables, every offline-capable policy on llmrouter)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder: report.md, results.json, <table>.png")] = Path(
        "runs/gateway-eval"
    ),
    embedder: Annotated[
        str, typer.Option(help="minilm (offline MiniLM) or hashing (fast, lexical)")
    ] = "minilm",
    seed: Annotated[int, typer.Option(help="the train/test split and the policies' seeds")] = 0,
    limit: Annotated[
        int | None, typer.Option(help="keep only this many rows per RouteLLM table (seeded; for quick runs)")
    ] = None,
) -> None:
    """Evaluate routers on the packaged routing data: APGR / CPT / AIQ, a markdown report and plots."""
    import numpy as np

    from moelab.gateway.datasets import TABLES, load_table
    from moelab.gateway.evaluate import CachedEmbedder, evaluate, write_report

    console = make_console()
    names = _split(data)
    bad = [n for n in names if n not in TABLES]
    if not names or bad:
        fail(console, f"--data must be names among {', '.join(TABLES)}; got {data!r}")
    if embedder not in ("minilm", "hashing"):
        fail(console, f"--embedder must be minilm or hashing, got {embedder!r}")
    if limit is not None and limit < 4:
        fail(console, f"--limit must be >= 4, got {limit}")
    specs = _split(policies) if policies is not None else None
    emb = CachedEmbedder(embedder)
    results = []
    for name in names:
        t0 = time.perf_counter()
        table = load_table(name)
        if limit is not None and len(table.models) == 2 and len(table) > limit:
            keep = np.sort(np.random.default_rng(seed).permutation(len(table))[:limit])
            table = table.rows(keep)
        chosen = None
        if specs is not None:  # 2-model specs go to 2-model tables, the others to multi-model ones
            from moelab.gateway.evaluate import PolicySpec, offline_policies

            two = set(offline_policies(two_model=True)) | {"random"}
            chosen = [s for s in specs if (PolicySpec.parse(s).name in two) == (len(table.models) == 2)]
        try:
            results.append(evaluate(table, chosen, embedder=emb, seed=seed))
        except ValueError as e:
            fail(console, str(e))
        console.print(f"{name}: {len(table)} rows, {time.perf_counter() - t0:.1f} s", highlight=False)
    path = write_report(results, out)
    console.print(f"wrote {path}", highlight=False)


@gateway_app.command("train")
def train_cmd(
    data: Annotated[
        str,
        typer.Argument(
            help="a CSV with columns prompt, weak_correct, strong_correct (optional weak_model, strong_model), "
            "or a packaged table name"
        ),
    ],
    out: Annotated[Path, typer.Option(help="where to write the policy state (JSON)")] = Path(
        "threshold.json"
    ),
    scorer: Annotated[str, typer.Option(help="mf (RouteLLM's matrix factorisation) or embed_lr")] = "mf",
    embedder: Annotated[str, typer.Option(help="minilm or hashing")] = "minilm",
    strong_fraction: Annotated[
        float, typer.Option(help="calibrate the threshold so that this fraction of prompts goes strong")
    ] = 0.5,
    ties: Annotated[
        str, typer.Option(help="drop (RouteLLM) or weak: rows where both models score the same")
    ] = "drop",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a ``threshold`` scorer on per-query correctness and write its state for the gateway config."""
    from moelab.gateway.datasets import TABLES, load_table, table_from_csv
    from moelab.gateway.policies.threshold import ThresholdPolicy

    console = make_console()
    try:
        table = load_table(data) if data in TABLES else table_from_csv(data)
        if len(table.models) != 2:
            raise ValueError(f"train needs a weak/strong table, {data!r} has {len(table.models)} models")
        policy = ThresholdPolicy(
            scorer=scorer, embedder=embedder, strong_fraction=strong_fraction, ties=ties, seed=seed
        ).fit(table)
    except (ValueError, TypeError) as e:
        fail(console, str(e))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(policy.state_dict()) + "\n")
    info = policy.info
    console.print(
        f"trained {scorer} on {info['train_rows']} rows ({info['strong_wins']} strong wins); threshold "
        f"{policy.threshold:.5f} sends {strong_fraction:.0%} strong; wrote {out}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add ``moelab gateway ...`` to ``app``."""
    app.add_typer(gateway_app, name="gateway")
