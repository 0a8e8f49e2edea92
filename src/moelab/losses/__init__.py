"""Auxiliary losses over a ``Routing``, by name (``aux_losses={"load_balance": 1e-2, "z": 1e-3}``)."""

from moelab.losses.balance import (
    load_balance,
    load_balance_loss,
    load_balance_seq,
    load_balance_seq_loss,
    load_balance_seq_unbiased,
    z,
    z_loss,
)
from moelab.losses.registry import check_aux_losses, get_loss, register_loss

__all__ = [
    "check_aux_losses",
    "get_loss",
    "load_balance",
    "load_balance_loss",
    "load_balance_seq",
    "load_balance_seq_loss",
    "load_balance_seq_unbiased",
    "register_loss",
    "z",
    "z_loss",
]
