"""FLOPs accounting against the count written by hand: 2 x multiply-adds of each matmul that ran."""

from __future__ import annotations

import pytest
import torch

from moelab.models import MoELM, MoELMConfig
from moelab.train.compare import CompareSettings, is_depth_arm, match_flops_steps, router_configs


def _by_hand(cfg: MoELMConfig, b: int, s: int, moe_assignments: list[int]) -> float:
    d, h = cfg.d_model, cfg.dense_hidden or 4 * cfg.d_model
    t = b * s
    total = 0.0
    moe_i = 0
    for i in range(cfg.n_layers):
        total += 2 * t * 4 * d * d + 2 * t * 2 * d * (s + 1) / 2  # projections, then scores + values
        if cfg.is_moe_layer(i):
            eh = cfg.expert_hidden or 4 * d // cfg.top_k
            total += 2 * t * d * cfg.num_experts  # router
            total += 2 * moe_assignments[moe_i] * 3 * d * eh
            moe_i += 1
        else:
            total += 2 * t * 3 * d * h
    return total / t + 2 * d * cfg.vocab_size


def test_dense_and_moe_flops_match_the_count_by_hand():
    cfg = MoELMConfig(d_model=32, n_layers=4, n_heads=2, max_seq_len=32, num_experts=4, top_k=2, moe_every=2)
    m = MoELM(cfg)
    m(torch.randint(0, 256, (2, 10)))
    # top-k without capacity limits: every token has k assignments
    assert m.flops_per_token() == pytest.approx(_by_hand(cfg, 2, 10, [2 * 10 * 2] * 2), rel=1e-9)
    per_layer = m.flops_by_layer()
    assert per_layer["blocks.1"] > 0 and per_layer["blocks.0.ffn"] > 0


def test_flops_reset_each_forward():
    m = MoELM(MoELMConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, moe_every=9))
    ids = torch.randint(0, 256, (1, 8))
    m(ids)
    first = m.flops_per_token()
    m(ids)
    assert m.flops_per_token() == first


def test_depth_arm_configs_and_matched_steps():
    s = CompareSettings(
        routers=["topk", "mod"],
        model={"d_model": 32, "n_layers": 4, "n_heads": 2, "num_experts": 4, "max_seq_len": 32},
        train={"steps": 20, "batch_size": 2, "seq_len": 16, "warmup_steps": 5},
        router_kwargs={"mod": {"capacity": 0.25}},
    )
    assert is_depth_arm("mod", s) and not is_depth_arm("topk", s)
    mcfg, _ = router_configs("mod", s, 256)
    assert mcfg.depth == "mod" and mcfg.depth_kwargs["capacity"] == 0.25 and mcfg.router == "topk"
    assert mcfg.router_kwargs.get("capacity_factor") == 1.25  # the MoE router keeps its paper settings
    matched = match_flops_steps(s, 256)
    ratio = matched["topk"]["flops_per_token"] / matched["mod"]["flops_per_token"]
    assert matched["topk"]["steps"] == 20 and matched["mod"]["steps"] == round(20 * ratio) > 20
    _, tcfg = router_configs("mod", s, 256)
    assert tcfg.steps == matched["mod"]["steps"]
