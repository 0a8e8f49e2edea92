"""The paper settings of each router and the demo's defaults: one source for ``moelab train``,
``moelab compare`` and ``moelab repro``. Torch-free (the command line reads it at start-up).

An arm's effective settings: the paper's router kwargs, then the user's (``--router-arg``); the
paper's auxiliary losses, replaced by an explicit set (``CompareSettings.aux_losses``) and then
adjusted by ``--aux-loss NAME=COEF`` (``COEF`` 0 removes a loss). Routers without an entry run
with their own defaults and ``MoELMConfig``'s default losses.
"""

from __future__ import annotations

import json
from typing import Any

# The demo (`make demo` = `moelab compare --name demo`): the three default routers, each on three
# seeds (the fewest that give a t-interval worth reading), in about the 3 minutes on 2 CPU cores
# that the one-seed demo of 250 steps took; so 70 steps each. See docs/quickstart.md ("What the
# demo prints") for the reasoning and the 250-step comparison.
DEMO: dict[str, Any] = {
    "steps": 70,
    "d_model": 128,
    "layers": 4,
    "heads": 4,
    "experts": 8,
    "top_k": 2,
    "seq_len": 128,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup": 20,
    "eval_every": 35,
    "eval_batches": 4,
    "final_eval_batches": 16,
    "seeds": (0, 1, 2),
}
# ``moelab repro``: the demo's model, trained as the v1 rows of docs/reproductions.md were (250
# steps of 16 x 128 tokens), on three seeds (the fewest with a usable t-interval), with a final
# evaluation on 256 val windows (twice the v1 rows'), so that a three-arm row fits in 10 minutes.
REPRO: dict[str, Any] = {
    "steps": 250,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup": 30,
    "eval_every": 50,
    "eval_batches": 8,
    "final_eval_batches": 16,
    "seeds": (0, 1, 2),
}
DEFAULT_ROUTERS = ("topk", "sigmoid_topk", "expert_choice")

