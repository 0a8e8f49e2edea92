"""Backend ``fast`` (``moelab.ops.fast``): every path against a plain per-token loop and ``moe_reference``.

The independent reference here is :func:`naive`, one token-expert pair at a time through
``ExpertBank.expert_forward``. The comparisons run in float64 (exact up to summation order), bf16
against an fp32 computation on the same rounded weights.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moelab
from moelab.core import Routing
from moelab.core.activations import ACTIVATIONS, activation_backward, activation_forward
from moelab.experts.bank import ExpertBank
from moelab.kernels.cpu import fused_forward, segments, small_batch_forward
from moelab.ops import get_executor, moe_reference, resolve_executor
from moelab.ops.fast import SMALL_BATCH_MAX_BYTES, choose_path, moe_fast, moe_fused

D, H = 8, 12


def naive(x_TD, routing, bank):
    """``y[t] = sum_n w_n * expert_{e_n}(x[t_n])``, one assignment at a time."""
    rows = [torch.zeros_like(x_TD[0]) for _ in range(routing.num_tokens)]
    for t, e, w in zip(
        routing.token_index.tolist(), routing.expert_index.tolist(), routing.weight, strict=True
    ):
        rows[t] = rows[t] + w.to(x_TD.dtype) * bank.expert_forward(e, x_TD[t : t + 1])[0]
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])


def topk_routing(t, e, k, *, seed=0, dtype=torch.float64, only_experts=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g, dtype=dtype)
    if only_experts is not None:  # leave the other experts empty
        mask = torch.full((e,), float("-inf"), dtype=dtype)
        mask[list(only_experts)] = 0
        logits = logits + mask
    w, idx = torch.topk(logits.softmax(-1), k, dim=-1)
    return w.requires_grad_(True), idx


def ragged_routing(t, e, n, *, seed=0, dtype=torch.float64):
    """COO routing with no structure: any count per token (0 included), repeats allowed."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, max(t, 1), (n,), generator=g) if t else torch.zeros(0, dtype=torch.long)
    ex = torch.randint(0, e, (n if t else 0,), generator=g)
    w = torch.rand(tok.shape[0], generator=g, dtype=dtype).requires_grad_(True)
    return Routing(tok, ex, w, num_tokens=t, num_experts=e)


def make_bank(e, activation="swiglu", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return ExpertBank(e, D, H, activation).to(dtype)


def grads(fn, x, routing, bank, gy):
    y = fn(x, routing, bank)
    params = [x, routing.weight, bank.w_in, bank.down_proj]
    if not y.requires_grad:  # nothing to differentiate (e.g. T = 0 in the reference)
        return y, [torch.zeros_like(p) for p in params]
    gs = torch.autograd.grad(y, params, gy, allow_unused=True)
    return y, [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params, strict=True)]


