"""MoBA's selection is traced like any routed layer's, and never rewritten by routing transforms."""

from __future__ import annotations

import pytest
import torch

import moelab
from moelab.attention.moba import MoBAAttention, moba_gate, moba_routing
from moelab.models import MoELM, MoELMConfig


def test_trace_records_the_gate_per_query_block():
    torch.manual_seed(0)
    layer = MoBAAttention(4, 2)
    q, k, v = (torch.randn(2, 2, 19, 8) for _ in range(3))
    plain = layer(q, k, v)
    with moelab.trace(layer) as tr:
        traced = layer(q, k, v)
    assert torch.equal(plain, traced)  # tracing changes nothing that runs
    (name,) = tr.layers
    expect = moba_routing(moba_gate(q, k, 4, 2), per="block", block_size=4)
    got = tr.routing(name)
    assert (got.num_tokens, got.num_experts) == (2 * 2 * 5, 5)
    torch.testing.assert_close(got.dense(), expect.dense())
    layer(q, k, v)  # outside the trace: nothing recorded
    assert tr.routing(name).num_tokens == 20


def test_moba_in_a_model_is_traced_but_not_transformed():
    cfg = MoELMConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=40,
        num_experts=4,
        attention="moba",
        attention_kwargs={"block_size": 8, "top_k": 2},
    )
    torch.manual_seed(0)
    model = MoELM(cfg).eval()
    ids = torch.randint(0, 256, (2, 40))
    with moelab.trace(model) as tr:
        model(ids)
    moba_layers = [n for n in tr.layers if n.endswith("attn.moba")]
    assert moba_layers == ["blocks.0.attn.moba", "blocks.1.attn.moba"]
    assert tr.routing(moba_layers[0]).num_experts == 5  # 40 tokens in blocks of 8
    expert_layers = [n for n in tr.layers if n not in moba_layers]
    assert len(expert_layers) == 2
    seen = []
    with moelab.override_routing(model, lambda r, site: seen.append(site.name) or r) as names:
        model(ids)
    assert set(names) == set(expert_layers) and set(seen) == set(expert_layers)
    with pytest.raises(ValueError, match="accept routing transforms"):
        with moelab.override_routing(model, lambda r, site: r, layers=["blocks.0.attn.moba"]):
            pass
