"""Routed LoRA mixtures on any ``nn.Linear``: MoLE / MixLoRA (``mole``) and DynMoLE (``dynmole``).

- ``LoRABank``: ``E`` LoRA experts ``scaling * B_e A_e x`` in PEFT's layout (``lora_A [E, r, d_in]``,
  ``lora_B [E, d_out, r]``), run with grouped low-rank GEMMs; registered as bank ``lora``.
- ``RoutedLoRA``: a frozen ``nn.Linear`` plus a routed mixture of those experts (any registered
  router, any registered loss), a ``RoutedLayer`` (traced, transformable).
- ``apply(model, targets, ...)`` / ``remove(model)``: wrap a model's projections (PEFT's
  ``target_modules`` rule) and restore them exactly; ``mixture_layers``, ``mixture_config``.
- ``FusedExpertLoRA``: one LoRA per MoE expert on a transformers MoE's fused 3-D expert parameters
  (``apply(..., target_parameters=["experts.gate_up_proj"])``), routed by the model's own router.
- Glider (``glider``): PHATGOOSE gate vectors trained per task (``apply_phatgoose``), assembled
  into one mixture (``assemble_glider``) whose router adds a global bias from instruction
  embeddings (``glider_queries``).
- ``MIXTURE_PRESETS``: the methods' paper defaults, by name (``method="mole"`` / ``"dynmole"``).
"""

from moelab.experts.lora import PEFT_DEFAULT_LORA_ALPHA, LoRABank, grouped_lora
from moelab.lora.apply import (
    apply,
    include_aux_loss,
    matches_target,
    mixture_config,
    mixture_layers,
    remove,
    use_context,
)
from moelab.lora.dymoe import (
    DYMOE_PRESET,
    DyMoEGuidance,
    ExpandedLoRABank,
    expand,
    expand_layer,
    expand_router,
    expanded_layers,
    guidance,
)
from moelab.lora.flylora import (
    FlyLoRALinear,
    FlyLoRARouter,
    apply_flylora,
    flylora_layers,
    flylora_state,
    load_flylora_state,
    merge_flylora,
    merge_lora,
    remove_flylora,
)
from moelab.lora.fused import FusedExpertLoRA, expert_lora_delta, fused_lora_layers
from moelab.lora.glider import (
    GLIDER_PRESET,
    GLIDER_SCALE_FLAN,
    GLIDER_SCALE_HELD_IN,
    GLIDER_SCALE_HELD_OUT,
    GliderRouter,
    TaskExpert,
    apply_phatgoose,
    glider_routers,
    phatgoose_phase,
    task_expert,
)
from moelab.lora.glider import assemble as assemble_glider
from moelab.lora.glider import queries as glider_queries
from moelab.lora.layer import RoutedLoRA
from moelab.lora.presets import MIXTURE_PRESETS, MixturePreset, get_preset, resolve_mixture
from moelab.lora.remix import (
    REMIX_PRESET,
    ReMixLoRA,
    ReMixRouter,
    effective_num_experts,
    plackett_luce_log_prob,
    recording,
    remix_rloo_step,
    remix_routers,
    rloo_advantages,
    rloo_surrogate,
    router_effective_num_experts,
    sample_without_replacement,
)

__all__ = [
    "DYMOE_PRESET",
    "GLIDER_PRESET",
    "GLIDER_SCALE_FLAN",
    "GLIDER_SCALE_HELD_IN",
    "GLIDER_SCALE_HELD_OUT",
    "MIXTURE_PRESETS",
    "PEFT_DEFAULT_LORA_ALPHA",
    "REMIX_PRESET",
    "DyMoEGuidance",
    "ExpandedLoRABank",
    "FlyLoRALinear",
    "FlyLoRARouter",
    "FusedExpertLoRA",
    "GliderRouter",
    "LoRABank",
    "MixturePreset",
    "ReMixLoRA",
    "ReMixRouter",
    "RoutedLoRA",
    "TaskExpert",
    "apply",
    "apply_flylora",
    "apply_phatgoose",
    "assemble_glider",
    "effective_num_experts",
    "expand",
    "expand_layer",
    "expand_router",
    "expanded_layers",
    "expert_lora_delta",
    "flylora_layers",
    "flylora_state",
    "fused_lora_layers",
    "get_preset",
    "glider_queries",
    "glider_routers",
    "grouped_lora",
    "guidance",
    "include_aux_loss",
    "load_flylora_state",
    "matches_target",
    "merge_flylora",
    "merge_lora",
    "mixture_config",
    "mixture_layers",
    "phatgoose_phase",
    "plackett_luce_log_prob",
    "recording",
    "remix_rloo_step",
    "remix_routers",
    "remove",
    "remove_flylora",
    "resolve_mixture",
    "rloo_advantages",
    "rloo_surrogate",
    "router_effective_num_experts",
    "sample_without_replacement",
    "task_expert",
    "use_context",
]
