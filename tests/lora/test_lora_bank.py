"""``LoRABank``: the grouped low-rank forward against one expert at a time, PEFT's init and
defaults, the registry entry, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor

import moelab.kernels.grouped_mm as gmm
from moelab import MoE, Routing, registry
from moelab.core import check_bank, example_bank
from moelab.lora import PEFT_DEFAULT_LORA_ALPHA, LoRABank, grouped_lora


def per_expert_loop(bank: LoRABank, x_sorted: Tensor, counts: list[int]) -> Tensor:
    """Each expert's group of rows through ``expert_forward``, concatenated."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(bank.expert_forward(e, x_sorted[start : start + c]))
        start += c
    return torch.cat(outs, 0) if outs else x_sorted.new_zeros(0, bank.d_out)


def random_bank(e: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, seed: int) -> LoRABank:
    torch.manual_seed(seed)
    bank = LoRABank(e, d_in, d_out, r, alpha=2.0 * r + 1).to(dtype)
    with torch.no_grad():
        bank.lora_B.normal_()  # B = 0 at init would make every output 0
    return bank


def check_against_loop(e, t, d_in, d_out, r, seed, dtype, tol):
    bank = random_bank(e, d_in, d_out, r, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    expert_index = torch.randint(0, e, (t,), generator=g)
    # Empty experts: drop one expert's rows on odd seeds.
    if seed % 2 and e > 1:
        expert_index = torch.where(expert_index == 0, torch.ones_like(expert_index), expert_index)
    routing = Routing(torch.arange(t), expert_index, torch.ones(t, dtype=dtype), t, e)
    order = routing.by_expert()
    x = torch.randn(t, d_in, generator=g).to(dtype)
    x_sorted = x[order.token_index].requires_grad_(True)
    y = bank.forward_sorted(x_sorted, order)
    assert y.shape == (t, d_out) and y.dtype == dtype
    upstream = torch.randn(t, d_out, generator=g).to(dtype)
    grads = torch.autograd.grad((y * upstream).sum(), [x_sorted, bank.lora_A, bank.lora_B], allow_unused=True)

    x_ref = x_sorted.detach().clone().requires_grad_(True)
    y_ref = per_expert_loop(bank, x_ref, order.counts.tolist())
    torch.testing.assert_close(y, y_ref, **tol)
    ref = torch.autograd.grad((y_ref * upstream).sum(), [x_ref, bank.lora_A, bank.lora_B], allow_unused=True)
    for name, a, b in zip(("x", "lora_A", "lora_B"), grads, ref, strict=True):
        a = torch.zeros_like(b if b is not None else a) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **tol, msg=name)
    # Experts without rows get exactly zero gradient.
    empty = order.counts == 0
    if t and bool(empty.any()):
        assert not grads[1][empty].any() and not grads[2][empty].any()


@settings(max_examples=60, derandomize=True, database=None)
@given(
    e=st.integers(1, 6),
    t=st.one_of(st.just(0), st.just(1), st.integers(0, 24)),
    d_in=st.sampled_from([3, 4, 8, 16, 5]),
    d_out=st.sampled_from([4, 6, 12, 16, 7]),
    r=st.sampled_from([1, 2, 4, 8]),
    seed=st.integers(0, 2**20),
)
@example(e=3, t=0, d_in=8, d_out=12, r=4, seed=0)
@example(e=1, t=1, d_in=16, d_out=4, r=8, seed=1)
@example(e=6, t=2, d_in=4, d_out=16, r=4, seed=3)  # at least 4 empty experts
def test_forward_sorted_equals_per_expert_loop_fp64(e, t, d_in, d_out, r, seed):
    check_against_loop(e, t, d_in, d_out, r, seed, torch.float64, {})


