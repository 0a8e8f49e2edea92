"""Pyramid-MoE: more experts in deeper MoE layers (DeepSpeed-MoE's PR-MoE is Pyramid + Residual).

Paper: Rajbhandari et al., *DeepSpeed-MoE: Advancing Mixture-of-Experts Inference and Training to
Power Next-Generation AI Scale* (ICML 2022, arXiv 2201.05596), section 4.1: the deeper layers
gain more from experts than the shallow ones, so the experts are moved to the later layers (the
paper's PR-MoE models use half the layers with fewer experts and half with twice as many), and
the total parameter count drops at about equal quality. PR-MoE combines the pyramid with
Residual-MoE (``moelab.layers.residual_moe``): ``MoELMConfig(router="residual_moe",
experts_per_layer=pyramid_experts(...))``.

In moelab a pyramid is a model setting, not a layer: ``MoELMConfig.experts_per_layer`` lists the
``E`` of each MoE layer in depth order and ``MoELM`` builds each layer with its own ``E``.
``pyramid_experts`` writes such a list; ``moelab compare --experts-per-layer 4,4,8,8`` (every arm)
or ``--model-arg LABEL.experts_per_layer=[4,4,8,8]`` (one arm) trains one.
"""

from __future__ import annotations

from moelab import registry
from moelab.core.checks import positive_int


def pyramid_experts(num_layers: int, shallow: int, deep: int, deep_from: int | None = None) -> list[int]:
    """The ``E`` of each of ``num_layers`` MoE layers: ``shallow`` before ``deep_from``, ``deep`` after.

    Args:
        num_layers: how many MoE layers (``len(MoELMConfig.moe_layers)``).
        shallow: experts of the shallow layers.
        deep: experts of the deep layers (the pyramid has ``deep >= shallow``; a smaller ``deep``
            is accepted, an inverted pyramid, as a control).
        deep_from: the first deep MoE layer (0-based among the MoE layers); default
            ``num_layers // 2``, the paper's halves (our choice of split point for odd counts).

    ``pyramid_experts(4, 4, 8) == [4, 4, 8, 8]``.
    """
    n = positive_int("num_layers", num_layers)
    shallow, deep = positive_int("shallow", shallow), positive_int("deep", deep)
    split = n // 2 if deep_from is None else deep_from
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= n:
        raise ValueError(f"deep_from must be an int in [0, num_layers={n}], got {deep_from!r}")
    return [shallow] * split + [deep] * (n - split)


registry.register(
    "architecture",
    "pyramid",
    paper="DeepSpeed-MoE Pyramid-MoE / PR-MoE (Rajbhandari et al. 2022, arXiv 2201.05596, sec. 4.1)",
    summary="more experts in deeper MoE layers: MoELMConfig.experts_per_layer, e.g. [4, 4, 8, 8]; "
    "with router='residual_moe' it is PR-MoE",
)(pyramid_experts)
