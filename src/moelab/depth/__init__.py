"""Depth routing: which blocks run on which tokens, and how often (``moelab list depth``)."""

from moelab.depth.base import DepthRouter, run_blocks
from moelab.depth.gamma_mod import GammaMoD, convert, lowest_arank_layers, select_layers_by_arank
from moelab.depth.layer_router import (
    DrLLM,
    LayerRouter,
    LayerRouters,
    apply_drllm,
    find_layer_routers,
    remove_drllm,
    train_layer_routers,
)
from moelab.depth.mcts import LayerPathSearch, mcts_layer_paths, mcts_layer_paths_batched
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
    "DrLLM",
    "FTPRouter",
    "GammaMoD",
    "LayerPathSearch",
    "LayerRouter",
    "LayerRouters",
    "MixtureOfDepths",
    "MixtureOfRecursions",
    "ScheduleSearch",
    "apply_drllm",
    "attach_ftp",
    "convert",
    "find_layer_routers",
    "ftp_loss_fn",
    "lowest_arank_layers",
    "mcts_layer_paths",
    "mcts_layer_paths_batched",
    "pruned_val_loss",
    "remove_drllm",
    "run_blocks",
    "search_sparsity_schedule",
    "select_layers_by_arank",
    "train_layer_routers",
]
