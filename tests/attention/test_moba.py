"""MoBA (``moelab.attention.moba``): gate, reference, efficient paths, key convolution, decoding, routing.

Independent references: a per-query loop for the gate, ``scaled_dot_product_attention`` (causal, and
with a block-diagonal mask), a plain per-position loop for the key convolution, and the dense masked
reference for the efficient paths (forward and q/k/v gradients, fp64).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from alloc_tracker import AllocationTracker

import moelab.attention.moba as moba_module
from moelab import registry
from moelab.attention.moba import (
    KeyConv,
    MoBAAttention,
    causal_key_conv,
    moba_attention,
    moba_attention_reference,
    moba_block_means,
    moba_decode,
    moba_gate,
    moba_routing,
)

# (B, H, H_kv, S, Dh, block_size, top_k): S a multiple of the block, S not a multiple, S < block,
# grouped-query heads, many small blocks, top_k above the number of blocks.
SHAPES = [
    (2, 2, 2, 32, 8, 8, 2),
    (2, 2, 2, 37, 8, 8, 3),
    (1, 2, 2, 5, 8, 8, 2),
    (1, 4, 2, 64, 16, 16, 2),
    (2, 3, 3, 50, 8, 4, 5),
    (1, 2, 1, 23, 4, 7, 100),
]


@pytest.fixture(params=["flash", "math"])
def path(request, monkeypatch):
    """Both efficient paths: ATen's CPU flash kernels and the batched-matmul fallback."""
    if request.param == "flash" and not moba_module._USE_CPU_FLASH:
        pytest.skip("this torch lacks ATen's CPU flash-attention ops")
    monkeypatch.setattr(moba_module, "_USE_CPU_FLASH", request.param == "flash")
    return request.param


