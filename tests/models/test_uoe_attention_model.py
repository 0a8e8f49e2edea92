"""MoELM with Union of Experts' selective multi-head attention (``attention="uoe_attention"``).

The reference is MoELM's own dense attention (``attention="sdpa"``, a fused ``qkv`` and ``out``):
with every head chosen by every token, the same weights copied into ``q_proj/k_proj/v_proj/o_proj``
give the same logits and gradients. The rest: training, the auxiliary loss, FLOPs counted once,
traces, decoding by recomputation (no KV cache), the trainer, config errors and checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moelab
from moelab.attention.selective_heads import SelectiveHeadAttention
from moelab.core.context import RoutingContext, Session
from moelab.core.flops import model_flops
from moelab.models import MoELM, MoELMConfig

BASE = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=32, num_experts=4, top_k=2)


def cfg(**kw) -> MoELMConfig:
    return MoELMConfig(**{**BASE, **kw})


def copy_dense_attention(dense: MoELM, uoe: MoELM) -> None:
    """Load ``dense``'s weights into ``uoe``: ``qkv`` rows q, k, v -> ``q_proj, k_proj, v_proj``,
    ``out`` -> ``o_proj``; every other weight by name; ``uoe``'s head gates keep theirs."""
    src = dense.state_dict()
    d = dense.config.d_model
    state = {}
    for key, value in uoe.state_dict().items():
        prefix, found, leaf = key.rpartition(".attn.")
        if not found:
            state[key] = src[key]
        elif leaf.startswith("gate."):
            state[key] = value
        elif leaf == "o_proj.weight":
            state[key] = src[f"{prefix}.attn.out.weight"]
        else:
            part = ("q_proj.weight", "k_proj.weight", "v_proj.weight").index(leaf)
            state[key] = src[f"{prefix}.attn.qkv.weight"][part * d : (part + 1) * d]
    uoe.load_state_dict(state, strict=True)


@pytest.mark.parametrize("rope_positions", ["token", "rank"])
def test_every_head_chosen_equals_dense_attention_forward_and_backward(rope_positions):
    torch.manual_seed(0)
    kw = dict(router="uoe", moe_every=2, n_layers=3)
    dense = MoELM(cfg(**kw)).double()
    uoe = MoELM(
        cfg(
            **kw,
            attention="uoe_attention",
            attention_kwargs={"heads_per_token": 4, "rope_positions": rope_positions},
        )
    ).double()
    assert all(isinstance(b.attn, SelectiveHeadAttention) for b in uoe.blocks)
    copy_dense_attention(dense, uoe)
    ids = torch.randint(0, 256, (2, 13))
    out_d, out_u = dense(ids, labels=ids), uoe(ids, labels=ids)
    torch.testing.assert_close(out_u.logits, out_d.logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out_u.loss, out_d.loss, atol=1e-10, rtol=1e-10)
    out_d.loss.backward()
    out_u.loss.backward()
    d = dense.config.d_model
    for bd, bu in zip(dense.blocks, uoe.blocks, strict=True):
        g_qkv = bd.attn.qkv.weight.grad
        for part, proj in enumerate((bu.attn.q_proj, bu.attn.k_proj, bu.attn.v_proj)):
            torch.testing.assert_close(
                proj.weight.grad, g_qkv[part * d : (part + 1) * d], atol=1e-10, rtol=1e-8
            )
        torch.testing.assert_close(bu.attn.o_proj.weight.grad, bd.attn.out.weight.grad, atol=1e-10, rtol=1e-8)
        assert bu.attn.gate.weight.grad is None  # the official gate only selects: no gradient
    grads_d = dict(dense.named_parameters())
    for name, p in uoe.named_parameters():
        if ".attn." not in name:
            torch.testing.assert_close(p.grad, grads_d[name].grad, atol=1e-10, rtol=1e-8)
    # FLOPs: with every head taken SMHA computes what the dense attention does, plus its gate
    # (d * H multiply-adds per token and layer); counted once per layer
    gate = 2.0 * d * dense.config.n_heads * dense.config.n_layers
    assert uoe.flops_per_token() == pytest.approx(dense.flops_per_token() + gate, rel=1e-12)


