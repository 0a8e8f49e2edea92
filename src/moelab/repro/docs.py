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
    """``record`` with ``verdict`` and ``conditions`` recomputed from its per-seed rows under the
    current rule (paired intervals over seeds, ``Reproduction.judge``); records written under an
    earlier rule (``holds`` / ``seed_holds``) keep those fields as ``previous_verdict``."""
    rep = REPRODUCTIONS.get(record.get("name", ""))
    if rep is None or not record.get("per_seed"):
        return record
    out = {k: v for k, v in record.items() if k not in ("holds", "seed_holds")}
    if "holds" in record and "previous_verdict" not in record:
        out["previous_verdict"] = old_verdict_text(record)
    return {**out, **rep.judge(record["per_seed"])}


def old_verdict_text(record: dict[str, Any]) -> str:
    """The verdict of the rule before intervals: ``holds`` on the seed mean and every seed,
    ``mixed`` on some seeds, else ``does not hold``."""
    seeds = record.get("seed_holds") or []
    if record.get("holds"):
        return "holds"
    if any(seeds):
        return f"mixed ({sum(seeds)} of {len(seeds)} seeds)"
    return "does not hold"


def verdict_text(record: dict[str, Any]) -> str:
    """``holds``, ``**does not hold**`` or ``**inconclusive**`` (markdown)."""
    v = record.get("verdict") or rejudge(record).get("verdict", "inconclusive")
    return v if v == "holds" else f"**{v}**"


def conditions_text(record: dict[str, Any]) -> str:
    """Each condition: the claimed inequality, the measured mean ± half-width, the verdict."""
    parts = []
    for c in record.get("conditions", []):
        iv = c["interval"]
        hw = (iv["high"] - iv["low"]) / 2 if iv["n"] > 1 else float("nan")
        parts.append(f"{c['condition']}: {iv['mean']:+#.3g} ± {hw:#.2g} ({c['verdict']})")
    return "; ".join(parts)


def render_rows(records: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| reproduction | method | paper | claim | measured (mean over seeds) | paired 95% intervals | verdict | seeds x steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(records):
        r = records[name]
        lines.append(
            f"| `{name}` | [{r['method']}](methods/{r['method']}.md) | {r['paper']} | {r['claim']} | "
            f"{r['measured']} | {conditions_text(r)} | {verdict_text(r)} | "
            f"{len(r['seeds'])} ({', '.join(map(str, r['seeds']))}) x {r['steps']} |"
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
