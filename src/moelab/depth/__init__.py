"""Depth routing: which blocks run on which tokens, and how often (``moelab list depth``)."""

from moelab.depth.base import DepthRouter, run_blocks
from moelab.depth.mod import MixtureOfDepths
from moelab.depth.prune import (
    FTPRouter,
    ScheduleSearch,
    attach_ftp,
    ftp_loss_fn,
    pruned_val_loss,
    search_sparsity_schedule,
)
from moelab.depth.recursion import MixtureOfRecursions

__all__ = [
    "DepthRouter",
    "FTPRouter",
    "MixtureOfDepths",
    "MixtureOfRecursions",
    "ScheduleSearch",
    "attach_ftp",
    "ftp_loss_fn",
    "pruned_val_loss",
    "run_blocks",
    "search_sparsity_schedule",
]
