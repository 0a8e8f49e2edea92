"""Routed layers built on the contract, one family per file (``moe.py``: the MoE layer;
``soft_moe.py``: Soft MoE, ``soft``; ``chain.py``: Chain-of-Experts, ``coe``; ``residual_moe.py``:
DeepSpeed's Residual-MoE, ``residual_moe``; ``uoe.py``: Union of Experts' MLP, ``uoe``; ``mofme.py``: feature-modulated experts, ``mofme``; ``pools.py``: product-key pools of atomic experts,
``peer`` and ``omni``)."""

from moelab import registry
from moelab.layers.chain import ChainOfExperts, chain_of_experts
from moelab.layers.moe import MoE
from moelab.layers.mofme import MoFME, compare_with_ffn_moe, gated_base
from moelab.layers.pools import PEER, OmniMoE
from moelab.layers.residual_moe import ResidualMoE, residual_mix
from moelab.layers.soft_moe import SoftMoE, SoftRouter
from moelab.layers.uoe import UnionOfExperts, assemble_mlp, decompose_mlp, dense_mlp_weights

registry.register(
    "layer",
    "moe",
    paper="Shazeer et al. 2017 (sparsely-gated MoE layer); Switch, GShard, DeepSeekMoE (shared experts)",
    summary="Router -> Routing -> dispatcher -> executor(bank) -> combine, plus optional shared experts",
)(MoE)

__all__ = [
    "PEER",
    "ChainOfExperts",
    "MoE",
    "MoFME",
    "OmniMoE",
    "ResidualMoE",
    "SoftMoE",
    "SoftRouter",
    "UnionOfExperts",
    "assemble_mlp",
    "chain_of_experts",
    "compare_with_ffn_moe",
    "decompose_mlp",
    "dense_mlp_weights",
    "gated_base",
    "residual_mix",
]
