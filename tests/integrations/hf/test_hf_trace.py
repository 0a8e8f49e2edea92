"""moelab.hf.trace / moelab.trace on unpatched and patched transformers models."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import FAMILIES, tiny_ids, tiny_model  # noqa: E402

import moelab  # noqa: E402
import moelab.hf as mh  # noqa: E402


def _gate_outputs(model):
    """Independent capture: every router module's raw output, by block name, in call order."""
    seen, handles = {}, []
    for name, block, fam in mh.find_blocks(model):
        gate = fam.gate(block)
        handles.append(
            gate.register_forward_hook(lambda m, a, o, name=name: seen.setdefault(name, []).append(o))
        )
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatched_trace_is_the_models_routing(family):
    model = tiny_model(family)
    ids = tiny_ids(batch=2, seq=7)
    k, e = model.config.num_experts_per_tok, len(mh.find_blocks(model)[0][1].experts.down_proj)
    seen, handles = _gate_outputs(model)
    with torch.no_grad(), moelab.trace(model) as tr:  # delegates to moelab.hf.trace
        model(ids)
    for h in handles:
        h.remove()
    assert tr.layers == [n for n, _, _ in mh.find_blocks(model)]
    for name in tr.layers:
        (logits, weight, index) = seen[name][0][:3]
        r = tr.routing(name)
        assert (r.num_tokens, r.num_experts, r.top_k) == (ids.numel(), e, k)
        assert r.logits.shape == r.probs.shape == (ids.numel(), e)
        assert torch.equal(r.topk_index(), index)
        torch.testing.assert_close(r.weight.view(-1, k), weight.float(), atol=0, rtol=0)
        torch.testing.assert_close(r.logits, logits.float(), atol=0, rtol=0)
        expected_probs = torch.sigmoid(logits) if family == "deepseek_v3" else torch.softmax(logits, -1)
        torch.testing.assert_close(r.probs, expected_probs, atol=1e-6, rtol=0)
        assert torch.equal(tr.tokens(name), ids.reshape(-1))
    # hooks are gone after the block
    with torch.no_grad():
        model(ids)
    assert tr.routing(tr.layers[0]).num_tokens == ids.numel()


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_patched_and_unpatched_traces_agree(family):
    model = tiny_model(family)
    ids = tiny_ids(batch=1, seq=9)
    with torch.no_grad(), mh.trace(model) as before:
        model(ids)
    mh.patch(model)
    with torch.no_grad(), mh.trace(model) as after:
        model(ids)
    assert before.layers == after.layers
    for name in before.layers:
        a, b = before.routing(name), after.routing(name)
        # the same experts per token with the same weights (DeepSeek's unsorted top-k may order them differently)
        ia, oa = a.topk_index().sort(-1)
        ib, ob = b.topk_index().sort(-1)
        assert torch.equal(ia, ib)
        wa, wb = a.weight.view(ia.shape).gather(1, oa), b.weight.view(ib.shape).gather(1, ob)
        torch.testing.assert_close(wa, wb, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.probs, b.probs, atol=1e-6, rtol=0)
        assert torch.equal(before.tokens(name), after.tokens(name))


def test_trace_during_generation_keeps_token_ids_aligned(tmp_path):
    model = mh.patch(tiny_model("qwen3_moe"))
    ids = tiny_ids(batch=1, seq=5)
    with torch.no_grad(), moelab.trace(model) as tr:
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    name = tr.layers[0]
    # prefill (5 tokens) then one token per step; the last generated token is never fed back
    assert torch.equal(tr.tokens(name), out[0, :-1])
    tr.save(tmp_path / "trace.safetensors")
    back = moelab.Trace.load(tmp_path / "trace.safetensors")
    assert back.layers == tr.layers
    assert torch.equal(back.routing(name).expert_index, tr.routing(name).expert_index)
    assert torch.equal(back.tokens(name), tr.tokens(name))


def test_trace_bad_input():
    with pytest.raises(ValueError, match="no moelab routed layer"):
        with moelab.trace(torch.nn.Linear(3, 3)):
            pass
    with pytest.raises(ValueError, match="supported family"):
        with mh.trace(torch.nn.Linear(3, 3)):
            pass
    with pytest.raises(TypeError, match="model must be"):
        with mh.trace(None):
            pass


@pytest.mark.parametrize("patched", [False, True])
def test_trace_records_sequence_lengths(patched):
    model = tiny_model("olmoe").eval()
    if patched:
        mh.patch(model)
    with torch.no_grad(), moelab.trace(model) as tr:
        model(tiny_ids(batch=2, seq=12))
    assert all(tr.sequence_lengths(n) == [12, 12] for n in tr.layers)