@settings(max_examples=25, derandomize=True, database=None)
@given(
    e=st.integers(1, 6),
    t=st.one_of(st.just(0), st.just(1), st.integers(0, 40)),
    d_in=st.sampled_from([4, 8, 16, 32]),
    d_out=st.sampled_from([4, 12, 16, 48]),
    r=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**20),
)
def test_forward_sorted_uses_the_grouped_gemm_for_aligned_fp32(e, t, d_in, d_out, r, seed):
    """fp32 with 16-byte-aligned widths runs torch's grouped GEMM: the per-expert loop fallback
    refuses non-empty inputs while the bank runs (the reference loop calls expert_forward)."""
    loop = gmm.grouped_mm_loop

    def refuse(x, w, counts):
        if x.shape[0]:
            raise AssertionError(
                f"grouped_mm fell back to the loop for x {tuple(x.shape)}, w {tuple(w.shape)}"
            )
        return loop(x, w, counts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gmm, "grouped_mm_loop", refuse)
        check_against_loop(e, t, d_in, d_out, r, seed, torch.float32, dict(atol=1e-5, rtol=1e-5))


def test_peft_defaults_and_init():
    peft = pytest.importorskip("peft")
    assert PEFT_DEFAULT_LORA_ALPHA == peft.LoraConfig().lora_alpha == 8
    torch.manual_seed(3)
    bank = LoRABank(3, 20, 7, 4)
    assert bank.alpha == 8 and bank.scaling == 8 / 4 and bank.dropout == 0.0
    assert bank.lora_A.shape == (3, 4, 20) and bank.lora_B.shape == (3, 7, 4)
    assert not bank.lora_B.any()  # B = 0: a fresh mixture changes nothing
    # A: kaiming_uniform_(a=sqrt(5)) expert by expert, i.e. PEFT's nn.Linear(d_in, r) init.
    torch.manual_seed(3)
    for e in range(3):
        expected = torch.empty(4, 20)
        torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
        assert torch.equal(bank.lora_A[e], expected)
    assert float(bank.lora_A.detach().abs().max()) <= 1 / math.sqrt(20)
    assert LoRABank(2, 4, 4, 2, alpha=16).scaling == 8.0


def test_expert_forward_is_the_lora_equation():
    bank = random_bank(2, 6, 5, 3, torch.float64, 0)
    x = torch.randn(4, 6, dtype=torch.float64)
    for e in range(2):
        expected = bank.scaling * (bank.lora_B[e] @ (bank.lora_A[e] @ x.T)).T
        torch.testing.assert_close(bank.expert_forward(e, x), expected)


def test_dropout_is_per_row_in_training_and_off_in_eval():
    bank = random_bank(2, 8, 8, 4, torch.float64, 0)
    bank.dropout = 0.5
    routing = Routing(
        torch.arange(6), torch.tensor([0, 1, 0, 1, 0, 1]), torch.ones(6, dtype=torch.float64), 6, 2
    )
    order = routing.by_expert()
    x = torch.randn(6, 8, dtype=torch.float64)[order.token_index]
    bank.eval()
    torch.testing.assert_close(bank.forward_sorted(x, order), per_expert_loop(bank, x, order.counts.tolist()))
    bank.train()
    torch.manual_seed(5)
    y = bank.forward_sorted(x, order)
    torch.manual_seed(5)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, True)
    bank.dropout = 0.0
    torch.testing.assert_close(y, bank.forward_sorted(x * mask, order))


