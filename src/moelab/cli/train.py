"""CLI commands of this subpackage; ``register(app)`` is called by ``moelab.cli``.

- ``moelab compare``: the same MoELM trained with several routers, one table and a report.
- ``moelab train``: one MoELM run with checkpoints and exact resume (works under ``torchrun``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

# The demo's defaults (`make demo` = `moelab compare --name demo`): chosen so that the three
# default routers train in about 2 minutes on 2 CPU cores and still differ visibly; see
# docs/quickstart.md ("What the demo prints") for the reasoning.
DEMO: dict[str, Any] = {
    "steps": 250,
    "d_model": 128,
    "layers": 4,
    "heads": 4,
    "experts": 8,
    "top_k": 2,
    "seq_len": 128,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup": 30,
    "eval_every": 50,
    "eval_batches": 8,
}
DEFAULT_ROUTERS = "topk,sigmoid_topk,expert_choice"


def parse_routers(spec: str) -> tuple[list[str], dict[str, str]]:
    """``"topk,no_lb=topk"`` -> labels ``["topk", "no_lb"]`` and variants ``{"no_lb": "topk"}``."""
    labels, variants = [], {}
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        label, eq, router = item.partition("=")
        label, router = label.strip(), router.strip()
        if eq and (not label or not router):
            raise typer.BadParameter(f"expected ROUTER or LABEL=ROUTER, got {item!r}", param_hint="--routers")
        labels.append(label)
        if eq:
            variants[label] = router
    return labels, variants


def parse_router_args(items: list[str] | None, *, prefixed: bool = True) -> dict[str, dict[str, Any]]:
    """``["topk.capacity_factor=2.0", "sigmoid_topk.bias_update_rate=0"]`` -> per-router kwargs.

    Values are JSON (``2.0``, ``null``, ``true``, ``"position"``); anything that is not JSON is
    taken as a string. With ``prefixed=False`` the items are ``ARG=VALUE`` (key ``""``).
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        router, dot, arg = key.partition(".") if prefixed else ("", ".", key)
        if not sep or not dot or (prefixed and not router) or not arg:
            form = "ROUTER.ARG=VALUE" if prefixed else "ARG=VALUE"
            raise typer.BadParameter(f"expected {form}, got {item!r}", param_hint="--router-arg")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(router, {})[arg] = value
    return out


