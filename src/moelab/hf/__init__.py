"""Hugging Face transformers interop: patch, trace and upcycle transformers models.

- ``patch(model, router=None, backend="moelab")``: replace the MoE blocks of OLMoE, Qwen2-MoE,
  Qwen3-MoE, Mixtral, DeepSeek-V3 and gpt-oss with moelab layers sharing their parameters.
- ``trace(model)``: record every MoE layer's ``Routing`` (patched or not) with the token ids.
- ``upcycle(dense_model, num_experts, top_k)``: turn a Llama-family model into an MoE.
- Importing this module registers ``"moelab"`` as a transformers experts implementation, so
  ``model.set_experts_implementation("moelab")`` runs the experts with moelab's backends.

Needs transformers (the ``[hf]`` extra).
"""

from .banks import ClampedSwiGLUExpertBank, clamped_swiglu
from .experts_impl import bank_for, make_experts_forward, register_experts_implementation
from .families import FAMILIES, Family, family_of, find_blocks, register_family
from .layer import ContextFeeder, HFMoE
from .patch import init_router_from, patch, patched_layers
from .trace import routing_from_gate_output, trace
from .upcycle import dense_ffns, upcycle, upcycled_bank

register_experts_implementation("moelab", "auto")

__all__ = [
    "FAMILIES",
    "ClampedSwiGLUExpertBank",
    "ContextFeeder",
    "Family",
    "HFMoE",
    "bank_for",
    "clamped_swiglu",
    "dense_ffns",
    "family_of",
    "find_blocks",
    "init_router_from",
    "make_experts_forward",
    "patch",
    "patched_layers",
    "register_experts_implementation",
    "register_family",
    "routing_from_gate_output",
    "trace",
    "upcycle",
    "upcycled_bank",
]
