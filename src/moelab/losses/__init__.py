"""Auxiliary losses over a ``Routing``, by name (``aux_losses={"load_balance": 1e-2, "z": 1e-3}``);
parameters by ``aux_loss_kwargs={"erc": {"alpha": 0.5}}``."""

from moelab.losses.balance import (
    load_balance,
    load_balance_loss,
    load_balance_seq,
    load_balance_seq_loss,
    load_balance_seq_unbiased,
    z,
    z_loss,
)
from moelab.losses.entropy import tsallis_entropy, tsallis_entropy_aux, tsallis_entropy_loss
from moelab.losses.erc import (
    erc,
    erc_coupling,
    erc_diag_dominance,
    erc_diagnostics,
    erc_epsilon,
    erc_loss,
    erc_proxy_tokens,
    expert_gate_weight,
)
from moelab.losses.rcl import rcl, routing_contrastive_loss
from moelab.losses.registry import check_aux_loss_kwargs, check_aux_losses, get_loss, register_loss

__all__ = [
    "check_aux_loss_kwargs",
    "check_aux_losses",
    "erc",
    "erc_coupling",
    "erc_diag_dominance",
    "erc_diagnostics",
    "erc_epsilon",
    "erc_loss",
    "erc_proxy_tokens",
    "expert_gate_weight",
    "get_loss",
    "load_balance",
    "load_balance_loss",
    "load_balance_seq",
    "load_balance_seq_loss",
    "load_balance_seq_unbiased",
    "rcl",
    "register_loss",
    "routing_contrastive_loss",
    "tsallis_entropy",
    "tsallis_entropy_aux",
    "tsallis_entropy_loss",
    "z",
    "z_loss",
]