# Per-router settings from each paper; anything else uses the router's and the model's defaults.
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "topk": {
        # Switch Transformer trains at capacity factor 1.25 with a load-balance loss of 1e-2;
        # ST-MoE adds the router z-loss (1e-3). Switch evaluates at cf 2.0; we evaluate dropless
        # (our choice): a capacity limit at evaluation lets later tokens evict earlier ones, so
        # the val loss would not be a causal language-model loss (docs/quickstart.md).
        "router_kwargs": {"capacity_factor": 1.25, "eval_capacity_factor": None},
        "aux_losses": {"load_balance": 1e-2, "z": 1e-3},
        "source": "Switch Transformer (cf 1.25, load balance 1e-2) + ST-MoE (z 1e-3); dropless at eval (ours)",
    },
    "sigmoid_topk": {
        # DeepSeek-V3: dropless, aux-loss-free bias balancing plus a tiny sequence-wise loss.
        "router_kwargs": {},
        "aux_losses": {"load_balance_seq": 1e-4},
        "source": "DeepSeek-V3 (bias balancing, sequence-wise loss 1e-4, dropless)",
    },
    "sinkhorn": {
        # Megatron-LM's Sinkhorn load balancing: selection by the balanced plan, no aux loss.
        "router_kwargs": {},
        "aux_losses": {},
        "source": "Megatron-LM sinkhorn load balancing / S-BASE (no auxiliary loss)",
    },
    "ssr": {
        # Selective Sinkhorn Routing: Sinkhorn on a fraction p of training steps, no aux loss.
        "router_kwargs": {},
        "aux_losses": {},
        "source": "Selective Sinkhorn Routing (p = 0.005, xi = 0.5, no auxiliary loss)",
    },
    "rmoe": {
        # RMoE's code: Mixtral load balance 1e-3 computed once over all layers (= k when balanced);
        # ours is summed per layer (= 1 each), so the same pull is 1e-3 * k / L = 5e-4 at k=2, L=4.
        "router_kwargs": {"hidden_size": 32},
        "aux_losses": {"load_balance": 5e-4},
        "source": "RMoE (qiuzh20/RMoE: GRU, Mixtral LB 1e-3 over all layers = 5e-4 per layer here; "
        "p = 32 keeps the router's share of parameters near the paper's, ours)",
    },
    "rexmoe": {
        # ReXMoE: r = 2 adjacent layers, progressive scaling; the schedule is sized for 250 steps.
        "router_kwargs": {"group_size": 2, "psr": True, "psr_local_steps": 50, "psr_full_steps": 150},
        "aux_losses": {"load_balance": 1e-2},
        "source": "ReXMoE (r = 2 with PSR; schedule steps and Switch LB 1e-2 ours)",
    },
    "dynamoe": {
        "router_kwargs": {},
        "aux_losses": {"load_balance": 1e-2, "z": 1e-3},
        "source": "DynaMoE (uniform schedule, k_max = top_k, threshold 1/E; losses ours: the paper's not found)",
    },
    "tsallis_topp": {
        "router_kwargs": {},
        "aux_losses": {"tsallis_entropy": 1e-2, "load_balance": 1e-3},
        "source": "DynMoLE code (top_p 0.75, keep_top_k 2, threshold 0.9, q 1.1; entropy loss 1e-2, balance 1e-3)",
    },
    "moma": {
        # MoMa: expert choice inside each modality's group, sigmoid scores, capacity c = top_k as
        # expert_choice; the causal predictor's BCE rides in routing.aux. Needs token types.
        "router_kwargs": {},
        "aux_losses": {},
        "source": "MoMa (modality groups, sigmoid expert choice, Gumbel noise in training, causal predictor; no balance loss)",
    },
    "promoe": {
        # ProMoE's configs: top-1 prototypical routing, identity gates, RCL lambda 1, no balance loss.
        "router_kwargs": {"top_k": 1},
        "aux_losses": {"rcl": 1.0},
        "source": "ProMoE configs (top-1, identity gates, RCL 1.0 with tau 0.07, LB 0; text tokens = the unconditional expert, ours)",
    },
    "pregate": {
        "router_kwargs": {},
        "aux_losses": {"load_balance": 1e-2},
        "source": "Read-ME pre-gate (2-layer 2-head causal transformer over ids, d 64, one decision for every layer); "
        "gate = the chosen expert's probability and Switch LB 1e-2 (ours: Read-ME distils a dense model's clusters)",
    },
    "mixer": {
        # MixER's code: hard top-1 (the model's top_k must be 1), gate refit every 5 steps, no aux loss.
        "router_kwargs": {},
        "aux_losses": {},
        "source": "MixER (ddrous/MixER: hard top-1, refit every 5 steps, K-means 20 it, tol 1e-4, lstsq noise 1e-4, "
        "no aux loss); token contexts and proximal first-order expert losses ours",
    },
    "soft": {
        "router_kwargs": {},
        "aux_losses": {},
        "source": "Soft MoE (Puigcerver et al. 2023: l2-normalised logits with a learned scale, no aux loss; "
        "slots per expert = top_k, ours); not causal",
    },
    "residual_moe": {
        # DeepSpeed-MoE's Residual-MoE: a fixed MLP plus one routed top-1 expert, summed.
        "router_kwargs": {"top_k": 1, "capacity_factor": 1.0, "eval_capacity_factor": None},
        "aux_losses": {"load_balance": 1e-2},
        "source": "DeepSpeed-MoE Residual-MoE (y = MLP(x) + E_top1(x), k = 1, capacity factor 1.0, balance loss 1e-2); "
        "dropless eval, SwiGLU, sum mix ours",
    },
    "peer": {
        "router_kwargs": {},
        "aux_losses": {},
        "source": "PEER (He 2024): 8 heads, top_k per head (paper 16), BatchNorm'd query, softmax over each head's "
        "k, GELU atomic experts, no aux loss; d_key = d_model (lucidrains); num_experts must be a square",
    },
    "omni": {
        "router_kwargs": {},
        "aux_losses": {},
        "source": "OmniMoE (flash-algo/omni-moe OmniMoE_Pytorch): n = floor(sqrt(N)), BatchNorm'd Cartesian-product "
        "router, weights p_x p_y not renormalised, silu atomic experts + dense SwiGLU (expert_hidden, default 4d), "
        "no aux loss",
    },
    "uar": {
        "router_kwargs": {},
        "aux_losses": {},
        "source": "MoFME UaR: linear (bias) -> KeepTopK -> softmax; 5 MC-dropout samples (official estimate_time), "
        "dropout 0.1 (ours); no auxiliary loss (MoFME)",
    },
    "mofme": {
        "router_kwargs": {},
        "aux_losses": {},
        "source": "MoFME (RoyZry98/MoFME-Pytorch film.py): full d x d modulations, adaptor 4d, uar router; no auxiliary loss",
    },
    "uoe": {
        # Union of Experts' official MLP (UoME_DS.py): top-2 mask, capacity 1.0, per-sequence
        # top-max_len selection padded to max_len, scores normalised over the batch, outputs not
        # weighted by the gate and no aux loss, so the router stays at its initialisation.
        "router_kwargs": {},
        "aux_losses": {},
        "source": "Union of Experts (YujiaoYang-work/UoE UoME_DS.py: top-2 mask, capacity 1.0, per-sequence "
        "selection padded to max_len, scores normalised over the batch, unweighted outputs, no aux loss: the "
        "router stays at init); not causal",
    },
    "uoe_select": {
        "router_kwargs": {},
        "aux_losses": {},
        "source": "Union of Experts' selection (as 'uoe') inside a plain moelab.MoE",
    },
    "coe": {
        # Chain-of-Experts' config: 2 iterations, a gate per iteration, inner residual, no top-k
        # renormalisation, sequence aux loss 1e-3 per iteration.
        "router_kwargs": {"iterations": 2},
        "aux_losses": {"load_balance_seq": 1e-3},
        "source": "Chain-of-Experts (ZihanWang314/CoE: C = 2, use_igate, inner residual, seq aux 1e-3 per iteration)",
    },
    "mod": {
        # Mixture-of-depths: capacity 12.5% on every other block (the paper's best isoFLOP
        # setting); causal sampling through an auxiliary BCE on the router (coefficient ours).
        # A depth arm's aux_losses are its MoE layers' (the model's router's settings).
        "router_kwargs": {"capacity": 0.125, "every": 2, "causal": "aux_bce"},
        "source": "Mixture-of-Depths (C = 12.5%, every other block, aux BCE for sampling)",
    },
    "mor": {
        # Mixture-of-Recursions: middle-cycle sharing, N_r = 3, expert-choice recursion router
        # (alpha 0.1, sigmoid gate, capacities 1, 2/3, 1/3, BCE 1e-3 for causal inference).
        "router_kwargs": {"num_recursions": 3, "router": "expert_choice", "sharing": "middle_cycle"},
        "source": "Mixture-of-Recursions (N_r = 3, middle-cycle, expert choice, alpha 0.1, BCE 1e-3)",
    },
    "expert_choice": {
        # Expert choice: capacity factor c = 2 (= top_k), balanced by construction, no aux loss.
        "router_kwargs": {},
        "aux_losses": {},
        "source": "Expert Choice (c = 2, no auxiliary loss)",
    },
}


