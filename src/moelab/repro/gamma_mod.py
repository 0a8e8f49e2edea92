"""``gamma_mod_arank``: does converting low-ARank layers hurt less than converting high-ARank ones?

γ-MoD (Luo et al., ICLR 2025, arXiv 2410.13859) turns the layers of a trained model whose
attention maps have the lowest rank (ARank, ``moelab.analysis.arank``) into mixture-of-depths
layers, arguing that their tokens attend redundantly, so skipping half of them costs little. This
runner checks that choice on a CPU-sized language model, per seed:

1. **base**: a dense ``MoELM`` (``GAMMA_MOD_MODEL``: d = 64, 8 layers, byte tokens) trained on the
   default stdlib corpus for ``train["steps"]`` steps (``moelab.train.Trainer``).
2. **ARank** of every layer on ``ARANK_WINDOWS`` val windows (``arank_per_layer``).
3. **arms**: two copies of the base, each converted (``moelab.depth.gamma_mod.convert``, capacity
   0.5, the official ``arank_mod`` exclusion of layers 0, 1, 2 and the last) at ``k`` layers:
   ``low_arank`` the ``k`` lowest-ARank candidates, ``high_arank`` the ``k`` highest of the
   other candidates (``k`` half the candidates: 2 of layers 3-6; the arms never share a
   layer). A third copy, ``base``, is not converted. All three are then fine-tuned with the
   same budget (``FINETUNE_FRACTION`` of the base steps, lr / 3, the same batches), every
   parameter, router included (γ-MoD fine-tunes the whole model).
4. **metrics** per arm: ``val_loss`` under the training top-k (``rule="topk"``: exactly half of
   each sequence runs each MoD layer, so both arms spend the same compute; the selection reads
   the whole window, so it is not causal, alike in both arms), ``val_loss_causal`` and
   ``kept_causal`` under the causal rule (a token runs a MoD layer when ``p >= 0.5``, what a
   decoder can use; the share of tokens that ran may differ between arms),
   ``val_loss_converted`` right after conversion (router untrained, top-k), ``flops_per_token``
   (top-k) and ``arank`` (mean ARank of the converted layers). ``_arank`` holds every layer's
   ARank.

The claim is judged on ``val_loss``: ``low_arank`` below ``high_arank`` over seeds.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from moelab.repro.rules import Arm, Reproduction, Rows, fmt, lower

GAMMA_MOD_MODEL = {"d_model": 64, "n_layers": 8, "n_heads": 4, "moe_every": 1000, "max_seq_len": 64}
GAMMA_MOD_TRAIN = {"seq_len": 64, "eval_every": 0}
ARANK_WINDOWS = 8  # val windows ARank is measured on (γ-MoD: "a few samples")
FINETUNE_FRACTION = 0.25  # fine-tuning steps per arm, as a share of the base model's (our choice)
FINETUNE_LR_SCALE = 1 / 3  # fine-tuning lr relative to the base run's (our choice)


def _measure(model: Any, trainer: Any, windows: Any, rule: str | None) -> dict[str, float]:
    """Val loss, the share of tokens that ran the MoD layers and the FLOPs per token, with the
    γ-MoD router's evaluation rule set to ``rule`` (None: a model without one)."""
    from moelab.core.context import RoutingContext

    depth = getattr(model, "depth", None)
    old = None if depth is None else depth.rule
    if depth is not None:
        depth.rule = rule
    try:
        loss = trainer.evaluate(final=True)["val_loss"]
        ctx = RoutingContext()
        model.eval()
        with torch.no_grad():
            model(torch.as_tensor(windows).to(next(model.parameters()).device), ctx=ctx)
        model.train()
        mod = [r for r in ctx.history if r.num_experts == 1]
        kept = sum(r.num_assignments for r in mod) / max(1, sum(r.num_tokens for r in mod)) if mod else 1.0
        return {"val_loss": loss, "kept": kept, "flops_per_token": model.flops_per_token()}
    finally:
        if depth is not None:
            depth.rule = old


