"""``moelab compare``: the same MoELM trained with several routers, one table and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moelab.cli.options import (
    fail,
    given,
    make_console,
    parse_aux_losses,
    parse_counts,
    parse_router_args,
    parse_routers,
    parse_seeds,
    warn_load,
)
from moelab.train.settings import DEFAULT_ROUTERS, DEMO


def register(app: typer.Typer) -> None:
    """Add ``moelab compare`` to ``app``."""

    @app.command("compare")
    def compare_cmd(
        ctx: typer.Context,
        routers: Annotated[
            str,
            typer.Option(
                help="comma-separated router names; LABEL=ROUTER runs a router under its own label, "
                "so one router can appear twice with different --router-arg LABEL.ARG=VALUE"
            ),
        ] = ",".join(DEFAULT_ROUTERS),
        steps: Annotated[int, typer.Option(help="optimizer steps per router")] = DEMO["steps"],
        seeds: Annotated[
            str,
            typer.Option(
                help="seeds, e.g. 0,1,2 or 0-4: every arm trains once per seed (init, data order, every "
                "RNG); the table shows means with 95% intervals and paired differences"
            ),
        ] = ",".join(map(str, DEMO["seeds"])),
        baseline: Annotated[
            str | None, typer.Option(help="the arm differences are taken from (default: the first)")
        ] = None,
        name: Annotated[str, typer.Option(help="run name: outputs go to OUT/NAME/")] = "compare",
        out: Annotated[Path, typer.Option(help="output root")] = Path("runs"),
        d_model: Annotated[int, typer.Option("--d-model")] = DEMO["d_model"],
        layers: Annotated[int, typer.Option()] = DEMO["layers"],
        heads: Annotated[int, typer.Option()] = DEMO["heads"],
        experts: Annotated[int, typer.Option()] = DEMO["experts"],
        top_k: Annotated[int, typer.Option("--top-k")] = DEMO["top_k"],
        experts_per_layer: Annotated[
            str | None,
            typer.Option(
                help="Pyramid-MoE: experts of each MoE layer, e.g. 8,8,16,16 (default: --experts everywhere)"
            ),
        ] = None,
        moe_every: Annotated[int, typer.Option(help="MoE FFN on every n-th layer, dense elsewhere")] = 1,
        seq_len: Annotated[int, typer.Option()] = DEMO["seq_len"],
        batch_size: Annotated[int, typer.Option()] = DEMO["batch_size"],
        lr: Annotated[float, typer.Option(help="peak learning rate")] = DEMO["lr"],
        warmup: Annotated[int, typer.Option(help="warmup steps")] = DEMO["warmup"],
        eval_every: Annotated[int, typer.Option()] = DEMO["eval_every"],
        eval_batches: Annotated[int, typer.Option(help="val batches per evaluation along the way")] = DEMO[
            "eval_batches"
        ],
        final_eval_batches: Annotated[
            int,
            typer.Option(help="val batches of the final evaluation, the reported one (0: --eval-batches)"),
        ] = DEMO["final_eval_batches"],
        data: Annotated[
            str,
            typer.Option(
                help="'stdlib', text files/folders (comma-separated), hf:NAME, or 'mixed' (Fashion-MNIST or digits patches with class names; token types)"
            ),
        ] = "stdlib",
        tokenizer: Annotated[str, typer.Option(help="bytes or bpe")] = "bytes",
        router_arg: Annotated[
            list[str] | None,
            typer.Option(help="ROUTER.ARG=VALUE over the paper settings, e.g. topk.capacity_factor=null"),
        ] = None,
        model_arg: Annotated[
            list[str] | None,
            typer.Option(
                help="ARM.FIELD=VALUE: a MoELMConfig field for one arm only, e.g. "
                "pyramid.experts_per_layer=[4,4,8,8] (Pyramid-MoE against uniform arms)"
            ),
        ] = None,
        aux_loss: Annotated[
            list[str] | None,
            typer.Option(
                help="NAME=COEF (every arm) or ARM.NAME=COEF over the paper's auxiliary losses; "
                "0 removes a loss, 'none' / 'ARM.none' all of them"
            ),
        ] = None,
        jobs: Annotated[
            int | None, typer.Option(help="routers trained in parallel (default: all on CPU, 1 on GPU)")
        ] = None,
        threads: Annotated[
            int,
            typer.Option(
                help="PyTorch threads per arm (0: the default, 1: measured fastest for these sizes)"
            ),
        ] = 0,
        bf16: Annotated[bool, typer.Option(help="bf16 autocast")] = False,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
        save_models: Annotated[bool, typer.Option(help="keep each router's final model")] = True,
        match_flops: Annotated[
            bool,
            typer.Option(
                "--match-flops",
                help="scale each arm's steps so every arm spends the baseline arm's training FLOPs",
            ),
        ] = False,
        progress: Annotated[
            bool, typer.Option(help="progress bars (a line per eval when not a terminal)")
        ] = True,
        mixtures: Annotated[
            str | None,
            typer.Option(
                help="LoRA mixtures to compare instead of routers, e.g. mole,dynmole,remix: each fine-tunes "
                "--base on --tasks (moelab finetune's settings; --steps, --batch-size, --seq-len, --lr, "
                "--warmup, --seeds, --threads apply when given)"
            ),
        ] = None,
        base: Annotated[
            str, typer.Option(help="with --mixtures: 'smollm2' or a local transformers model directory")
        ] = "smollm2",
        tasks: Annotated[
            str | None,
            typer.Option(
                help="with --mixtures: built-in tasks, comma-separated (default arithmetic,brackets,sort)"
            ),
        ] = None,
        generate: Annotated[
            int | None, typer.Option(help="with --mixtures: test prompts per task scored by greedy decoding")
        ] = None,
        train_examples: Annotated[
            int | None, typer.Option(help="with --mixtures: train examples per task (default 400)")
        ] = None,
        val_examples: Annotated[
            int | None, typer.Option(help="with --mixtures: validation examples per task (default 32)")
        ] = None,
        mixture_tokenizer: Annotated[
            str, typer.Option("--base-tokenizer", help="with --mixtures: 'auto' (the base's) or 'bytes'")
        ] = "auto",
    ) -> None:
        """Train the same MoELM with each router on each seed (same data, budget, init per seed) and
        compare them: means with 95% intervals over seeds, paired differences from the baseline."""
        if mixtures is not None:
            from moelab.cli.finetune import run_mixture_compare, split_names

            typed = given(ctx)
            flags = {
                "steps": "steps",
                "batch_size": "batch_size",
                "seq_len": "seq_len",
                "lr": "lr",
                "warmup": "warmup_steps",
            }
            options = {field: ctx.params[p] for p, field in flags.items() if p in typed}
            options.update(
                {
                    "tasks": tasks,
                    "threads": threads,
                    "generate": generate,
                    "train_examples": train_examples,
                    "val_examples": val_examples,
                }
            )
            run_mixture_compare(
                base=base,
                tokenizer=mixture_tokenizer,
                mixtures=split_names(mixtures) or [],
                seeds=parse_seeds(seeds) if "seeds" in typed else [0],
                out_dir=out / name,
                options=options,
                progress=progress,
            )
            return
        console = make_console()
        labels, variants = parse_routers(routers)
        seed_list = parse_seeds(seeds)
        if baseline is not None and baseline not in labels:
            raise typer.BadParameter(f"{baseline!r} is not among --routers {labels}", param_hint="--baseline")
        from moelab.train.compare import CompareSettings, default_jobs, print_table, run_compare

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
                "experts_per_layer": parse_counts(experts_per_layer, "--experts-per-layer"),
            },
            train={
                "steps": steps,
                "batch_size": batch_size,
                "seq_len": seq_len,
                "lr": lr,
                "warmup_steps": min(warmup, steps),
                "eval_every": eval_every,
                "eval_batches": eval_batches,
                "final_eval_batches": final_eval_batches,
                "seed": seed_list[0],
                "data": data,
                "tokenizer": tokenizer,
                "bf16": bf16,
                "device": device,
                "threads": threads,
            },
            router_kwargs=parse_router_args(router_arg),
            aux_overrides=parse_aux_losses(aux_loss, prefixed=True),
            model_overrides=parse_router_args(model_arg, option="--model-arg"),
            save_models=save_models,
            seeds=seed_list,
            baseline=baseline,
            match_flops=match_flops,
        )
        for option, per_arm in (
            ("--aux-loss", settings.aux_overrides),
            ("--model-arg", settings.model_overrides),
        ):
            unknown = sorted(set(per_arm) - {""} - set(labels))
            if unknown:
                fail(console, f"{option} names arm(s) {unknown} that are not among --routers {labels}")
        try:
            warn_load(console, jobs or default_jobs(settings))
            summary = run_compare(settings, jobs=jobs, progress=progress, console=console, echo=True)
        except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
            fail(console, str(e))
        print_table(summary, console)
        out_dir = Path(settings.out) / settings.name
        console.print(
            f"wrote {out_dir}/report.md, results.json, loss_curves.png, expert_load.png "
            f"(wall time {summary['wall_time_s']:.0f} s)",
            highlight=False,
        )
