"""``load_smollm2``'s converted-model cache holds exactly the GGUF's weights: every tensor equals the
GGUF tensor de-quantised by the ``gguf`` package itself (the query and key projections after
llama.cpp's head permutation is undone, written plainly here), and a cached load reads no GGUF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from moelab.integrations.hf import loading  # noqa: E402

LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip


def hf_name(gguf_name: str) -> str:
    base = gguf_name.removesuffix(".weight")
    if base == "token_embd":
        return "model.embed_tokens.weight"
    if base == "output_norm":
        return "model.norm.weight"
    _, layer, kind = base.split(".")
    return f"model.layers.{layer}.{LAYER_NAMES[kind]}.weight"


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores the q/k rows of each head interleaved, as (pairs, 2); transformers' layout
    is (2, pairs), the two rotary halves: swap the two axes back."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_cached_smollm2_equals_the_gguf_tensors(monkeypatch):
    d = loading.smollm2_dir()
    if d is None:
        pytest.skip(f"SmolLM2-135M weights not installed: {loading.SMOLLM2_INSTALL}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loading.load_smollm2(tokenizer=False)  # converts into the cache unless an earlier test did
    folder = loading.smollm2_cache_folder()
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            calls.append(kwargs.get("gguf_file"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    model, tok = loading.load_smollm2()
    assert calls == [None, None]  # both read from the cache folder
    assert tok("def fibonacci(n):", add_special_tokens=False)["input_ids"] == [1604, 3987, 46477, 24, 94, 727]

    cfg = model.config
    state = model.state_dict()
    reader = gguf.GGUFReader(str(d / loading.SMOLLM2_GGUF))
    seen = set()
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        name = hf_name(t.name)
        if ".attn_q." in t.name:
            w = unpermute(w, cfg.num_attention_heads)
        elif ".attn_k." in t.name:
            w = unpermute(w, cfg.num_key_value_heads)
        assert torch.equal(torch.from_numpy(w.copy()).reshape(state[name].shape), state[name]), t.name
        seen.add(name)
    assert seen | {"lm_head.weight"} == set(state)  # lm_head is tied to the embeddings
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