def qkv(b, h, h_kv, s, d, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv, s, d, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv, s, d, generator=g, dtype=dtype)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def dense_masked_attention(q, k, v, mask):
    """Plain attention with an explicit ``[.., S_q, S]`` boolean mask (True = attend), in q's dtype."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


# ---------------------------------------------------------------------------- gate
def brute_force_gate(q, k, block_size, top_k):
    """One query at a time: own block, then the best past blocks by q . mean (ties: later first)."""
    b, h, s_q, _ = q.shape
    s = k.shape[2]
    nb = -(-s // block_size)
    group = h // k.shape[1]
    out = torch.zeros(b, h, s_q, nb, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            keys = k[bi, hi // group]
            for t in range(s_q):
                own = (s - s_q + t) // block_size
                scored = []
                for j in range(own):
                    mean = keys[j * block_size : (j + 1) * block_size].mean(0)
                    scored.append((float(q[bi, hi, t] @ mean), j))
                scored.sort(key=lambda sj: (sj[0], sj[1]), reverse=True)
                out[bi, hi, t, own] = True
                for _, j in scored[: top_k - 1]:
                    out[bi, hi, t, j] = True
    return out


@pytest.mark.parametrize("shape", [(2, 2, 2, 37, 4, 8, 3), (1, 4, 2, 40, 4, 5, 4), (1, 1, 1, 6, 4, 8, 2)])
@pytest.mark.parametrize("s_q", [None, 1, 9])
def test_gate_matches_a_per_query_loop(shape, s_q):
    b, h, h_kv, s, d, bs, top_k = shape
    q, k, _ = qkv(b, h, h_kv, s, d)
    q = q if s_q is None else q[:, :, -min(s_q, s) :]  # decoding: the last positions
    assert torch.equal(moba_gate(q, k, bs, top_k), brute_force_gate(q, k, bs, top_k))


def test_gate_structure():
    b, h, s, bs, top_k = 2, 3, 45, 4, 3
    q, k, _ = qkv(b, h, h, s, 8)
    sel = moba_gate(q, k, bs, top_k)
    own = torch.arange(s) // bs
    assert sel.shape == (b, h, s, -(-s // bs))
    assert sel[:, :, torch.arange(s), own].all()  # the own block always
    future = torch.arange(sel.shape[-1])[None, :] > own[:, None]
    assert not sel[..., future].any()  # never a future block
    assert torch.equal(sel.sum(-1), torch.clamp(own + 1, max=top_k).expand(b, h, s))  # exactly top_k


def test_gate_ties_keep_exactly_top_k_latest_first():
    q, k, _ = qkv(1, 1, 1, 40, 4)
    k = torch.zeros_like(k)  # every block mean is 0: all past blocks tie
    sel = moba_gate(q, k, 4, 3)
    t = 37  # own block 9: ties resolved to the two latest past blocks, 8 and 7
    assert sel[0, 0, t].nonzero().flatten().tolist() == [7, 8, 9]
    assert torch.equal(sel.sum(-1)[0, 0], torch.clamp(torch.arange(40) // 4 + 1, max=3))


def test_block_means_partial_last_block():
    k = torch.arange(10, dtype=torch.float64).view(1, 1, 10, 1)
    assert moba_block_means(k, 4).flatten().tolist() == [1.5, 5.5, 8.5]  # last: mean of 8, 9


# ---------------------------------------------------------------------------- reference semantics
@pytest.mark.parametrize("shape", SHAPES)
def test_all_blocks_equals_causal_sdpa(shape, path):
    b, h, h_kv, s, d, bs, _ = shape
    q, k, v = qkv(b, h, h_kv, s, d)
    top_k = -(-s // bs)  # every block
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(h // h_kv, 1), v.repeat_interleave(h // h_kv, 1), is_causal=True
    )
    torch.testing.assert_close(moba_attention_reference(q, k, v, bs, top_k), expected)
    torch.testing.assert_close(moba_attention(q, k, v, bs, top_k), expected)
    torch.testing.assert_close(moba_attention(q, k, v, bs, top_k + 5), expected)


@pytest.mark.parametrize("shape", SHAPES)
def test_top1_equals_block_diagonal_causal_attention(shape, path):
    b, h, h_kv, s, d, bs, _ = shape
    q, k, v = qkv(b, h, h_kv, s, d)
    pos = torch.arange(s)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] // bs == pos[:, None] // bs)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(h // h_kv, 1), v.repeat_interleave(h // h_kv, 1), attn_mask=mask
    )
    torch.testing.assert_close(moba_attention_reference(q, k, v, bs, 1), expected)
    torch.testing.assert_close(moba_attention(q, k, v, bs, 1), expected)


def test_reference_is_the_gate_mask_applied_plainly():
    q, k, v = qkv(2, 2, 1, 30, 8)
    sel = moba_gate(q, k, 4, 3)
    mask = sel.repeat_interleave(4, -1)[..., :30] & torch.ones(30, 30, dtype=torch.bool).tril()
    torch.testing.assert_close(moba_attention_reference(q, k, v, 4, 3), dense_masked_attention(q, k, v, mask))


# ---------------------------------------------------------------------------- efficient == reference
@pytest.mark.parametrize("shape", SHAPES)
def test_efficient_matches_reference_forward_and_backward(shape, path):
    b, h, h_kv, s, d, bs, top_k = shape
    q, k, v = qkv(b, h, h_kv, s, d, grad=True, seed=1)
    out = moba_attention(q, k, v, bs, top_k, backend="torch")
    ref = moba_attention_reference(q, k, v, bs, top_k)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, e in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_efficient_low_precision(dtype, tol, path):
    q, k, v = qkv(2, 4, 2, 70, 16, dtype=torch.float32, seed=2)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = moba_attention(q, k, v, 16, 3)
    assert out.dtype == dtype
    ref = moba_attention_reference(*(t.detach().float() for t in (q, k, v)), 16, 3)
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == dtype and t.grad.isfinite().all() for t in (q, k, v))


def test_scale_and_backend_reference():
    q, k, v = qkv(1, 2, 2, 20, 8)
    for backend in ("torch", "reference", "auto"):
        torch.testing.assert_close(
            moba_attention(q, k, v, 4, 2, scale=0.3, backend=backend),
            moba_attention_reference(q, k, v, 4, 2, scale=0.3),
        )


def test_module_and_registry():
    info = registry.get("attention", "moba")
    assert info.obj is MoBAAttention
    q, k, v = qkv(1, 4, 2, 33, 8, grad=True)
    layer = MoBAAttention(block_size=8, top_k=2, key_conv_size=3, num_kv_heads=2, head_dim=8)
    torch.testing.assert_close(layer(q, k, v), moba_attention(q, k, v, 8, 2).to(layer(q, k, v).dtype))
    layer.double()(q, k, v).sum().backward()
    assert layer.key_conv.weight.grad is not None and layer.key_conv.weight.grad.abs().sum() > 0
    assert layer.routing(q, k).num_experts == 5


# ---------------------------------------------------------------------------- key convolution
def conv_loop(k, weight):
    """out[t] = sum_d weight[..., K-1-d] * k[t-d] (zeros before the start), one position at a time."""
    size = weight.shape[-1]
    out = torch.zeros_like(k)
    for t in range(k.shape[2]):
        for back in range(size):
            if t - back >= 0:
                out[:, :, t] += weight[None, :, :, size - 1 - back] * k[:, :, t - back]
    return out


@pytest.mark.parametrize("size", [1, 3, 5])
def test_causal_key_conv_matches_a_loop_and_prefix(size):
    _, k, _ = qkv(2, 3, 3, 13, 4)
    weight = torch.randn(3, 4, size, dtype=torch.float64)
    full = causal_key_conv(k, weight)
    torch.testing.assert_close(full, conv_loop(k, weight))
    if size > 1:  # the tail convolved with the raw keys before it as prefix equals the full tail
        tail = causal_key_conv(k[:, :, 8:], weight, prefix=k[:, :, 8 - (size - 1) : 8])
        torch.testing.assert_close(tail, full[:, :, 8:])


def test_key_conv_identity_init_is_plain_moba(path):
    q, k, v = qkv(1, 2, 2, 30, 8)
    conv = KeyConv(2, 8, 5).double()
    torch.testing.assert_close(conv(k), k)
    torch.testing.assert_close(moba_attention(q, k, v, 4, 3, key_conv=conv), moba_attention(q, k, v, 4, 3))


def test_key_conv_in_attention_forward_and_backward(path):
    q, k, v = qkv(1, 4, 2, 29, 8, grad=True, seed=3)
    weight = torch.randn(2, 8, 3, dtype=torch.float64, requires_grad=True)
    out = moba_attention(q, k, v, 4, 3, key_conv=weight)
    ref = moba_attention_reference(q, k, v, 4, 3, key_conv=weight)
    torch.testing.assert_close(out, ref)
    # The convolution is applied before the gate: same as attending over convolved keys.
    torch.testing.assert_close(out, moba_attention_reference(q, conv_loop(k, weight), v, 4, 3))
    got = torch.autograd.grad(out.sum(), (q, k, v, weight))
    want = torch.autograd.grad(ref.sum(), (q, k, v, weight))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


# ---------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("shape", [(1, 2, 2, 37, 8, 8, 3), (2, 4, 2, 40, 8, 4, 4), (1, 1, 1, 5, 4, 8, 2)])
@pytest.mark.parametrize("t_new", [1, 3, 9])
def test_cached_decode_equals_full_recompute(shape, t_new, path):
    b, h, h_kv, s, d, bs, top_k = shape
    q, k, v = qkv(b, h, h_kv, s, d, seed=4)
    t_new = min(t_new, s)
    full = moba_attention(q, k, v, bs, top_k)
    new = moba_decode(q[:, :, -t_new:], k, v, bs, top_k)
    torch.testing.assert_close(new, full[:, :, -t_new:])


def test_token_by_token_decode_with_key_conv(path):
    """Prefill 10 tokens, then decode one at a time across block boundaries, the cache holding
    convolved keys and the caller the last kernel_size - 1 raw keys."""
    b, h, h_kv, s, d, bs, top_k, size = 1, 4, 2, 27, 8, 4, 3, 3
    q, k_raw, v = qkv(b, h, h_kv, s, d, seed=5)
    weight = torch.randn(h_kv, d, size, dtype=torch.float64)
    full = moba_attention(q, k_raw, v, bs, top_k, key_conv=weight)
    prefill = 10
    k_cache = causal_key_conv(k_raw[:, :, :prefill], weight)
    raw_tail = k_raw[:, :, prefill - (size - 1) : prefill]
    for t in range(prefill, s):
        k_new = causal_key_conv(k_raw[:, :, t : t + 1], weight, prefix=raw_tail)
        raw_tail = torch.cat([raw_tail, k_raw[:, :, t : t + 1]], 2)[:, :, -(size - 1) :]
        k_cache = torch.cat([k_cache, k_new], 2)
        out = moba_decode(q[:, :, t : t + 1], k_cache, v[:, :, : t + 1], bs, top_k)
        torch.testing.assert_close(out, full[:, :, t : t + 1])


# ---------------------------------------------------------------------------- memory
def test_efficient_path_memory_is_linear(monkeypatch, path):
    """No S x S tensor, and the peak grows ~linearly: 2x at twice the length (S^2 would give 4x)."""
    monkeypatch.setattr(moba_module, "_GATE_CHUNK_ELEMENTS", 1 << 14)
    monkeypatch.setattr(moba_module, "_SCORE_CHUNK_ELEMENTS", 1 << 14)
    peaks = []
    for s in (1024, 2048):
        q, k, v = qkv(1, 2, 2, s, 16, dtype=torch.float32, seed=6, grad=True)
        with AllocationTracker() as tracker:
            moba_attention(q, k, v, 32, 3).sum().backward()
        assert max(torch.Size(shape).numel() for shape in tracker.shapes) < s * s // 8
        peaks.append(tracker.peak())
    assert peaks[1] < 2.6 * peaks[0], peaks


# ---------------------------------------------------------------------------- routing
def test_routing_per_token_and_per_block():
    q, k, _ = qkv(2, 2, 2, 20, 4)
    sel = moba_gate(q, k, 4, 2)
    r = moba_routing(sel)
    assert (r.num_tokens, r.num_experts, r.top_k) == (2 * 2 * 20, 5, None)  # the first block picks 1
    assert torch.equal(r.dense() > 0, sel.reshape(-1, 5))
    late = moba_routing(sel[:, :, 4:])  # every query past the first block picks exactly 2
    assert late.top_k == 2 and late.num_tokens == 2 * 2 * 16
    rb = moba_routing(sel, per="block", block_size=4)
    assert (rb.num_tokens, rb.num_experts) == (2 * 2 * 5, 5)
    share = rb.dense().view(2, 2, 5, 5)
    torch.testing.assert_close(share, sel.float().view(2, 2, 5, 4, 5).mean(3))
    assert torch.all(share.diagonal(dim1=-2, dim2=-1) == 1)  # each query block always takes itself
    layer = MoBAAttention(4, 2)
    assert torch.equal(layer.routing(q, k).dense(), r.dense())


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    q, k, v = qkv(1, 2, 2, 8, 4)
    with pytest.raises(ValueError, match="q must be"):
        moba_attention(q[0], k, v, 4, 2)
    with pytest.raises(ValueError, match="k and v"):
        moba_attention(q, k, v[:, :, :7], 4, 2)
    with pytest.raises(ValueError, match="same length"):
        moba_attention(q[:, :, :7], k, v, 4, 2)
    with pytest.raises(ValueError, match="divide"):
        moba_attention(torch.randn(1, 3, 8, 4, dtype=torch.float64), k, v, 4, 2)
    with pytest.raises(TypeError, match="dtype"):
        moba_attention(q.float(), k, v, 4, 2)
    with pytest.raises(TypeError, match="floating"):
        moba_attention(q.long(), k, v, 4, 2)
    with pytest.raises(ValueError, match="block_size"):
        moba_attention(q, k, v, 0, 2)
    with pytest.raises(TypeError, match="top_k"):
        moba_attention(q, k, v, 4, 2.0)
    with pytest.raises(ValueError, match="backend"):
        moba_attention(q, k, v, 4, 2, backend="cuda")
    with pytest.raises(ValueError, match="scale"):
        moba_attention(q, k, v, 4, 2, scale=-1.0)
    with pytest.raises(ValueError, match="key_conv weight"):
        moba_attention(q, k, v, 4, 2, key_conv=torch.ones(2, 3, 3))
    with pytest.raises(TypeError, match="key_conv"):
        moba_attention(q, k, v, 4, 2, key_conv="conv")
    with pytest.raises(ValueError, match="prefix"):
        causal_key_conv(k, torch.ones(2, 4, 3, dtype=torch.float64), prefix=k[:, :, :1])
    with pytest.raises(ValueError, match="hold the"):
        moba_decode(q, k[:, :, :4], v[:, :, :4], 4, 2)
    with pytest.raises(ValueError, match="bool"):
        moba_routing(torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match="block_size"):
        moba_routing(moba_gate(q, k, 4, 2), per="block")
    with pytest.raises(ValueError, match="num_kv_heads"):
        MoBAAttention(4, 2, key_conv_size=3)


def test_triton_backend_without_the_kernel_module_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "moelab.kernels.triton.moba", None)  # import fails
    q, k, v = qkv(1, 1, 1, 8, 4)
    with pytest.raises(ImportError, match="moelab.kernels.triton.moba"):
        moba_attention(q, k, v, 4, 2, backend="triton")


def test_strided_inputs_and_inference_mode(path):
    """transformers hands over [B, S, H, Dh] transposed views; no_grad / inference_mode run too."""
    q, k, v = qkv(1, 2, 2, 26, 8)
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    torch.testing.assert_close(moba_attention(*strided, 4, 3), moba_attention_reference(q, k, v, 4, 3))
    with torch.inference_mode():
        torch.testing.assert_close(moba_attention(q, k, v, 4, 3), moba_attention_reference(q, k, v, 4, 3))
