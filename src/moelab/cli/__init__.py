"""The ``moelab`` command line (Typer). Subcommands live beside the code they drive."""

from __future__ import annotations

import importlib

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="moelab: routing for PyTorch.")

@app.callback()
def main() -> None:
    """moelab: routing for PyTorch. `moelab list` shows every method."""


# Each module defines ``register(app)`` adding its commands.
COMMAND_MODULES = ("moelab.cli.train", "moelab.cli.analyze")


@app.command("list")
def list_cmd(kind: str = typer.Option(None, help="router, loss, backend, layer or analysis")) -> None:
    """Print every registered method with its paper."""
    import moelab

    table = Table(title="moelab methods")
    for col in ("kind", "name", "paper", "summary"):
        table.add_column(col, overflow="fold")
    for m in moelab.list_methods(kind):
        table.add_row(m.kind, m.name, m.paper, m.summary)
    Console(width=160).print(table)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
