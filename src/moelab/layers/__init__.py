"""Routed layers built on the contract, one family per file (``moe.py``: the MoE layer)."""

from moelab import registry
from moelab.layers.moe import MoE

registry.register(
    "layer",
    "moe",
    paper="Shazeer et al. 2017 (sparsely-gated MoE layer); Switch, GShard, DeepSeekMoE (shared experts)",
    summary="Router -> Routing -> dispatcher -> executor(bank) -> combine, plus optional shared experts",
)(MoE)

__all__ = ["MoE"]
