"""``moelab finetune``: a LoRA mixture on a pretrained causal LM, trained on the built-in tasks or
text files, saved as a PEFT-shaped adapter folder. ``moelab compare --mixtures`` runs several
mixtures the same way (``run_mixture_compare``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from moelab.cli.options import fail, make_console, parse_aux_losses, parse_router_args, warn_load

ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError)


def split_names(spec: str | None) -> list[str] | None:
    """``"a,b"`` -> ``["a", "b"]`` (None stays None)."""
    if spec is None:
        return None
    return [x.strip() for x in spec.split(",") if x.strip()]


def load_base_model(base: str, tokenizer: str) -> tuple[Any, Any]:
    from moelab.integrations.hf.loading import load_base

    return load_base(base, tokenizer=tokenizer)


def merged_aux_losses(method: str, overrides: dict[str, float]) -> dict[str, float]:
    """The method's paper losses with ``--aux-loss`` applied: ``NAME=COEF`` sets one, 0 removes
    it, ``none`` (key ``"*"``) removes them all first."""
    from moelab.lora.presets import get_preset

    losses = {} if "*" in overrides else dict(get_preset(method).aux_losses)
    for name, coef in overrides.items():
        if name != "*":
            losses[name] = coef
    return {k: v for k, v in losses.items() if v > 0}


def save_flylora(model: Any, folder: Path, settings: Any) -> None:
    """A FlyLoRA adapter: ``flylora.safetensors`` (``moelab.lora.flylora_state``) and its settings."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from moelab.lora import flylora_state

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in flylora_state(model).items()}
    save_file(state, str(folder / "flylora.safetensors"), metadata={"format": "pt"})
    (folder / "flylora_config.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")


def settings_from(options: dict[str, Any]) -> Any:
    """A ``FinetuneSettings`` from the command's options (None: the settings' default)."""
    from moelab.train.finetune import FinetuneSettings

    kwargs = {k: v for k, v in options.items() if v is not None}
    for key in ("targets", "target_parameters", "tasks", "text"):
        if key in kwargs:
            kwargs[key] = split_names(kwargs[key])
    return FinetuneSettings(**kwargs)


def run_mixture_compare(
    *,
    base: str,
    tokenizer: str,
    mixtures: list[str],
    seeds: list[int],
    out_dir: Path,
    options: dict[str, Any],
    progress: bool,
) -> None:
    """``moelab compare --mixtures``: every mixture on every seed from the same base; writes
    ``out_dir/report.md`` and ``results.json`` and prints the report."""
    import copy

    from moelab.train.finetune import compare_mixtures

    console = make_console()
    try:
        settings = settings_from(options)
        warn_load(console)
        model, tok = load_base_model(base, tokenizer)
        summary = compare_mixtures(
            lambda: copy.deepcopy(model),
            tok,
            mixtures,
            settings,
            seeds=seeds,
            out=out_dir,
            base_name=base,
            progress=progress,
            console=console,
        )
    except ERRORS as e:
        fail(console, str(e))
    console.print((out_dir / "report.md").read_text(), highlight=False, markup=False)
    console.print(
        f"wrote {out_dir}/report.md, results.json (wall time {summary['wall_time_s']:.0f} s)", highlight=False
    )


