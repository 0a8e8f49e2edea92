"""KV-cached attention and ``moelab.generate`` against their references: the fast causal path,
a full recompute per token, and an explicit softmax attention written plainly."""

from __future__ import annotations

import math

import pytest
import torch

import moelab
from moelab.core.context import RoutingContext, Session
from moelab.models import MoELM, MoELMConfig
from moelab.models.blocks import Attention, KVCache, rope_tables
from moelab.models.generate import sample_next


def _tiny(**kw):
    base = dict(d_model=32, n_layers=3, n_heads=2, max_seq_len=64, num_experts=4, top_k=2, moe_every=2)
    return MoELM(MoELMConfig(**{**base, **kw}))


def _plain_attention(att: Attention, x, rope, pos):
    """Softmax attention over keys at positions <= the query's, one row at a time (the definition)."""
    b, s, d = x.shape
    h, hd = att.n_heads, att.head_dim
    q, k, v = att.qkv(x).view(b, s, 3, h, hd).permute(2, 0, 3, 1, 4)
    cos, sin = rope

    def rot(t, p):
        c, sn = cos[p], sin[p]
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return torch.cat((t1 * c - t2 * sn, t1 * sn + t2 * c), -1)

    out = torch.zeros(b, h, s, hd)
    for bi in range(b):
        qs = rot(q[bi], pos[bi])  # [H, S, hd]: cos[pos] is [S, hd/2]
        ks = rot(k[bi], pos[bi])
        for i in range(s):
            allowed = pos[bi] <= pos[bi, i]
            sc = (qs[:, i : i + 1] @ ks[:, allowed].transpose(-1, -2)) / math.sqrt(hd)
            out[bi, :, i] = (sc.softmax(-1) @ v[bi][:, allowed]).squeeze(1)
    return att.out(out.transpose(1, 2).reshape(b, s, d))


def test_attention_at_gathered_positions_matches_plain_softmax():
    torch.manual_seed(0)
    att = Attention(16, 2)
    rope = rope_tables(8, 64, 10000.0)
    x = torch.randn(2, 5, 16)
    pos = torch.tensor([[0, 3, 4, 9, 20], [1, 2, 5, 6, 7]])
    want = _plain_attention(att, x, rope, pos)
    torch.testing.assert_close(att(x, rope, positions=pos), want, atol=1e-5, rtol=1e-5)
    # the masked path (validity given) agrees with the fast path
    torch.testing.assert_close(
        att(x, rope, positions=pos, valid=torch.ones(2, 5, dtype=torch.bool)), want, atol=1e-5, rtol=1e-5
    )


