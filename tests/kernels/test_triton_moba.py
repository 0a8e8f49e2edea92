"""MoBA's Triton kernels under Triton's interpreter, against a plain dense reference.

The reference is the definition written out: a per-query loop picks the blocks (own block plus the
``top_k - 1`` best past blocks by ``q . mean(K_j)``, ties to the later block), builds an explicit
``[S, S]`` mask, and runs dense softmax attention in float64. Forward and the q/k/v gradients of
``moba_attention_triton`` must match it; ``top_k >= n`` must equal causal
``scaled_dot_product_attention`` and ``top_k = 1`` block-diagonal causal attention.

``TRITON_INTERPRET=1`` must be set before ``triton`` is first imported: as in ``test_triton.py``,
this file runs in-process when it can and otherwise re-runs itself in a fresh interpreter
(``test_interpreter_subprocess``). Triton comes with the ``[gpu]`` extra: the tests skip only where
it is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'moelab[gpu]')", allow_module_level=True)


def _import_interpreted():
    """Import Triton and the MoBA kernels with the interpreter on; None if Triton is already compiled mode."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl_standard.sigmoid, InterpretedFunction) or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import moelab.kernels.triton.moba as moba

    if not moba.INTERPRET:  # imported before under a different setting: decorate again
        moba = importlib.reload(moba)
    return moba


M = _import_interpreted()
IN_PROCESS = M is not None
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS,
    reason="Triton was imported before the interpreter could be enabled: see the subprocess test",
)

from moelab.kernels.triton.moba import moba_attention_triton, moba_token_selection  # noqa: E402

pytestmark = pytest.mark.triton


# ---------------------------------------------------------------------------- plain reference
def reference_mask(q, k, block_size, top_k):
    """``[B, H, S, S]`` bool: query t may attend key s, by a loop over queries (the definition)."""
    b_, h_, s_, _ = q.shape
    n = math.ceil(s_ / block_size)
    mask = torch.zeros(b_, h_, s_, s_, dtype=torch.bool)
    for b in range(b_):
        for h in range(h_):
            means = [k[b, h, j * block_size : min(s_, (j + 1) * block_size)].mean(0) for j in range(n)]
            for t in range(s_):
                own = t // block_size
                scores = {j: float(q[b, h, t] @ means[j]) for j in range(own)}
                past = sorted(range(own), key=lambda j: (-scores[j], -j))  # ties: later block first
                for j in past[: top_k - 1]:
                    mask[b, h, t, j * block_size : (j + 1) * block_size] = True
                mask[b, h, t, own * block_size : t + 1] = True  # own block, causal
    return mask


