"""moelab.hf.upcycle: a dense Llama-family model becomes an MoE that equals it at init."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import tiny_ids, tiny_llama  # noqa: E402
from smollm2 import FIBONACCI_IDS, load_smollm2  # noqa: E402

import moelab  # noqa: E402
import moelab.hf as mh  # noqa: E402


@pytest.mark.parametrize(
    ("num_experts", "top_k", "router"), [(4, 2, "topk"), (3, 1, "topk"), (4, 2, "sigmoid_topk")]
)
def test_upcycled_equals_dense_at_init(num_experts, top_k, router):
    model = tiny_llama()
    ids = tiny_ids()
    ffns = [m for _, m in mh.dense_ffns(model)]
    with torch.no_grad():
        ref = model(ids).logits
    n_dense = sum(p.numel() for p in model.parameters())
    mh.upcycle(model, num_experts=num_experts, top_k=top_k, router=router)
    layers = [m for m in model.modules() if isinstance(m, moelab.MoE)]
    assert len(layers) == len(ffns) == model.config.num_hidden_layers
    for layer, ffn in zip(layers, ffns, strict=True):
        assert layer.router.name == router
        w_in = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight], 0)
        for e in range(num_experts):  # every expert is a copy of the dense FFN (a copy, not a view)
            assert torch.equal(layer.experts.gate_up_proj[e], w_in)
            assert torch.equal(layer.experts.down_proj[e], ffn.down_proj.weight)
        assert layer.experts.down_proj.data_ptr() != ffn.down_proj.weight.data_ptr()
        x = torch.randn(5, model.config.hidden_size)
        with torch.no_grad():  # the layer alone equals the dense FFN
            torch.testing.assert_close(layer(x), ffn(x), atol=1e-6, rtol=1e-5)
    d, h = model.config.hidden_size, model.config.intermediate_size
    assert sum(p.numel() for p in model.parameters()) == n_dense + len(layers) * (
        (num_experts - 1) * 3 * d * h + num_experts * d
    )
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_upcycled_model_trains_and_experts_diverge():
    model = mh.upcycle(tiny_llama(), num_experts=4, top_k=2, aux_losses={"load_balance": 1e-2})
    model.train()
    ids = tiny_ids(batch=2, seq=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss + moelab.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    bank = next(m for m in model.modules() if isinstance(m, moelab.MoE)).experts
    assert not torch.equal(bank.down_proj[0], bank.down_proj[1])


def test_upcycle_options_and_bad_input():
    model = tiny_llama()
    ids = tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
        mh.upcycle(model, 4, 2, layers=[1], noise=0.05, router_init_std=0.1)
        out = model(ids).logits
    layers = [m for m in model.modules() if isinstance(m, moelab.MoE)]
    assert len(layers) == 1 and not torch.equal(
        layers[0].experts.down_proj[0], layers[0].experts.down_proj[1]
    )
    assert (out - ref).abs().max() > 1e-4  # noise breaks the exact equality
    assert 0.05 < layers[0].router.weight.std().item() < 0.2
    with pytest.raises(ValueError, match="no Llama-style FFN"):
        mh.upcycle(torch.nn.Linear(3, 3), 4, 2)
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        mh.upcycle(tiny_llama(), 2, 3)
    with pytest.raises(ValueError, match="layers must be indices"):
        mh.upcycle(tiny_llama(), 4, 2, layers=[7])
    with pytest.raises(ValueError, match="noise"):
        mh.upcycle(tiny_llama(), 4, 2, noise=-1.0)


@pytest.mark.slow
def test_upcycled_smollm2_generates_like_dense_offline(monkeypatch):
    model = load_smollm2(monkeypatch)
    ids = torch.tensor(FIBONACCI_IDS)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
    mh.upcycle(model, num_experts=4, top_k=2)
    assert sum(isinstance(m, moelab.MoE) for m in model.modules()) == model.config.num_hidden_layers
    with torch.no_grad(), moelab.trace(model) as tr:
        moe = model.generate(ids, **kw)
    assert torch.equal(moe, dense)
    assert tr.tokens(tr.layers[0]).numel() == moe.shape[1] - 1
    r = tr.routing(tr.layers[0])
    assert r.top_k == 2 and r.num_experts == 4
