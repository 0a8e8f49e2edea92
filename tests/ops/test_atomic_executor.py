"""Executor ``atomic`` (``moelab.ops.atomic``): atomic-expert pools, forward and backward.

- property test (hypothesis, float64, tight tolerances): the executor equals the ``reference``
  executor and a plain per-token loop over each token's experts, forward and the gradients of
  ``x``, the combine weights (the router's gradient), ``u`` and ``v``; random shapes, token-major
  and COO routings, ``T = 0`` and ``T = 1``, empty experts, duplicate (token, expert) pairs, every
  activation, both implementations (C loops and the chunked PyTorch path), any subset of inputs
  requiring a gradient. The run asserts that each of these features occurred;
- memory (issue #10): at ``E = 2^20`` the forward and backward allocate exactly what they
  allocate at ``E = 2^10``, apart from the two ``[E, d]`` table gradients, and no tensor but
  those has a dimension of size ``E`` (``tests/alloc_tracker.py`` records every allocation);
- the registry, ``"auto"``, a lone ``moelab.MoE``, autocast, threads, ``torch.compile``, bad input.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from alloc_tracker import AllocationTracker
from hypothesis import example, given, settings
from hypothesis import strategies as st

import moelab
import moelab.ops.atomic as atomic_op
from moelab import Routing, registry
from moelab.experts.atomic import AtomicBank
from moelab.ops import moe_reference
from moelab.ops.atomic import atomic_experts, moe_atomic
from moelab.ops.executors import get_executor, resolve_executor

CPU = torch.device("cpu")
ACTS = {"gelu": F.gelu, "relu": torch.relu, "silu": F.silu}
F64_TOL = dict(rtol=1e-10, atol=1e-12)


def torch_path():
    """Force the chunked PyTorch path (what CUDA, bf16 and machines without a compiler run)."""
    return mock.patch.object(atomic_op, "_kernel_usable", lambda *args: False)


def token_loop(x_TD, token_index, expert_index, weight, u, v, act):
    """``y[t] = sum over t's assignments of w * act(u_e . x_t) * v_e``, one token, one expert at a time."""
    rows = []
    for t in range(x_TD.shape[0]):
        row = x_TD.new_zeros(v.shape[1])
        for n in (token_index == t).nonzero().flatten().tolist():
            e = int(expert_index[n])
            row = row + weight[n] * act((u[e] * x_TD[t]).sum()) * v[e]
        rows.append(row)
    return torch.stack(rows) if rows else x_TD.new_zeros(0, v.shape[1])


@st.composite
def cases(draw):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        T=draw(st.one_of(st.just(0), st.just(1), st.integers(0, 10))),
        E=draw(st.integers(1, 24)),
        d=draw(st.sampled_from([1, 3, 4, 8, 17])),
        d_out=draw(st.sampled_from([None, 2, 5])),
        k=draw(st.integers(1, 6)),
        kind=draw(st.sampled_from(["topk", "topk_subset", "ragged", "expert_choice"])),
        activation=draw(st.sampled_from(sorted(ACTS))),
        path=draw(st.sampled_from(["kernel", "torch"])),
        chunk=draw(st.sampled_from([None, 1, 2, 5])),
        grads=draw(st.sampled_from(["all", "all", "x", "weight", "u", "v", "uv"])),
        upstream=draw(st.sampled_from(["random", "sum"])),  # "sum": a stride-0 gradient
    )


def build(case):
    """Bank, input and routing of one case (float64)."""
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    t, e, k, d = case["T"], case["E"], case["k"], case["d"]
    bank = AtomicBank(e, d, d_out=case["d_out"], activation=case["activation"]).double()
    x = torch.randn(t, d, generator=g, dtype=torch.float64)
    kind = case["kind"]
    if kind in ("topk", "topk_subset"):
        # Drawn with replacement: a token may pick an expert twice (as two PEER heads can).
        pool = e if kind == "topk" else max(1, e // 2)
        allowed = torch.randperm(e, generator=g)[:pool]
        idx = allowed[torch.randint(0, pool, (t, k), generator=g)]
        w = torch.rand(t, k, generator=g, dtype=torch.float64)
        routing = Routing.from_topk(idx, w, e)
    elif kind == "ragged":  # COO: duplicates, tokens with none, top_k None
        n = int(torch.randint(0, 3 * t + 1, (1,), generator=g)) if t else 0
        routing = Routing(
            torch.randint(0, max(t, 1), (n,), generator=g),
            torch.randint(0, e, (n,), generator=g),
            torch.rand(n, generator=g, dtype=torch.float64),
            t,
            e,
        )
    else:  # expert-major, C distinct tokens per expert
        c = int(torch.randint(0, t + 1, (1,), generator=g))
        tok = (
            torch.cat([torch.randperm(t, generator=g)[:c] for _ in range(e)]) if c else torch.zeros(0).long()
        )
        routing = Routing(
            tok, torch.arange(e).repeat_interleave(c), torch.rand(e * c, dtype=torch.float64), t, e
        )
    wanted = {"all": "xwuv", "x": "x", "weight": "w", "u": "u", "v": "v", "uv": "uv"}[case["grads"]]
    x.requires_grad_("x" in wanted)
    routing.weight.requires_grad_("w" in wanted)
    bank.u.requires_grad_("u" in wanted)
    bank.v.requires_grad_("v" in wanted)
    return bank, x, routing


def grads_of(y, gy, inputs):
    loss = y.sum() if gy is None else (y * gy).sum()
    if not loss.requires_grad:  # nothing routed: every gradient is zero
        return [torch.zeros_like(p) for p in inputs]
    gs = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, inputs, strict=True)]


