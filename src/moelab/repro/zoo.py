"""The router zoo's claims (issue #9): each paper's cheap check from ``PAPERS.md`` as a reproduction.

Same rules as ``moelab.repro.claims`` (the vocabulary is ``moelab.repro.rules``): arms differ in the one thing the
paper says matters, every arm trains on every seed from the same weights and batches, and each
condition is judged by the 95% t-interval of its paired difference over seeds.
"""

from __future__ import annotations

from moelab.repro.rules import (
    HIT_MARGIN,
    Arm,
    Condition,
    Reproduction,
    Rows,
    higher,
    lower,
    lower_loss,
    no_worse_loss,
)
from moelab.repro.rules import fmt as _f
from moelab.train.settings import PAPER_SETTINGS

_DROPLESS = {"capacity_factor": None}
_LB = {"load_balance": 1e-2}


def _describe_erc(r: Rows) -> str:
    a, b = r["lb"], r["lb_erc"]
    return (
        f"diag dominance of M {_f(a['erc_diag_dominance'])} -> {_f(b['erc_diag_dominance'])}; "
        f"mean eps {a['erc_epsilon']:.3f} -> {b['erc_epsilon']:.3f}; "
        f"val loss {a['val_loss']:.3f} -> {b['val_loss']:.3f}"
    )


def _describe_rmoe(r: Rows) -> str:
    a, b = r["topk"], r["rmoe"]
    return (
        f"NMI of consecutive layers' expert sets {a['nmi_consecutive']:.3f} -> {b['nmi_consecutive']:.3f}; "
        f"max/mean load {_f(a['max_over_mean'])} -> {_f(b['max_over_mean'])}; "
        f"val loss {a['val_loss']:.3f} -> {b['val_loss']:.3f}"
    )


def _describe_rexmoe(r: Rows) -> str:
    v, reuse, psr = r["vanilla"], r["reuse"], r["psr"]
    return (
        f"val loss: top-k {v['val_loss']:.3f}, reuse (r = 2) {reuse['val_loss']:.3f}, reuse + PSR "
        f"{psr['val_loss']:.3f}; max/mean load (over each layer's 2E candidates for ReXMoE) "
        f"{_f(v['max_over_mean'])} / {_f(reuse['max_over_mean'])} / {_f(psr['max_over_mean'])}"
    )


def _describe_dynamoe(r: Rows) -> str:
    u, d = r["uniform"], r["descending"]
    return (
        f"experts per token {u['experts_per_token']:.2f} (uniform cap 4) vs {d['experts_per_token']:.2f} "
        f"(descending caps 4,3,2,1); val loss {u['val_loss']:.3f} vs {d['val_loss']:.3f}"
    )


def _describe_tsallis(r: Rows) -> str:
    a, b = r["without_loss"], r["with_loss"]
    return (
        f"router entropy {a['entropy']:.3f} -> {b['entropy']:.3f}; experts per token "
        f"{a['experts_per_token']:.2f} -> {b['experts_per_token']:.2f}; share of tokens on all experts (training mean) "
        f"{a['all_experts_fraction']:.2f} -> {b['all_experts_fraction']:.2f}; "
        f"val loss {a['val_loss']:.3f} -> {b['val_loss']:.3f}"
    )


def _describe_moma(r: Rows) -> str:
    ec, mo, mc = r["ec"], r["moma"], r["moma_causal"]
    return (
        f"val loss: expert choice {ec['val_loss']:.3f}, MoMa {mo['val_loss']:.3f} (text "
        f"{ec['val_loss_text']:.3f} -> {mo['val_loss_text']:.3f}, image {ec['val_loss_image']:.3f} -> "
        f"{mo['val_loss_image']:.3f}); MoMa with the causal predictor at eval {mc['val_loss']:.3f} "
        f"(predictor agreement {mc['moma_predictor_accuracy']:.2f}, {mc['moma_eval_experts_per_token']:.2f} "
        "experts/token); expert choice and plain MoMa see later tokens at eval"
    )