def reference_attention(q, k, v, block_size, top_k, scale=None):
    """Dense softmax attention under ``reference_mask``, in float64 (gate on detached values)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    mask = reference_mask(q64.detach(), k64.detach(), block_size, top_k)
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v64


# ---------------------------------------------------------------------------- comparison
def qkv(b, h, s, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(3)]


def run(fn, q, k, v, gy, *args, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    y = fn(*leaves, *args, **kwargs)
    grads = torch.autograd.grad(y, leaves, gy.to(y.dtype))
    return y.detach(), grads


def assert_matches_reference(q, k, v, block_size, top_k, *, scale=None, atol=2e-5, rtol=1e-4, seed=0):
    gy = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 7))
    y, grads = run(moba_attention_triton, q, k, v, gy, block_size, top_k, scale)
    y_ref, grads_ref = run(reference_attention, q, k, v, gy, block_size, top_k, scale)
    torch.testing.assert_close(y, y_ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"forward: {m}")
    for name, a, b in zip("qkv", grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


# ---------------------------------------------------------------------------- tests
CASES = {
    # name: (B, H, S, Dh, block_size, top_k). Interpreter tiles are 16x16: block sizes that are
    # multiples of 16 take the block-aligned mask path, the others the per-(query, key) gather.
    "partial_last_block": (1, 2, 37, 16, 8, 2),
    "aligned_blocks": (2, 1, 48, 16, 16, 2),
    "aligned_partial": (1, 2, 41, 16, 16, 2),
    "s_lt_block": (2, 1, 10, 16, 16, 2),
    "odd_block_dh32": (1, 2, 45, 32, 7, 3),
    "block_straddles_tiles": (1, 1, 48, 16, 24, 2),
    "head_dim_not_pow2": (1, 1, 30, 20, 6, 3),
    "single_token": (1, 3, 1, 16, 4, 2),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    b, h, s, d, bs, top_k = CASES[case]
    assert_matches_reference(*qkv(b, h, s, d, seed=len(case)), bs, top_k, seed=len(case))


@needs_interpreter
@pytest.mark.parametrize("seed", range(2))
def test_random_shapes(seed):
    g = torch.Generator().manual_seed(200 + seed)
    b, h = (int(torch.randint(1, 3, (1,), generator=g)) for _ in range(2))
    s = int(torch.randint(1, 49, (1,), generator=g))
    bs = int(torch.randint(1, 20, (1,), generator=g))
    top_k = int(torch.randint(1, math.ceil(s / bs) + 2, (1,), generator=g))
    assert_matches_reference(*qkv(b, h, s, 16, seed=seed), bs, top_k, seed=seed)


@needs_interpreter
@pytest.mark.parametrize(("block_size", "top_k"), [(8, 6), (16, 3), (5, 100)])
def test_all_blocks_is_causal_sdpa(block_size, top_k):
    """``top_k >= n`` selects every past block: plain causal attention."""
    q, k, v = qkv(2, 2, 43, 16, seed=block_size)
    assert top_k >= math.ceil(43 / block_size)
    gy = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    y, grads = run(moba_attention_triton, q, k, v, gy, block_size, top_k)
    y_ref, grads_ref = run(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), q, k, v, gy)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("block_size", [8, 16])
def test_top_k_one_is_block_diagonal(block_size):
    """``top_k = 1``: each query sees only its own block, causally."""
    q, k, v = qkv(1, 2, 37, 16, seed=5)
    pos = torch.arange(37)
    mask = (pos[:, None] // block_size == pos[None, :] // block_size) & (pos[None, :] <= pos[:, None])
    gy = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    y, grads = run(moba_attention_triton, q, k, v, gy, block_size, 1)
    y_ref, grads_ref = run(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask), q, k, v, gy)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize(("block_m", "block_n", "block_size"), [(16, 32, 32), (32, 16, 8), (32, 32, 20)])
def test_rectangular_tiles(monkeypatch, block_m, block_n, block_size):
    """Tiles other than the interpreter's 16x16 (as on GPU: BLOCK_M != BLOCK_N, a key tile spanning blocks)."""

    def tiles(bs, head_dim, kernel, ieee=False):
        return {
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_D": max(16, 1 << (head_dim - 1).bit_length()),
            "ALIGNED": bs % block_n == 0,
            "num_warps": 1,
            "num_stages": 1,
        }

    monkeypatch.setattr(M, "_tiles", tiles)
    assert_matches_reference(*qkv(1, 2, 45, 16, seed=block_m + block_size), block_size, 2)