def features(case, routing):
    t = case["T"]
    pairs = (routing.token_index * routing.num_experts + routing.expert_index).tolist()
    used = set(routing.expert_index.tolist())
    return {
        "T=0": t == 0,
        "T=1": t == 1,
        "empty expert": t > 0 and len(used) < routing.num_experts,
        "duplicate pair": len(pairs) != len(set(pairs)),
        "COO (top_k None)": t > 0 and routing.top_k is None,
        "token-major": t > 0 and routing.top_k is not None,
        f"path {case['path']}": t > 0,
        f"activation {case['activation']}": t > 0,
        "d_out != d_in": case["d_out"] not in (None, case["d"]),
        "partial grads": case["grads"] != "all",
    }


def check_case(case):
    bank, x, routing = build(case)
    inputs = [p for p in (x, routing.weight, bank.u, bank.v) if p.requires_grad]
    with torch_path() if case["path"] == "torch" else nullcontext():
        y = moe_atomic(x, routing, bank, chunk_size=case["chunk"])
    y_ref = moe_reference(x, routing, bank)
    act = ACTS[case["activation"]]
    y_loop = token_loop(x, routing.token_index, routing.expert_index, routing.weight, bank.u, bank.v, act)
    assert y.shape == (case["T"], bank.d_out) and y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, **F64_TOL)
    torch.testing.assert_close(y, y_loop, **F64_TOL)
    gy = None if case["upstream"] == "sum" else torch.randn(y.shape, dtype=torch.float64)
    got, ref, loop = (grads_of(out, gy, inputs) for out in (y, y_ref, y_loop))
    for a, b, c in zip(got, ref, loop, strict=True):
        torch.testing.assert_close(a, b, **F64_TOL)
        torch.testing.assert_close(a, c, **F64_TOL)
    return features(case, routing)


EXPLICIT = [
    dict(seed=1, T=0, E=4, d=4, d_out=None, k=2, kind="topk", activation="gelu", path="kernel", chunk=None,
         grads="all", upstream="random"),
    dict(seed=2, T=0, E=3, d=3, d_out=5, k=2, kind="ragged", activation="silu", path="torch", chunk=2,
         grads="all", upstream="sum"),
    dict(seed=3, T=1, E=5, d=8, d_out=None, k=4, kind="topk", activation="relu", path="kernel", chunk=None,
         grads="all", upstream="random"),
    dict(seed=4, T=1, E=2, d=4, d_out=2, k=6, kind="topk", activation="gelu", path="torch", chunk=1,
         grads="all", upstream="sum"),
    dict(seed=5, T=9, E=20, d=17, d_out=None, k=5, kind="topk_subset", activation="silu", path="kernel",
         chunk=None, grads="all", upstream="random"),
    dict(seed=6, T=9, E=3, d=3, d_out=5, k=3, kind="ragged", activation="relu", path="torch", chunk=5,
         grads="all", upstream="random"),
    dict(seed=7, T=8, E=6, d=4, d_out=None, k=2, kind="expert_choice", activation="gelu", path="kernel",
         chunk=None, grads="uv", upstream="random"),
]  # fmt: skip
REQUIRED = (
    "T=0", "T=1", "empty expert", "duplicate pair", "COO (top_k None)", "token-major", "path kernel",
    "path torch", "activation gelu", "activation relu", "activation silu", "d_out != d_in", "partial grads",
)  # fmt: skip


