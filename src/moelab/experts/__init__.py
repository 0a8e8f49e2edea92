"""Expert banks: E experts stored as fused tensors, run with grouped GEMMs."""

from .bank import ACTIVATIONS, ExpertBank, SharedExperts

__all__ = ["ACTIVATIONS", "ExpertBank", "SharedExperts"]
