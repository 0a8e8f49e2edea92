"""Small reference models: ``MoELM``, a decoder LM whose FFNs are ``moelab.MoE`` layers."""

from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM, MoELMOutput
from moelab.models.pyramid import pyramid_experts

__all__ = ["MoELM", "MoELMConfig", "MoELMOutput", "pyramid_experts"]
