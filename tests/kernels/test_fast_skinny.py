"""The skinny-GEMM kernel (``moelab.kernels.cpu.skinny``) and the decode path built on it.

References: ``x.double() @ w.double().T`` for the kernel, a per-token loop through
``ExpertBank.expert_forward`` for the decode path. Where the machine cannot build the kernel (no C
compiler, no AVX-512) the kernel tests skip, and the fallback test still runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from moelab.core import Routing
from moelab.experts.bank import ExpertBank
from moelab.kernels.cpu import skinny
from moelab.kernels.cpu.small_batch import small_batch_forward


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()
HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_fp32 = pytest.mark.skipif(not skinny.available(torch.float32), reason="skinny kernel not built here")
needs_bf16 = pytest.mark.skipif(not skinny.available(torch.bfloat16), reason="no AVX512-BF16 build here")


@pytest.mark.skipif(not (HAS_CC and "avx512f" in FLAGS), reason="needs a C compiler and AVX-512")
def test_kernel_builds_where_it_can():
    assert skinny.available(torch.float32)
    assert skinny.available(torch.bfloat16) == ("avx512_bf16" in FLAGS)


@needs_fp32
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (7, 64), (300, 1024)])
def test_fp32_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    assert skinny.can_use(x, w)
    y = skinny.skinny_linear(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, atol=1e-4, rtol=1e-5)


@needs_bf16
@pytest.mark.parametrize("m", [1, 3, 6, 8])
@pytest.mark.parametrize(("n", "k"), [(5, 64), (130, 512)])
def test_bf16_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    assert skinny.can_use(x, w)
    y = skinny.skinny_linear(x, w)
    # bf16 products are exact in fp32; only the fp32 accumulation order differs.
    torch.testing.assert_close(y.double(), x.double() @ w.double().T, atol=1e-3, rtol=1e-5)


@needs_fp32
def test_writes_into_rows_of_a_buffer_and_checks_it():
    x, w = torch.randn(2, 64), torch.randn(9, 64)
    buf = torch.full((5, 9), 7.0)
    skinny.skinny_linear(x, w, buf[1:3])
    torch.testing.assert_close(buf[1:3], x @ w.T, atol=1e-4, rtol=1e-5)
    assert (buf[0] == 7).all() and (buf[3:] == 7).all()
    with pytest.raises(ValueError, match="out_MN must be a contiguous float32"):
        skinny.skinny_linear(x, w, torch.empty(2, 9, dtype=torch.float64))


def test_can_use_rejects_what_the_kernel_cannot_run():
    w = torch.randn(8, 64)
    assert not skinny.can_use(torch.randn(9, 64), w)  # more rows than the kernel takes
    assert skinny.max_rows(1024, torch.float32) == 6 and skinny.max_rows(2816, torch.float32) == 2
    assert not skinny.can_use(torch.randn(3, 2816), torch.randn(8, 2816))  # x rows would leave L1
    assert not skinny.can_use(torch.randn(2, 48), torch.randn(8, 48))  # k not a multiple of 32
    assert not skinny.can_use(torch.randn(64, 2).t(), w)  # not contiguous
    assert not skinny.can_use(torch.randn(2, 64).double(), w.double())  # dtype
    assert not skinny.can_use(torch.randn(2, 64), w.bfloat16())  # mixed dtypes


def _decode_case(dtype, t=16, e=8, k=2, d=64, h=128, seed=0):
    torch.manual_seed(seed)
    bank = ExpertBank(e, d, h).to(dtype)
    x = torch.randn(t, d).to(dtype)
    w, idx = torch.topk(torch.randn(t, e).softmax(-1), k)
    return bank, x, Routing.from_topk(idx, w, e)


def _naive(bank, x, routing):
    bank64 = ExpertBank(bank.num_experts, bank.d_model, bank.hidden).double()
    bank64.load_state_dict({n: p.double() for n, p in bank.state_dict().items()})
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t, e, w in zip(
        routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight.tolist(), strict=True
    ):
        y[t] += w * bank64.expert_forward(e, x[t : t + 1].double())[0]
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 4, 16, 40])
def test_decode_path_matches_per_token_loop(dtype, t):
    """Experts with few rows go through the kernel, the others through PyTorch's GEMM."""
    bank, x, routing = _decode_case(dtype, t=t)
    with torch.no_grad():
        y = small_batch_forward(x, routing.by_expert(), bank.w_in, bank.down_proj, "swiglu")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), _naive(bank, x, routing), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_path_without_the_kernel(monkeypatch, dtype):
    """Where the kernel is missing the decode path falls back to PyTorch's GEMMs, same result."""
    monkeypatch.setattr(skinny, "_STATE", {"lib": None, "caps": 0})
    assert not skinny.available(dtype)
    bank, x, routing = _decode_case(dtype, t=8)
    with torch.no_grad():
        y = small_batch_forward(x, routing.by_expert(), bank.w_in, bank.down_proj, "swiglu")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), _naive(bank, x, routing), atol=tol, rtol=tol)
