"""The reproductions' page: ``docs/reproductions.md`` (its generated table) and ``docs/reproductions.json``
(every record). ``docs_path()`` finds the page of moelab's source checkout, whatever the current
directory, so ``moelab repro --write-docs`` can check it before training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moelab.repro.claims import REPRODUCTIONS

DOC_NAME = "reproductions.md"


def docs_path() -> Path:
    """``docs/reproductions.md`` of the source checkout this package runs from
    (``src/moelab/repro`` -> the repository root). It exists only in a checkout (an editable install)."""
    return Path(__file__).resolve().parents[3] / "docs" / DOC_NAME


def check_docs_path(doc: str | Path | None = None) -> Path:
    """The page ``--write-docs`` will rewrite, checked before any training: it must exist (with its
    table markers) and be writable, and so must ``reproductions.json`` beside it."""
    p = Path(doc) if doc is not None else docs_path()
    if not p.is_file():
        where = (
            "" if doc is not None else " (moelab is not running from its source checkout; pass --docs PATH)"
        )
        raise FileNotFoundError(f"--write-docs: {p} does not exist{where}")
    text = p.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{p} lacks the {BEGIN} ... {END} markers that delimit the generated table")
    store = p.with_suffix(".json")
    for f in (p, store if store.exists() else p.parent):
        if not os.access(f, os.W_OK):
            raise PermissionError(f"--write-docs: {f} is not writable")
    return p


BEGIN, END = "<!-- repro:begin -->", "<!-- repro:end -->"


def rejudge(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with ``holds`` / ``seed_holds`` recomputed from its per-seed rows under the
    current rule (records written before the per-seed rule existed are brought up to date)."""
    rep = REPRODUCTIONS.get(record.get("name", ""))
    if rep is None or not record.get("per_seed") or not record.get("rows"):
        return record
    seed_holds = [rep.verdict(p)[0] for p in record["per_seed"]]
    return {**record, "holds": rep.verdict(record["rows"])[0] and all(seed_holds), "seed_holds": seed_holds}


def verdict_text(record: dict[str, Any]) -> str:
    """``holds`` (on the seed mean and on every seed), ``mixed`` (on some seeds) or ``does not hold``."""
    seeds = record.get("seed_holds") or []
    if record["holds"]:
        return "holds"
    if any(seeds):
        return f"**mixed**: holds on {sum(seeds)} of {len(seeds)} seeds"
    return "**does not hold**"


def render_rows(records: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| reproduction | method | paper | claim | measured | verdict | seeds x steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(records):
        r = records[name]
        verdict = verdict_text(r)
        lines.append(
            f"| `{name}` | [{r['method']}](methods/{r['method']}.md) | {r['paper']} | {r['claim']} | "
            f"{r['measured']} | {verdict} | {len(r['seeds'])} x {r['steps']} |"
        )
    return "\n".join(lines)


def write_docs(records: dict[str, dict[str, Any]], doc: str | Path | None = None) -> Path:
    """Merge ``records`` into ``reproductions.json`` and rewrite the table in the markdown page
    (default: ``docs_path()``, the checkout's ``docs/reproductions.md``)."""
    doc = Path(doc) if doc is not None else docs_path()
    store = doc.with_suffix(".json")
    known = json.loads(store.read_text()) if store.exists() else {}
    known.update(records)
    known = {name: rejudge({"name": name, **r}) for name, r in known.items()}
    store.write_text(json.dumps(known, indent=1, default=lambda o: None) + "\n")
    text = doc.read_text() if doc.exists() else f"# Reproductions\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} lacks the {BEGIN} ... {END} markers that delimit the generated table")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(f"{head}{BEGIN}\n{render_rows(known)}\n{END}{tail}")
    return doc
