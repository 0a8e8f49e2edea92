"""Mixture presets: a LoRA-mixture method's paper defaults for the router and its losses, by name.

A preset fills the arguments of ``moelab.lora.apply`` / ``RoutedLoRA`` that the caller leaves
None: the router's name, ``top_k``, the router's own arguments and the auxiliary losses with their
coefficients and parameters. What a caller gives wins (each argument replaces the preset's whole
value); preset router arguments are kept only when the router is the preset's, preset loss
parameters only for losses that stay.

- ``mole``: the MoLE / MixLoRA baseline. Softmax top-2 over the LoRA experts with the two gates
  renormalised (MixLoRA's ``"mixtral"`` routing: ``softmax -> topk -> w / w.sum()``), plus the
  Switch/Mixtral load-balance loss. Li et al., *MixLoRA* (arXiv 2404.15159); code
  TUDB-Labs/MixLoRA ``mixlora/model.py`` and the README's top-k configuration
  (``top_k: 2``, ``router_aux_loss_coef: 0.01``).
- ``dynmole``: DynMoLE's hybrid router ``tsallis_topp`` with its Tsallis entropy loss and a
  load-balance term, the code's defaults (Li et al. 2025; mikecovlee/DynMoLE
  ``moe_peft/adapters/dynmole/config.py``): ``keep_top_k=2``, ``top_p=0.75``,
  ``entropy_threshold=0.9``, ``q=1.1``, ``eps=1e-5``, ``router_dyn_loss_coef=1e-2``,
  ``router_aux_loss_coef=1e-3``.
- ``lora_mixer``: LoRA-Mixer's experts routed inside the attention projections (``PAPER_TARGETS``),
  the hard-soft top-k router ``hardsoft_topk`` (``moelab.routers.hardsoft``) and our
  specialisation balance loss: ``load_balance`` plus the per-token Shannon entropy of the router
  (``tsallis_entropy`` at ``q = 1``), both 1e-2 (our choice: the paper publishes neither).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

# Routing of a layer built without a method (and the fill-in for a preset that names none).
DEFAULT_ROUTER = "topk"
DEFAULT_TOP_K = 2


@dataclass(frozen=True)
class MixturePreset:
    """A LoRA-mixture method's defaults (see the module docstring)."""

    name: str
    paper: str
    summary: str
    router: str
    top_k: int
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    aux_losses: dict[str, float] = field(default_factory=dict)
    aux_loss_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


MIXTURE_PRESETS: dict[str, MixturePreset] = {
    "mole": MixturePreset(
        name="mole",
        paper="MixLoRA (Li et al. 2024, arXiv 2404.15159); code TUDB-Labs/MixLoRA mixlora/model.py and README",
        summary="MoLE baseline: softmax top-2 over LoRA experts, gates renormalised, load-balance loss",
        router="topk",
        top_k=2,
        router_kwargs={"normalize": True},
        # MixLoRA: 0.01 on Mixtral's E * sum_e (count_e / T) P_e, which is top_k times moelab's
        # load_balance (f normalised over the T * k assignments): 0.01 * 2 here.
        aux_losses={"load_balance": 0.02},
    ),
    "dynmole": MixturePreset(
        name="dynmole",
        paper="DynMoLE (Li et al. 2025); code mikecovlee/DynMoLE moe_peft/adapters/dynmole/{model,config}.py",
        summary="tsallis_topp router (top-p, all experts for uncertain tokens) + Tsallis entropy loss + balance",
        router="tsallis_topp",
        top_k=2,
        router_kwargs={"top_p": 0.75, "entropy_threshold": 0.9, "q": 1.1, "eps": 1e-5},
        aux_losses={"tsallis_entropy": 1e-2, "load_balance": 1e-3},
        aux_loss_kwargs={"tsallis_entropy": {"q": 1.1, "eps": 1e-5}},
    ),
    "lora_mixer": MixturePreset(
        name="lora_mixer",
        paper="LoRA-Mixer (hustcselwb 2025; README-only code): routed LoRA inside the attention projections, "
        "hard-soft top-k, specialisation balance loss (its formula unpublished: ours)",
        summary="experts in q/k/v/o, hard top-k forward with soft gradients, load balance + per-token "
        "entropy shaping (our SBL)",
        router="hardsoft_topk",
        top_k=2,
        # Our SBL: the global load balance plus the mean normalised Shannon entropy of each token's
        # router distribution (Tsallis at q = 1), so decisions sharpen while usage stays balanced.
        aux_losses={"load_balance": 1e-2, "tsallis_entropy": 1e-2},
        aux_loss_kwargs={"tsallis_entropy": {"q": 1.0, "eps": 0.0}},
    ),
}

# The projections each method's paper routes (``moelab.lora.apply(model, targets=...)``).
PAPER_TARGETS: dict[str, tuple[str, ...]] = {"lora_mixer": ("q_proj", "k_proj", "v_proj", "o_proj")}


def get_preset(method: str) -> MixturePreset:
    """The preset called ``method``, or a ``ValueError`` listing the known ones."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a preset name (str) or None, got {type(method).__name__}")
    preset = MIXTURE_PRESETS.get(method)
    if preset is None:
        raise ValueError(f"method must be one of {sorted(MIXTURE_PRESETS)} or None, got {method!r}")
    return preset


def resolve_mixture(
    method: str | None,
    router: Any = None,
    top_k: int | None = None,
    router_kwargs: dict[str, Any] | None = None,
    aux_losses: dict[str, float] | None = None,
    aux_loss_kwargs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The routing arguments a mixture layer is built with: what is given, else ``method``'s
    preset, else ``router="topk"``, ``top_k=2``, no router arguments and no losses.

    Returns ``{"router", "top_k", "router_kwargs", "aux_losses", "aux_loss_kwargs"}`` (fresh
    copies: callers may keep them).
    """
    if method is None:
        preset = MixturePreset("", "", "", DEFAULT_ROUTER, DEFAULT_TOP_K)
    else:
        preset = get_preset(method)
    chosen_router = preset.router if router is None else router
    if router_kwargs is None:
        router_kwargs = preset.router_kwargs if chosen_router == preset.router else {}
    if aux_losses is None:
        aux_losses = preset.aux_losses
    if aux_loss_kwargs is None:
        aux_loss_kwargs = {k: v for k, v in preset.aux_loss_kwargs.items() if k in (aux_losses or {})}
    return {
        "router": chosen_router,
        "top_k": preset.top_k if top_k is None else top_k,
        "router_kwargs": copy.deepcopy(router_kwargs),
        "aux_losses": copy.deepcopy(aux_losses),
        "aux_loss_kwargs": copy.deepcopy(aux_loss_kwargs),
    }


def _register_presets() -> None:
    from moelab import registry

    for preset in MIXTURE_PRESETS.values():
        registry.register("lora", preset.name, paper=preset.paper, summary=preset.summary)(preset)


_register_presets()
