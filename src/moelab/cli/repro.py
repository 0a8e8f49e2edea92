"""``moelab repro``: check papers' claims at small scale (``moelab.repro``).

Everything that can fail without training is checked first: the names, the seeds, the output
folder, the docs page for ``--write-docs`` and each reproduction's prerequisites (a reproduction
whose programs or data are missing is skipped with a message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moelab.cli.options import fail, make_console, parse_seeds, warn_load
from moelab.train.settings import DEMO, REPRO


def register(app: typer.Typer) -> None:
    """Add ``moelab repro`` to ``app``."""

    @app.command("repro")
    def repro_cmd(
        names: Annotated[
            list[str] | None, typer.Argument(help="reproductions to run (default: all; --list shows them)")
        ] = None,
        seeds: Annotated[
            str,
            typer.Option(help="seeds, e.g. 0,1,2 or 0-4; the verdict uses paired intervals over them"),
        ] = ",".join(map(str, REPRO["seeds"])),
        steps: Annotated[int, typer.Option(help="optimizer steps per arm")] = REPRO["steps"],
        out: Annotated[Path, typer.Option(help="output root")] = Path("runs/repro"),
        jobs: Annotated[
            int | None, typer.Option(help="arms trained in parallel (default: all on CPU)")
        ] = None,
        threads: Annotated[
            int, typer.Option(help="PyTorch threads per arm (0: the default, 1: measured fastest)")
        ] = 0,
        write_docs: Annotated[
            bool, typer.Option("--write-docs", help="record the rows in docs/reproductions.md")
        ] = False,
        docs: Annotated[
            Path | None,
            typer.Option(
                help="the page --write-docs rewrites (default: docs/reproductions.md of moelab's checkout)"
            ),
        ] = None,
        list_only: Annotated[bool, typer.Option("--list", help="list the reproductions and exit")] = False,
        progress: Annotated[
            bool, typer.Option(help="progress bars (a line per eval when not a terminal)")
        ] = True,
    ) -> None:
        """Check papers' claims at small scale (same model, data and budget per arm, every arm on
        every seed); a claim holds when its paired 95% intervals over seeds clear the margin."""
        console = make_console()
        from moelab.repro.claims import REPRODUCTIONS

        if list_only:
            for r in REPRODUCTIONS.values():
                console.print(f"[bold]{r.name}[/bold] ({r.paper}): {r.claim} Arms: {', '.join(r.arms)}")
            return
        chosen = names or list(REPRODUCTIONS)
        unknown = [n for n in chosen if n not in REPRODUCTIONS]
        if unknown:
            fail(console, f"unknown reproduction(s) {unknown}; known: {sorted(REPRODUCTIONS)}")
        seed_list = parse_seeds(seeds)
        from moelab.repro.docs import check_docs_path, conditions_text, render_rows, verdict_text
        from moelab.repro.docs import write_docs as write_docs_fn
        from moelab.repro.runner import missing_prerequisites, run_repro

        try:  # before any training: the page and the output folder
            doc = check_docs_path(docs) if write_docs else None
            out.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as e:
            fail(console, str(e))
        skipped = missing_prerequisites(chosen)
        for name, why in skipped.items():
            console.print(
                f"skip {name}: {why}", style="yellow", highlight=False, markup=False, soft_wrap=True
            )
        runnable = [n for n in chosen if n not in skipped]
        if not runnable:
            fail(
                console, "nothing to run: every chosen reproduction lacks a prerequisite (see above)", code=1
            )
        model = {
            "d_model": DEMO["d_model"],
            "n_layers": DEMO["layers"],
            "n_heads": DEMO["heads"],
            "num_experts": DEMO["experts"],
            "top_k": DEMO["top_k"],
            "max_seq_len": DEMO["seq_len"],
        }
        train = {
            "steps": steps,
            "batch_size": REPRO["batch_size"],
            "seq_len": DEMO["seq_len"],
            "lr": REPRO["lr"],
            "warmup_steps": min(REPRO["warmup"], steps),
            "eval_every": REPRO["eval_every"],
            "eval_batches": REPRO["eval_batches"],
            "final_eval_batches": REPRO["final_eval_batches"],
            "threads": threads,
        }
        warn_load(console, jobs or 3)
        records = {}
        for i, name in enumerate(runnable):
            console.rule(f"repro {name} ({i + 1}/{len(runnable)})")
            try:
                records[name] = run_repro(
                    name,
                    seeds=seed_list,
                    model=model,
                    train=train,
                    out=str(out),
                    jobs=jobs,
                    progress=progress,
                    console=console,
                )
            except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
                fail(console, f"{name}: {e}")
        from rich.table import Table

        table = Table(title="moelab repro")
        for col in ("reproduction", "claim", "measured (mean)", "paired 95% intervals", "verdict"):
            table.add_column(col, overflow="fold")
        for name, r in records.items():
            table.add_row(name, r["claim"], r["measured"], conditions_text(r), verdict_text(r).replace("**", ""))
        console.print(table)
        if doc is not None:
            console.print(f"wrote {write_docs_fn(records, doc)}")
        else:
            console.print(render_rows(records), markup=False, highlight=False, soft_wrap=True)
