"""moelab.hf.patch on tiny random models of every supported family: exact routing, shared weights, training."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import FAMILIES, tiny_ids, tiny_model  # noqa: E402

import moelab  # noqa: E402
import moelab.hf as mh  # noqa: E402
from moelab.routers import SigmoidTopKRouter, TopKRouter  # noqa: E402

# The model's own routing must be a core router, not a special path.
OWN_ROUTER = {
    "olmoe": TopKRouter,
    "qwen2_moe": TopKRouter,
    "qwen3_moe": TopKRouter,
    "mixtral": TopKRouter,
    "deepseek_v3": SigmoidTopKRouter,
    "gpt_oss": TopKRouter,
}


def _blocks(model):
    return {name: block for name, block, _ in mh.find_blocks(model)}


def _lm_loss(model, ids):
    return model(ids, labels=ids).loss


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_keeps_logits_grads_and_shares_parameters(family):
    model = tiny_model(family)
    ids = tiny_ids()
    params_before = {id(p): p.data_ptr() for p in model.parameters()}
    n_before = sum(p.numel() for p in model.parameters())
    blocks = _blocks(model)
    assert blocks, family

    loss_ref = _lm_loss(model, ids)
    loss_ref.backward()
    logits_ref = model(ids).logits.detach()
    grads_ref = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    assert mh.patch(model) is model
    layers = dict(mh.patched_layers(model))
    assert set(layers) == set(blocks)

    # No copies: the very same parameter objects, nothing added.
    assert {id(p): p.data_ptr() for p in model.parameters()} == params_before
    assert sum(p.numel() for p in model.parameters()) == n_before
    for name, block in blocks.items():
        layer = layers[name]
        gate = block.router if family == "gpt_oss" else block.gate
        assert type(layer.router) is OWN_ROUTER[family]
        assert layer.router.weight is gate.weight
        assert layer.experts.gate_up_proj is block.experts.gate_up_proj
        assert layer.experts.down_proj is block.experts.down_proj
        assert layer.experts.down_proj.data_ptr() == block.experts.down_proj.data_ptr()
        if family == "gpt_oss":
            assert layer.router.bias is gate.bias
            assert layer.experts.gate_up_proj_bias is block.experts.gate_up_proj_bias
            assert layer.experts.down_proj_bias is block.experts.down_proj_bias
        if family == "deepseek_v3":
            assert layer.router.expert_bias is gate.e_score_correction_bias
            for p in ("gate_proj", "up_proj", "down_proj"):
                assert getattr(layer.shared_experts, p) is getattr(block.shared_experts, p)
        if family == "qwen2_moe":
            for p in ("gate_proj", "up_proj", "down_proj"):
                assert getattr(layer.shared_experts, p) is getattr(block.shared_expert, p)
            assert layer.shared_experts.gate is block.shared_expert_gate
        if family not in ("deepseek_v3", "qwen2_moe"):
            assert layer.shared_experts is None

    logits = model(ids).logits.detach()
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=0)
    loss = _lm_loss(model, ids)
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), atol=1e-5, rtol=0)
    loss.backward()
    for p in model.parameters():
        if id(p) in grads_ref:
            torch.testing.assert_close(p.grad, grads_ref[id(p)], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3"])
def test_patch_reference_backend_matches(family):
    # The readable reference backend runs the bank's per-expert definition (expert_forward).
    model = tiny_model(family)
    ids = tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
        mh.patch(model, backend="reference")
        out = model(ids).logits
    assert all(layer.backend == "reference" for _, layer in mh.patched_layers(model))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_gpt_oss_block_returns_router_scores():
    model = tiny_model("gpt_oss")
    name, block, _ = mh.find_blocks(model)[0]
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        y_ref, scores_ref = block(x)
        mh.patch(model)
        y, scores = model.get_submodule(name)(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, scores_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss"])
def test_output_router_logits_and_aux_loss_survive_patch(family):
    model = tiny_model(family, output_router_logits=True, router_aux_loss_coef=0.01)
    ids = tiny_ids()
    with torch.no_grad():
        ref = model(ids, labels=ids)
        mh.patch(model)
        out = model(ids, labels=ids)
    assert len(out.router_logits) == len(ref.router_logits) == model.config.num_hidden_layers
    for a, b in zip(out.router_logits, ref.router_logits, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


def _train(model, ids, steps=20, lr=3e-3):
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = _lm_loss(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        moelab.step_end(model)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_trains(family):
    model = mh.patch(tiny_model(family))
    losses = _train(model, tiny_ids(batch=2, seq=10))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    ("family", "router"),
    [
        ("olmoe", "expert_choice"),
        ("gpt_oss", "expert_choice"),
        ("deepseek_v3", "topk"),
        ("qwen2_moe", "sigmoid_topk"),
    ],
)
def test_router_replacement_inits_from_gate_and_trains(family, router):
    model = tiny_model(family)
    blocks = _blocks(model)
    gates = {n: (b.router if family == "gpt_oss" else b.gate).weight for n, b in blocks.items()}
    old = {n: w.detach().clone() for n, w in gates.items()}
    mh.patch(model, router=router)
    for name, layer in mh.patched_layers(model):
        assert layer.router.name == router
        torch.testing.assert_close(layer.router.weight.detach(), old[name], atol=0, rtol=0)
        assert layer.router.weight is not gates[name]  # initialised from the old gate, not shared
    ids = tiny_ids(batch=2, seq=10)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    losses = _train(model, ids)
    assert losses[-1] < 0.8 * losses[0], losses


def test_router_replacement_on_patched_model_and_new_parameter():
    model = mh.patch(tiny_model("qwen3_moe"))
    own = {n: layer.router.weight for n, layer in mh.patched_layers(model)}
    mh.patch(model, router="expert_choice", router_kwargs={"capacity_factor": 1.5})
    for n, layer in mh.patched_layers(model):
        assert layer.router.name == "expert_choice" and layer.router.capacity_factor == 1.5
        assert layer.router.weight is not own[n]
        torch.testing.assert_close(layer.router.weight.detach(), own[n].detach())


def test_deepseek_bias_update_writes_the_models_buffer():
    model = tiny_model("deepseek_v3")
    buffers = [b.gate.e_score_correction_bias for _, b, _ in mh.find_blocks(model)]
    before = [b.clone() for b in buffers]
    mh.patch(model, router_kwargs={"bias_update_rate": 1e-3})
    model.train()
    model(tiny_ids())
    moelab.step_end(model)
    for b, b0 in zip(buffers, before, strict=True):
        delta = b - b0
        # sign rule: every expert moves by exactly +-gamma (or 0 at the mean load)
        assert delta.abs().max() > 0
        assert torch.all(((delta.abs() - 1e-3).abs() < 1e-6) | (delta == 0))


def test_patched_generation_matches_original():
    model = tiny_model("olmoe")
    ids = tiny_ids(batch=1, seq=6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **kw)
    mh.patch(model)
    out = model.generate(ids, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_patched_state_dict_keeps_original_names(family, tmp_path):
    import transformers as tf

    model = tiny_model(family)
    ids = tiny_ids()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids).logits
    mh.patch(model)
    patched = model.state_dict()
    assert list(sorted(patched)) == list(sorted(original))
    for k, v in original.items():
        assert torch.equal(patched[k], v), k
    # An original state dict loads strictly into the patched model ...
    model.load_state_dict(original, strict=True)
    # ... and a patched model saves a checkpoint the original class loads.
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert not mh.patched_layers(reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ref, atol=1e-5, rtol=0)
    # A replaced router is not the model's own: it saves under moelab's names.
    mh.patch(model, router="topk")
    assert any(k.endswith("mlp.router.weight") for k in model.state_dict())


def test_patch_bad_input():
    with pytest.raises(ValueError, match="no MoE block"):
        mh.patch(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="model must be"):
        mh.patch("olmoe")
    model = tiny_model("olmoe")
    with pytest.raises(TypeError, match="router must be"):
        mh.patch(model, router=3)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        mh.patch(model, backend="nope")
    with pytest.raises(ValueError, match="unknown router"):
        mh.patch(model, router="nope")
    with pytest.raises(TypeError, match="router_kwargs"):
        mh.patch(model, router_kwargs=[1])


def test_a_replacing_router_with_cross_layer_state_is_linked_across_patched_layers():
    model = tiny_model("qwen3_moe")
    mh.patch(model, router="rmoe", router_kwargs={"hidden_size": 8})
    routers = [layer.router for _, layer in mh.patched_layers(model)]
    assert len(routers) >= 2
    assert [r.depth for r in routers] == list(range(len(routers)))
    assert all(r.cell is routers[0].cell for r in routers)  # one GRU cell, owned by the first
    assert sum(".cell." in n for n, _ in model.named_parameters()) == sum(
        1 for _ in routers[0].cell.parameters()
    )
    ids = tiny_ids(batch=2, seq=10)
    out = model(ids)
    out.logits.float().square().mean().backward()
    assert routers[0].in_proj.grad is not None and torch.isfinite(out.logits).all()
