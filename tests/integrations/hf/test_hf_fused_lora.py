"""LoRA on transformers 5's fused 3-D expert parameters (``apply(..., target_parameters=...)``).

The reference is the model with each expert's weight replaced, expert by expert in a plain loop,
by ``W_e + scaling * B_e A_e`` (PEFT's LoRA merged by hand); forward and backward must agree, under
every experts implementation, and ``remove`` must give back the very parameter objects.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import tiny_config

from moelab.lora import FusedExpertLoRA, apply, fused_lora_layers, mixture_config, mixture_layers, remove

transformers = pytest.importorskip("transformers")

FAMILIES = ("mixtral", "qwen2_moe", "gpt_oss")  # gpt-oss: transposed [E, d_in, d_out], with biases
FUSED = ["experts.gate_up_proj", "experts.down_proj"]


def tiny(family: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    for p in model.parameters():  # random biases too (gpt-oss initialises them to zero)
        p.data.normal_(0, 0.2)
    return model


def randomize_adapters(model) -> None:
    g = torch.Generator().manual_seed(1)
    for adapter in fused_lora_layers(model).values():
        adapter.lora_B.data = torch.randn(adapter.lora_B.shape, generator=g) * 0.3


def merged_by_hand(base, adapted) -> torch.nn.Module:
    """``base`` with every adapted fused weight replaced by its LoRA-merged value, expert by expert."""
    ref = copy.deepcopy(base)
    for name, adapter in fused_lora_layers(adapted).items():
        weight = ref.get_parameter(name)
        for e in range(weight.shape[0]):
            delta = adapter.scaling * (adapter.lora_B[e].detach() @ adapter.lora_A[e].detach())
            weight.data[e] += delta.T if adapter.transposed else delta
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_lora_equals_the_hand_merged_weights(family):
    base = tiny(family)
    model = copy.deepcopy(base)
    names = apply(model, None, target_parameters=FUSED, rank=4, alpha=8)
    assert names == [n for n, p in base.named_parameters() if n.endswith(tuple(FUSED))]
    assert not mixture_layers(model)
    ids = torch.randint(0, 96, (2, 7))
    # B = 0 at init: the model is unchanged, bit for bit.
    assert torch.equal(model(ids).logits, base(ids).logits)
    randomize_adapters(model)
    ref = merged_by_hand(base, model)
    out, want = model(ids).logits, ref(ids).logits
    assert not torch.allclose(out, base(ids).logits, atol=1e-3)  # the adapters do act
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    # only the LoRA tensors train
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fused_lora_gradients_match_a_per_expert_reference(family):
    base = tiny(family)
    model = copy.deepcopy(base)
    apply(model, None, target_parameters=FUSED, rank=3)
    randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 6))
    model(ids).logits.square().mean().backward()
    for name, adapter in fused_lora_layers(model).items():
        a = adapter.lora_A.detach().clone().requires_grad_(True)
        b = adapter.lora_B.detach().clone().requires_grad_(True)
        w0 = base.get_parameter(name).detach()
        deltas = [adapter.scaling * (b[e] @ a[e]) for e in range(w0.shape[0])]
        weight = w0 + torch.stack([d.T if adapter.transposed else d for d in deltas])
        # every other adapted weight enters as merged constants
        others = {n: p.detach() for n, p in merged_by_hand(base, model).named_parameters()}
        others[name] = weight
        logits = torch.func.functional_call(base, others, (ids,)).logits
        logits.square().mean().backward()
        torch.testing.assert_close(adapter.lora_A.grad, a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(adapter.lora_B.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm", "moelab"])
def test_fused_lora_runs_under_every_experts_implementation(impl):
    if impl == "moelab":
        from moelab.integrations.hf import register_experts_implementation

        register_experts_implementation()
    base = tiny("qwen2_moe")
    model = copy.deepcopy(base)
    apply(model, ["q_proj"], target_parameters=FUSED, rank=2, num_experts=2)
    randomize_adapters(model)
    ids = torch.randint(0, 96, (1, 5))
    eager = model(ids).logits
    model.set_experts_implementation(impl)
    torch.testing.assert_close(model(ids).logits, eager, rtol=1e-4, atol=1e-5)


def test_remove_restores_the_parameter_objects_bit_exactly():
    model = tiny("gpt_oss")
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in params.items()}
    apply(model, ["q_proj"], target_parameters=FUSED, rank=2)
    assert mixture_config(model)["wrapped_parameters"] == [n for n in params if n.endswith(tuple(FUSED))]
    assert all(isinstance(a, FusedExpertLoRA) and a.transposed for a in fused_lora_layers(model).values())
    randomize_adapters(model)
    model(torch.randint(0, 96, (1, 4))).logits.sum().backward()
    remove(model)
    assert not fused_lora_layers(model) and not mixture_layers(model)
    assert all(model.get_parameter(n) is p for n, p in params.items())
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert set(model.state_dict()) == set(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_fused_targets_bad_input():
    model = tiny("mixtral")
    with pytest.raises(ValueError, match="pass those in target_parameters"):
        apply(model, ["gate_up_proj"])
    with pytest.raises(ValueError, match="target_parameters .* match no parameter.*gate_up_proj"):
        apply(model, None, target_parameters=["experts.up_proj"])
    with pytest.raises(ValueError, match="only fused 3-D expert parameters"):
        apply(model, None, target_parameters=["q_proj.weight"])
    with pytest.raises(ValueError, match="dropout must be 0"):
        apply(model, None, target_parameters=FUSED, dropout=0.1)
    with pytest.raises(ValueError, match="both are None"):
        apply(model, None)
    with pytest.raises(TypeError, match="target_parameters must be"):
        apply(model, None, target_parameters=3)
    assert not fused_lora_layers(model)
    apply(model, None, target_parameters=FUSED)
    with pytest.raises(ValueError, match="already has"):
        apply(model, None, target_parameters=FUSED)


def test_fused_mixture_saves_and_reloads_bit_exactly(tmp_path):
    pytest.importorskip("peft")
    from moelab.integrations.peft import load_mixture, save_mixture

    base = tiny("qwen2_moe")
    model = copy.deepcopy(base)
    apply(model, ["q_proj"], target_parameters=FUSED, rank=2, num_experts=2, method="mole")
    randomize_adapters(model)
    ids = torch.randint(0, 96, (2, 5))
    want = model(ids).logits
    save_mixture(model, tmp_path / "mix")
    assert (tmp_path / "mix" / "expert_parameters.safetensors").is_file()
    fresh = copy.deepcopy(base)
    load_mixture(fresh, tmp_path / "mix")
    assert torch.equal(fresh(ids).logits, want)
    # fused only: no expert folders
    only = copy.deepcopy(base)
    apply(only, None, target_parameters=FUSED, rank=2)
    randomize_adapters(only)
    save_mixture(only, tmp_path / "fused")
    again = copy.deepcopy(base)
    load_mixture(again, tmp_path / "fused")
    assert torch.equal(again(ids).logits, only(ids).logits)
