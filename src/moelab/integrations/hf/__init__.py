"""Hugging Face transformers interop: patch, trace and upcycle transformers models.

- ``patch(model, router=None, backend="moelab")``: replace the MoE blocks of OLMoE, Qwen2-MoE,
  Qwen3-MoE, Mixtral, DeepSeek-V3 and gpt-oss with moelab layers sharing their parameters.
- ``trace(model)``: record every MoE layer's ``Routing`` (patched or not) with the token ids
  (``moelab.trace``; this package registers the tracer for unpatched blocks).
- ``upcycle(dense_model, num_experts, top_k)``: turn a Llama-family model into an MoE.
- Importing this package registers ``"moelab"`` as a transformers experts implementation, so
  ``model.set_experts_implementation("moelab")`` runs the experts with moelab's executors, and
  the gpt-oss bank as bank ``clamped_swiglu``.

The only package of moelab that imports transformers (the ``[hf]`` extra). ``moelab.hf`` is the
same package under a short name.
"""

from moelab.integrations.hf.banks import ClampedSwiGLUExpertBank, clamped_swiglu
from moelab.integrations.hf.common import backend_name, replace_module
from moelab.integrations.hf.experts_impl import (
    bank_for,
    make_experts_forward,
    register_experts_implementation,
)
from moelab.integrations.hf.families import FAMILIES, Family, family_of, find_blocks, register_family
from moelab.integrations.hf.layer import ContextFeeder, HFMoE
from moelab.integrations.hf.loading import (
    TransformersTokenizer,
    has_tokenizer_files,
    load_causal_lm,
    load_tokenizer,
)
from moelab.integrations.hf.moba import moba_attention_forward, register_moba
from moelab.integrations.hf.patch import init_router_from, patch, patched_layers
from moelab.integrations.hf.trace import routing_from_gate_output, trace
from moelab.integrations.hf.upcycle import dense_ffns, upcycle, upcycled_bank

register_experts_implementation("moelab", "auto")

__all__ = [
    "FAMILIES",
    "ClampedSwiGLUExpertBank",
    "ContextFeeder",
    "Family",
    "HFMoE",
    "TransformersTokenizer",
    "backend_name",
    "bank_for",
    "clamped_swiglu",
    "dense_ffns",
    "family_of",
    "find_blocks",
    "has_tokenizer_files",
    "init_router_from",
    "load_causal_lm",
    "load_tokenizer",
    "make_experts_forward",
    "moba_attention_forward",
    "patch",
    "patched_layers",
    "register_experts_implementation",
    "register_family",
    "register_moba",
    "replace_module",
    "routing_from_gate_output",
    "trace",
    "upcycle",
    "upcycled_bank",
]
