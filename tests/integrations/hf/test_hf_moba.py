"""MoBA as a transformers attention backend (``register_moba``) against sdpa and against itself
without the KV cache; SmolLM2-135M offline as the slow real-model check."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import _COMMON  # noqa: E402
from smollm2 import FIBONACCI_IDS, load_smollm2  # noqa: E402

from moelab.integrations.hf.moba import register_moba  # noqa: E402


def _llama(impl: str, seed: int = 0, **over):
    import transformers as tf

    cfg = tf.LlamaConfig(**{**_COMMON, "num_key_value_heads": 2, **over})
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def test_moba_with_every_block_equals_sdpa_and_fewer_blocks_differ():
    name = register_moba(block_size=4, top_k=64, name="moba_all")
    ids = torch.randint(0, 64, (2, 23))
    dense, moba = _llama("sdpa"), _llama(name)
    with torch.no_grad():
        torch.testing.assert_close(moba(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
        sparse = _llama(register_moba(block_size=4, top_k=2, name="moba_2"))(ids).logits
    assert not torch.allclose(sparse, dense(ids).logits, atol=1e-3)


def test_cached_generation_equals_uncached():
    model = _llama(register_moba(block_size=4, top_k=2, name="moba_gen"))
    ids = torch.randint(0, 64, (2, 9))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_padding_and_bad_options_are_refused():
    model = _llama(register_moba(block_size=4, top_k=2, name="moba_pad"))
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="block_size"):
        register_moba(block_size=0)
    with pytest.raises(ValueError, match="top_k"):
        register_moba(top_k=0)


@pytest.mark.slow
def test_smollm2_generates_with_moba_offline(monkeypatch):
    model = load_smollm2(monkeypatch)
    ids = torch.tensor(FIBONACCI_IDS)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        model.set_attn_implementation(register_moba(block_size=4, top_k=64, name="moba_smol_all"))
        same = model.generate(ids, **kw)  # every block selected: dense attention
        model.set_attn_implementation(register_moba(block_size=2, top_k=2, name="moba_smol"))
        sparse = model.generate(ids, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(same, dense)
    assert sparse.shape == dense.shape and torch.equal(sparse, uncached)
