"""MoELM: config round trip and errors, shapes, causality, checkpoints, learning."""

from __future__ import annotations

import json

import pytest
import torch

import moelab
from moelab.models import MoELM, MoELMConfig


def tiny(**kw) -> MoELMConfig:
    base = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=32, num_experts=4, top_k=2)
    return MoELMConfig(**{**base, **kw})


def test_config_defaults_and_json_round_trip(tmp_path):
    cfg = MoELMConfig()
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_seq_len) == (256, 256, 4, 4, 256)
    assert (cfg.moe_every, cfg.num_experts, cfg.top_k, cfg.router) == (1, 8, 2, "topk")
    assert cfg.aux_losses == {"load_balance": 1e-2, "z": 1e-3} and cfg.router_kwargs == {}
    assert cfg.expert_hidden is None and cfg.dense_hidden is None and cfg.tie_embeddings
    odd = tiny(router="sigmoid_topk", router_kwargs={"bias_update_rate": 0.01}, moe_every=2, shared_experts=1)
    assert MoELMConfig.from_json(odd.to_json()) == odd
    odd.to_json(tmp_path / "c.json")
    assert MoELMConfig.from_json(tmp_path / "c.json") == odd
    assert MoELMConfig.from_dict(json.loads(odd.to_json())) == odd


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown MoELMConfig key\(s\) \['bogus', 'hidden'\]"):
        MoELMConfig.from_dict({"bogus": 1, "hidden": 3, "d_model": 64})
    with pytest.raises(ValueError, match="divisible by n_heads"):
        MoELMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="even for RoPE"):
        MoELMConfig(d_model=12, n_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        MoELMConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="n_layers"):
        MoELMConfig(n_layers=0)
    with pytest.raises(TypeError, match="d_model"):
        MoELMConfig(d_model=32.0)
    with pytest.raises(ValueError, match="not valid JSON"):
        MoELMConfig.from_json("{nope")
    with pytest.raises(ValueError, match="unknown router"):
        MoELM(tiny(router="nope"))


def test_forward_shapes_loss_and_layer_kinds():
    model = MoELM(tiny(n_layers=4, moe_every=2))
    assert [b.is_moe for b in model.blocks] == [False, True, False, True]
    assert [i for i, _ in model.moe_layers()] == [1, 3]
    ids = torch.randint(0, 256, (3, 16))
    out = model(ids)
    assert out.logits.shape == (3, 16, 256) and out.loss is None and out.aux_loss.dim() == 0
    out = model(ids, labels=ids)
    assert torch.allclose(out.loss, out.ce_loss + out.aux_loss)
    assert out.aux_loss.item() > 0 and abs(out.ce_loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.num_parameters(active=True) < model.num_parameters()


def test_context_carries_token_ids_and_layer_index():
    model = MoELM(tiny(n_layers=3))
    ids = torch.randint(0, 256, (2, 8))
    seen = []
    for idx, moe in model.moe_layers():
        moe.router.register_forward_hook(
            lambda m, args, out, idx=idx: seen.append((idx, args[1].layer_index, args[1].token_ids))
        )
    model(ids)
    assert [(a, b) for a, b, _ in seen] == [(0, 0), (1, 1), (2, 2)]
    assert all(torch.equal(t, ids.reshape(-1)) for _, _, t in seen)
    with moelab.trace(model) as tr:
        model(ids)
    assert tr.layers == ["blocks.0.ffn", "blocks.1.ffn", "blocks.2.ffn"]


def test_bad_inputs():
    model = MoELM(tiny())
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\]"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.full((1, 4), 256))
    with pytest.raises(ValueError, match="labels must have"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))
    ids = torch.randint(0, 256, (2, 8))
    lab = ids.clone()
    lab[:, :4] = -100  # ignored targets are fine
    assert torch.isfinite(model(ids, labels=lab).loss)


