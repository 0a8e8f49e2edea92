"""Regenerate docs/methods/README.md from the method registry.

    .venv/bin/python docs/methods/make_index.py

Every registered method gets a row (kind, name, paper, summary); the name links to
``docs/methods/<name>.md`` when that page exists.
"""

from __future__ import annotations

from pathlib import Path

import moelab

HERE = Path(__file__).parent

HEADER = """# Methods

One page per registered method: the math, the parameters with their defaults and sources,
our choices where the papers are silent, how to use it, and what we measured. This table is
generated from the registry (`moelab list`) by `.venv/bin/python docs/methods/make_index.py`;
rerun it after registering a method.

The numbers on the core pages come from
[`measure_core.py`](measure_core.py) (raw results: [`measured_core.json`](measured_core.json)).
Cross-method comparisons from `moelab compare`: [../reproductions.md](../reproductions.md).

"""

KIND_TITLES = {
    "router": "Routers",
    "loss": "Auxiliary losses",
    "bank": "Banks (what an expert is)",
    "dispatcher": "Dispatchers (where rows go)",
    "executor": "Executors (how experts are computed; a layer's `backend`)",
    "layer": "Layers",
    "analysis": "Analysis",
    "architecture": "Architectures (how routed layers are arranged across a model)",
    "depth": "Depth routers (which blocks run on which tokens, and how often)",
    "attention": "Attention routers (which keys each query attends to)",
    "lora": "LoRA mixtures (routed adapters over a model's projections: `moelab.lora.apply`)",
    "placement": "Placement (where experts live: expert parallelism, replicas, offloading)",
    "request_router": "Request routers (the gateway's policies: which LLM answers a request)",
}


def main() -> None:
    # Import optional parts so their methods register (each may be absent on a minimal install).
    for mod in ("moelab.models", "moelab.analysis", "moelab.integrations.hf", "moelab.lora"):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - a missing optional extra only shortens the table
            pass
    lines = [HEADER]
    missing = []
    for kind in moelab.registry.kinds():
        title = KIND_TITLES.get(kind, kind)
        rows = moelab.list_methods(kind)
        if not rows:
            continue
        lines.append(f"## {title}\n\n| name | paper | summary |\n|---|---|---|\n")
        for m in rows:
            page = HERE / f"{m.name}.md"
            name = f"[`{m.name}`]({m.name}.md)" if page.exists() else f"`{m.name}` (no page yet)"
            if not page.exists():
                missing.append(m.name)
            summary = m.summary.replace("|", "\\|")
            lines.append(f"| {name} | {m.paper} | {summary} |\n")
        lines.append("\n")
    (HERE / "README.md").write_text("".join(lines).rstrip() + "\n")
    print(f"wrote {HERE / 'README.md'}; methods without a page: {missing or 'none'}")


if __name__ == "__main__":
    main()
