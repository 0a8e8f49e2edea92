"""PEFT interop for LoRA mixtures (``moelab.lora``): PEFT-shaped folders, PEFT adapters as experts, X-LoRA.

- ``save_mixture(model, folder)``: the mixture as a PEFT-shaped adapter folder: its config in
  ``adapter_config.json`` (``peft_type: "MOELAB_LORA_MIXTURE"``), the router in
  ``router.safetensors``, and each expert as a standard PEFT LoRA folder
  ``experts/expert_<i>/`` that ``peft.PeftModel.from_pretrained`` loads as an ordinary LoRA.
- ``load_mixture(model, folder)``: rebuild it on a fresh base model, bit-exactly.
- ``from_peft_adapters(model, folders, **mixture_kwargs)``: a mixture whose experts are existing
  PEFT LoRA adapters, with a fresh router.
- ``read_lora_adapter`` / ``write_lora_adapter``: plain PEFT LoRA folders as tensors.
- ``xlora_model(base_model, folders)``: PEFT's X-LoRA over the same folders; ``XLoRAProjection``
  / ``xlora_projection(layer)``: one projection as X-LoRA runs it, for benchmarks.

Safetensors and JSON only: nothing is pickled or unpickled. The only package of moelab that
imports peft (the ``[peft]`` extra).
"""

from moelab.integrations.peft.adapters import LoraAdapter, read_lora_adapter, write_lora_adapter
from moelab.integrations.peft.mixture_io import (
    MIXTURE_PEFT_TYPE,
    expert_folder_name,
    from_peft_adapters,
    load_mixture,
    read_mixture_config,
    save_mixture,
)
from moelab.integrations.peft.xlora import XLoRAProjection, xlora_model, xlora_projection

__all__ = [
    "MIXTURE_PEFT_TYPE",
    "LoraAdapter",
    "XLoRAProjection",
    "expert_folder_name",
    "from_peft_adapters",
    "load_mixture",
    "read_lora_adapter",
    "read_mixture_config",
    "save_mixture",
    "write_lora_adapter",
    "xlora_model",
    "xlora_projection",
]
