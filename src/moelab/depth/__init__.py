"""Depth routing: which blocks run on which tokens, and how often (``moelab list depth``)."""

from moelab.depth.base import DepthRouter, run_blocks
from moelab.depth.mod import MixtureOfDepths

__all__ = ["DepthRouter", "MixtureOfDepths", "run_blocks"]
