"""Expert offloading (``moelab.offload``) on patched transformers models: bitwise the in-memory
patched model's logits and ``generate`` output, for every family (gpt-oss: a bank with biases)."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_tiny import FAMILIES, tiny_ids, tiny_model

pytest.importorskip("transformers")

import moelab  # noqa: E402
import moelab.hf  # noqa: E402
from moelab.ops.offload import OffloadedExperts, budget_for, expert_nbytes  # noqa: E402


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_patched_model_equals_in_memory(family, tmp_path):
    model = moelab.hf.patch(tiny_model(family, seed=2))
    ids = tiny_ids(batch=2, seq=9, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    gen_ref = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)

    off = copy.deepcopy(model)
    storage = tmp_path if family == "gpt_oss" else "memory"  # one family through the safetensors file
    rt = moelab.offload(off, budget_for(off, 3), policy="lru", storage=storage, prefetch="router")
    banks = [m for m in off.modules() if isinstance(m, OffloadedExperts)]
    assert len(banks) == len(rt.caches) > 0
    assert not any(".experts." in n for n, _ in off.named_parameters())  # the weights left the model
    with torch.no_grad():
        got = off(ids).logits
    assert torch.equal(got, ref)
    assert torch.equal(off.generate(ids[:1, :4], max_new_tokens=6, do_sample=False), gen_ref)
    s = rt.stats()
    assert s["misses"] > 0 and s["hits"] > 0 and s["prefetched"] > 0
    assert s["bytes_read"] == (s["misses"] + s["prefetched"]) * expert_nbytes(model)
    rt.close()


def test_gpt_oss_expert_bytes_count_the_biases():
    model = moelab.hf.patch(tiny_model("gpt_oss"))
    bank = next(m for m in model.modules() if hasattr(m, "gate_up_proj_bias") and hasattr(m, "num_experts"))
    per_expert = sum(t[0].numel() * t.element_size() for t in bank.parameters())
    assert expert_nbytes(model) == per_expert
    assert per_expert > bank.gate_up_proj[0].numel() * 4 + bank.down_proj[0].numel() * 4
