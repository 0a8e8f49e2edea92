"""The FTP reproduction: on a small trained language model, does FTP's 4-feature router prune tokens
at 25% sparsity with perplexity no worse than a router that reads the hidden state?

FTP (Li et al. 2024, arXiv 2412.11494) reports that its router on four low-dimensional features
(position, attention received, its rank, the block's sparsity) beats a router on the hidden state
(its ablation). This runner checks that at CPU scale, per seed:

1. **dense model**: a dense ``MoELM`` (no MoE layer) of ``model``'s sizes, trained with
   ``moelab.train.Trainer`` on the default stdlib corpus (bytes) for ``train["steps"]`` steps;
2. **schedule search**: FTP's genetic search (``moelab.depth.prune.search_sparsity_schedule``) for
   the per-block sparsities, mean 25%, every block but the first prunable; the fitness is the
   next-token loss of the model pruned by the *static* router (tokens ranked by the attention they
   receive) on ``calibration_batches`` windows of the train split (the val windows stay unseen);
3. **routers**: the 4-feature router and the hidden-state router, each attached to a copy of the
   dense model (frozen) at the searched schedule and trained for the same ``router_steps`` steps,
   same batches, with ``ftp_loss_fn`` (distillation to the dense model + guide + sparsity losses);
4. **evaluation**: the next-token loss and perplexity of every arm on the same val windows
   (``final_eval_batches`` batches spread over the val split): ``dense``, ``static_uniform`` (the
   static router at a uniform 25%), ``static`` (at the searched schedule), ``features`` and
   ``hidden_state``.

The claim is judged on ``val_loss(features) - val_loss(hidden_state)`` over seeds
(non-inferiority with the project's ``LOSS_MARGIN``; perplexity is ``exp`` of it).
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

from moelab.repro.rules import Arm, Reproduction, Rows, no_worse_loss

FTP_SPARSITY = 0.25  # PAPERS.md A.4: compare the routers at 25% sparsity
# A dense 4-block model of the demo's width, trained 200 steps of 16 x 128 bytes; the routers
# 75 steps each (our choice: about 3 minutes per seed on one core, sec. "Reproduction" of
# docs/methods/ftp.md).
FTP_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 128}
FTP_TRAIN = {"steps": 200, "eval_every": 0, "eval_batches": 2, "final_eval_batches": 16}
ROUTER_STEPS = 75
ROUTER_LR = 1e-2  # a 4 -> 64 -> 1 MLP: a larger step than the LM's (our choice)
SEARCH = {"population": 8, "generations": 4}  # 8 + 4 x 6 = at most 32 evaluated schedules
CALIBRATION_BATCHES = 2


@functools.lru_cache(maxsize=2)
def _data(source: str, tokenizer: str) -> Any:
    """The corpus, tokenised once per process (three seeds read it once)."""
    from moelab.data import load_data

    return load_data(source, tokenizer)


def run_ftp(
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path | None = None,
    progress: bool = False,
    console: Any = None,
    sparsity: float = FTP_SPARSITY,
    router_steps: int = ROUTER_STEPS,
    router_lr: float = ROUTER_LR,
    search: dict[str, Any] | None = None,
    calibration_batches: int = CALIBRATION_BATCHES,
    router_kwargs: dict[str, Any] | None = None,
    loss_kwargs: dict[str, Any] | None = None,
) -> Rows:
    """One seed of the reproduction (module docstring). ``model``: ``d_model``, ``n_layers``,
    ``n_heads``, ``max_seq_len`` (other keys ignored: the model is dense); ``train``:
    ``TrainConfig`` fields of the dense run (the routers' runs take its batch size, sequence length
    and data with ``router_steps`` and ``router_lr``). Rows: ``dense``, ``static_uniform``,
    ``static``, ``features``, ``hidden_state`` with ``val_loss``, ``val_ppl`` and (pruned arms)
    ``kept_fraction``; ``_schedule`` with the searched sparsity of each prunable block
    (``block<i>``) and the search's ``evaluations``. ``router_kwargs``: more ``FTPRouter`` options for
    both trained routers (``guide_coef``, ``selection``, ...); ``loss_kwargs``: ``ftp_loss_fn``'s."""
    import torch

    from moelab.core.checks import positive_int
    from moelab.data import eval_batches
    from moelab.depth.prune import attach_ftp, ftp_loss_fn, pruned_val_loss
    from moelab.depth.schedule_search import search_sparsity_schedule
    from moelab.models import MoELMConfig
    from moelab.train.config import TrainConfig
    from moelab.train.resources import torch_threads
    from moelab.train.trainer import Trainer

    positive_int("router_steps", router_steps)
    positive_int("calibration_batches", calibration_batches)
    tcfg = TrainConfig.from_dict({**train, "seed": seed})
    data = _data(tcfg.data, tcfg.tokenizer)
    n_layers = int(model["n_layers"])
    cfg = MoELMConfig(
        vocab_size=data.vocab_size,
        d_model=int(model["d_model"]),
        n_layers=n_layers,
        n_heads=int(model["n_heads"]),
        max_seq_len=int(model.get("max_seq_len", tcfg.seq_len)),
        moe_every=n_layers + 1,  # dense: no block has an MoE FFN
    )

    def trainer(net: Any, cfg_: TrainConfig, label: str, **kw: Any) -> Trainer:
        return Trainer(
            net,
            cfg_,
            None,
            data=data,
            progress=progress,
            console=console,
            description=f"{label} s{seed}",
            **kw,
        )

    # every arm is evaluated below on the same windows: the trainers' own evaluations stay minimal
    quiet = {"eval_every": 0, "eval_batches": 1, "final_eval_batches": 0}
    dense = trainer(cfg, TrainConfig.from_dict({**train, "seed": seed, **quiet}), "ftp dense")
    dense.train()
    base = dense.model.eval()
    val = eval_batches(
        data.val_tokens, tcfg.seq_len, tcfg.batch_size, tcfg.final_eval_batches or tcfg.eval_batches
    )
    calib = eval_batches(data.train_tokens, tcfg.seq_len, tcfg.batch_size, calibration_batches)
    rows: Rows = {}
    with torch_threads(tcfg.threads):
        loss = pruned_val_loss(base, val)
        rows["dense"] = {"val_loss": loss, "val_ppl": math.exp(loss)}
        # the schedule search with the static router, on train-split windows
        static = copy.deepcopy(base)
        router = attach_ftp(static, sparsity=sparsity, scorer="attention")

        def evaluate(schedule: list[float]) -> float:
            with router.using(sparsity=schedule):
                return pruned_val_loss(static, calib)

        found = search_sparsity_schedule(
            evaluate, len(router.layers), sparsity, seed=seed, **{**SEARCH, **(search or {})}
        )
        schedule = [round(s, 6) for s in found.schedule]
        for label, sched in (("static_uniform", sparsity), ("static", schedule)):
            router.set_sparsity(sched)
            loss = pruned_val_loss(static, val)
            rows[label] = {
                "val_loss": loss,
                "val_ppl": math.exp(loss),
                "kept_fraction": router.last_stats["kept_fraction"],
            }
    rows["_schedule"] = {f"block{i}": s for i, s in zip(router.layers, schedule, strict=True)}
    rows["_schedule"]["evaluations"] = float(found.evaluations)
    rcfg = TrainConfig.from_dict(
        {
            **train,
            "seed": seed,
            "steps": router_steps,
            "lr": router_lr,
            "warmup_steps": min(tcfg.warmup_steps, max(1, router_steps // 10)),
            **quiet,
        }
    )
    for label in ("features", "hidden_state"):
        net = copy.deepcopy(base).train()
        torch.manual_seed(seed)  # the router's initialisation
        router = attach_ftp(net, sparsity=schedule, scorer=label, **(router_kwargs or {}))
        trainer(net, rcfg, f"ftp {label}", loss_fn=ftp_loss_fn(**(loss_kwargs or {}))).train()
        with torch_threads(tcfg.threads):
            loss = pruned_val_loss(net, val)
        rows[label] = {
            "val_loss": loss,
            "val_ppl": math.exp(loss),
            "kept_fraction": router.last_stats["kept_fraction"],
        }
    return rows


def _describe(r: Rows) -> str:
    sched = ", ".join(f"{v:.2f}" for k, v in r["_schedule"].items() if k.startswith("block"))
    return (
        f"val perplexity: dense {r['dense']['val_ppl']:.3f}; at {FTP_SPARSITY:.0%} token sparsity, static router "
        f"(attention received) {r['static_uniform']['val_ppl']:.3f} uniform / {r['static']['val_ppl']:.3f} at the "
        f"searched schedule [{sched}] (mean over seeds); trained routers: 4-feature {r['features']['val_ppl']:.3f}, "
        f"hidden-state {r['hidden_state']['val_ppl']:.3f} (val loss {r['features']['val_loss']:.4f} / "
        f"{r['hidden_state']['val_loss']:.4f}); kept fraction {r['features']['kept_fraction']:.3f}"
    )


FTP_REPRODUCTION = Reproduction(
    name="ftp",
    method="ftp",
    paper="FTP (Li et al. 2024, arXiv 2412.11494); PAPERS.md sec. A.4, router ablation",
    claim=(
        f"At {FTP_SPARSITY:.0%} token sparsity on a trained dense LM, FTP's 4-feature router (position, attention "
        "received, its rank, block sparsity) prunes with val perplexity lower than or equal to a router on the hidden "
        "state, both trained with the same losses and budget on the same GA-searched schedule."
    ),
    arms={
        "features": Arm("ftp", {"scorer": "features", "sparsity": FTP_SPARSITY}),
        "hidden_state": Arm("ftp", {"scorer": "hidden_state", "sparsity": FTP_SPARSITY}),
    },
    model=FTP_MODEL,
    train=FTP_TRAIN,
    conditions=(no_worse_loss("features", "hidden_state"),),
    describe=_describe,
    runner=run_ftp,
)