def default_aux_losses() -> dict[str, float]:
    """``MoELMConfig``'s default losses (for routers without paper settings)."""
    from moelab.models.config import MoELMConfig

    return dict(MoELMConfig().aux_losses)


def merge_aux(base: dict[str, float], overrides: dict[str, float] | None) -> dict[str, float]:
    """``base`` with ``overrides`` applied: a coefficient sets a loss, 0 removes it; the key
    ``"*"`` (``--aux-loss none``) removes every loss of ``base`` first."""
    overrides = dict(overrides or {})
    out = {} if "*" in overrides else dict(base)
    overrides.pop("*", None)
    for name, coef in overrides.items():
        if coef == 0:
            out.pop(name, None)
        else:
            out[name] = float(coef)
    return out


def arm_settings(
    router: str,
    *,
    router_kwargs: dict[str, Any] | None = None,
    aux_losses: dict[str, float] | None = None,
    aux_overrides: dict[str, float] | None = None,
    model_aux_losses: dict[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """An arm's effective ``(router_kwargs, aux_losses)`` (module docstring).

    ``aux_losses`` replaces the paper's set; ``model_aux_losses`` is the fallback for routers
    without paper settings (default: ``MoELMConfig``'s).
    """
    paper = PAPER_SETTINGS.get(router, {})
    kw = {**paper.get("router_kwargs", {}), **(router_kwargs or {})}
    if aux_losses is not None:
        aux = dict(aux_losses)
    elif "aux_losses" in paper:
        aux = dict(paper["aux_losses"])
    else:
        aux = dict(model_aux_losses) if model_aux_losses is not None else default_aux_losses()
    return kw, merge_aux(aux, aux_overrides)


def describe_arm(
    label: str, router: str, kw: dict[str, Any], aux: dict[str, float], causal: bool | None = None
) -> str:
    """One line for the start of a run: what the arm trains with and where it comes from."""
    name = label if label == router else f"{label} ({router})"
    paper = PAPER_SETTINGS.get(router, {})
    source = paper.get("source", "router defaults")
    if paper and (kw != paper.get("router_kwargs", {}) or aux != paper.get("aux_losses", aux)):
        source = f"changed from the paper settings: {source}"
    mark = "" if causal is None or causal else "; not causal at eval (*)"
    return f"{name}: router_kwargs {json.dumps(kw)}, aux_losses {json.dumps(aux)} [{source}]{mark}"