def assert_same(fn, x, routing, bank, *, ref=naive, atol=1e-10, rtol=1e-8):
    gy = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(7))
    y_ref, g_ref = grads(ref, x, routing, bank, gy)
    y, g = grads(fn, x, routing, bank, gy)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    for name, a, b in zip(("x", "weight", "w_in", "down_proj"), g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


# ------------------------------------------------------------------------------ training path (fused)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize(("t", "e", "k"), [(0, 4, 2), (1, 4, 2), (1, 3, 3), (9, 4, 4), (23, 6, 2)])
def test_fused_matches_naive(activation, t, e, k):
    bank = make_bank(e, activation)
    w, idx = topk_routing(t, e, k)
    x = torch.randn(t, D, dtype=torch.float64, requires_grad=True)
    assert_same(moe_fast, x, Routing.from_topk(idx, w, e), bank)
    assert_same(moe_fast, x, Routing.from_topk(idx, w, e), bank, ref=moe_reference)


def test_fused_empty_experts_and_ragged_routing():
    bank = make_bank(8)
    x = torch.randn(13, D, dtype=torch.float64, requires_grad=True)
    w, idx = topk_routing(13, 8, 2, only_experts=[1, 5, 6])
    routing = Routing.from_topk(idx, w, 8)
    assert (routing.tokens_per_expert() == 0).sum() == 5
    assert_same(moe_fast, x, routing, bank)
    # dropped tokens (count 0), repeated pairs, any count per token
    assert_same(moe_fast, x, ragged_routing(13, 8, 20, seed=3), bank)
    assert_same(moe_fast, x, ragged_routing(13, 8, 0, seed=3), bank)


@pytest.mark.parametrize("max_rows", [1, 3, 5, 64])
def test_fused_segment_splitting(max_rows):
    """Experts cut into several row segments accumulate their weight gradients correctly."""
    bank = make_bank(3, "geglu")
    w, idx = topk_routing(17, 3, 2, seed=1)
    x = torch.randn(17, D, dtype=torch.float64, requires_grad=True)
    fn = lambda x, r, b: moe_fused(x, r, b, max_rows=max_rows)
    assert_same(fn, x, Routing.from_topk(idx, w, 3), bank)


@given(
    t=st.integers(0, 12),
    e=st.integers(1, 5),
    n=st.integers(0, 30),
    max_rows=st.integers(1, 8),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    seed=st.integers(0, 2**16),
)
def test_fused_property(t, e, n, max_rows, activation, seed):
    bank = make_bank(e, activation, seed=seed)
    routing = ragged_routing(t, e, n, seed=seed)
    x = torch.randn(t, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_(
        True
    )
    fn = lambda x, r, b: moe_fused(x, r, b, max_rows=max_rows)
    assert_same(fn, x, routing, bank, ref=moe_reference)


def test_partial_gradients_and_retain_graph():
    """Only the requested gradients are computed; a retained graph gives the same result twice."""
    bank = make_bank(4)
    bank.requires_grad_(False)
    w, idx = topk_routing(6, 4, 2)
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    y = moe_fast(x, Routing.from_topk(idx, w, 4), bank)
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad(y, [x, w], gy, retain_graph=True)
    g2 = torch.autograd.grad(y, [x, w], gy)
    y_ref = moe_reference(x, Routing.from_topk(idx, w, 4), bank)
    g_ref = torch.autograd.grad(y_ref, [x, w], gy)
    for a, b, c in zip(g1, g2, g_ref, strict=True):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


def test_fused_saves_only_indices_and_h_in():
    """The autograd graph keeps x itself (no copy), the indices, the weights and h_in [N, 2h]."""
    bank = make_bank(4, dtype=torch.float32)
    w, idx = topk_routing(10, 4, 2, dtype=torch.float32)
    x = torch.randn(10, D, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        moe_fast(x, Routing.from_topk(idx, w, 4), bank)
    ptrs = {t.data_ptr() for t in saved}
    assert x.data_ptr() in ptrs  # the input itself, not a gathered copy
    known = {x.data_ptr(), bank.w_in.data_ptr(), bank.down_proj.data_ptr()}
    new = [t for t in saved if t.data_ptr() not in known and t.is_floating_point() and t.dim() == 2]
    # h_in, one piece per expert segment, 20 = T*k rows in all; no x_sorted, activation or y_sorted
    assert {t.shape[1] for t in new} == {2 * H}
    assert sum(t.shape[0] for t in new) == 20


# ------------------------------------------------------------------------------ inference paths
@pytest.mark.parametrize("t", [0, 1, 4, 16])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_decode_path_matches_naive(t, activation):
    bank = make_bank(8, activation)
    w, idx = topk_routing(t, 8, 2, seed=t)
    x = torch.randn(t, D, dtype=torch.float64)
    routing = Routing.from_topk(idx, w.detach(), 8)
    with torch.no_grad():
        assert choose_path(x, routing, bank) == "small_batch"
        y = moe_fast(x, routing, bank)
        torch.testing.assert_close(y, naive(x, routing, bank))
        torch.testing.assert_close(
            small_batch_forward(x, routing.by_expert(), bank.w_in, bank.down_proj, activation), y
        )


def test_large_inference_uses_bounded_fused_forward():
    bank = ExpertBank(2, 64, 256).double()
    t = SMALL_BATCH_MAX_BYTES // (2 * 256 * 8) // 2 + 1  # N * 2h * 8 bytes just above the bound
    x = torch.randn(t, 64, dtype=torch.float64)
    w, idx = topk_routing(t, 2, 2)
    routing = Routing.from_topk(idx, w.detach(), 2)
    with torch.no_grad():
        assert choose_path(x, routing, bank) == "fused"
        y = moe_fast(x, routing, bank)
        order = routing.by_expert()
        y2, h_in = fused_forward(
            x, order.token_index, order.weight, bank.w_in, bank.down_proj, order.counts.tolist(), "swiglu",
            save_hidden=False,
        )  # fmt: skip
        assert h_in is None
        torch.testing.assert_close(y, y2)
        torch.testing.assert_close(y[:50], moe_reference(x, routing, bank)[:50])


def test_choose_path_training_is_fused():
    bank = make_bank(4)
    w, idx = topk_routing(2, 4, 2)
    x = torch.randn(2, D, dtype=torch.float64)
    assert choose_path(x, Routing.from_topk(idx, w, 4), bank) == "fused"  # w requires grad
    with torch.no_grad():
        assert choose_path(x, Routing.from_topk(idx, w, 4), bank) == "small_batch"


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize(("t", "grad"), [(1, False), (16, False), (37, True), (5, True)])
def test_fp32_gemm_paths_match_float64(monkeypatch, onednn, t, grad):
    """fp32 runs its GEMMs on oneDNN (gemm.linear) or torch.mm; both equal a float64 computation."""
    from moelab.kernels.cpu import gemm

    monkeypatch.setattr(gemm, "USE_ONEDNN_FP32", onednn)
    bank = make_bank(6, "swiglu", dtype=torch.float32)
    bank64 = make_bank(6, "swiglu")
    bank64.load_state_dict({k: v.double() for k, v in bank.state_dict().items()})
    w, idx = topk_routing(t, 6, 3, dtype=torch.float32)
    x = torch.randn(t, D)
    x32 = x.clone().requires_grad_(grad)
    w32 = w.detach().clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y = moe_fast(x32, Routing.from_topk(idx, w32, 6), bank)
    x64 = x.double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = naive(x64, Routing.from_topk(idx, w64, 6), bank64)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    if grad:
        gy = torch.randn(t, D)
        y.backward(gy)
        y64.backward(gy.double())
        torch.testing.assert_close(x32.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w32.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bank.down_proj.grad.double(), bank64.down_proj.grad, atol=1e-5, rtol=1e-5)


def test_fp32_split_segments_on_onednn_match_float64():
    """fp32 GEMMs on oneDNN with experts cut into several segments (weight-gradient accumulation)."""
    bank = make_bank(3, "swiglu", dtype=torch.float32)
    bank64 = make_bank(3, "swiglu")
    bank64.load_state_dict({k: v.double() for k, v in bank.state_dict().items()})
    w, idx = topk_routing(45, 3, 2, dtype=torch.float32, seed=4)
    x = torch.randn(45, D)
    x32, w32 = x.clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y = moe_fused(x32, Routing.from_topk(idx, w32, 3), bank, max_rows=7)
    x64, w64 = x.double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64 = naive(x64, Routing.from_topk(idx, w64, 3), bank64)
    gy = torch.randn(45, D)
    y.backward(gy)
    y64.backward(gy.double())
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    grads = ((x32.grad, x64.grad), (w32.grad, w64.grad), (bank.w_in.grad, bank64.w_in.grad))
    for a, b in grads + ((bank.down_proj.grad, bank64.down_proj.grad),):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [3, 40])
def test_bf16_close_to_fp32(t):
    bank = make_bank(4, dtype=torch.bfloat16)
    bank32 = make_bank(4, dtype=torch.float32)
    bank32.load_state_dict({k: v.float() for k, v in bank.state_dict().items()})
    x = torch.randn(t, D).bfloat16()
    w, idx = topk_routing(t, 4, 2, dtype=torch.float32)
    x16 = x.clone().requires_grad_(True)
    x32 = x.float().requires_grad_(True)
    w32 = w.detach().clone().requires_grad_(True)
    y16 = moe_fast(x16, Routing.from_topk(idx, w, 4), bank)
    y32 = moe_reference(x32, Routing.from_topk(idx, w32, 4), bank32)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=2e-2, rtol=2e-2)
    gy = torch.randn(t, D)
    y16.backward(gy.bfloat16())
    y32.backward(gy)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(x16.grad.float(), x32.grad, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(w.grad, w32.grad, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(bank.w_in.grad.float(), bank32.w_in.grad, atol=3e-2, rtol=3e-2)
    with torch.no_grad():
        torch.testing.assert_close(
            moe_fast(x, Routing.from_topk(idx, w, 4), bank).float(), y32, atol=2e-2, rtol=2e-2
        )


def test_autocast_runs_in_lower_precision_and_reaches_fp32_params():
    bank = make_bank(4, dtype=torch.float32)
    w, idx = topk_routing(6, 4, 2, dtype=torch.float32)
    x = torch.randn(6, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_fast(x, Routing.from_topk(idx, w, 4), bank)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert bank.w_in.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    y_ref = naive(x.detach(), Routing.from_topk(idx, w.detach(), 4), bank)
    torch.testing.assert_close(y.float(), y_ref.detach(), atol=3e-2, rtol=3e-2)


def test_dtype_mismatch_is_a_clear_error():
    bank = make_bank(4, dtype=torch.float32)
    w, idx = topk_routing(3, 4, 2, dtype=torch.float32)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        moe_fast(torch.randn(3, D, dtype=torch.float64), Routing.from_topk(idx, w, 4), bank)


# ------------------------------------------------------------------------------ pieces
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_backward_matches_autograd(activation):
    gated = ACTIVATIONS[activation].gated
    h_in = torch.randn(5, 2 * H if gated else H, dtype=torch.float64, requires_grad=True)
    a = activation_forward(h_in, activation)
    plain = ExpertBank(1, D, H, activation).activate(h_in)
    torch.testing.assert_close(a, plain)
    g = torch.randn_like(a)
    (expected,) = torch.autograd.grad(plain, h_in, g)
    torch.testing.assert_close(activation_backward(h_in.detach(), g, activation), expected)


def test_activation_rejects_unknown_name():
    with pytest.raises(ValueError, match="activation must be one of"):
        activation_forward(torch.zeros(1, 2), "tanh")


@pytest.mark.parametrize("counts", [[0], [5], [0, 7, 0, 2], [9, 9, 1], [3000]])
@pytest.mark.parametrize("max_rows", [1, 2, 4, 2048])
def test_segments_partition_rows(counts, max_rows):
    segs = segments(counts, max_rows)
    covered = [r for _, s, e in segs for r in range(s, e)]
    assert covered == list(range(sum(counts)))
    start = 0
    for ex, c in enumerate(counts):
        mine = [(s, e) for x, s, e in segs if x == ex]
        assert sum(e - s for s, e in mine) == c
        if mine:
            sizes = [e - s for s, e in mine]
            assert max(sizes) <= max_rows and max(sizes) - min(sizes) <= 1  # balanced, no tiny tail
            assert mine[0][0] == start
        start += c


# ------------------------------------------------------------------------------ registry and layer
def test_registered_and_chosen_by_auto_on_cpu():
    bank = ExpertBank(4, D, H)
    assert "fast" in moelab.ops.executor_names()
    assert resolve_executor("auto", torch.device("cpu"), bank).name == "fast"
    assert get_executor("fast").usable(torch.device("cpu"), bank)


def test_subclassed_bank_is_not_supported():
    class Biased(ExpertBank):
        def expert_forward(self, e, x):
            return super().expert_forward(e, x) + 1.0

    bank = Biased(4, D, H)
    assert not get_executor("fast").usable(torch.device("cpu"), bank)
    assert resolve_executor("auto", torch.device("cpu"), bank).name != "fast"


def test_moe_layer_with_fast_backend_equals_reference():
    torch.manual_seed(0)
    layer = moelab.MoE(16, num_experts=4, top_k=2, backend="fast").double()
    ref = moelab.MoE(16, num_experts=4, top_k=2, backend="reference").double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = layer(x1), ref(x2)
    torch.testing.assert_close(y1, y2)
    (y1.sum() + layer.aux_loss).backward()
    (y2.sum() + ref.aux_loss).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (n, p), q in zip(layer.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_under_torch_compile(compile_backend):
    """The backend runs eagerly inside a compiled model (a graph break) and stays exact."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = moelab.MoE(16, num_experts=4, top_k=2, backend="fast")
    ref = moelab.MoE(16, num_experts=4, top_k=2, backend="reference")
    ref.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, backend=compile_backend)
    x = torch.randn(2, 8, 16)
    y = compiled(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for p, q in zip(layer.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    with torch.no_grad():  # the decode path under compile
        torch.testing.assert_close(compiled(x[:, :1]), ref(x[:, :1]))
