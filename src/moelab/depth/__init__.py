"""Depth routing: which blocks run on which tokens, and how often (``moelab list depth``)."""

from moelab.depth.base import DepthRouter, run_blocks
from moelab.depth.gamma_mod import GammaMoD, convert, lowest_arank_layers, select_layers_by_arank
from moelab.depth.mod import MixtureOfDepths
from moelab.depth.prune import (
    FTPRouter,
    attach_ftp,
    ftp_loss_fn,
    pruned_val_loss,
)
from moelab.depth.recursion import MixtureOfRecursions
from moelab.depth.schedule_search import ScheduleSearch, search_sparsity_schedule

__all__ = [
    "DepthRouter",
    "FTPRouter",
    "GammaMoD",
    "MixtureOfDepths",
    "MixtureOfRecursions",
    "ScheduleSearch",
    "attach_ftp",
    "convert",
    "ftp_loss_fn",
    "lowest_arank_layers",
    "pruned_val_loss",
    "run_blocks",
    "search_sparsity_schedule",
    "select_layers_by_arank",
]