def test_half_the_heads_trains_and_the_head_gate_aux_loss_counts():
    torch.manual_seed(1)
    model = MoELM(
        cfg(
            router="uoe",
            attention="uoe_attention",
            attention_kwargs={"heads_per_token": 2, "aux_losses": {"load_balance": 1e-2}},
        )
    )
    ids = torch.randint(0, 256, (4, 24))
    out = model(ids, labels=ids)
    attn_aux = sum(b.attn.aux_loss for b in model.blocks)
    assert attn_aux.item() > 0 and set(model.blocks[0].attn.aux_terms) == {"load_balance"}
    ffn_aux = sum(m.aux_loss for _, m in model.moe_layers())
    torch.testing.assert_close(out.aux_loss, ffn_aux + attn_aux)
    torch.testing.assert_close(out.aux_loss, moelab.aux_loss(model))  # every routed layer's
    out.loss.backward()
    assert model.blocks[0].attn.gate.weight.grad.abs().sum() > 0  # the aux loss trains the gate
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    # without aux_losses the attention adds nothing
    plain = MoELM(cfg(attention="uoe_attention", aux_losses={}))
    assert plain(ids, labels=ids).aux_loss.item() == 0.0


def test_trace_context_and_flops_of_a_uoe_block():
    torch.manual_seed(2)
    model = MoELM(cfg(router="uoe", moe_every=2, attention="uoe_attention"))
    ids = torch.randint(0, 256, (2, 10))
    ctx = RoutingContext()
    with moelab.trace(model) as tr:
        model(ids, ctx=ctx)
    assert tr.layers == ["blocks.0.attn", "blocks.1.attn", "blocks.1.ffn.moe"]
    heads = tr.routing("blocks.0.attn")
    assert (heads.num_tokens, heads.num_experts, heads.top_k) == (20, 4, 2)
    assert [r.num_experts for r in ctx.history] == [4, 4, 4]  # heads, heads, MLP slices (E = 4)
    seen = []
    model.blocks[1].attn.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    model(ids)
    assert seen[0].layer_index == 1 and seen[0].batch_shape == (2, 10)
    assert torch.equal(seen[0].token_ids, ids.reshape(-1))
    # FLOPs: each attention's own count, once; a second forward does not accumulate
    attn = sum(b.attn.flops for b in model.blocks)
    assert attn > 0
    assert model_flops(model) == pytest.approx(
        attn + sum(b.flops + b.ffn.__dict__.get("flops", 0.0) for b in model.blocks)
    )
    first = model.flops_per_token()
    model(ids)
    assert model.flops_per_token() == pytest.approx(first)
    assert model.flops_by_layer()["blocks.0.attn"] == pytest.approx(model.blocks[0].attn.flops / 20)


