"""Attention routing's claims (issue #12): MoBA's recall with small blocks and a key convolution
(``moelab.repro.moba``), and UoE's selective heads in a UoE block.

Same rules as ``moelab.repro.claims`` (vocabulary in ``moelab.repro.rules``).
"""

from __future__ import annotations

import math

from moelab.repro.moba import MOBA_RECALL
from moelab.repro.rules import Arm, Reproduction, Rows, lower_loss, no_worse_loss
from moelab.train.settings import PAPER_SETTINGS

_UOE = PAPER_SETTINGS["uoe"]
_SMHA = {"attention": "uoe_attention"}  # heads_per_token = n_heads // 2 (official SwitchGate)


def _describe_uoe_attention(r: Rows) -> str:
    parts = []
    for label, name in (
        ("topk", "MHA + top-2 MoE"),
        ("uoe_mlp", "MHA + UoE MLP"),
        ("uoe_block", "UoE block (selective heads + UoE MLP)"),
    ):
        row = r[label]
        flops = row.get("flops_per_token", math.nan)
        parts.append(f"{name} {row['val_loss']:.3f} ({flops / 1e6:.2f} MFLOP/token)")
    ratio = r["uoe_block"].get("flops_per_token", math.nan) / r["topk"].get("flops_per_token", math.nan)
    return (
        "val loss at equal steps: "
        + "; ".join(parts)
        + f"; the UoE block's forward FLOPs are {ratio:.2f}x top-2's"
    )


UOE_ATTENTION = Reproduction(
    name="uoe_attention",
    method="uoe_attention",
    paper="Union of Experts (Yang et al. 2025), the whole block: selective multi-head attention (SMHA) with the "
    "UoE MLP; cheap check of PAPERS.md sec. 11",
    claim=(
        "A UoE block (each token takes half of the heads, each head attends only among its tokens; UoE's MLP "
        "as in its official code) beats a top-2 MoE with full multi-head attention at lower FLOPs, and its "
        "selective heads cost nothing against the same UoE MLP under full attention."
    ),
    arms={
        "topk": Arm("topk", {"capacity_factor": None}, {"load_balance": 1e-2}),
        "uoe_mlp": Arm("uoe", _UOE["router_kwargs"], _UOE["aux_losses"]),
        "uoe_block": Arm("uoe", _UOE["router_kwargs"], _UOE["aux_losses"], _SMHA),
    },
    model={"num_experts": 4},
    conditions=(lower_loss("uoe_block", "topk"), no_worse_loss("uoe_block", "uoe_mlp")),
    describe=_describe_uoe_attention,
)

ATTENTION: list[Reproduction] = [MOBA_RECALL, UOE_ATTENTION]
