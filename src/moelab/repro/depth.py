"""Depth routing's claims (issue #11): each paper's cheap check as a reproduction.

Same rules as ``moelab.repro.claims`` (vocabulary in ``moelab.repro.rules``). Arms that differ in
compute are compared at equal *training FLOPs* (``match_flops``: each arm's steps are scaled to the
first arm's FLOPs, ``moelab compare --match-flops``), as the isoFLOP claims of the papers are.
"""

from __future__ import annotations

from moelab.repro.rules import Arm, Reproduction, Rows, no_worse_loss
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

DEPTH: list[Reproduction] = [MOD_ISOFLOP]
