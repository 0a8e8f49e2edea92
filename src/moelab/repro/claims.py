"""``moelab repro``: check each paper's claim at small scale, and say whether it held.

A reproduction is a small ``moelab compare`` whose arms differ in exactly the thing a paper
claims matters (a loss on or off, a balancing rule, a router), plus the claim written as
conditions on paired differences. Every arm shares the model shape, the data and the step
budget, and runs with the demo's model (``moelab.train.settings.DEMO``) unless overridden; it
trains once per seed, and on a seed every arm starts from the same weights and reads the same
batches.

A condition is a quantity measured on each seed, usually a difference between two arms (``val
loss of B - val loss of A``), and a claimed direction with a margin. Its verdict comes from the
95% t-interval of that quantity over seeds (``moelab.analysis.intervals``): it **holds** when the
interval clears the margin in the claimed direction, **does not hold** when it clears it in the
other direction, and is **inconclusive** otherwise. A claim of several conditions does not hold
when one does not, holds when all do, and is inconclusive otherwise. Margins: a loss difference
smaller than ``LOSS_MARGIN`` is of no practical consequence at this scale; load and locality
metrics use 0 (any change in the claimed direction counts); hit rates ``HIT_MARGIN``.

This module holds the claims (``REPRODUCTIONS``); ``moelab.repro.runner`` runs them and
``moelab.repro.docs`` records them in ``docs/reproductions.md`` (``--write-docs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moelab.repro.multilingual import bibles_missing, run_bilingual
from moelab.repro.rules import (  # noqa: F401  (re-exported: the claims' vocabulary)
    HIT_MARGIN,
    LOSS_MARGIN,
    Arm,
    Condition,
    Reproduction,
    Rows,
    diff,
    fmt,
    higher,
    lower,
    lower_loss,
    no_worse_loss,
)

_f = fmt


def _describe_load_balance(r: Rows) -> str:
    a, b = r["no_aux"], r["load_balance"]
    return (
        f"max/mean load {_f(a['max_over_mean'])} -> {_f(b['max_over_mean'])}; "
        f"val loss {a['val_loss']:.3f} -> {b['val_loss']:.3f}"
    )


def _describe_z(r: Rows) -> str:
    a, b = r["lb"], r["lb_z"]
    return (
        f"z (mean lse^2) {_f(a['z'])} -> {_f(b['z'])}; max abs logit {_f(a['max_abs_logit'])} -> "
        f"{_f(b['max_abs_logit'])}; val loss {a['val_loss']:.3f} -> {b['val_loss']:.3f}"
    )


def _describe_aux_free(r: Rows) -> str:
    none, aux, bias = r["none"], r["aux_loss"], r["bias"]
    return (
        f"max/mean load: none {_f(none['max_over_mean'])}, aux loss {_f(aux['max_over_mean'])}, "
        f"bias {_f(bias['max_over_mean'])}; val loss: none {none['val_loss']:.3f}, aux loss "
        f"{aux['val_loss']:.3f}, bias {bias['val_loss']:.3f}"
    )


def _describe_expert_choice(r: Rows) -> str:
    tc, ec = r["top2"], r["expert_choice"]
    return (
        f"max/mean load top-2 {_f(tc['max_over_mean'])} vs EC {_f(ec['max_over_mean'])}; val loss "
        f"{tc['val_loss']:.3f} vs {ec['val_loss']:.3f} (EC is non-causal: its loss sees later tokens' routing)"
    )


def _describe_lrc_architecture(r: Rows) -> str:
    every, shared, half = r["every_layer"], r["shared_expert"], r["every_2nd"]
    return (
        "SRP(16): every layer "
        f"{every['srp']:.3f}, with a shared expert {shared['srp']:.3f}, every 2nd layer {half['srp']:.3f}; "
        f"SCH(16, 2k): {every['sch_2k']:.3f} / {shared['sch_2k']:.3f} / {half['sch_2k']:.3f}"
    )


def _describe_lrc_local_balance(r: Rows) -> str:
    g, weak, strong = r["global"], r["seq_1e-2"], r["seq_1e-1"]
    return (
        f"SRP(16): global only {g['srp']:.3f}, + seq 1e-2 {weak['srp']:.3f}, + seq 1e-1 {strong['srp']:.3f}; "
        f"SCH(16, 2k): {g['sch_2k']:.3f} / {weak['sch_2k']:.3f} / {strong['sch_2k']:.3f}; "
        f"val loss {g['val_loss']:.3f} / {weak['val_loss']:.3f} / {strong['val_loss']:.3f}"
    )


def _describe_balancing_router(arm: str) -> Callable[[Rows], str]:
    """What a row comparing a balancing router ``arm`` with top-k without and with the Switch loss measured."""

    def describe(r: Rows) -> str:
        none, lb, x = r["no_aux"], r["load_balance"], r[arm]
        return (
            f"max/mean load: top-k {_f(none['max_over_mean'])}, top-k + LB {_f(lb['max_over_mean'])}, "
            f"{arm} {_f(x['max_over_mean'])}; val loss {none['val_loss']:.3f} / {lb['val_loss']:.3f} / "
            f"{x['val_loss']:.3f}"
        )

    return describe


def balancing_router(name: str, arm: Arm, *, paper: str, claim: str) -> Reproduction:
    """A router that balances without an auxiliary loss, against dropless top-k without and with
    the Switch load-balancing loss: lower max/mean than the first, val loss no worse than the
    second (within ``LOSS_MARGIN``)."""
    return Reproduction(
        name=name,
        method=name,
        paper=paper,
        claim=claim,
        arms={
            "no_aux": Arm("topk", _DROPLESS, {}),
            "load_balance": Arm("topk", _DROPLESS, {"load_balance": 1e-2}),
            name: arm,
        },
        conditions=(lower("max_over_mean", name, "no_aux", "max/mean"), no_worse_loss(name, "load_balance")),
        describe=_describe_balancing_router(name),
    )


def _describe_lookahead(r: Rows) -> str:
    a = r["topk"]
    return (
        f"hit rate with a cache of 2k = 4 of 8 experts: LRU {a['lru']:.3f}, LFU {a['lfu']:.3f}, "
        f"lookahead (8 tokens) {a['lookahead']:.3f}, Belady {a['belady']:.3f}"
    )


def _u_shape_parts(n: int) -> tuple[list[int], list[int], list[int]]:
    """Layer indices of the first quarter, the middle half and the last quarter (at least one each)."""
    q = max(1, n // 4)
    return list(range(q)), list(range(q, n - q)), list(range(n - q, n))


def _u_parts(r: Rows) -> tuple[list[float], float, float, float]:
    a = r["bilingual"]
    d = [a[f"layer{i}"] for i in range(int(a["layers"]))]
    first, middle, last = (
        sum(d[i] for i in idx) / len(idx) if idx else float("nan") for idx in _u_shape_parts(len(d))
    )
    return d, first, middle, last


def _u_depth(r: Rows) -> float:
    """The middle layers' divergence minus the lower of the outer quarters' (< 0: a U)."""
    _, first, middle, last = _u_parts(r)
    return middle - min(first, last)


def _describe_multilingual(r: Rows) -> str:
    d, first, middle, last = _u_parts(r)
    return (
        "divergence by MoE layer "
        + " ".join(f"{x:.4f}" for x in d)
        + f"; first quarter {first:.4f}, middle {middle:.4f}, last quarter {last:.4f}"
    )


def _run_multilingual(**kwargs: Any) -> Rows:
    return run_bilingual(MULTILINGUAL_ARM, MULTILINGUAL_PAIRS, **kwargs)


# The multilingual reproduction's model: deeper than the demo's (a U over 4 layers is hard to
# tell from noise), windows long enough for a verse; the router and losses of
# examples/bible_divergence.py (MoELM's defaults). Our choice.
MULTILINGUAL_ARM = Arm("topk", {}, {"load_balance": 1e-2, "z": 1e-3}, {"n_layers": 8, "max_seq_len": 256})
MULTILINGUAL_PAIRS = 256  # held-out verse pairs (the example's default)

_DROPLESS = {"capacity_factor": None}
_LOCALITY = {"locality": True}
_LRC_PAPER = "Local routing consistency (Liang et al. 2025, ljcleo/moe-lrc)"

REPRODUCTIONS: dict[str, Reproduction] = {
    r.name: r
    for r in [
        Reproduction(
            name="load_balance",
            method="load_balance",
            paper="Switch Transformers (Fedus et al. 2022), sec. 2.2",
            claim="The load-balancing loss (alpha = 1e-2) evens out expert load without hurting quality.",
            arms={
                "no_aux": Arm("topk", _DROPLESS, {}),
                "load_balance": Arm("topk", _DROPLESS, {"load_balance": 1e-2}),
            },
            model={"top_k": 1},
            conditions=(
                lower("max_over_mean", "load_balance", "no_aux", "max/mean"),
                no_worse_loss("load_balance", "no_aux"),
            ),
            describe=_describe_load_balance,
        ),
        Reproduction(
            name="z",
            method="z",
            paper="ST-MoE (Zoph et al. 2022), sec. 3.1",
            claim="The router z-loss (1e-3) keeps router logits small without hurting quality.",
            arms={
                "lb": Arm("topk", _DROPLESS, {"load_balance": 1e-2}),
                "lb_z": Arm("topk", _DROPLESS, {"load_balance": 1e-2, "z": 1e-3}),
            },
            conditions=(lower("z", "lb_z", "lb"), no_worse_loss("lb_z", "lb")),
            describe=_describe_z,
        ),
        Reproduction(
            name="aux_loss_free",
            method="sigmoid_topk",
            paper="Aux-loss-free balancing (Wang et al. 2024); DeepSeek-V3 (2024)",
            claim=(
                "Bias updates (gamma = 1e-3) balance expert load as well as an auxiliary loss, "
                "with equal or better LM loss."
            ),
            arms={
                "none": Arm("sigmoid_topk", {"bias_update_rate": 0.0}, {}),
                "aux_loss": Arm("sigmoid_topk", {"bias_update_rate": 0.0}, {"load_balance": 1e-2}),
                "bias": Arm("sigmoid_topk", {"bias_update_rate": 1e-3}, {}),
            },
            conditions=(
                lower("max_over_mean", "bias", "none", "max/mean"),
                # "as well as an auxiliary loss": within 10% of its max/mean (ours)
                Condition(
                    "max/mean: bias - 1.1 x aux_loss", diff("max_over_mean", "bias", "aux_loss", 1.1), "lower"
                ),
                no_worse_loss("bias", "aux_loss"),
            ),
            describe=_describe_aux_free,
        ),
        Reproduction(
            name="expert_choice",
            method="expert_choice",
            paper="Expert Choice routing (Zhou et al. 2022), sec. 4",
            claim="Expert choice balances load perfectly and trains to lower loss than top-2 token choice at equal compute.",
            arms={
                "top2": Arm("topk", _DROPLESS, {"load_balance": 1e-2}),
                "expert_choice": Arm("expert_choice", {}, {}),
            },
            conditions=(
                Condition(
                    "max/mean: expert_choice", lambda r: r["expert_choice"]["max_over_mean"], "lower", 1.01
                ),
                lower_loss("expert_choice", "top2"),
            ),
            describe=_describe_expert_choice,
        ),
        balancing_router(
            "sinkhorn",
            Arm("sinkhorn", {}, {}),
            paper="S-BASE (Clark et al. 2022); Megatron-LM sinkhorn load balancing",
            claim=(
                "Selecting experts by the Sinkhorn-balanced plan balances expert load without an auxiliary "
                "loss, and trains as well as top-k with the load-balancing loss."
            ),
        ),
        balancing_router(
            "ssr",
            Arm("ssr", {"p": 0.005}, {}),
            paper="Selective Sinkhorn Routing (SSR, v2)",
            claim=(
                "Sinkhorn routing on a small fraction of training steps (p = 0.005), with no auxiliary loss, "
                "balances load better than plain softmax top-k and trains as well as top-k with the "
                "load-balancing loss."
            ),
        ),
        Reproduction(
            name="lrc_architecture",
            method="srp",
            paper=_LRC_PAPER,
            claim=(
                "Models with an MoE on every layer and no shared experts have the highest local routing "
                "consistency (SRP, SCH)."
            ),
            arms={
                "every_layer": Arm("topk", _DROPLESS, {"load_balance": 1e-2}),
                "shared_expert": Arm("topk", _DROPLESS, {"load_balance": 1e-2}, {"shared_experts": 1}),
                "every_2nd": Arm("topk", _DROPLESS, {"load_balance": 1e-2}, {"moe_every": 2}),
            },
            train=_LOCALITY,
            conditions=tuple(
                higher(m, "every_layer", other)
                for m in ("srp", "sch_2k")
                for other in ("shared_expert", "every_2nd")
            ),
            describe=_describe_lrc_architecture,
        ),
        Reproduction(
            name="lrc_local_balance",
            method="sch",
            paper=_LRC_PAPER,
            claim=(
                "Local (per-sequence) load balancing trades off against local routing consistency: SRP and "
                "SCH fall as the sequence-level balance loss grows."
            ),
            arms={
                "global": Arm("topk", _DROPLESS, {"load_balance": 1e-2}),
                "seq_1e-2": Arm("topk", _DROPLESS, {"load_balance": 1e-2, "load_balance_seq": 1e-2}),
                "seq_1e-1": Arm("topk", _DROPLESS, {"load_balance": 1e-2, "load_balance_seq": 1e-1}),
            },
            train=_LOCALITY,
            conditions=tuple(
                higher(m, a, b)
                for m in ("srp", "sch_2k")
                for a, b in (("global", "seq_1e-2"), ("seq_1e-2", "seq_1e-1"))
            ),
            describe=_describe_lrc_local_balance,
        ),
        Reproduction(
            name="lookahead_cache",
            method="lookahead",
            paper="Read-ME (Cai et al. 2024): pre-gating enables lookahead expert caching",
            claim=(
                "Knowing upcoming tokens' experts (pre-gating) lets an expert cache evict better than LRU "
                "on the same routing."
            ),
            # capacity 1.25 in training *and* at eval, dropping by v1's global ranking ("probs"),
            # as when the recorded row was measured (the paper settings now evaluate topk dropless
            # and the routers' default drop policy is batch_priority)
            arms={
                "topk": Arm(
                    "topk",
                    {"capacity_factor": 1.25, "eval_capacity_factor": "same", "drop_policy": "probs"},
                    {"load_balance": 1e-2, "z": 1e-3},
                )
            },
            train=_LOCALITY,
            conditions=(
                Condition(
                    "hit rate: lookahead - LRU",
                    lambda r: r["topk"]["lookahead"] - r["topk"]["lru"],
                    "higher",
                    margin=HIT_MARGIN,
                ),
            ),
            describe=_describe_lookahead,
        ),
        Reproduction(
            name="multilingual_u_shape",
            method="js_divergence",
            paper="Multilingual routing in MoE (Bandarkar et al. 2025)",
            claim=(
                "Cross-lingual routing divergence between parallel sentences is U-shaped over layers: "
                "lowest in the middle layers."
            ),
            arms={"bilingual": MULTILINGUAL_ARM},
            conditions=(Condition("divergence: middle - min(first, last quarter)", _u_depth, "lower"),),
            describe=_describe_multilingual,
            runner=_run_multilingual,
            requires=bibles_missing,
        ),
    ]
}

# The router zoo's (issue #9), the composite layers' (issue #10), depth routing's (issue #11) and
# attention routing's (issue #12) and LoRA mixtures' (issue #13) reproductions live in their own modules; they use the helpers above.
from moelab.repro.attention import ATTENTION  # noqa: E402
from moelab.repro.composite import COMPOSITE  # noqa: E402
from moelab.repro.depth import DEPTH  # noqa: E402
from moelab.repro.glider import GLIDER  # noqa: E402
from moelab.repro.lora import LORA  # noqa: E402
from moelab.repro.offload import OFFLOAD  # noqa: E402
from moelab.repro.scaleout import SCALEOUT  # noqa: E402
from moelab.repro.zoo import ZOO  # noqa: E402

REPRODUCTIONS.update({r.name: r for r in ZOO + COMPOSITE + DEPTH + ATTENTION + LORA + GLIDER + SCALEOUT + OFFLOAD})
