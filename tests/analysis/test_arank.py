"""ARank on hand-built attention maps, and attention capture from SDPA and transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab.analysis.arank import arank_per_layer, attention_maps, attention_rank, capture_sdpa_attention


def causal_uniform(S: int) -> torch.Tensor:
    a = torch.tril(torch.ones(S, S))
    return a / a.sum(-1, keepdim=True)


def test_attention_rank_hand_built_maps():
    S = 8
    # every token attends to token 0 only: the strictly lower part is one nonzero column -> rank 1
    first = torch.zeros(S, S)
    first[:, 0] = 1.0
    assert attention_rank(first.unsqueeze(0)) == 1.0
    # every token attends only to itself: the diagonal is zeroed -> rank 0
    assert attention_rank(torch.eye(S).unsqueeze(0)) == 0.0
    # uniform causal attention: strictly lower triangular with a nonzero subdiagonal -> rank S - 1
    assert attention_rank(causal_uniform(S).unsqueeze(0)) == S - 1
    # the upper triangle is ignored (tril), even if a map is not causal
    full = torch.full((S, S), 1.0 / S)
    assert attention_rank(full.unsqueeze(0)) == S - 1
    # mean over heads and samples
    heads = torch.stack([first, torch.eye(S), causal_uniform(S)])
    assert attention_rank(heads) == pytest.approx((1 + 0 + S - 1) / 3)
    assert attention_rank(torch.stack([heads, heads])) == pytest.approx((1 + 0 + S - 1) / 3)
    # tokens 1-4 attend to token 0, tokens 5-7 to token 4 (token 4's self-attention is zeroed,
    # so its row equals tokens 1-3's): two distinct nonzero columns -> rank 2
    blocks = torch.zeros(S, S)
    blocks[:5, 0] = 1.0
    blocks[4:, 4] = 1.0
    assert attention_rank(blocks.unsqueeze(0)) == 2.0


def test_attention_rank_errors():
    with pytest.raises(ValueError, match="square"):
        attention_rank(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"\[H, S, S\]"):
        attention_rank(torch.zeros(3, 3))


@pytest.mark.parametrize("kind", ["causal", "bool_mask", "float_mask", "gqa"])
def test_captured_probabilities_reproduce_sdpa(kind):
    torch.manual_seed(0)
    B, H, S, D = 2, 4, 7, 8
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
    kw: dict = {}
    if kind == "causal":
        kw["is_causal"] = True
    elif kind == "bool_mask":
        kw["attn_mask"] = torch.rand(S, S) > 0.3
        kw["attn_mask"].fill_diagonal_(True)
    elif kind == "float_mask":
        kw["attn_mask"] = torch.randn(S, S)
    else:
        k, v = torch.randn(B, 2, S, D), torch.randn(B, 2, S, D)
        kw["enable_gqa"] = True
    with capture_sdpa_attention() as maps:
        y = F.scaled_dot_product_attention(q, k, v, **kw)
    assert len(maps) == 1
    vv = v.repeat_interleave(H // v.shape[1], dim=1)
    torch.testing.assert_close(maps[0] @ vv, y, atol=1e-5, rtol=1e-5)
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored


def test_arank_on_moelm():
    from moelab.models import MoELM, MoELMConfig

    torch.manual_seed(0)
    model = MoELM(MoELMConfig(d_model=32, n_layers=3, n_heads=2, max_seq_len=32, num_experts=4, top_k=2))
    ids = torch.randint(0, 256, (2, 12))
    maps = attention_maps(model, ids)
    assert len(maps) == 3 and maps[0].shape == (2, 2, 12, 12)
    ranks = arank_per_layer(model, ids)
    assert len(ranks) == 3 and all(0 <= r <= 11 for r in ranks)
    assert ranks == [attention_rank(m) for m in maps]


def test_arank_on_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.OlmoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(cfg).eval()
    before = model.config._attn_implementation
    maps = attention_maps(model, torch.randint(0, 64, (1, 10)))
    assert len(maps) == 2 and maps[0].shape == (1, 4, 10, 10)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(1, 4, 10))
    assert model.config._attn_implementation == before  # restored