def test_cached_attention_equals_full_and_ignores_invalid_keys():
    torch.manual_seed(1)
    att = Attention(16, 2)
    rope = rope_tables(8, 64, 10000.0)
    x = torch.randn(1, 7, 16)
    full = att(x, rope)
    cache = KVCache()
    steps = [att(x[:, :4], rope, cache=cache)] + [
        att(x[:, i : i + 1], rope, cache=cache) for i in range(4, 7)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert len(cache) == 7
    # a key stored invalid is invisible: same result as never storing it
    c1, c2 = KVCache(), KVCache()
    att(x[:, :3], rope, cache=c1)
    att(x[:, 3:4], rope, positions=torch.tensor([[3]]), valid=torch.tensor([[False]]), cache=c1)
    a = att(x[:, 4:5], rope, positions=torch.tensor([[4]]), cache=c1)
    att(x[:, :3], rope, cache=c2)
    b = att(x[:, 4:5], rope, positions=torch.tensor([[4]]), cache=c2)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("router", ["topk", "sigmoid_topk", "sinkhorn", "soft"])
def test_cached_greedy_equals_uncached(router):
    torch.manual_seed(2)
    m = _tiny(router=router).eval()
    ids = torch.randint(0, 256, (2, 6))
    a = moelab.generate(m, ids, 10)
    b = moelab.generate(m, ids, 10, use_cache=False)
    if router == "soft":  # Soft MoE mixes tokens of a sequence: not causal, only shapes agree
        assert a.shape == b.shape
    else:
        assert torch.equal(a, b)


def test_uncached_equals_step_by_step_argmax():
    torch.manual_seed(3)
    m = _tiny(moe_every=10).eval()
    ids = torch.randint(0, 256, (1, 4))
    out = moelab.generate(m, ids, 5, use_cache=False)
    ref = ids
    with torch.no_grad():
        for _ in range(5):
            ref = torch.cat((ref, m(ref).logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ref)


def test_session_offsets_positions_and_logits_match_full_forward():
    torch.manual_seed(4)
    m = _tiny().eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        full = m(ids).logits
        s = Session()
        parts = [m(ids[:, :5], ctx=RoutingContext(session=s)).logits]
        parts += [m(ids[:, i : i + 1], ctx=RoutingContext(session=s)).logits for i in range(5, 9)]
    assert s.num_seen_tokens == 9
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(5)
    m = _tiny(moe_every=10)
    ids = torch.randint(0, 256, (2, 3))
    a = moelab.generate(m, ids, 6, do_sample=True, top_k=5, seed=7)
    b = moelab.generate(m, ids, 6, do_sample=True, top_k=5, seed=7)
    assert torch.equal(a, b)
    assert m.training  # restored
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, do_sample=True, top_k=2, generator=g)) for _ in range(50)}
    assert draws <= {1, 2}
    draws = {int(sample_next(logits, do_sample=True, top_p=0.5, generator=g)) for _ in range(50)}
    assert draws == {1}


def test_eos_pads_and_stops():
    torch.manual_seed(6)
    m = _tiny(moe_every=10).eval()
    ids = torch.randint(0, 256, (1, 3))
    first = int(moelab.generate(m, ids, 1)[0, -1])
    out = moelab.generate(m, ids, 8, eos_token_id=first)
    assert out.shape == (1, 4) and int(out[0, -1]) == first


@pytest.mark.parametrize(
    "kwargs, err",
    [
        ({"max_new_tokens": -1}, ValueError),
        ({"max_new_tokens": 100}, ValueError),
        ({"temperature": 0.0}, ValueError),
        ({"top_p": 1.5}, ValueError),
        ({"top_k": 0}, ValueError),
    ],
)
def test_generate_bad_arguments(kwargs, err):
    m = _tiny(moe_every=10)
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(err):
        moelab.generate(m, torch.zeros(1, 2, dtype=torch.long), **args)
    with pytest.raises(ValueError, match="input_ids"):
        moelab.generate(m, torch.zeros(2), 2)


def test_session_past_max_seq_len_is_refused():
    m = _tiny(moe_every=10, max_seq_len=8).eval()
    s = Session()
    m(torch.zeros(1, 6, dtype=torch.long), ctx=RoutingContext(session=s))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 3, dtype=torch.long), ctx=RoutingContext(session=s))


@pytest.mark.parametrize("key_conv", [None, 3])
def test_moba_attention_in_moelm_generates_like_a_full_recompute(key_conv):
    torch.manual_seed(7)
    kw = {"block_size": 4, "top_k": 2, **({"key_conv": key_conv} if key_conv else {})}
    m = _tiny(moe_every=99, attention="moba", attention_kwargs=kw)
    if key_conv:  # a convolution that is not the identity, so the cached raw-key tail matters
        for blk in m.blocks:
            blk.attn.moba.key_conv.weight.data.normal_()
    m.eval()
    ids = torch.randint(0, 256, (2, 9))
    assert torch.equal(moelab.generate(m, ids, 11), moelab.generate(m, ids, 11, use_cache=False))


def test_moba_with_every_block_selected_is_dense_attention():
    torch.manual_seed(8)
    dense = _tiny(moe_every=99).eval()
    moba = _tiny(moe_every=99, attention="moba", attention_kwargs={"block_size": 4, "top_k": 16}).eval()
    moba.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(moba(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="depth router"):
        MoELMConfig(attention="moba", depth="mod")