def _describe_promoe(r: Rows) -> str:
    t, n, p = r["topk"], r["promoe_no_rcl"], r["promoe"]
    return (
        f"expert-token NMI (image tokens) without RCL {n['promoe_token_nmi']:.3f} -> with "
        f"{p['promoe_token_nmi']:.3f}; prototype-centroid cos {n['promoe_centroid_cos']:.2f} -> "
        f"{p['promoe_centroid_cos']:.2f}; val loss top-1 {t['val_loss']:.3f}, ProMoE w/o RCL "
        f"{n['val_loss']:.3f}, ProMoE {p['val_loss']:.3f}"
    )


def _describe_pregate(r: Rows) -> str:
    g, t = r["pregate"], r["top1"]
    return (
        f"pre-gated routing, cache of 2 of 8 experts: LRU {g['lru']:.3f}, lookahead {g['lookahead']:.3f}, "
        f"Belady {g['belady']:.3f}; val loss pre-gate {g['val_loss']:.3f} vs top-1 {t['val_loss']:.3f} "
        "(top-1's lookahead would need the backbone's future outputs)"
    )


def _describe_mixer(r: Rows) -> str:
    sw, fr, mx = r["switch"], r["frozen"], r["mixer"]
    updates, skips = mx.get("mixer_gate_updates", float("nan")), mx.get("mixer_gate_skips", float("nan"))
    return (
        f"val loss: top-1 with gradient gate + LB {sw['val_loss']:.3f}, MixER gate never refit "
        f"{fr['val_loss']:.3f}, MixER refit every 5 steps {mx['val_loss']:.3f} ({updates:.0f} refits, "
        f"{skips:.0f} skipped per layer); max/mean load {_f(sw['max_over_mean'])} / "
        f"{_f(fr['max_over_mean'])} / {_f(mx['max_over_mean'])}"
    )


def _describe_soft(r: Rows) -> str:
    data = "Fashion-MNIST" if r["_data"]["fashion"] >= 0.5 else "digits (Fashion-MNIST not installed)"
    parts = ", ".join(
        f"{name} {r[label]['val_loss']:.3f} / {100 * r[label]['val_acc']:.1f}%"
        for label, name in (("top2", "top-2"), ("ec", "expert choice"), ("soft", "Soft MoE"))
    )
    return f"{data}, whole test split, val loss / accuracy: {parts}"


def _run_soft(**kwargs) -> Rows:
    from moelab.repro.vision import run_patch_classifiers

    return run_patch_classifiers(_SOFT_ARMS, **kwargs)


# Soft MoE at the expert compute of top-2: 49 patch tokens x 2 / 8 experts = 12 slots per expert
# (expert choice with c = 2 takes the same 12 tokens per expert).
_SOFT_ARMS = {
    "top2": Arm("topk", {"capacity_factor": None}, {"load_balance": 1e-2}),
    "ec": Arm("expert_choice", {}, {}),
    "soft": Arm("soft", {"slots_per_expert": 12}, {}),
}
_MIXED = {"data": "mixed"}
_RMOE = PAPER_SETTINGS["rmoe"]
_REX = PAPER_SETTINGS["rexmoe"]["router_kwargs"]
_DYNA_LOSSES = PAPER_SETTINGS["dynamoe"]["aux_losses"]
_TSALLIS_LB = {"load_balance": 1e-3}

