from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def texts(tmp_path: Path) -> Path:
    """A small folder of Python-like text files: a fast stand-in for the stdlib corpus."""
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(30):
        (d / f"m{i}.py").write_text(
            "".join(f"def g{i}_{j}(a, b):\n    return a * {j} - b\n" for j in range(30))
        )
    return d