def test_registered_bank_and_moe_with_a_lora_bank():
    assert registry.get("bank", "lora").obj is LoRABank
    bank = check_bank(example_bank("lora", 5, 8, 12))
    assert (bank.num_experts, bank.d_in, bank.d_out) == (5, 8, 12) and bank.lora_B.any()
    bank = bank.double()
    for backend in ("reference", "sorted", "auto"):
        moe = MoE(8, num_experts=5, top_k=2, experts=bank, backend=backend).double()
        x = torch.randn(3, 4, 8, dtype=torch.float64)
        y, routing = moe.forward_routed(x)
        expected = torch.zeros(12, 12, dtype=torch.float64)
        for t, e, w in zip(
            routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True
        ):
            expected[t] += w * bank.expert_forward(e, x.reshape(-1, 8)[t : t + 1])[0]
        torch.testing.assert_close(y.reshape(-1, 12), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRABank(2, 4, 4, 0)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        LoRABank(2.0, 4, 4, 2)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        LoRABank(2, 4, 4, 2, alpha=-1.0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0.0, 1.0\)"):
        LoRABank(2, 4, 4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="d_out must be >= 1"):
        LoRABank(2, 4, 0, 2)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 3)
    offsets = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"x_sorted must be \[N, d_in=4\]"):
        grouped_lora(torch.randn(2, 5), a, b, offsets, 1.0)
    with pytest.raises(ValueError, match="does not match lora_A"):
        grouped_lora(torch.randn(2, 4), a, torch.randn(2, 5, 2), offsets, 1.0)
    with pytest.raises(ValueError, match=r"lora_A must be \[E, r, d_in\]"):
        grouped_lora(torch.randn(2, 4), a[0], b, offsets, 1.0)


@given(
    e=st.integers(1, 4),
    t=st.integers(0, 9),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    r=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=30)
@example(e=1, t=1, d_in=1, d_out=1, r=1, bias=False, seed=0)
def test_base_and_rank_dense_lora_equals_the_equation_fp64(e, t, d_in, d_out, r, bias, seed):
    """The fused base + rank-dense LoRA against ``W x + b + sum_e w_e scaling B_e A_e x`` written
    per token and expert, forward and backward (x, A, B and the combine weights)."""
    from moelab.experts.lora import base_and_rank_dense_lora

    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    x = torch.randn(t, d_in, generator=g, **f64).requires_grad_(True)
    w_OD = torch.randn(d_out, d_in, generator=g, **f64)
    b_O = torch.randn(d_out, generator=g, **f64) if bias else None
    a = torch.randn(e, r, d_in, generator=g, **f64).requires_grad_(True)
    b = torch.randn(e, d_out, r, generator=g, **f64).requires_grad_(True)
    w_TE = torch.rand(t, e, generator=g, **f64).requires_grad_(True)
    y = base_and_rank_dense_lora(x, w_OD, b_O, a, b, w_TE, 0.5)
    rows = []
    for i in range(t):
        row = w_OD @ x[i] + (b_O if bias else 0)
        for j in range(e):
            row = row + w_TE[i, j] * 0.5 * (b[j] @ (a[j] @ x[i]))
        rows.append(row)
    ref = torch.stack(rows) if rows else torch.zeros(0, d_out, **f64)
    torch.testing.assert_close(y, ref)
    if t:
        grad = torch.randn(t, d_out, generator=g, **f64)
        got = torch.autograd.grad(y, (x, a, b, w_TE), grad)
        want = torch.autograd.grad(ref, (x, a, b, w_TE), grad)
        for name, u, v in zip(("x", "A", "B", "weight"), got, want, strict=True):
            torch.testing.assert_close(u, v, msg=name)


def test_routed_lora_fuses_the_base_only_when_it_is_a_frozen_plain_linear(monkeypatch):
    import moelab.lora.layer as layer_module
    from moelab.lora import RoutedLoRA

    calls = []
    real = layer_module.base_and_rank_dense_lora
    monkeypatch.setattr(layer_module, "base_and_rank_dense_lora", lambda *a: calls.append(1) or real(*a))
    layer = RoutedLoRA(torch.nn.Linear(32, 32), 2, 2)
    x = torch.randn(2, 5, 32)
    unfused_ref = layer.base(x)
    y = layer(x)
    assert calls and y.shape == (2, 5, 32)
    torch.testing.assert_close(y, unfused_ref)  # B = 0 at init
    with pytest.raises(ValueError, match="must be frozen"):
        real(x[0], layer.base.weight.detach().requires_grad_(True), None, layer.bank.lora_A, layer.bank.lora_B,
             torch.ones(5, 2), 1.0)  # fmt: skip
    calls.clear()
    layer.base.weight.requires_grad_(True)  # a trainable base: the plain path
    layer(x)
    assert not calls