ZOO: list[Reproduction] = [
    Reproduction(
        name="rmoe",
        method="rmoe",
        paper="RMoE, layerwise recurrent router (Qiu et al. 2024), cheap check of PAPERS.md sec. 1",
        claim=(
            "A GRU router shared across layers trains no worse than a linear router at equal steps and "
            "ties consecutive layers' expert choices more closely (higher mutual information)."
        ),
        arms={
            "topk": Arm("topk", _DROPLESS, _RMOE["aux_losses"]),
            "rmoe": Arm("rmoe", _RMOE["router_kwargs"], _RMOE["aux_losses"]),
        },
        conditions=(
            no_worse_loss("rmoe", "topk"),
            higher("nmi_consecutive", "rmoe", "topk", "NMI of consecutive layers"),
        ),
        describe=_describe_rmoe,
    ),
    Reproduction(
        name="rexmoe",
        method="rexmoe",
        paper="ReXMoE (2025), cheap check of PAPERS.md sec. 4",
        claim=(
            "Routing over 2 adjacent layers' experts with progressive scaling (PSR) trains no worse than "
            "plain top-k; reuse without PSR is about plain top-k."
        ),
        arms={
            "vanilla": Arm("topk", _DROPLESS, _LB),
            "reuse": Arm("rexmoe", {**_REX, "psr": False}, _LB),
            "psr": Arm("rexmoe", _REX, _LB),
        },
        conditions=(
            no_worse_loss("psr", "vanilla"),
            no_worse_loss("reuse", "vanilla"),
            no_worse_loss("vanilla", "reuse"),
        ),
        describe=_describe_rexmoe,
    ),
    Reproduction(
        name="dynamoe",
        method="dynamoe",
        paper="DynaMoE (Guelmez 2026), cheap check of PAPERS.md sec. 6 (the LM variant)",
        claim=(
            "A descending capacity schedule (4, 3, 2, 1 experts at most over 4 layers) trains no worse than "
            "a uniform one (4 everywhere) while activating fewer experts per token."
        ),
        arms={
            "uniform": Arm("dynamoe", {"top_k": 4, "schedule": "uniform"}, _DYNA_LOSSES),
            "descending": Arm("dynamoe", {"top_k": 4, "schedule": "descending"}, _DYNA_LOSSES),
        },
        conditions=(
            no_worse_loss("descending", "uniform"),
            lower("experts_per_token", "descending", "uniform", "experts per token"),
        ),
        describe=_describe_dynamoe,
    ),
    Reproduction(
        name="tsallis_topp",
        method="tsallis_topp",
        paper="DynMoLE (Li et al. 2025), the Tsallis entropy loss; PAPERS.md B.7's CPU check",
        claim=(
            "The Tsallis entropy loss (1e-2) sharpens the hybrid router: lower router entropy and fewer "
            "experts per token, without hurting val loss."
        ),
        arms={
            "without_loss": Arm("tsallis_topp", {}, _TSALLIS_LB),
            "with_loss": Arm("tsallis_topp", {}, {**_TSALLIS_LB, "tsallis_entropy": 1e-2}),
        },
        conditions=(
            lower("entropy", "with_loss", "without_loss", "router entropy"),
            lower("experts_per_token", "with_loss", "without_loss", "experts per token"),
            no_worse_loss("with_loss", "without_loss"),
        ),
        describe=_describe_tsallis,
    ),
    Reproduction(
        name="erc",
        method="erc",
        paper="Expert-router coupling loss (Lv et al. 2025), cheap check of PAPERS.md sec. 3",
        claim=(
            "The ERC loss (weight 0.1, alpha = 1) couples router rows to their experts: the diagonal "
            "dominance of M rises, without hurting val loss."
        ),
        arms={
            "lb": Arm("topk", _DROPLESS, _LB),
            "lb_erc": Arm("topk", _DROPLESS, {**_LB, "erc": 0.1}),
        },
        train={"diagnostics": ["erc"]},  # the coupling of the arm without ERC too
        conditions=(
            higher("erc_diag_dominance", "lb_erc", "lb", "diag dominance"),
            higher("erc_epsilon", "lb_erc", "lb", "eps"),
            no_worse_loss("lb_erc", "lb"),
        ),
        describe=_describe_erc,
    ),
    Reproduction(
        name="moma",
        method="moma",
        paper="MoMa (Lin et al. 2024), cheap check of PAPERS.md sec. 10, on --data mixed (image patches + class names)",
        claim=(
            "Modality-aware expert groups (expert choice inside each modality's experts) beat mixed expert "
            "choice over all experts at equal FLOPs, on text and on image tokens."
        ),
        arms={
            "ec": Arm("expert_choice", {}, {}),
            "moma": Arm("moma", {"causal_inference": False}, {}),
            "moma_causal": Arm("moma", {}, {}),
        },
        train=_MIXED,
        conditions=(
            lower_loss("moma", "ec"),
            lower("val_loss_text", "moma", "ec", "text val loss"),
            lower("val_loss_image", "moma", "ec", "image val loss"),
        ),
        describe=_describe_moma,
    ),
    Reproduction(
        name="promoe",
        method="promoe",
        paper="ProMoE (Wei et al. 2025), cheap check of PAPERS.md sec. 8 adapted to an LM on --data mixed",
        claim=(
            "The routing contrastive loss makes prototypes specialise (higher expert-token NMI on the "
            "conditional tokens), and ProMoE trains no worse than top-1 routing."
        ),
        arms={
            "topk": Arm("topk", {"top_k": 1, "capacity_factor": None}, _LB),
            "promoe_no_rcl": Arm("promoe", {"top_k": 1}, {}),
            "promoe": Arm("promoe", {"top_k": 1}, {"rcl": 1.0}),
        },
        model={"shared_experts": 1},
        train=_MIXED,
        conditions=(
            higher("promoe_token_nmi", "promoe", "promoe_no_rcl", "expert-token NMI"),
            no_worse_loss("promoe", "topk"),
        ),
        describe=_describe_promoe,
    ),
    Reproduction(
        name="pregate",
        method="pregate",
        paper="Read-ME (Cai et al. 2024), cheap check of PAPERS.md sec. 12",
        claim=(
            "Routing decided from token ids before the backbone runs lets a lookahead expert cache beat "
            "LRU on the routing the model actually runs."
        ),
        arms={
            "pregate": Arm("pregate", {}, _LB),
            "top1": Arm("topk", _DROPLESS, _LB),
        },
        model={"top_k": 1},
        train={"locality": True},
        conditions=(
            Condition(
                "hit rate: lookahead - LRU (pre-gate)",
                lambda r: r["pregate"]["lookahead"] - r["pregate"]["lru"],
                "higher",
                margin=HIT_MARGIN,
            ),
        ),
        describe=_describe_pregate,
    ),
    Reproduction(
        name="mixer",
        method="mixer",
        paper="MixER (Nzoyem et al. 2025), PAPERS.md sec. 13 adapted to an LM (top-1, token contexts)",
        claim=(
            "Refitting a hard top-1 gate by K-means and least squares (every 5 steps) beats the same gate "
            "never refit, and is no worse than a gradient-trained top-1 gate with the Switch loss."
        ),
        arms={
            "switch": Arm("topk", _DROPLESS, _LB),
            "frozen": Arm("mixer", {"update_every": 10**9}, {}),
            "mixer": Arm("mixer", {}, {}),
        },
        model={"top_k": 1},
        conditions=(lower_loss("mixer", "frozen"), no_worse_loss("mixer", "switch")),
        describe=_describe_mixer,
    ),
    Reproduction(
        name="soft",
        method="soft",
        paper="Soft MoE (Puigcerver et al. 2023), image classification at small scale (not causal: no LM row)",
        claim=(
            "At the expert compute of top-2 routing, Soft MoE classifies images better (lower val loss) "
            "than token-choice top-2 and than expert choice."
        ),
        arms=_SOFT_ARMS,
        model={"n_layers": 2},
        train={"batch_size": 32},
        conditions=(lower_loss("soft", "top2"), lower_loss("soft", "ec")),
        describe=_describe_soft,
        runner=_run_soft,
    ),
]
