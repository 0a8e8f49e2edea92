"""Expert pools and composite FFN layers' claims (issue #10): each paper's cheap check as a reproduction.

Same rules as ``moelab.repro.claims`` (vocabulary in ``moelab.repro.rules``): the arms differ in
the one thing the paper says matters, every arm trains on every seed from the same batches, and
each condition is judged by the 95% t-interval of its paired difference over seeds. Arms that
differ in architecture (expert counts, widths) cannot share initial weights; they share the data
order and every other setting.
"""

from __future__ import annotations

import math

from moelab.models.pyramid import pyramid_experts
from moelab.repro.denoise import MOFME_REPRODUCTION
from moelab.repro.rules import Arm, Reproduction, Rows, lower_loss, no_worse_loss
from moelab.repro.rules import fmt as _f
from moelab.train.settings import PAPER_SETTINGS

_LB = {"load_balance": 1e-2}
_CF1 = {"capacity_factor": 1.0, "eval_capacity_factor": None}
_RESIDUAL = PAPER_SETTINGS["residual_moe"]
_COE = PAPER_SETTINGS["coe"]


def _params(row: dict[str, float]) -> str:
    n = row.get("params", float("nan"))
    return "?" if math.isnan(n) else f"{n / 1e6:.2f}M"


def _describe_residual(r: Rows) -> str:
    res, t2, t1 = r["residual"], r["top2"], r["top1"]
    return (
        f"val loss: residual (MLP + top-1) {res['val_loss']:.3f}, top-2 {t2['val_loss']:.3f}, top-1 at top-2's "
        f"expert width {t1['val_loss']:.3f}; max/mean load {_f(res['max_over_mean'])} / "
        f"{_f(t2['max_over_mean'])} / {_f(t1['max_over_mean'])}"
    )


def _describe_pyramid(r: Rows) -> str:
    u, p, pr = r["uniform"], r["pyramid"], r["pr_moe"]
    return (
        f"val loss (params): uniform 8 experts/layer {u['val_loss']:.3f} ({_params(u)}), pyramid 4,4,8,8 "
        f"{p['val_loss']:.3f} ({_params(p)}), PR-MoE (pyramid + MLP + top-1) {pr['val_loss']:.3f} ({_params(pr)})"
    )


def _describe_uoe(r: Rows) -> str:
    u, g, t = r["uoe"], r["uoe_gated"], r["topk"]
    return (
        f"val loss: UoE (official: unweighted, fixed router) {u['val_loss']:.3f}, UoE weighted by a trained "
        f"gate {g['val_loss']:.3f}, top-2 MoE {t['val_loss']:.3f}; max/mean load {_f(u['max_over_mean'])} / "
        f"{_f(g['max_over_mean'])} / {_f(t['max_over_mean'])} (UoE's selection sees the whole sequence)"
    )


def _describe_omni(r: Rows) -> str:
    p, o = r["peer"], r["omni"]
    return (
        f"val loss (params): PEER {p['val_loss']:.3f} ({_params(p)}), OmniMoE {o['val_loss']:.3f} ({_params(o)}); "
        f"share of the 4096 experts used on the final val windows {p.get('expert_usage', float('nan')):.2f} / "
        f"{o.get('expert_usage', float('nan')):.2f}"
    )


def _describe_coe(r: Rows) -> str:
    t, c, g, o = r["topk"], r["coe"], r["shared_gate"], r["outer_residual"]
    return (
        f"val loss: top-4 MoE {t['val_loss']:.3f}, CoE C=2 K=2 {c['val_loss']:.3f}, with one shared gate "
        f"{g['val_loss']:.3f}, with the outer residual {o['val_loss']:.3f}; max/mean load "
        f"{_f(t['max_over_mean'])} / {_f(c['max_over_mean'])} / {_f(g['max_over_mean'])} / {_f(o['max_over_mean'])}"
    )


# Pyramid: 4 MoE layers, 8 experts each (the demo model) against 4, 4, 8, 8 (a quarter fewer
# experts); PR-MoE is the same pyramid with Residual-MoE layers (MLP + top-1 at top-2's width).
_PYRAMID = {"experts_per_layer": pyramid_experts(4, 4, 8)}

# CoE at the paper's ratio (CoE C=2, K=4 of 64 against MoE K=8 of 64), scaled down: 16 fine-grained
# experts of width 128 = 4d/4; top-4 MoE against two iterations of top-2 (the same expert FLOPs).
# Both use DeepSeek-V2's gate (softmax top-k, not renormalised) and its sequence loss 1e-3. Two
# layers (the paper's models have 4): with 4 layers the four arms took 19 minutes on 2 cores.
_COE_MODEL = {"num_experts": 16, "top_k": 4, "expert_hidden": 128, "n_layers": 2}
_COE_LOSSES = _COE["aux_losses"]
_COE_K2 = {"top_k": 2}

# UoE at the paper's E = 4, k = 2: the same expert width 4d/k in both arms, so UoE is a dense MLP of
# width 4 x 256 cut into 4 slices; each slice takes S k / E tokens per sequence (2 per token on
# average), as dropless top-2 runs 2 experts per token: equal active FLOPs and parameters.
_UOE = PAPER_SETTINGS["uoe"]

