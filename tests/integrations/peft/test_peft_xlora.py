"""PEFT's X-LoRA over the same adapters as a moelab mixture: the whole model and one projection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft_tiny import logits, make_peft_lora, tiny_ids, tiny_llama  # noqa: E402

from moelab import lora  # noqa: E402
from moelab.integrations.peft import XLoRAProjection, save_mixture, xlora_model, xlora_projection  # noqa: E402


def test_xlora_model_over_saved_experts(tmp_path):
    model = tiny_llama()
    lora.apply(model, ["q_proj", "v_proj"], num_experts=3, rank=4, alpha=8, router="topk", top_k=2)
    save_mixture(model, tmp_path / "mix")
    folders = [tmp_path / "mix" / "experts" / f"expert_{i}" for i in range(3)]
    xm = xlora_model(tiny_llama(), folders, top_k_lora=2)
    ids = tiny_ids()
    out = xm(input_ids=ids).logits
    assert out.shape == (2, 7, 64) and torch.isfinite(out).all()
    trainable = [n for n, p in xm.named_parameters() if p.requires_grad]
    assert trainable and all("xlora_classifier" in n for n in trainable)
    out.sum().backward()


def test_xlora_with_one_adapter_is_that_adapter(tmp_path):
    # One adapter: the softmax weight is 1, so X-LoRA computes the plain LoRA.
    folder = make_peft_lora(tmp_path / "a", seed=3)
    ids = tiny_ids()
    want = logits(peft.PeftModel.from_pretrained(tiny_llama(), str(folder)), ids)
    got = logits(xlora_model(tiny_llama(), [folder]), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_xlora_model_refuses_non_lora_folders(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        xlora_model(tiny_llama(), [tmp_path / "x"])
    with pytest.raises(ValueError, match="non-empty list"):
        xlora_model(tiny_llama(), [])


@pytest.mark.parametrize("top_k", [None, 2])
def test_xlora_projection_matches_the_dense_mixture(top_k):
    torch.manual_seed(0)
    E, r, d_in, d_out = 4, 3, 12, 10
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    a_ERD, b_EOR = torch.randn(E, r, d_in), torch.randn(E, d_out, r)
    proj = XLoRAProjection(base, a_ERD, b_EOR, 0.5, top_k=top_k)
    x = torch.randn(2, 5, d_in, requires_grad=True)
    y = proj(x)

    # X-LoRA written plainly, per expert: W x + sum_e p_e * scaling * B_e A_e x.
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = proj.classifier.weight.detach().clone().requires_grad_(True)
    p = torch.softmax(x_ref @ w_ref.T + proj.classifier.bias.detach(), -1)
    if top_k is not None:
        keep = torch.zeros_like(p).scatter(-1, p.topk(top_k, -1).indices, 1.0)
        p = p * keep
    want = base(x_ref)
    for e in range(E):
        want = want + p[..., e : e + 1] * 0.5 * (x_ref @ a_ERD[e].T) @ b_EOR[e].T
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)

    g = torch.randn_like(y)
    (y * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj.classifier.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
    assert proj(x.reshape(10, d_in)).shape == (10, d_out)


def test_xlora_projection_of_a_mixture_layer():
    model = tiny_llama()
    lora.apply(model, ["up_proj"], num_experts=2, rank=4, alpha=8, router="topk", top_k=1)
    layer = lora.mixture_layers(model)["model.layers.0.mlp.up_proj"]
    proj = xlora_projection(layer)
    x = torch.randn(6, 32)
    assert proj(x).shape == (6, 48)
    assert proj.lora.base_layer is layer.base  # shared, not copied
    with pytest.raises(TypeError, match="mixture layer"):
        xlora_projection(nn.Linear(3, 3))