@pytest.mark.parametrize("router", ["topk", "sigmoid_topk"])
def test_token_choice_model_is_causal(router):
    torch.manual_seed(1)
    model = MoELM(tiny(router=router)).eval()
    ids = torch.randint(0, 256, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = (changed[:, 15:] + 7) % 256
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_expert_choice_model_is_not_causal():
    """Documented: expert choice routes over the whole batch, so the future leaks into the past."""
    torch.manual_seed(1)
    model = MoELM(tiny(router="expert_choice")).eval()
    ids = torch.randint(0, 256, (2, 24))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 256
    assert not torch.allclose(model(ids).logits[:, :12], model(changed).logits[:, :12])


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_pretrained(tmp_path, tie):
    torch.manual_seed(0)
    model = MoELM(tiny(router="sigmoid_topk", tie_embeddings=tie, moe_every=2))
    model.blocks[1].ffn.router.expert_bias.fill_(0.25)  # buffers travel too
    d = model.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    again = MoELM.from_pretrained(d)
    assert again.config == model.config
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = torch.randint(0, 256, (2, 10))
    torch.testing.assert_close(model.eval()(ids).logits, again.eval()(ids).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="not a MoELM checkpoint"):
        MoELM.from_pretrained(tmp_path)


def test_shared_experts_and_dense_widths():
    model = MoELM(tiny(shared_experts=1, expert_hidden=16, dense_hidden=40, moe_every=2))
    dense, moe = model.blocks[0].ffn, model.blocks[1].ffn
    assert dense.down.in_features == 40 and moe.experts.hidden == 16 and moe.shared_experts is not None
    out = model(torch.randint(0, 256, (1, 8)), labels=torch.randint(0, 256, (1, 8)))
    out.loss.backward()


def test_saved_files_have_ordinary_permissions(tmp_path):
    """safetensors' save_file writes 0600; moelab writes with the umask (0644 under umask 022)."""
    import os

    old = os.umask(0o022)
    try:
        model = MoELM(MoELMConfig(d_model=32, n_layers=1, n_heads=2, num_experts=4, top_k=2, max_seq_len=8))
        model.save_pretrained(tmp_path / "m")
        with moelab.trace(model) as tr:
            model(torch.randint(0, 256, (1, 8)))
        tr.save(tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    for p in (tmp_path / "m" / "model.safetensors", tmp_path / "t.safetensors"):
        assert p.stat().st_mode & 0o777 == 0o644, oct(p.stat().st_mode)


def test_pyramid_experts_per_layer_builds_each_moe_layer_with_its_count():
    cfg = MoELMConfig(
        d_model=16, n_layers=4, n_heads=2, max_seq_len=16, num_experts=4, experts_per_layer=[4, 4, 8, 8]
    )
    model = MoELM(cfg)
    assert [m.num_experts for _, m in model.moe_layers()] == [4, 4, 8, 8]
    assert [m.experts.num_experts for _, m in model.moe_layers()] == [4, 4, 8, 8]
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    # active parameters: top_k / E of each layer's own experts
    total = sum(p.numel() for p in model.parameters())
    routed = [sum(p.numel() for p in m.experts.parameters()) for _, m in model.moe_layers()]
    expect = total - sum((1 - 2 / e) * r for e, r in zip([4, 4, 8, 8], routed, strict=True))
    assert model.num_parameters(active=True) == int(expect)
    assert MoELMConfig.from_json(cfg.to_json()).experts_per_layer == [4, 4, 8, 8]
    with pytest.raises(ValueError, match="one expert count per MoE layer"):
        MoELMConfig(n_layers=4, experts_per_layer=[8, 8])
    with pytest.raises(ValueError, match="experts_per_layer"):
        MoELMConfig(n_layers=2, experts_per_layer=[8, 0])
    with pytest.raises(ValueError, match="top_k"):
        MoELMConfig(n_layers=2, top_k=2, experts_per_layer=[8, 1])