# OmniMoE against PEER at matched parameters, on the demo model (d 128, 4 MoE layers): a pool of
# 4096 = 64^2 atomic experts and 8 retrieved per token in both (PEER: 2 heads x 4; OmniMoE: K = 8);
# OmniMoE's dense SwiGLU of width 87 matches PEER's query projection, BatchNorm and sub-keys, so
# the layers have 1,098,240 (PEER) and 1,098,368 (OmniMoE) parameters. 16 per token (the papers')
# costs about 2x a top-2 step, beyond the row's 10 minutes.
_POOL = {"num_experts": 4096}

COMPOSITE: list[Reproduction] = [
    Reproduction(
        name="residual_moe",
        method="residual_moe",
        paper="DeepSpeed-MoE (Rajbhandari et al. 2022), Residual-MoE; cheap check of PAPERS.md sec. 14",
        claim=(
            "A fixed MLP plus one routed top-1 expert (Residual-MoE) reaches the val loss of top-2 routing "
            "(equal within the 0.02 margin both ways)."
        ),
        arms={
            "residual": Arm("residual_moe", _RESIDUAL["router_kwargs"], _RESIDUAL["aux_losses"]),
            "top2": Arm("topk", _CF1, _LB),
            # top-1 with top-2's expert width: one routed expert, no fixed MLP (a reference, not judged)
            "top1": Arm("topk", _CF1, _LB, {"top_k": 1, "expert_hidden": 256}),
        },
        conditions=(no_worse_loss("residual", "top2"), no_worse_loss("top2", "residual")),
        describe=_describe_residual,
    ),
    Reproduction(
        name="pyramid",
        method="pyramid",
        paper="DeepSpeed-MoE (Rajbhandari et al. 2022), Pyramid-MoE and PR-MoE; cheap check of PAPERS.md sec. 14",
        claim=(
            "Fewer experts in the shallow layers (4, 4, 8, 8 instead of 8 everywhere: a quarter fewer expert "
            "parameters) train no worse than the uniform model; so does PR-MoE (the pyramid with a fixed "
            "MLP plus a top-1 expert per layer)."
        ),
        arms={
            "uniform": Arm("topk", _CF1, _LB),
            "pyramid": Arm("topk", _CF1, _LB, _PYRAMID),
            "pr_moe": Arm("residual_moe", _RESIDUAL["router_kwargs"], _RESIDUAL["aux_losses"], _PYRAMID),
        },
        conditions=(no_worse_loss("pyramid", "uniform"), no_worse_loss("pr_moe", "uniform")),
        describe=_describe_pyramid,
    ),
    Reproduction(
        name="coe_vs_topk",
        method="coe",
        paper="Chain-of-Experts (Wang et al. 2025), cheap check of PAPERS.md sec. 5, with both ablations",
        claim=(
            "Two chained iterations of top-2 routing over one bank of 16 experts (CoE C=2, K=2) beat one "
            "top-4 MoE layer at the same expert compute; a gate shared by the iterations and the outer "
            "residual (instead of the inner one) are both worse than CoE."
        ),
        arms={
            "topk": Arm("topk", {"normalize": False, "capacity_factor": None}, _COE_LOSSES),
            "coe": Arm("coe", _COE["router_kwargs"], _COE_LOSSES, _COE_K2),
            "shared_gate": Arm("coe", {**_COE["router_kwargs"], "shared_gate": True}, _COE_LOSSES, _COE_K2),
            "outer_residual": Arm(
                "coe", {**_COE["router_kwargs"], "outer_residual": True}, _COE_LOSSES, _COE_K2
            ),
        },
        model=_COE_MODEL,
        conditions=(
            lower_loss("coe", "topk"),
            lower_loss("coe", "shared_gate"),
            lower_loss("coe", "outer_residual"),
        ),
        describe=_describe_coe,
    ),
    Reproduction(
        name="uoe",
        method="uoe",
        paper="Union of Experts (Yang et al. 2025), the MLP part (UoME); cheap check of PAPERS.md sec. 11",
        claim=(
            "UoE's MLP (4 exact slices of a dense MLP, top-2 mask, per-sequence selection at capacity 1, "
            "outputs not weighted, the router left at init as in the official code) beats top-2 MoE at "
            "equal active FLOPs and parameters."
        ),
        arms={
            "uoe": Arm("uoe", _UOE["router_kwargs"], _UOE["aux_losses"]),
            # a reference, not judged: the gate weights the outputs, so the router trains
            "uoe_gated": Arm("uoe", {"scale_by_gate": True}, _LB),
            "topk": Arm("topk", {"capacity_factor": None}, _LB),
        },
        model={"num_experts": 4},
        conditions=(lower_loss("uoe", "topk"),),
        describe=_describe_uoe,
    ),
    Reproduction(
        name="omni_vs_peer",
        method="omni",
        paper="OmniMoE (flash-algo/omni-moe) against PEER (He 2024); cheap check of PAPERS.md sec. 7",
        claim=(
            "At matched parameters (a pool of 4096 atomic experts, 8 retrieved per token), OmniMoE's val loss is "
            "no worse than PEER's."
        ),
        arms={
            "peer": Arm("peer", {"heads": 2}, {}, {"top_k": 4}),
            "omni": Arm("omni", {}, {}, {"top_k": 8, "expert_hidden": 87}),
        },
        model=_POOL,
        conditions=(no_worse_loss("omni", "peer"),),
        describe=_describe_omni,
    ),
    MOFME_REPRODUCTION,
]
