"""CLI commands of this subpackage; ``register(app)`` is called by ``moelab.cli``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this subpackage's commands to ``app``."""