def register(app: typer.Typer) -> None:
    """Add this subpackage's commands to ``app``."""

    @app.command("compare")
    def compare_cmd(
        routers: Annotated[
            str,
            typer.Option(
                help="comma-separated router names; LABEL=ROUTER runs a router under its own label, "
                "so one router can appear twice with different --router-arg LABEL.ARG=VALUE"
            ),
        ] = DEFAULT_ROUTERS,
        steps: Annotated[int, typer.Option(help="optimizer steps per router")] = DEMO["steps"],
        seed: Annotated[int, typer.Option(help="seed for init, data order and every RNG")] = 0,
        name: Annotated[str, typer.Option(help="run name: outputs go to OUT/NAME/")] = "compare",
        out: Annotated[Path, typer.Option(help="output root")] = Path("runs"),
        d_model: Annotated[int, typer.Option("--d-model")] = DEMO["d_model"],
        layers: Annotated[int, typer.Option()] = DEMO["layers"],
        heads: Annotated[int, typer.Option()] = DEMO["heads"],
        experts: Annotated[int, typer.Option()] = DEMO["experts"],
        top_k: Annotated[int, typer.Option("--top-k")] = DEMO["top_k"],
        moe_every: Annotated[int, typer.Option(help="MoE FFN on every n-th layer, dense elsewhere")] = 1,
        seq_len: Annotated[int, typer.Option()] = DEMO["seq_len"],
        batch_size: Annotated[int, typer.Option()] = DEMO["batch_size"],
        lr: Annotated[float, typer.Option(help="peak learning rate")] = DEMO["lr"],
        warmup: Annotated[int, typer.Option(help="warmup steps")] = DEMO["warmup"],
        eval_every: Annotated[int, typer.Option()] = DEMO["eval_every"],
        eval_batches: Annotated[int, typer.Option()] = DEMO["eval_batches"],
        data: Annotated[
            str, typer.Option(help="'stdlib', text files/folders (comma-separated) or hf:NAME")
        ] = "stdlib",
        tokenizer: Annotated[str, typer.Option(help="bytes or bpe")] = "bytes",
        router_arg: Annotated[
            list[str] | None,
            typer.Option(help="ROUTER.ARG=VALUE over the paper settings, e.g. topk.capacity_factor=null"),
        ] = None,
        jobs: Annotated[
            int | None, typer.Option(help="routers trained in parallel (default: all on CPU, 1 on GPU)")
        ] = None,
        bf16: Annotated[bool, typer.Option(help="bf16 autocast")] = False,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
        save_models: Annotated[bool, typer.Option(help="keep each router's final model")] = True,
        progress: Annotated[bool, typer.Option()] = True,
    ) -> None:
        """Train the same MoELM with each router (same data, budget, seed) and compare them."""
        from rich.console import Console

        from moelab.train.compare import CompareSettings, print_table, run_compare

        console = Console()
        if not console.is_terminal:  # a log file: room for the whole table
            console = Console(width=120)
        labels, variants = parse_routers(routers)
        settings = CompareSettings(
            routers=labels,
            variants=variants,
            name=name,
            out=str(out),
            model={
                "d_model": d_model,
                "n_layers": layers,
                "n_heads": heads,
                "num_experts": experts,
                "top_k": top_k,
                "moe_every": moe_every,
                "max_seq_len": seq_len,
            },
            train={
                "steps": steps,
                "batch_size": batch_size,
                "seq_len": seq_len,
                "lr": lr,
                "warmup_steps": min(warmup, steps),
                "eval_every": eval_every,
                "eval_batches": eval_batches,
                "seed": seed,
                "data": data,
                "tokenizer": tokenizer,
                "bf16": bf16,
                "device": device,
            },
            router_kwargs=parse_router_args(router_arg),
            save_models=save_models,
        )
        try:
            summary = run_compare(settings, jobs=jobs, progress=progress, console=console)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        print_table(summary, console)
        out_dir = Path(settings.out) / settings.name
        console.print(
            f"wrote {out_dir}/report.md, results.json, loss_curves.png, expert_load.png "
            f"(wall time {summary['wall_time_s']:.0f} s)"
        )

    @app.command("train")
    def train_cmd(
        out: Annotated[
            Path, typer.Option(help="checkpoints go to OUT/checkpoints, the final model to OUT/final")
        ] = Path("runs/train"),
        router: Annotated[str, typer.Option(help="a registered router (moelab list)")] = "topk",
        router_arg: Annotated[
            list[str] | None, typer.Option(help="ARG=VALUE for the router, e.g. capacity_factor=1.25")
        ] = None,
        config: Annotated[
            Path | None, typer.Option(help="a MoELMConfig JSON file (replaces the shape options)")
        ] = None,
        steps: Annotated[int, typer.Option()] = 1000,
        d_model: Annotated[int, typer.Option("--d-model")] = DEMO["d_model"],
        layers: Annotated[int, typer.Option()] = DEMO["layers"],
        heads: Annotated[int, typer.Option()] = DEMO["heads"],
        experts: Annotated[int, typer.Option()] = DEMO["experts"],
        top_k: Annotated[int, typer.Option("--top-k")] = DEMO["top_k"],
        moe_every: Annotated[int, typer.Option()] = 1,
        seq_len: Annotated[int, typer.Option()] = DEMO["seq_len"],
        batch_size: Annotated[int, typer.Option(help="sequences per step per process")] = DEMO["batch_size"],
        lr: Annotated[float, typer.Option()] = DEMO["lr"],
        warmup: Annotated[int, typer.Option()] = 50,
        eval_every: Annotated[int, typer.Option()] = 100,
        eval_batches: Annotated[int, typer.Option()] = 8,
        ckpt_every: Annotated[int, typer.Option(help="checkpoint interval in steps (0: none)")] = 100,
        resume: Annotated[
            bool, typer.Option("--resume", help="continue from the newest checkpoint in OUT")
        ] = False,
        seed: Annotated[int, typer.Option()] = 0,
        data: Annotated[
            str, typer.Option(help="'stdlib', text files/folders (comma-separated) or hf:NAME")
        ] = "stdlib",
        tokenizer: Annotated[str, typer.Option(help="bytes or bpe")] = "bytes",
        bf16: Annotated[bool, typer.Option()] = False,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
        progress: Annotated[bool, typer.Option()] = True,
    ) -> None:
        """Train one MoELM (checkpoints, exact resume; run it under torchrun for DDP)."""
        import torch.distributed as dist
        from rich.console import Console

        from moelab.models.config import MoELMConfig
        from moelab.train.trainer import TrainConfig, Trainer

        console = Console()
        kw = parse_router_args(router_arg, prefixed=False).get("", {})
        try:
            if config is not None:
                mcfg = MoELMConfig.from_json(config)
            else:
                mcfg = MoELMConfig(
                    d_model=d_model,
                    n_layers=layers,
                    n_heads=heads,
                    num_experts=experts,
                    top_k=top_k,
                    moe_every=moe_every,
                    max_seq_len=seq_len,
                    router=router,
                    router_kwargs=kw,
                )
            tcfg = TrainConfig(
                steps=steps,
                batch_size=batch_size,
                seq_len=seq_len,
                lr=lr,
                warmup_steps=min(warmup, steps),
                eval_every=eval_every,
                eval_batches=eval_batches,
                ckpt_every=ckpt_every,
                seed=seed,
                data=data,
                tokenizer=tokenizer,
                bf16=bf16,
                device=device,
            )
            trainer = Trainer(mcfg, tcfg, out, progress=progress, description=mcfg.router, console=console)
            res = trainer.train(resume=resume)
            trainer.close()  # under DDP, before the group is destroyed (see Trainer.close)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
            console.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from None
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        if trainer.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "result.json").write_text(json.dumps(res.to_dict(), indent=1) + "\n")
            console.print(
                f"step {res.step}: val loss {res.val_loss:.4f} (ppl {res.val_ppl:.2f}), "
                f"{res.tokens_per_s:,.0f} tok/s; final model in {out / 'final'}"
            )

    @app.command("repro")
    def repro_cmd(
        names: Annotated[
            list[str] | None, typer.Argument(help="reproductions to run (default: all; --list shows them)")
        ] = None,
        seeds: Annotated[str, typer.Option(help="comma-separated seeds; numbers are averaged")] = "0",
        steps: Annotated[int, typer.Option(help="optimizer steps per arm")] = DEMO["steps"],
        out: Annotated[Path, typer.Option(help="output root")] = Path("runs/repro"),
        jobs: Annotated[
            int | None, typer.Option(help="arms trained in parallel (default: all on CPU)")
        ] = None,
        write_docs: Annotated[
            bool, typer.Option("--write-docs", help="record the rows in docs/reproductions.md")
        ] = False,
        list_only: Annotated[bool, typer.Option("--list", help="list the reproductions and exit")] = False,
        progress: Annotated[bool, typer.Option(help="progress bars")] = True,
    ) -> None:
        """Check papers' claims at small scale (same model, data, budget and seed per arm)."""
        from rich.console import Console
        from rich.table import Table

        from moelab.repro.claims import REPRODUCTIONS, render_rows, run_repro, verdict_text
        from moelab.repro.claims import write_docs as write_docs_fn

        console = Console() if Console().is_terminal else Console(width=140)
        if list_only:
            for r in REPRODUCTIONS.values():
                console.print(f"[bold]{r.name}[/bold] ({r.paper}): {r.claim} Arms: {', '.join(r.arms)}")
            return
        chosen = names or list(REPRODUCTIONS)
        unknown = [n for n in chosen if n not in REPRODUCTIONS]
        if unknown:
            console.print(
                f"[red]error:[/red] unknown reproduction(s) {unknown}; known: {sorted(REPRODUCTIONS)}"
            )
            raise typer.Exit(2)
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise typer.BadParameter(
                f"expected comma-separated integers, got {seeds!r}", param_hint="--seeds"
            ) from None
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
            "batch_size": DEMO["batch_size"],
            "seq_len": DEMO["seq_len"],
            "lr": DEMO["lr"],
            "warmup_steps": min(DEMO["warmup"], steps),
            "eval_every": DEMO["eval_every"],
            "eval_batches": DEMO["eval_batches"],
        }
        records = {}
        for name in chosen:
            console.rule(f"repro {name}")
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
        table = Table(title="moelab repro")
        for col in ("reproduction", "claim", "measured", "verdict"):
            table.add_column(col, overflow="fold")
        for name, r in records.items():
            table.add_row(
                name, r["claim"], r["measured"], verdict_text(r).replace("**", "")
            )
        console.print(table)
        if write_docs:
            console.print(f"wrote {write_docs_fn(records)}")
        else:
            console.print(render_rows(records), markup=False, highlight=False)
