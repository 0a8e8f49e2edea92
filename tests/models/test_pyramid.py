"""Pyramid-MoE's expert counts (``moelab.models.pyramid_experts``) and its registration."""

from __future__ import annotations

import pytest

import moelab
from moelab.models import MoELM, MoELMConfig, pyramid_experts


def test_pyramid_experts_splits_the_moe_layers_in_halves():
    assert pyramid_experts(4, 4, 8) == [4, 4, 8, 8]
    assert pyramid_experts(3, 32, 64) == [32, 64, 64]  # odd counts: the deep half is the larger
    assert pyramid_experts(4, 4, 8, deep_from=3) == [4, 4, 4, 8]
    assert pyramid_experts(2, 8, 4, deep_from=0) == [4, 4]  # every layer deep
    assert pyramid_experts(1, 4, 8) == [8]


def test_pyramid_experts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_layers"):
        pyramid_experts(0, 4, 8)
    with pytest.raises(ValueError, match="shallow"):
        pyramid_experts(4, 0, 8)
    with pytest.raises(ValueError, match="deep_from"):
        pyramid_experts(4, 4, 8, deep_from=5)
    with pytest.raises(ValueError, match="deep_from"):
        pyramid_experts(4, 4, 8, deep_from=True)


def test_pyramid_is_listed_and_pr_moe_builds():
    info = {m.name: m for m in moelab.list_methods("architecture")}
    assert info["pyramid"].obj is pyramid_experts and "DeepSpeed" in info["pyramid"].paper
    # PR-MoE: Residual-MoE layers in a pyramid
    cfg = MoELMConfig(d_model=16, n_layers=4, n_heads=2, max_seq_len=16, num_experts=4, router="residual_moe",
                      experts_per_layer=pyramid_experts(4, 2, 4))  # fmt: skip
    model = MoELM(cfg)
    assert [blk.ffn.num_experts for blk in model.blocks] == [2, 2, 4, 4]
    assert [blk.ffn.moe.experts.num_experts for blk in model.blocks] == [2, 2, 4, 4]
