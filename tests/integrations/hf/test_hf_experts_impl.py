"""``model.set_experts_implementation("moelab")`` on every family: same logits, same gradients, weights shared."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import FAMILIES, tiny_ids, tiny_model  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402

import moelab.hf as mh  # noqa: E402


def _experts_modules(model):
    return [block.experts for _, block, _ in mh.find_blocks(model)]


def test_registered_on_import():
    assert "moelab" in ALL_EXPERTS_FUNCTIONS.valid_keys()


@pytest.mark.parametrize("family", FAMILIES)
def test_moelab_experts_implementation_matches_eager(family):
    model = tiny_model(family)
    ids = tiny_ids()
    loss_ref = model(ids, labels=ids).loss
    loss_ref.backward()
    grads_ref = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        logits_ref = model(ids).logits

    model.set_experts_implementation("moelab")
    assert model.config._experts_implementation == "moelab"
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=0)

    # moelab really ran: each experts module holds its cached bank, a view of its own parameters.
    for experts in _experts_modules(model):
        bank = experts.__dict__.get("_moelab_bank")
        assert bank is not None
        assert bank.w_in is experts.gate_up_proj and bank.down_proj is experts.down_proj
        assert mh.bank_for(experts) is bank  # cached, not rebuilt
        assert "_moelab_bank" not in dict(experts.named_modules())
    assert not any("_moelab_bank" in k for k in model.state_dict())

    loss = model(ids, labels=ids).loss
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), atol=1e-5, rtol=0)
    loss.backward()
    for p in model.parameters():
        if id(p) in grads_ref:
            torch.testing.assert_close(p.grad, grads_ref[id(p)], atol=1e-5, rtol=1e-4)


def test_pinned_backend_registration_and_cache_rebuild():
    mh.register_experts_implementation("moelab_reference", "reference")
    model = tiny_model("mixtral")
    ids = tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
        model.set_experts_implementation("moelab_reference")
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
        experts = _experts_modules(model)[0]
        old = mh.bank_for(experts)
        experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().clone())
        assert mh.bank_for(experts) is not old
        assert mh.bank_for(experts).down_proj is experts.down_proj


def test_unsupported_layout_is_a_clear_error():
    model = tiny_model("olmoe")
    experts = _experts_modules(model)[0]
    experts.has_post_expert_norm = True
    with pytest.raises(ValueError, match="post-expert norm"):
        mh.bank_for(experts)
    with pytest.raises(ValueError, match="non-empty str"):
        mh.register_experts_implementation("")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        mh.register_experts_implementation("moelab_nope", "nope")