def register(app: typer.Typer) -> None:
    """Add ``moelab finetune`` to ``app``."""

    @app.command("finetune")
    def finetune_cmd(
        base: Annotated[
            str,
            typer.Option(
                help="'smollm2' (SmolLM2-135M, offline package) or a local transformers model directory"
            ),
        ] = "smollm2",
        method: Annotated[
            str,
            typer.Option(help="the mixture: mole, dynmole, lora_mixer, remix, ... (moelab list --kind lora)"),
        ] = "mole",
        tasks: Annotated[
            str | None,
            typer.Option(help="built-in tasks, comma-separated (default arithmetic,brackets,sort)"),
        ] = None,
        text: Annotated[
            str | None, typer.Option(help="text files (comma-separated) instead of --tasks")
        ] = None,
        targets: Annotated[
            str | None,
            typer.Option(
                help="projections to adapt, comma-separated (default: the method's, else every Llama projection)"
            ),
        ] = None,
        target_parameters: Annotated[
            str | None,
            typer.Option(help="fused 3-D expert parameters of a MoE base, e.g. experts.gate_up_proj"),
        ] = None,
        experts: Annotated[int | None, typer.Option(help="LoRA experts per projection")] = None,
        rank: Annotated[int | None, typer.Option(help="LoRA rank")] = None,
        alpha: Annotated[float | None, typer.Option(help="lora_alpha (default 8, PEFT's)")] = None,
        router: Annotated[
            str | None, typer.Option(help="a registered router instead of the method's")
        ] = None,
        top_k: Annotated[int | None, typer.Option("--top-k")] = None,
        router_arg: Annotated[list[str] | None, typer.Option(help="ARG=VALUE for the router")] = None,
        aux_loss: Annotated[list[str] | None, typer.Option(help="NAME=COEF over the method's losses")] = None,
        steps: Annotated[int | None, typer.Option()] = None,
        batch_size: Annotated[int | None, typer.Option(help="packed rows per step")] = None,
        seq_len: Annotated[int | None, typer.Option(help="tokens per packed row")] = None,
        lr: Annotated[float | None, typer.Option()] = None,
        warmup: Annotated[int | None, typer.Option()] = None,
        train_examples: Annotated[int | None, typer.Option(help="train examples per task")] = None,
        val_examples: Annotated[
            int | None, typer.Option(help="validation examples per task (default 32)")
        ] = None,
        generate: Annotated[
            int | None, typer.Option(help="test prompts per task scored by greedy decoding")
        ] = None,
        seed: Annotated[int, typer.Option()] = 0,
        threads: Annotated[int, typer.Option(help="PyTorch threads (0: the default)")] = 0,
        ckpt_every: Annotated[int, typer.Option(help="checkpoint every n steps (0: none)")] = 0,
        resume: Annotated[bool, typer.Option(help="resume from the newest checkpoint in OUT/NAME")] = False,
        tokenizer: Annotated[str, typer.Option(help="'auto' (the base's) or 'bytes'")] = "auto",
        name: Annotated[str, typer.Option(help="run name: outputs go to OUT/NAME/")] = "finetune",
        out: Annotated[Path, typer.Option(help="output root")] = Path("runs"),
        progress: Annotated[bool, typer.Option(help="progress bars")] = True,
    ) -> None:
        """Fine-tune a LoRA mixture on a pretrained causal LM; write OUT/NAME/adapter (a PEFT-shaped
        mixture folder: each expert loads into peft.PeftModel as a plain LoRA; FlyLoRA: its tensors
        in flylora.safetensors) and metrics.json."""
        console = make_console()
        options = {
            "method": method,
            "tasks": tasks,
            "text": text,
            "targets": targets,
            "target_parameters": target_parameters,
            "num_experts": experts,
            "rank": rank,
            "alpha": alpha,
            "router": router,
            "top_k": top_k,
            "steps": steps,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "lr": lr,
            "warmup_steps": warmup,
            "train_examples": train_examples,
            "val_examples": val_examples,
            "generate": generate,
            "seed": seed,
            "threads": threads,
            "ckpt_every": ckpt_every,
        }
        try:
            if router_arg:
                options["router_kwargs"] = parse_router_args(router_arg, prefixed=False).get("", {})
            if aux_loss:
                options["aux_losses"] = merged_aux_losses(method, parse_aux_losses(aux_loss).get("", {}))
            settings = settings_from(options)
            run = out / name
            warn_load(console)
            model, tok = load_base_model(base, tokenizer)
            from moelab.integrations.peft import save_mixture
            from moelab.train.finetune import finetune_mixture

            row = finetune_mixture(
                model,
                tok,
                settings,
                run if (ckpt_every or resume) else None,
                progress=progress,
                console=console,
                resume=resume,
            )
            if settings.method == "flylora":
                save_flylora(model, run / "adapter", settings)
            else:
                save_mixture(model, run / "adapter", base_model_name_or_path=base)
        except ERRORS as e:
            fail(console, str(e))
        (run / "metrics.json").write_text(json.dumps({"base": base, **row}, indent=2, default=float) + "\n")
        shown = {
            k: v for k, v in row.items() if k.startswith(("val_loss", "score_")) or k in ("entropy", "ess")
        }
        for k, v in shown.items():
            console.print(f"{k:>24}  {v:.4f}", highlight=False)
        console.print(f"wrote {run}/adapter (PEFT-shaped mixture), {run}/metrics.json", highlight=False)