def test_gpu_tile_choice(monkeypatch):
    """The compiled-mode tiles: block-aligned key tiles where the block size allows, capped for IEEE fp32."""
    import moelab.kernels.triton.moba as moba

    monkeypatch.setattr(moba, "INTERPRET", False)
    t = moba._tiles(512, 64, "fwd")
    assert (t["BLOCK_M"], t["BLOCK_N"], t["ALIGNED"], t["num_warps"]) == (64, 64, True, 4)
    t = moba._tiles(32, 64, "fwd")
    assert (t["BLOCK_N"], t["ALIGNED"]) == (32, True)
    t = moba._tiles(100, 128, "dkdv")
    assert (t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_D"], t["ALIGNED"], t["num_warps"]) == (32, 64, 128, False, 8)
    t = moba._tiles(512, 64, "dq", ieee=True)
    assert (t["BLOCK_M"], t["BLOCK_N"], t["ALIGNED"]) == (32, 32, True)


@needs_interpreter
def test_custom_scale_and_strided_inputs():
    """``scale`` honoured; ``[B, S, H, Dh]`` storage viewed as ``[B, H, S, Dh]`` (the HF layout) works as is."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 29, 2, 16, generator=g).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    assert_matches_reference(q, k, v, 6, 2, scale=0.3)


def test_ties_go_to_the_later_block():
    """Identical key blocks give equal gate scores: the latest past blocks win (with the own block)."""
    block = torch.randn(1, 1, 4, 8)
    k = block.repeat(1, 1, 6, 1)  # 6 identical blocks of 4 keys
    q = torch.randn(1, 1, 24, 8)
    sel = moba_token_selection(q, k, 4, 3)[0, 0]
    for t in range(24):
        own = t // 4
        expect = sorted({*range(max(0, own - 2), own), own})
        assert sel[t].nonzero().flatten().tolist() == expect, t
    torch.testing.assert_close(sel, reference_block_choice(q, k, 4, 3))


def reference_block_choice(q, k, block_size, top_k):
    """``[S, n]`` bool: the blocks ``reference_mask`` lets each query touch (batch and head 0)."""
    mask = reference_mask(q, k, block_size, top_k)[0, 0]
    n = math.ceil(q.shape[2] / block_size)
    return torch.stack([mask[:, j * block_size : (j + 1) * block_size].any(-1) for j in range(n)], -1)


@pytest.mark.parametrize(
    ("s", "block_size", "top_k"), [(37, 8, 2), (50, 7, 4), (9, 16, 3), (40, 4, 1), (30, 4, 8), (23, 3, 3)]
)
def test_selection_matches_plain_gate(s, block_size, top_k, monkeypatch):
    import moelab.kernels.triton.moba as moba

    monkeypatch.setattr(moba, "_GATE_CHUNK_ELEMENTS", 50)  # several row chunks even at this size
    q, k, _ = qkv(1, 1, s, 16, seed=s)
    sel = moba.moba_token_selection(q, k, block_size, top_k)[0, 0]
    torch.testing.assert_close(sel, reference_block_choice(q, k, block_size, top_k))
    own = torch.arange(s) // block_size
    assert sel[torch.arange(s), own].all()  # own block always in
    assert (sel.sum(-1) == torch.clamp(own + 1, max=top_k)).all()  # exactly min(top_k, b_t + 1) blocks


@needs_interpreter
def test_partial_grads_and_no_grad():
    """Only the leaves that need a gradient get one; ``no_grad`` gives the same forward."""
    q, k, v = qkv(1, 2, 21, 16, seed=11)
    qg = q.clone().requires_grad_(True)
    y = moba_attention_triton(qg, k, v, 8, 2)
    y.sum().backward()
    (dq_ref,) = torch.autograd.grad(reference_attention(qg, k, v, 8, 2).sum(), [qg])
    torch.testing.assert_close(qg.grad, dq_ref.float(), atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        y0 = moba_attention_triton(q, k, v, 8, 2)
    assert not y0.requires_grad
    torch.testing.assert_close(y0, y.detach())


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_close_to_fp32_reference(dtype):
    """16-bit inputs, fp32 accumulation: within 16-bit rounding of the fp32 math on the same values."""
    q, k, v = qkv(1, 2, 33, 16, seed=13, dtype=dtype)
    gy = torch.randn(q.shape, generator=torch.Generator().manual_seed(14)).to(dtype)
    y, grads = run(moba_attention_triton, q, k, v, gy, 8, 2)
    y_ref, grads_ref = run(reference_attention, q.float(), k.float(), v.float(), gy.float(), 8, 2)
    for name, a, b in zip(("y", "dq", "dk", "dv"), [y, *grads], [y_ref, *grads_ref], strict=True):
        assert a.dtype == dtype, name
        err = (a.float() - b.float()).abs().max() / b.abs().max().clamp_min(1e-6)
        assert err < 2e-2, f"{name}: relative error {err:.3g}"


@needs_interpreter
def test_empty_sequence():
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 2, 0, 16))
    y = moba_attention_triton(q, k, v, 4, 2)
    assert y.shape == (1, 2, 0, 16)
    y.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_bad_inputs():
    q, k, v = qkv(1, 1, 8, 16)
    with pytest.raises(ValueError, match=r"\[B, H, S, Dh\]"):
        moba_attention_triton(q[0], k[0], v[0], 4, 2)
    with pytest.raises(ValueError, match="same shape"):
        moba_attention_triton(q, k[:, :, :4], v, 4, 2)
    with pytest.raises(TypeError, match="dtype"):
        moba_attention_triton(q.double(), k.double(), v.double(), 4, 2)
    with pytest.raises(TypeError, match="share a dtype"):
        moba_attention_triton(q, k.half(), v, 4, 2)
    with pytest.raises(ValueError, match="block_size"):
        moba_attention_triton(q, k, v, 0, 2)
    with pytest.raises(ValueError, match="top_k"):
        moba_attention_triton(q, k, v, 4, 0)
    with pytest.raises(ValueError, match="scale"):
        moba_attention_triton(q, k, v, 4, 2, scale=float("nan"))
    with pytest.raises(ValueError, match="head dim"):
        moba_attention_triton(*qkv(1, 1, 4, 257), 4, 2)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    import moelab.kernels.triton.moba as moba

    monkeypatch.setattr(moba, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        moba.moba_attention_triton(*qkv(1, 1, 8, 16), 4, 2)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests ran in this process")
def test_interpreter_subprocess():
    """Run this file's kernel tests in a fresh interpreter with ``TRITON_INTERPRET=1`` set from the start."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-x", "-p", "no:cacheprovider"]
    cmd += ["-k", "not subprocess and not compile_for_sm90"]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    summary = out.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, tail


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The three kernels compile for an H100 (sm_90) with bf16 tensor-core dots (wgmma) and no spills.

    The interpreter checks the math; this checks what only the compiler sees, with no GPU.
    """
    code = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from moelab.kernels.triton import moba as M
        from moelab.kernels.triton.aot_check import _ptxas, _ptxas_report

        ptrs = {"SEL": "*i8", "KT_IDX": "*i32", "KT_CNT": "*i32", "QT_IDX": "*i32", "QT_CNT": "*i32",
                "LSE": "*fp32", "DELTA": "*fp32"}
        data = ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")
        for name, kind in (("_moba_fwd_kernel", "fwd"), ("_moba_bwd_dq_kernel", "dq"),
                           ("_moba_bwd_dkdv_kernel", "dkdv")):
            for head_dim, block_size in ((64, 128), (128, 512), (64, 100)):
                cfg = M._tiles(block_size, head_dim, kind)
                opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
                cx = {**cfg, "UPCAST": False, "PRECISION": "tf32"}
                fn = getattr(M, name)
                sig = {a: "constexpr" if a in cx else ptrs.get(a, "*bf16" if a in data else
                       ("fp32" if "scale" in a else "i32")) for a in fn.arg_names}
                c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx),
                                   target=GPUTarget("cuda", 90, 32), options=opts)
                rep = _ptxas_report(_ptxas(), c.asm["ptx"], 90)
                print(name, head_dim, block_size, "wgmma" in c.asm["ptx"], rep.get("spill_store_bytes"))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("_moba")]
    assert len(lines) == 9, out.stdout
    assert all(ln[3] == "True" for ln in lines), out.stdout
    assert all(ln[4] in ("0", "None") for ln in lines), out.stdout