def test_equals_reference_and_token_loop_float64():
    seen: Counter[str] = Counter()

    @settings(max_examples=150, derandomize=True, database=None)
    @given(case=cases())
    def prop(case):
        for feat, hit in check_case(case).items():
            seen[feat] += int(hit)
        seen["cases"] += 1

    for ex in EXPLICIT:
        prop = example(case=ex)(prop)
    prop()
    assert seen["cases"] >= 150 + len(EXPLICIT)
    missing = [f for f in REQUIRED if seen[f] == 0]
    assert not missing, f"cases never covered {missing}: {dict(seen)}"


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_float32_wide_rows_both_paths(path):
    """Rows wider than a vector register, not a multiple of it (the C loops' remainders)."""
    torch.manual_seed(1)
    bank = AtomicBank(4096, 67, d_out=33, activation="silu")
    x = torch.randn(40, 67, requires_grad=True)
    routing = Routing.from_topk(
        torch.randint(0, 4096, (40, 12)), torch.rand(40, 12, requires_grad=True), 4096
    )
    with torch_path() if path == "torch" else nullcontext():
        y = moe_atomic(x, routing, bank)
    y_ref = moe_reference(x, routing, bank)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    inputs = [x, routing.weight, bank.u, bank.v]
    gy = torch.randn_like(y)
    for a, b in zip(grads_of(y, gy, inputs), grads_of(y_ref, gy, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_tokens_and_expert_rows(threads):
    """The C loops split tokens and expert-row blocks across threads (some blocks empty: E = 5)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for e, t, k in ((5, 11, 3), (300, 64, 8)):
            torch.manual_seed(e)
            bank = AtomicBank(e, 8).double()
            x = torch.randn(t, 8, dtype=torch.float64, requires_grad=True)
            routing = Routing.from_topk(
                torch.randint(0, e, (t, k)), torch.rand(t, k, dtype=torch.float64, requires_grad=True), e
            )
            y, y_ref = moe_atomic(x, routing, bank), moe_reference(x, routing, bank)
            torch.testing.assert_close(y, y_ref, **F64_TOL)
            inputs = [x, routing.weight, bank.u, bank.v]
            for a, b in zip(grads_of(y, None, inputs), grads_of(y_ref, None, inputs), strict=True):
                torch.testing.assert_close(a, b, **F64_TOL)
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- memory
def _pool_step(e: int, d: int, t: int, k: int, path: str) -> AllocationTracker:
    """Forward + backward of one token-major routing over ``e`` experts, every allocation recorded."""
    torch.manual_seed(0)
    bank = AtomicBank(e, d)
    x = torch.randn(t, d, requires_grad=True)
    w = torch.rand(t, k, requires_grad=True)
    routing = Routing.from_topk(torch.randint(0, e, (t, k)), w, e)
    with torch_path() if path == "torch" else nullcontext(), AllocationTracker() as tracker:
        y = moe_atomic(x, routing, bank)
        y.square().sum().backward()
    assert bank.u.grad.shape == (e, d) and w.grad.abs().sum() > 0
    return tracker


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_peak_memory_does_not_depend_on_the_pool_size(path):
    """Issue #10: "The E = 2^20 pools run forward and backward with peak memory independent of N
    (the pool size), apart from the parameters themselves. The test checks the allocations."

    Same ``T``, ``d``, ``k`` at ``E = 2^10`` and ``E = 2^20``: the peak of live bytes, leaving out
    the two ``[E, d]`` table gradients (the parameter-sized ones, 64 MiB each here), is the same;
    exactly two allocations are ``[E, d]``-sized (no transient copy); no tensor has a dimension of
    size ``E`` except those; and nothing is bigger than an ``[N]`` index vector (no ``[N, d]``).
    """
    d, t, k = 16, 1024, 32
    n = t * k
    small_e, big_e = 2**10, 2**20
    small, big = _pool_step(small_e, d, t, k, path), _pool_step(big_e, d, t, k, path)
    grad_bytes = big_e * d * 4
    assert big.count(grad_bytes) == 2, big.count(grad_bytes)
    big_peak = big.peak(exclude_sizes=(grad_bytes,))
    # The small run's peak includes its own two [2^10, d] gradients (128 KiB) if they are live at its
    # peak; nothing else may differ beyond allocator-level noise.
    small_grads = 2 * small_e * d * 4
    slack = 16 * 1024
    assert small.peak() - small_grads - slack <= big_peak <= small.peak() + slack, (small.peak(), big_peak)
    with_e = {s for s in big.shapes if big_e in s}
    assert with_e == {(big_e, d)}, with_e
    assert big.largest(exclude_sizes=(grad_bytes,)) <= n * 8  # an [N] long; an [N, d] would be 2 MiB
    assert big_peak < n * d * 4  # all of it together is smaller than one [N, d] tensor


# --------------------------------------------------------------------------------- registry and use
def test_registered_for_atomic_banks_only_and_auto_picks_it():
    ex = get_executor("atomic")
    assert registry.get("executor", "atomic").obj is ex
    assert ex.usable(CPU, AtomicBank(8, 4)) and not ex.usable(CPU, moelab.ExpertBank(4, 8, 8))
    assert resolve_executor("auto", CPU, AtomicBank(8, 4)).name == "atomic"
    assert resolve_executor("auto", CPU, moelab.ExpertBank(4, 8, 8)).name != "atomic"


@pytest.mark.parametrize("backend", ["atomic", "auto"])
@pytest.mark.parametrize("t", [0, 1, 7])
def test_in_a_lone_moe_forward_and_backward(backend, t):
    torch.manual_seed(3)
    moe = moelab.MoE(16, num_experts=64, top_k=4, experts=AtomicBank(64, 16), backend=backend)
    x = torch.randn(t, 16, requires_grad=True)
    y = moe(x)
    assert y.shape == (t, 16) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert x.grad.shape == (t, 16)
    if t:
        assert moe.experts.u.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0
        ref = moe_reference(x, moe.router(x), moe.experts)
        torch.testing.assert_close(moe_atomic(x, moe.router(x), moe.experts), ref, rtol=1e-5, atol=1e-6)


def test_autocast_bf16_runs_the_torch_path_with_fp32_gradients():
    torch.manual_seed(4)
    bank = AtomicBank(128, 32)
    x = torch.randn(10, 32, requires_grad=True)
    w = torch.rand(10, 6, requires_grad=True)
    routing = Routing.from_topk(torch.randint(0, 128, (10, 6)), w, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_atomic(x, routing, bank)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), moe_reference(x, routing, bank), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert bank.u.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.isfinite(bank.v.grad).all() and w.grad.abs().sum() > 0


def test_under_torch_compile_runs_eagerly_and_exactly():
    torch.manual_seed(5)
    moe = moelab.MoE(16, num_experts=32, top_k=4, experts=AtomicBank(32, 16), backend="atomic")
    compiled = torch.compile(moe, backend="eager")
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(compiled(x), moe(x))


def test_direct_call_with_token_index_and_duplicates():
    """``atomic_experts`` on its own: a [T, k] layout and the same assignments as COO agree."""
    torch.manual_seed(6)
    u, v = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    idx = torch.tensor([[1, 1], [2, 9], [0, 0]])
    w = torch.rand(3, 2, dtype=torch.float64)
    y_tk = atomic_experts(x, idx, w, u, v, "relu")
    y_coo = atomic_experts(
        x, idx.flatten(), w.flatten(), u, v, "relu", token_index_N=torch.arange(3).repeat_interleave(2)
    )
    torch.testing.assert_close(y_tk, y_coo, **F64_TOL)
    torch.testing.assert_close(y_tk[0], (w[0].sum() * torch.relu(u[1] @ x[0])) * v[1], **F64_TOL)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(activation="swiglu"), ValueError, "gelu, relu or silu"),
        (dict(expert_index=torch.zeros(3, 2)), TypeError, "expert_index must be a torch.long"),
        (dict(weight=torch.rand(3, 3)), ValueError, "weight must be a float tensor of expert_index's shape"),
        (dict(u_ED=torch.randn(10, 5)), ValueError, r"u_ED must be \[E, d_in=4\]"),
        (dict(v_EO=torch.randn(9, 3)), ValueError, "v_EO must have E=10 rows"),
        (dict(expert_index=torch.zeros(2, 2).long(), weight=torch.rand(2, 2)), ValueError, r"\[T=3, k\]"),
        (dict(token_index_N=torch.zeros(6).long()), ValueError, "token_index_N must be None"),
        (
            dict(expert_index=torch.zeros(6).long(), weight=torch.rand(6)),
            ValueError,
            "token_index_N must be a",
        ),
        (dict(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
        (dict(u_ED=torch.randn(10, 4, dtype=torch.float64)), TypeError, "x has dtype torch.float32"),
        (dict(expert_index=torch.full((3, 2), 10)), ValueError, r"expert_index must lie in \[0, 10\)"),
        (dict(expert_index=torch.full((3, 2), -1)), ValueError, r"expert_index must lie in \[0, 10\)"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    args = dict(
        x_TD=torch.randn(3, 4),
        expert_index=torch.zeros(3, 2).long(),
        weight=torch.rand(3, 2),
        u_ED=torch.randn(10, 4),
        v_EO=torch.randn(10, 3),
        activation="gelu",
    )
    args.update(kwargs)
    with pytest.raises(err, match=match):
        atomic_experts(**args)
