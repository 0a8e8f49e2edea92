"""Routed LoRA mixtures on any ``nn.Linear``: MoLE / MixLoRA (``mole``) and DynMoLE (``dynmole``).

- ``LoRABank``: ``E`` LoRA experts ``scaling * B_e A_e x`` in PEFT's layout (``lora_A [E, r, d_in]``,
  ``lora_B [E, d_out, r]``), run with grouped low-rank GEMMs; registered as bank ``lora``.
- ``RoutedLoRA``: a frozen ``nn.Linear`` plus a routed mixture of those experts (any registered
  router, any registered loss), a ``RoutedLayer`` (traced, transformable).
- ``apply(model, targets, ...)`` / ``remove(model)``: wrap a model's projections (PEFT's
  ``target_modules`` rule) and restore them exactly; ``mixture_layers``, ``mixture_config``.
- ``MIXTURE_PRESETS``: the methods' paper defaults, by name (``method="mole"`` / ``"dynmole"``).
"""

from moelab.experts.lora import PEFT_DEFAULT_LORA_ALPHA, LoRABank, grouped_lora
from moelab.lora.apply import apply, matches_target, mixture_config, mixture_layers, remove, use_context
from moelab.lora.layer import RoutedLoRA
from moelab.lora.presets import MIXTURE_PRESETS, MixturePreset, get_preset, resolve_mixture

__all__ = [
    "MIXTURE_PRESETS",
    "PEFT_DEFAULT_LORA_ALPHA",
    "LoRABank",
    "MixturePreset",
    "RoutedLoRA",
    "apply",
    "get_preset",
    "grouped_lora",
    "matches_target",
    "mixture_config",
    "mixture_layers",
    "remove",
    "resolve_mixture",
    "use_context",
]
