"""Small reference models: ``MoELM``, a decoder LM whose FFNs are ``moelab.MoE`` layers."""

from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM, MoELMOutput

__all__ = ["MoELM", "MoELMConfig", "MoELMOutput"]
