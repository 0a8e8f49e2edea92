"""ClampedSwiGLUExpertBank (gpt-oss experts) against transformers' own GptOssExperts, every backend."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import tiny_model  # noqa: E402

import moelab.hf as mh  # noqa: E402
from moelab.core import Routing  # noqa: E402
from moelab.ops import get_executor, resolve_executor  # noqa: E402


def _gpt_oss_experts():
    model = tiny_model("gpt_oss")
    return model.model.layers[0].mlp.experts


@pytest.mark.parametrize("backend", ["reference", "sorted"])
@pytest.mark.parametrize("num_tokens", [0, 1, 9])
def test_bank_equals_transformers_experts(backend, num_tokens):
    experts = _gpt_oss_experts()
    bank = mh.ClampedSwiGLUExpertBank.from_module(experts)
    e, k = bank.num_experts, 2
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, bank.d_model, generator=g, requires_grad=True)
    # experts 0..2 only: the others get no token (empty groups)
    index = torch.argsort(torch.rand(num_tokens, 3, generator=g), dim=-1)[:, :k]
    weight = torch.rand(num_tokens, k, generator=g, requires_grad=True)
    ref = experts(x, index, weight)  # transformers' eager loop
    y = get_executor(backend)(x, Routing.from_topk(index, weight, e), bank)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    if num_tokens:
        gy = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, weight, experts.gate_up_proj, experts.down_proj_bias), gy)
        grads_ref = torch.autograd.grad(ref, (x, weight, experts.gate_up_proj, experts.down_proj_bias), gy)
        for a, b in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bank_shares_parameters_and_rejects_fused_backends():
    experts = _gpt_oss_experts()
    bank = mh.ClampedSwiGLUExpertBank.from_module(experts)
    for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"):
        assert getattr(bank, name) is getattr(experts, name)
    # Backends that read weights directly must not take this layout; "auto" falls back to one that calls the bank.
    assert resolve_executor("auto", torch.device("cpu"), bank).name in ("sorted", "reference")
    with pytest.raises(ValueError, match="must have shape"):
        mh.ClampedSwiGLUExpertBank(
            experts.gate_up_proj,
            experts.gate_up_proj_bias[:, :-2],
            experts.down_proj,
            experts.down_proj_bias,
            alpha=1.0,
            limit=1.0,
        )
