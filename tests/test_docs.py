"""Every ```python block of the README and docs/ runs as written.

The blocks of one page run in order in one namespace (later blocks may use earlier names), from a
temporary working directory. A block may opt out only with an HTML comment on the line before its
fence, ``<!-- not run: <reason> -->``; the reason must say why (a download, a GPU), and the test
lists the opted-out blocks so they stay few.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
FENCE = re.compile(r"(?:<!--\s*not run:\s*(?P<why>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: Path) -> list[tuple[str, str | None]]:
    return [(m["code"], m["why"]) for m in FENCE.finditer(page.read_text())]


def test_opt_outs_have_reasons():
    skipped = [(p.name, why) for p in PAGES for _, why in blocks(p) if why is not None]
    assert all(len(why) > 10 for _, why in skipped), skipped
    assert len(skipped) <= 3, f"too many docs blocks are not run: {skipped}"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(REPO)))
def test_docs_code_blocks_run(page, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    threads = torch.get_num_threads()
    try:
        for i, (code, why) in enumerate(blocks(page)):
            if why is not None:
                continue
            try:
                exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
            except Exception as e:  # name the page and block, keep the traceback
                raise AssertionError(f"{page.relative_to(REPO)}, python block {i} fails: {e!r}") from e
    finally:
        torch.set_num_threads(threads)  # a block may choose its own thread count
    assert os.getcwd() == str(tmp_path)