def run_gamma_mod_arank(
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path | None = None,
    progress: bool = False,
    console: Any = None,
) -> Rows:
    """One seed of ``gamma_mod_arank`` (module docstring). ``model``: ``MoELMConfig`` fields
    (others, such as ``num_experts`` of ``moelab repro``'s defaults, are ignored for a dense
    model); ``train``: ``TrainConfig`` fields. Returns the rows ``base``, ``low_arank``,
    ``high_arank`` and ``_arank``."""
    import moelab.depth.gamma_mod as gm
    from moelab.analysis.arank import arank_per_layer
    from moelab.data import eval_batches, load_data
    from moelab.models.config import MoELMConfig
    from moelab.models.lm import MoELM
    from moelab.train.config import TrainConfig
    from moelab.train.resources import torch_threads
    from moelab.train.trainer import Trainer

    known = {f.name for f in fields(MoELMConfig)}
    tcfg = TrainConfig.from_dict({**train, "seed": seed})
    data = load_data(tcfg.data, tcfg.tokenizer, bpe_vocab_size=tcfg.bpe_vocab_size)
    cfg = MoELMConfig.from_dict(
        {k: v for k, v in model.items() if k in known} | {"vocab_size": data.vocab_size}
    )
    if cfg.moe_layers:
        raise ValueError(
            f"gamma_mod_arank converts a dense model: set moe_every > n_layers, got {cfg.moe_every}"
        )

    def trainer_for(net: Any, cfg_t: TrainConfig, label: str) -> Trainer:
        return Trainer(
            net, cfg_t, data=data, progress=progress, console=console, description=f"{label} s{seed}"
        )

    base_trainer = trainer_for(cfg, tcfg, "base")
    base_trainer.train()
    base = base_trainer.model.eval()
    windows = eval_batches(data.val_tokens, tcfg.seq_len, ARANK_WINDOWS, 1)[0]
    with torch_threads(tcfg.threads):
        scores = arank_per_layer(base, torch.as_tensor(windows))
    candidates = gm.lowest_arank_layers(scores)  # every layer but 0, 1, 2 and the last
    k = max(1, len(candidates) // 2)
    low = gm.lowest_arank_layers(scores, k)
    # the highest among the other candidates: the arms never share a layer, even on ties
    rest = [i for i in range(len(scores)) if i not in candidates or i in low]
    layers = {"low_arank": low, "high_arank": gm.lowest_arank_layers(scores, k, exclude=rest, highest=True)}
    ft_steps = max(1, round(FINETUNE_FRACTION * tcfg.steps))
    ft = TrainConfig.from_dict(
        {
            **tcfg.__dict__,
            "steps": ft_steps,
            "lr": tcfg.lr * FINETUNE_LR_SCALE,
            "warmup_steps": min(tcfg.warmup_steps, ft_steps // 5),
        }
    )
    rows: Rows = {}
    for label in ("base", "low_arank", "high_arank"):
        net = MoELM(base.config)
        net.load_state_dict(base.state_dict())
        rule = None if label == "base" else "topk"
        if rule is not None:
            gm.convert(net, layers[label], rule=rule)
        trainer = trainer_for(net, ft, label)
        with torch_threads(tcfg.threads):
            converted = trainer.evaluate(final=True)["val_loss"]
        trainer.train()
        with torch_threads(tcfg.threads):
            row = _measure(net, trainer, windows, rule)
            causal = _measure(net, trainer, windows, "causal" if rule else None)
        row.update(
            val_loss_converted=converted, val_loss_causal=causal["val_loss"], kept_causal=causal["kept"]
        )
        if rule is not None:
            row["arank"] = sum(scores[i] for i in layers[label]) / len(layers[label])
            row["first_layer"] = float(layers[label][0])
            row["last_layer"] = float(layers[label][-1])
        rows[label] = row
    rows["_arank"] = {f"layer{i}": float(s) for i, s in enumerate(scores)}
    return rows


def _describe(r: Rows) -> str:
    b, lo, hi = r["base"], r["low_arank"], r["high_arank"]
    ranks = ", ".join(f"{v:.1f}" for v in r["_arank"].values())
    return (
        f"ARank per layer {ranks} (mean over seeds); converted layers' mean ARank low {lo['arank']:.1f} / "
        f"high {hi['arank']:.1f}. Val loss after the same fine-tuning, capacity 0.5: base {b['val_loss']:.3f}, "
        f"low-ARank {lo['val_loss']:.3f} ({lo['val_loss'] - b['val_loss']:+.3f}), high-ARank {hi['val_loss']:.3f} "
        f"({hi['val_loss'] - b['val_loss']:+.3f}); causal rule {lo['val_loss_causal']:.3f} / "
        f"{hi['val_loss_causal']:.3f} keeping {fmt(lo['kept_causal'])} / {fmt(hi['kept_causal'])} of the tokens in "
        f"the MoD layers; right after conversion {lo['val_loss_converted']:.3f} / {hi['val_loss_converted']:.3f} "
        f"(base {b['val_loss_converted']:.3f}); FLOPs per token {fmt(lo['flops_per_token'] / b['flops_per_token'])}x base"
    )


GAMMA_MOD_REPRODUCTION = Reproduction(
    name="gamma_mod_arank",
    method="gamma_mod",
    paper="γ-MoD (Luo et al., ICLR 2025, arXiv 2410.13859); cheap check of PAPERS.md A.1",
    claim=(
        "Converting the lowest-ARank layers of a trained dense LM to γ-MoD layers (capacity 0.5, one shared "
        "router) hurts its val loss less than converting as many highest-ARank layers, after the same brief "
        "fine-tuning."
    ),
    arms={
        "base": Arm("none"),
        "low_arank": Arm("gamma_mod", {"layers": "lowest ARank (arank_mod candidates)", "capacity": 0.5}),
        "high_arank": Arm("gamma_mod", {"layers": "highest ARank (arank_mod candidates)", "capacity": 0.5}),
    },
    model=GAMMA_MOD_MODEL,
    train=GAMMA_MOD_TRAIN,
    conditions=(lower("val_loss", "low_arank", "high_arank"),),
    describe=_describe,
    runner=run_gamma_mod_arank,
)
