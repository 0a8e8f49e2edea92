"""Small reference models: ``MoELM``, a decoder LM whose FFNs are ``moelab.MoE`` layers."""

from .config import MoELMConfig
from .lm import MoELM, MoELMOutput

__all__ = ["MoELM", "MoELMConfig", "MoELMOutput"]
