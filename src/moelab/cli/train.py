"""``moelab train``: one MoELM run with checkpoints and exact resume (works under ``torchrun``).

The router trains with its paper settings (``moelab.train.settings``, the same as ``moelab
compare``), adjusted by ``--router-arg`` and ``--aux-loss``; the effective settings are printed at
the start. ``--resume`` takes every setting from the checkpoint: flags are only needed for what
may change on resume (``--steps``, eval/checkpoint intervals, device, threads), and a flag that
contradicts the checkpoint is an error naming it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from moelab.cli.options import fail, flag, given, make_console, parse_aux_losses, parse_router_args, warn_load
from moelab.train.settings import DEMO

# command-line parameter -> MoELMConfig field (``--config`` replaces all of them)
MODEL_FLAGS = {
    "d_model": "d_model",
    "layers": "n_layers",
    "heads": "n_heads",
    "experts": "num_experts",
    "top_k": "top_k",
    "moe_every": "moe_every",
    "router": "router",
    "router_arg": "router_kwargs",
    "aux_loss": "aux_losses",
}
# command-line parameter -> TrainConfig field
TRAIN_FLAGS = {
    "steps": "steps",
    "seq_len": "seq_len",
    "batch_size": "batch_size",
    "lr": "lr",
    "warmup": "warmup_steps",
    "eval_every": "eval_every",
    "eval_batches": "eval_batches",
    "final_eval_batches": "final_eval_batches",
    "ckpt_every": "ckpt_every",
    "seed": "seed",
    "data": "data",
    "tokenizer": "tokenizer",
    "bf16": "bf16",
    "device": "device",
    "threads": "threads",
    "ep": "ep",
}
ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError, PermissionError)


def model_from_flags(p: dict[str, Any]) -> Any:
    from moelab.models.config import MoELMConfig
    from moelab.train.settings import arm_settings

    kw, aux = arm_settings(
        p["router"],
        router_kwargs=parse_router_args(p["router_arg"], prefixed=False).get("", {}),
        aux_overrides=parse_aux_losses(p["aux_loss"]).get("", {}),
    )
    return MoELMConfig(
        d_model=p["d_model"],
        n_layers=p["layers"],
        n_heads=p["heads"],
        num_experts=p["experts"],
        top_k=p["top_k"],
        moe_every=p["moe_every"],
        max_seq_len=p["seq_len"],
        router=p["router"],
        router_kwargs=kw,
        aux_losses=aux,
    )


def train_from_flags(p: dict[str, Any]) -> dict[str, Any]:
    t = {field: p[name] for name, field in TRAIN_FLAGS.items()}
    t["warmup_steps"] = min(p["warmup"], p["steps"])
    return t


def resumed_configs(ckpt: Path, p: dict[str, Any], typed: set[str], config: Path | None) -> tuple[Any, Any]:
    """The checkpoint's model and train configs, with the typed flags that may change on resume
    applied; a typed flag that contradicts the checkpoint is an error naming only those flags."""
    from moelab.models.config import MoELMConfig
    from moelab.train.checkpoint import read_state
    from moelab.train.config import RESUME_MAY_CHANGE, TrainConfig, config_diff

    saved_model = MoELMConfig.from_json(ckpt / "config.json")
    saved_train = read_state(ckpt)["train_config"]
    clashes = []
    if config is not None:
        diff = config_diff(saved_model.to_dict(), MoELMConfig.from_json(config).to_dict())
        clashes += [f"--config {config}: {d}" for d in diff]
    elif typed & set(MODEL_FLAGS):
        wanted = model_from_flags(p).to_dict()
        for name in sorted(typed & set(MODEL_FLAGS)):
            field = MODEL_FLAGS[name]
            if wanted[field] != saved_model.to_dict()[field]:
                clashes.append(
                    f"{flag(name)} gives {field}={wanted[field]!r} (checkpoint: {saved_model.to_dict()[field]!r})"
                )
    wanted_train = train_from_flags(p)
    changes = {}
    for name in sorted(typed & set(TRAIN_FLAGS)):
        field = TRAIN_FLAGS[name]
        if wanted_train[field] == saved_train.get(field):
            continue
        if field in RESUME_MAY_CHANGE:
            changes[field] = wanted_train[field]
        else:
            clashes.append(f"{flag(name)} {wanted_train[field]!r} (checkpoint: {saved_train.get(field)!r})")
    if clashes:
        raise ValueError(
            f"--resume: {ckpt} was trained with other settings; these flags contradict it: "
            + "; ".join(clashes)
            + ". Drop them to resume with the checkpoint's settings (only "
            + ", ".join(sorted(RESUME_MAY_CHANGE))
            + " may change)"
        )
    return saved_model, TrainConfig.from_dict({**saved_train, **changes})


def register(app: typer.Typer) -> None:
    """Add ``moelab train`` to ``app``."""

    @app.command("train")
    def train_cmd(
        ctx: typer.Context,
        out: Annotated[
            Path,
            typer.Option(
                help="run directory: checkpoints go to OUT/checkpoints, the final model to OUT/final"
            ),
        ] = Path("runs/train"),
        router: Annotated[str, typer.Option(help="a registered router (moelab list --kind router)")] = "topk",
        router_arg: Annotated[
            list[str] | None,
            typer.Option(help="ARG=VALUE over the router's paper settings, e.g. capacity_factor=null"),
        ] = None,
        aux_loss: Annotated[
            list[str] | None,
            typer.Option(help="NAME=COEF over the paper's auxiliary losses (0 removes one; 'none': all)"),
        ] = None,
        config: Annotated[
            Path | None, typer.Option(help="a MoELMConfig JSON file (instead of the model-shape options)")
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
        final_eval_batches: Annotated[
            int, typer.Option(help="val batches of the final evaluation (0: --eval-batches)")
        ] = 0,
        ckpt_every: Annotated[int, typer.Option(help="checkpoint interval in steps (0: none)")] = 100,
        resume: Annotated[
            bool,
            typer.Option(
                "--resume", help="continue the run in OUT from its newest checkpoint, with its settings"
            ),
        ] = False,
        seed: Annotated[int, typer.Option()] = 0,
        data: Annotated[
            str,
            typer.Option(
                help="'stdlib', text files/folders (comma-separated), hf:NAME, or 'mixed' (image patches + class names, with token types)"
            ),
        ] = "stdlib",
        tokenizer: Annotated[str, typer.Option(help="bytes or bpe")] = "bytes",
        bf16: Annotated[bool, typer.Option()] = False,
        device: Annotated[str, typer.Option(help="cpu, cuda or auto")] = "cpu",
        threads: Annotated[
            int, typer.Option(help="PyTorch threads per process on CPU (0: the default, 1: measured fastest)")
        ] = 0,
        progress: Annotated[
            bool, typer.Option(help="progress bar (a line per eval when not a terminal)")
        ] = True,
        ep: Annotated[
            int,
            typer.Option(
                help="expert parallelism: shard each MoE layer's experts over this many processes "
                "(run under torchrun with as many processes; 1: off)"
            ),
        ] = 1,
    ) -> None:
        """Train one MoELM (checkpoints, exact resume; run it under torchrun for DDP)."""
        console = make_console()
        p = dict(ctx.params)
        typed = given(ctx)
        if config is not None and typed & set(MODEL_FLAGS):
            flags = ", ".join(flag(n) for n in sorted(typed & set(MODEL_FLAGS)))
            fail(console, f"--config replaces the model options; drop {flags} (or edit {config})")
        from moelab.train.checkpoint import find_checkpoint, run_dir_of

        run_dir = run_dir_of(out)
        if run_dir is not None and not resume:
            fail(
                console,
                f"--out {out} is a checkpoint directory of the run {run_dir}; to continue that run: "
                f"moelab train --resume --out {run_dir}",
            )
        try:
            if resume:
                ckpt = find_checkpoint(out)
                run_dir = run_dir_of(ckpt) or out
                mcfg, tcfg = resumed_configs(ckpt, p, typed, config)
            else:
                from moelab.models.config import MoELMConfig
                from moelab.train.config import TrainConfig

                ckpt, run_dir = None, out
                mcfg = MoELMConfig.from_json(config) if config is not None else model_from_flags(p)
                tcfg = TrainConfig.from_dict(train_from_flags(p))
        except ERRORS as e:
            fail(console, str(e))
        _train(console, mcfg, tcfg, run_dir, ckpt, progress)


def _train(console: Any, mcfg: Any, tcfg: Any, run_dir: Path, ckpt: Path | None, progress: bool) -> None:
    import torch.distributed as dist

    from moelab.train.resources import resolve_threads
    from moelab.train.settings import describe_arm
    from moelab.train.trainer import Trainer

    main = int(os.environ.get("RANK", "0")) == 0  # torchrun: only rank 0 prints
    if main:
        for line in (
            describe_arm(mcfg.router, mcfg.router, mcfg.router_kwargs, mcfg.aux_losses),
            f"train: {tcfg.steps} steps x {tcfg.batch_size} x {tcfg.seq_len} tokens, lr {tcfg.lr}, seed {tcfg.seed}, "
            f"data {tcfg.data} ({tcfg.tokenizer}), {resolve_threads(tcfg.threads)} thread(s) per process, "
            f"out {run_dir}" + (f", resuming from {ckpt}" if ckpt is not None else ""),
        ):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
        warn_load(console, int(os.environ.get("WORLD_SIZE", "1")))
    trainer = None
    t0 = time.perf_counter()
    try:
        trainer = Trainer(mcfg, tcfg, run_dir, progress=progress, description=mcfg.router, console=console)
        if main:
            console.print(f"set-up (data, model): {time.perf_counter() - t0:.1f} s", highlight=False)
        res = trainer.train(resume=ckpt if ckpt is not None else False)
        trainer.close()  # under DDP, before the group is destroyed (see Trainer.close)
    except ERRORS as e:
        fail(console, str(e))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").write_text(json.dumps(res.to_dict(), indent=1) + "\n")
        console.print(
            f"step {res.step}: val loss {res.val_loss:.4f}"
            + (
                f" (standard error {res.val_loss_se:.4f} over {len(res.val_window_losses)} windows)"
                if math.isfinite(res.val_loss_se)
                else ""
            )
            + f", ppl {res.val_ppl:.2f}, "
            f"{res.tokens_per_s:,.0f} tok/s (wall); final model in {run_dir / 'final'}",
            highlight=False,
        )