def test_no_kv_cache_and_generation_by_recomputation():
    torch.manual_seed(3)
    model = MoELM(cfg(attention="uoe_attention", moe_every=99)).eval()
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match=r"no KV cache.*use_cache=False"):
        moelab.generate(model, ids, 3)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(ids, ctx=RoutingContext(session=Session()))
    out = moelab.generate(model, ids, 6, use_cache=False)
    ref = ids
    with torch.no_grad():
        for _ in range(6):  # greedy by hand
            ref = torch.cat((ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
        assert torch.equal(out, ref)
        # the default layer is causal: a longer sequence leaves the earlier logits unchanged
        torch.testing.assert_close(model(out).logits[:, :5], model(ids).logits, atol=1e-5, rtol=1e-5)
    blk = model.blocks[0]
    x = torch.randn(1, 4, 32)
    rope = (model.rope_cos, model.rope_sin)
    with pytest.raises(ValueError, match="padded gather"):
        blk(x, rope, RoutingContext(), valid=torch.ones(1, 4, dtype=torch.bool))


def test_trainer_runs_a_uoe_block_model(tmp_path: Path):
    from moelab.data import load_data
    from moelab.train.trainer import TrainConfig, Trainer

    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(20):
        (texts / f"m{i}.py").write_text(
            "".join(f"def g{i}_{j}(a, b):\n    return a * {j} - b\n" for j in range(30))
        )
    mcfg = cfg(
        max_seq_len=64,
        router="uoe",
        attention="uoe_attention",
        attention_kwargs={"aux_losses": {"load_balance": 1e-2}},
    )
    run = TrainConfig(
        steps=3, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=3, eval_batches=2
    )
    tr = Trainer(mcfg, run, tmp_path / "run", data=load_data(texts), progress=False)
    res = tr.train()
    assert res.step == 3 and all(a > 0 for a in res.history["aux_loss"])
    # expert statistics cover the MLP slices only: the head routing (E = n_heads) is kept apart
    assert [row["layer"] for row in res.routing] == ["blocks.0.ffn.moe", "blocks.1.ffn.moe"]
    assert res.flops_per_token > 0
    back = MoELM.from_pretrained(tmp_path / "run" / "final")
    assert isinstance(back.blocks[0].attn, SelectiveHeadAttention)


def test_config_validation_names_the_argument():
    with pytest.raises(ValueError, match=r"unknown attention_kwargs \['bogus'\]"):
        cfg(attention="uoe_attention", attention_kwargs={"bogus": 1})
    with pytest.raises(ValueError, match=r"must not set \['n_heads'\]"):
        cfg(attention="uoe_attention", attention_kwargs={"n_heads": 2})
    with pytest.raises(ValueError, match="head_dim"):
        cfg(attention="uoe_attention", attention_kwargs={"head_dim": 4})
    with pytest.raises(ValueError, match="heads_per_token"):
        cfg(attention="uoe_attention", attention_kwargs={"heads_per_token": 5})
    with pytest.raises(ValueError, match="capacity"):
        cfg(attention="uoe_attention", attention_kwargs={"capacity": -1.0})
    with pytest.raises(ValueError, match="rope_positions"):
        cfg(attention="uoe_attention", attention_kwargs={"rope_positions": "absolute"})
    with pytest.raises(ValueError, match="aux_losses"):
        cfg(attention="uoe_attention", attention_kwargs={"aux_losses": {"nope": 1.0}})
    with pytest.raises(TypeError, match="scale_by_gate"):
        cfg(attention="uoe_attention", attention_kwargs={"scale_by_gate": "yes"})
    with pytest.raises(ValueError, match="causal"):
        cfg(attention="uoe_attention", attention_kwargs={"causal": False})
    with pytest.raises(ValueError, match="depth router"):
        cfg(attention="uoe_attention", depth="mod")
    with pytest.raises(ValueError, match="uoe_attention"):
        cfg(attention="selective")
    good = cfg(
        attention="uoe_attention",
        attention_kwargs={
            "heads_per_token": 1,
            "capacity": 1.5,
            "scale_by_gate": True,
            "aux_losses": {"z": 1e-3},
        },
    )
    assert MoELMConfig.from_json(good.to_json()) == good
    layer = MoELM(good).blocks[0].attn
    assert (layer.heads_per_token, layer.capacity, layer.scale_by_gate) == (1, 1.5, True)
    assert layer.aux_coefficients == {"z": 1e-3} and layer.q_proj.weight.device.type == "cpu"


def test_checkpoint_round_trip(tmp_path: Path):
    torch.manual_seed(4)
    model = MoELM(cfg(router="uoe", attention="uoe_attention", attention_kwargs={"bias": True})).eval()
    assert (
        "blocks.0.attn.gate.weight" in model.state_dict()
        and "blocks.0.attn.q_proj.bias" in model.state_dict()
    )
    with torch.no_grad():  # biases are initialised to zero: make them matter
        for b in model.blocks:
            b.attn.q_proj.bias.normal_()
    model.save_pretrained(tmp_path)
    back = MoELM.from_pretrained(tmp_path).eval()
    assert back.config == model.config
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
