"""The ``moelab`` command line (Typer).

Start-up is cheap: the command modules import only typer and torch-free settings at import time;
torch, transformers and matplotlib load inside the command that needs them, so ``moelab --help``
and ``moelab list`` do not pay for them.
"""

from __future__ import annotations

import importlib

import typer
from rich.markup import escape

from moelab import registry

app = typer.Typer(add_completion=False, no_args_is_help=True, help="moelab: routing for PyTorch.")


@app.callback()
def main() -> None:
    """moelab: routing for PyTorch. `moelab list` shows every method."""


# Each module defines ``register(app)`` adding its commands.
COMMAND_MODULES = (
    "moelab.cli.train",
    "moelab.cli.compare",
    "moelab.cli.finetune",
    "moelab.cli.repro",
    "moelab.cli.analyze",
    "moelab.cli.gateway",
    "moelab.cli.serve",
    "moelab.cli.serve_model",
)


@app.command("list")
def list_cmd(
    kind: str = typer.Option(
        None, help=f"only this kind: {', '.join(registry.kinds())} (a plural such as 'routers' works too)"
    ),
) -> None:
    """Print every registered method with its paper, grouped by kind."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from moelab.cli.options import fail, make_console

    console: Console = make_console()
    try:
        chosen = registry.check_kind(kind) if kind is not None else None
    except ValueError as e:
        fail(console, str(e))
    import moelab

    methods = moelab.list_methods(chosen)  # imports moelab's method modules (and torch)
    narrow = console.width < 100
    for k in registry.kinds() if chosen is None else [chosen]:
        rows = [m for m in methods if m.kind == k]
        if not rows and chosen is None:
            continue
        console.print(f"[bold]{k}[/bold]: {registry.kind_description(k)}", highlight=False)
        if not rows:
            console.print(f"  no {k} registered", style="dim")
            continue
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=not narrow)
        # Names never fold (they are what one types); papers and summaries wrap to the width.
        table.add_column("name", no_wrap=True, min_width=max(len(m.name) for m in rows))
        table.add_column("paper", overflow="fold", ratio=1)
        table.add_column("summary", overflow="fold", ratio=1)
        for m in rows:
            table.add_row(escape(m.name), escape(m.paper), escape(m.summary))  # '[k_min, k_max]' is text
        console.print(table)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


if __name__ == "__main__":  # pragma: no cover
    app()
