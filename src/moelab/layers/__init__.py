"""Routed layers built on the contract: the MoE layer (and, later, composites built from it)."""

from .moe import MoE, aux_loss

__all__ = ["MoE", "aux_loss"]
