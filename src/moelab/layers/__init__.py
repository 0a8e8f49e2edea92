"""Routed layers built on the contract, one family per file (``moe.py``: the MoE layer;
``soft_moe.py``: Soft MoE, registered as ``soft``)."""

from moelab import registry
from moelab.layers.moe import MoE
from moelab.layers.soft_moe import SoftMoE, SoftRouter

registry.register(
    "layer",
    "moe",
    paper="Shazeer et al. 2017 (sparsely-gated MoE layer); Switch, GShard, DeepSeekMoE (shared experts)",
    summary="Router -> Routing -> dispatcher -> executor(bank) -> combine, plus optional shared experts",
)(MoE)

__all__ = ["MoE", "SoftMoE", "SoftRouter"]
