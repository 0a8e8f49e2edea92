"""Depth routing's claims (issue #11): each paper's cheap check as a reproduction.

Same rules as ``moelab.repro.claims`` (vocabulary in ``moelab.repro.rules``). Arms that differ in
compute are compared at equal *training FLOPs* (``match_flops``: each arm's steps are scaled to the
first arm's FLOPs, ``moelab compare --match-flops``), as the isoFLOP claims of the papers are.
"""

from __future__ import annotations

from moelab.repro.drllm import DRLLM_REPRODUCTION
from moelab.repro.ftp import FTP_REPRODUCTION
from moelab.repro.gamma_mod import GAMMA_MOD_REPRODUCTION
from moelab.repro.rules import Arm, Reproduction, Rows, lower, no_worse_loss
from moelab.train.settings import PAPER_SETTINGS

_DENSE = {"moe_every": 10_000}  # dense SwiGLU FFNs in every block: the comparisons are about depth
_MOD = PAPER_SETTINGS["mod"]["router_kwargs"]


def _describe_mod(r: Rows) -> str:
    d, m, deep = r["dense"], r["mod"], r["mod_deep"]
    return (
        f"val loss at equal training FLOPs: dense 4 blocks {d['val_loss']:.3f} ({d['steps']:.0f} steps, "
        f"{d['flops_per_token'] / 1e6:.2f} MFLOP/token), MoD 4 blocks {m['val_loss']:.3f} ({m['steps']:.0f} steps, "
        f"{m['flops_per_token'] / 1e6:.2f}), MoD 8 blocks {deep['val_loss']:.3f} ({deep['steps']:.0f} steps, "
        f"{deep['flops_per_token'] / 1e6:.2f}); causal decision vs top-k at eval: agreement "
        f"{m.get('depth_predictor_accuracy', float('nan')):.3f} / {deep.get('depth_predictor_accuracy', float('nan')):.3f}, "
        f"recall of the top-k {m.get('depth_topk_recall', float('nan')):.3f} / {deep.get('depth_topk_recall', float('nan')):.3f}, "
        f"tokens kept {m.get('depth_kept_fraction', float('nan')):.3f} / {deep.get('depth_kept_fraction', float('nan')):.3f}"
    )


MOD_ISOFLOP = Reproduction(
    name="mod_isoflop",
    method="mod",
    paper="Raposo et al. 2024 (Mixture-of-Depths), isoFLOP comparison; cheap check of PAPERS.md sec. A.0",
    claim=(
        "At equal training FLOPs, a mixture-of-depths model (C = 12.5% on every other block, evaluated with its "
        "causal rule) is no worse than the dense baseline: the same 4-block model trained for more steps, and "
        "an 8-block MoD model (more parameters at about the same FLOPs per token)."
    ),
    arms={
        "dense": Arm("topk", model=_DENSE),
        "mod": Arm("mod", dict(_MOD), model=_DENSE),
        "mod_deep": Arm("mod", dict(_MOD), model={**_DENSE, "n_layers": 8}),
    },
    conditions=(no_worse_loss("mod", "dense"), no_worse_loss("mod_deep", "dense")),
    describe=_describe_mod,
    match_flops=True,
)

_MOR = PAPER_SETTINGS["mor"]["router_kwargs"]
# d 128, 4 heads, dense FFNs; 4 unique blocks for the recursive arms (block 0, two shared middle
# blocks run up to N_r times, the last block), 6 for vanilla: about the same FLOPs per token.
_MOR_MODEL = {**_DENSE, "n_layers": 4}


def _describe_mor(r: Rows) -> str:
    parts = []
    for label, name in (
        ("vanilla", "vanilla 6 blocks"),
        ("mor_ec", "MoR expert choice"),
        ("mor_tc", "MoR token choice"),
        ("recursive", "recursive N_r=2"),
    ):
        row = r[label]
        parts.append(
            f"{name} {row['val_loss']:.3f} ({row['params'] / 1e6:.2f}M params, {row['steps']:.0f} steps, "
            f"{row['flops_per_token'] / 1e6:.2f} MFLOP/token)"
        )
    return "val loss at equal training FLOPs: " + "; ".join(parts)


MOR_PARETO = Reproduction(
    name="mor_pareto",
    method="mor",
    paper="Bae et al. 2025 (Mixture-of-Recursions), the Pareto comparison; cheap check of PAPERS.md sec. A.2",
    claim=(
        "At equal training FLOPs, MoR with expert-choice routing (N_r = 3, middle-cycle sharing, 2/3 of the "
        "parameters) is no worse than a vanilla model and than a plain recursive model with the same sharing, "
        "and expert choice beats token choice."
    ),
    arms={
        "vanilla": Arm("topk", model={**_DENSE, "n_layers": 6}),
        "mor_ec": Arm("mor", dict(_MOR), model=_MOR_MODEL),
        "mor_tc": Arm("mor", {**_MOR, "router": "token_choice"}, model=_MOR_MODEL),
        # every token every step, no router: N_r = 2 costs what 6 vanilla blocks cost
        "recursive": Arm("mor", {**_MOR, "router": "none", "num_recursions": 2}, model=_MOR_MODEL),
    },
    conditions=(
        no_worse_loss("mor_ec", "vanilla"),
        no_worse_loss("mor_ec", "recursive"),
        lower("val_loss", "mor_ec", "mor_tc"),
    ),
    describe=_describe_mor,
    train={"steps": 150},
    match_flops=True,
)

DEPTH: list[Reproduction] = [MOD_ISOFLOP, GAMMA_MOD_REPRODUCTION, MOR_PARETO, DRLLM_REPRODUCTION, FTP_REPRODUCTION]
