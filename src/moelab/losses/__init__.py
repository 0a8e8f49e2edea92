"""Auxiliary losses over a ``Routing``, by name (``aux_losses={"load_balance": 1e-2, "z": 1e-3}``)."""

from .balance import load_balance, load_balance_seq, z_loss
from .registry import check_aux_losses, get_loss, register_loss

__all__ = ["check_aux_losses", "get_loss", "load_balance", "load_balance_seq", "register_loss", "z_loss"]
