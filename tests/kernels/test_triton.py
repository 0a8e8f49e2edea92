"""The ``triton`` backend's kernels under Triton's interpreter, against ``moe_reference``.

``TRITON_INTERPRET=1`` is read when ``triton.jit`` decorates a function, Triton's own standard
library included, so it must be set before ``triton`` is first imported. When this module is
collected first in a process, it sets the variable and runs in-process. When something imported
Triton earlier (``torch._dynamo`` and transformers do), the in-process tests are skipped and
``test_interpreter_subprocess`` runs this same file in a fresh interpreter with the variable set,
so the kernels are checked either way. Triton comes with the ``[gpu]`` extra (installed in CI):
the tests skip only where it is absent.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moelab
from moelab.core import Routing
from moelab.experts.bank import ExpertBank
from moelab.ops import get_executor, moe_reference, resolve_executor
from moelab.routers.expert_choice import expert_choice

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'moelab[gpu]')", allow_module_level=True)


def _import_interpreted():
    """Import Triton and the kernels with the interpreter on; None if Triton is already in compiled mode.

    The variable stays set for the rest of the process: Triton also reads it at call time (lazy
    imports of its own modules). Triton compiles nothing on this CPU-only path anyway.
    """
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl_standard.sigmoid, InterpretedFunction) or os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import moelab.kernels.triton.function as function
    import moelab.kernels.triton.kernels as kernels

    if not kernels.INTERPRET:  # imported before under a different setting: decorate again
        kernels = importlib.reload(kernels)
        importlib.reload(function)
    return kernels


K = _import_interpreted()
IN_PROCESS = K is not None
needs_interpreter = pytest.mark.skipif(
    not IN_PROCESS,
    reason="Triton was imported before the interpreter could be enabled: see the subprocess test",
)

from moelab.ops.triton import moe_triton  # noqa: E402

pytestmark = pytest.mark.triton


# ---------------------------------------------------------------------------- routings
def topk_routing(t: int, e: int, k: int, *, banned: tuple[int, ...] = (), seed: int = 0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    logits[:, list(banned)] = float("-inf")
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    return Routing(torch.arange(t).repeat_interleave(k), idx.reshape(-1), w.reshape(-1), t, e, top_k=k)


def dropped_routing(t: int, e: int, k: int, keep: float = 0.6, seed: int = 0) -> Routing:
    """Token-choice top-k with a random subset of entries dropped: ragged, no ``top_k``."""
    r = topk_routing(t, e, k, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    kept = torch.rand(r.num_assignments, generator=g) < keep
    kept[0] = True
    return Routing(r.token_index[kept], r.expert_index[kept], r.weight[kept], t, e)


def expert_choice_routing(t: int, e: int, capacity: int, seed: int = 0) -> Routing:
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(t, e, generator=g).softmax(-1)
    token, expert, weight = expert_choice(probs, capacity)
    return Routing(token, expert, weight, t, e)


def with_leaf_weight(r: Routing) -> tuple[Routing, torch.Tensor]:
    """A copy of ``r`` whose weight is a fresh leaf (so its gradient can be compared)."""
    w = r.weight.detach().clone().requires_grad_(True)
    return Routing(r.token_index, r.expert_index, w, r.num_tokens, r.num_experts, top_k=r.top_k), w


# ---------------------------------------------------------------------------- comparison
def run_both(x, routing, bank, gy):
    """Forward + backward of the triton backend and of the reference on the same leaves."""
    outs = {}
    for name, fn in (("triton", moe_triton), ("reference", moe_reference)):
        xl = x.detach().clone().requires_grad_(True)
        r, w = with_leaf_weight(routing)
        for p in bank.parameters():
            p.grad = None
        y = fn(xl, r, bank)
        leaves = [xl, w, bank.w_in, bank.down_proj]
        grads = torch.autograd.grad(y, leaves, gy, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves, strict=True)]
        outs[name] = (y.detach(), grads)
    return outs["triton"], outs["reference"]


def assert_matches(x, routing, bank, *, atol=1e-5, rtol=1e-4, seed=0):
    g = torch.Generator().manual_seed(seed + 7)
    gy = torch.randn(routing.num_tokens, bank.d_model, generator=g).to(x.dtype)
    (y, grads), (y_ref, grads_ref) = run_both(x, routing, bank, gy)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol, msg=lambda m: f"forward: {m}")
    for name, a, b in zip(("x", "weight", "w_in", "down_proj"), grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


def make(t, d, h, e, activation="swiglu", seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    bank = ExpertBank(e, d, h, activation).to(dtype)
    x = torch.randn(t, d, dtype=dtype)
    return x, bank


# ---------------------------------------------------------------------------- tests
CASES = {
    # name: (T, d, h, E, routing builder); d and h not multiples of the 16-wide tiles on purpose
    "topk_swiglu": (13, 24, 20, 4, lambda t, e: topk_routing(t, e, 2, seed=1)),
    "empty_expert": (11, 16, 24, 5, lambda t, e: topk_routing(t, e, 2, banned=(1, 3), seed=2)),
    "t1_k_eq_e": (1, 16, 16, 4, lambda t, e: topk_routing(t, e, e, seed=3)),
    "k_eq_e": (6, 20, 16, 3, lambda t, e: topk_routing(t, e, e, seed=4)),
    "dropped": (17, 16, 24, 4, lambda t, e: dropped_routing(t, e, 2, seed=5)),
    "expert_choice": (12, 16, 20, 4, lambda t, e: expert_choice_routing(t, e, capacity=5, seed=6)),
    "single_expert": (7, 16, 16, 1, lambda t, e: topk_routing(t, e, 1, seed=8)),
    "many_rows_one_expert": (40, 16, 16, 3, lambda t, e: topk_routing(t, e, 1, banned=(0, 2), seed=7)),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(case):
    t, d, h, e, build = CASES[case]
    x, bank = make(t, d, h, e, seed=len(case))
    assert_matches(x, build(t, e), bank)


@needs_interpreter
@pytest.mark.parametrize("activation", ["gelu", "geglu", "relu", "silu"])
def test_other_activations(activation):
    x, bank = make(10, 16, 20, 4, activation, seed=11)
    assert_matches(x, topk_routing(10, 4, 2, seed=12), bank)


@needs_interpreter
def test_gelu_dropped_routing():
    x, bank = make(14, 24, 16, 3, "gelu", seed=13)
    assert_matches(x, dropped_routing(14, 3, 2, seed=14), bank)


@needs_interpreter
@pytest.mark.parametrize("seed", range(3))
def test_random_shapes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    t, d, h = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 24), (8, 40), (8, 40)))
    e = int(torch.randint(1, 7, (1,), generator=g))
    k = int(torch.randint(1, e + 1, (1,), generator=g))
    x, bank = make(t, d, h, e, seed=seed)
    assert_matches(x, topk_routing(t, e, k, seed=seed), bank, seed=seed)


@needs_interpreter
def test_bf16_close_to_fp32_reference():
    """bf16 inputs, fp32 accumulation: within bf16 rounding of the fp32 reference on the same values."""
    x, bank = make(12, 32, 24, 4, seed=21, dtype=torch.bfloat16)
    routing = topk_routing(12, 4, 2, seed=22)
    gy = torch.randn(12, 32, generator=torch.Generator().manual_seed(23)).to(torch.bfloat16)
    (y, grads), _ = run_both(x, routing, bank, gy)
    bank32 = ExpertBank.from_parameters(
        torch.nn.Parameter(bank.w_in.detach().float()), torch.nn.Parameter(bank.down_proj.detach().float())
    )
    _, (y_ref, grads_ref) = run_both(x.float(), routing, bank32, gy.float())
    for name, a, b in zip(
        ("y", "x", "weight", "w_in", "down_proj"), [y, *grads], [y_ref, *grads_ref], strict=True
    ):
        assert a.dtype == (torch.float32 if name == "weight" else torch.bfloat16), name
        err = (a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)
        assert err < 2e-2, f"{name}: relative error {err:.3g}"


@needs_interpreter
def test_autocast_runs_in_autocast_dtype():
    """Under bf16 autocast with fp32 weights: bf16 GEMMs, fp32 weight gradients, close to fp32."""
    x, bank = make(8, 16, 16, 3, seed=25)
    routing = topk_routing(8, 3, 2, seed=26)
    gy = torch.randn(8, 16, generator=torch.Generator().manual_seed(27))
    xl = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_triton(xl, routing, bank)
    assert y.dtype == torch.bfloat16
    y.backward(gy.to(y.dtype))
    assert xl.grad.dtype == torch.float32 and bank.w_in.grad.dtype == torch.float32
    xr = x.clone().requires_grad_(True)
    bank32 = ExpertBank.from_parameters(
        torch.nn.Parameter(bank.w_in.detach().clone()), torch.nn.Parameter(bank.down_proj.detach().clone())
    )
    y_ref = moe_reference(xr, routing, bank32)
    y_ref.backward(gy)
    for name, a, b in (("y", y, y_ref), ("x", xl.grad, xr.grad), ("w_in", bank.w_in.grad, bank32.w_in.grad)):
        err = (a.float() - b).abs().max() / b.abs().max()
        assert err < 3e-2, f"{name}: relative error {err:.3g}"


@needs_interpreter
def test_strided_weights_and_input():
    """Weights stored transposed (as a ``[E, d, 2h]`` buffer) and a non-contiguous ``x``: strides honoured."""
    torch.manual_seed(31)
    e, d, h, t = 3, 16, 12, 9
    w_in = torch.nn.Parameter(torch.randn(e, d, 2 * h).div(4).transpose(1, 2))
    down = torch.nn.Parameter(torch.randn(e, h, d).div(4).transpose(1, 2))
    assert not w_in.is_contiguous() and not down.is_contiguous()
    bank = ExpertBank.from_parameters(w_in, down, "swiglu")
    x = torch.randn(d, t).t()
    assert not x.is_contiguous()
    assert_matches(x, topk_routing(t, e, 2, seed=32), bank)


@needs_interpreter
def test_no_grad_forward_matches():
    x, bank = make(9, 16, 16, 4, seed=41)
    routing = topk_routing(9, 4, 2, seed=42)
    with torch.no_grad():
        y = moe_triton(x, routing, bank)
        y_ref = moe_reference(x, routing, bank)
    assert not y.requires_grad
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("t", [0, 5])
def test_no_assignments(t):
    """T=0, and T>0 with every token dropped: zeros out, zero gradients."""
    x, bank = make(t, 16, 16, 3, seed=51)
    w = torch.zeros(0, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    routing = Routing(empty, empty, w, t, 3)
    xl = x.clone().requires_grad_(True)
    y = moe_triton(xl, routing, bank)
    assert y.shape == (t, 16)
    assert not y.any()
    y.sum().backward()
    assert xl.grad is not None and not xl.grad.any()
    assert not bank.w_in.grad.any() and not bank.down_proj.grad.any()


@needs_interpreter
def test_grouped_wgrad_against_einsum():
    """The weight-gradient kernel alone: ``dW[e] = sum over e's rows of a^T b`` by brute force."""
    torch.manual_seed(61)
    n, p, q, t = 23, 20, 18, 15
    e_sorted = torch.sort(torch.randint(0, 4, (n,)))[0]
    e_sorted[e_sorted == 2] = 1  # expert 2 empty
    e_sorted = torch.sort(e_sorted)[0]
    offsets = torch.cumsum(torch.bincount(e_sorted, minlength=4), 0).to(torch.int32)
    tok = torch.randint(0, t, (n,))
    a, b_tok = torch.randn(n, p), torch.randn(t, q)
    dw = K.grouped_wgrad(a, b_tok, offsets, tok, gather_a=False, gather_b=True, out_dtype=torch.float32)
    expect = torch.zeros(4, p, q)
    for j in range(n):
        expect[e_sorted[j]] += torch.outer(a[j], b_tok[tok[j]])
    torch.testing.assert_close(dw, expect, atol=1e-5, rtol=1e-5)


def test_bad_inputs():
    x, bank = make(4, 16, 16, 3, seed=71)
    routing = topk_routing(4, 3, 1)
    with pytest.raises(ValueError, match="d_in=16"):
        moe_triton(torch.randn(4, 8), routing, bank)
    with pytest.raises(ValueError, match="num_tokens"):
        moe_triton(torch.randn(5, 16), routing, bank)
    with pytest.raises(TypeError, match="dtype"):
        moe_triton(x.double(), routing, bank)
    with pytest.raises(ValueError, match="num_experts"):
        moe_triton(x, topk_routing(4, 5, 1), bank)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    import moelab.kernels.triton.kernels as kernels

    x, bank = make(4, 16, 16, 3, seed=72)
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        moe_triton(x, topk_routing(4, 3, 1), bank)


def test_registered_and_auto_on_cuda():
    info = [m for m in moelab.list_methods("executor") if m.name == "triton"]
    assert info and "ScatterMoE" in info[0].paper
    bank = ExpertBank(4, 16, 16)
    assert resolve_executor("auto", torch.device("cuda"), bank).name == "triton"
    assert resolve_executor("auto", torch.device("cpu"), bank).name != "triton"

    class BiasedBank(ExpertBank):  # changes the expert math: the kernels must not claim it
        def expert_forward(self, e, x_ND):
            return super().expert_forward(e, x_ND) + 1.0

    biased = BiasedBank(4, 16, 16)
    assert resolve_executor("auto", torch.device("cuda"), biased).name != "triton"
    assert not get_executor("triton").supports(biased)
    with pytest.raises(ValueError, match="BiasedBank"):
        moe_triton(torch.randn(3, 16), topk_routing(3, 4, 1), biased)


def test_import_without_triton():
    """``import moelab`` works where Triton is missing; the backend is then unavailable and auto skips it."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # as if not installed: find_spec -> None, import -> ImportError
        import torch, moelab
        from moelab.ops import get_executor, resolve_executor
        b = get_executor("triton")
        assert not b.available()
        bank = moelab.ExpertBank(4, 8, 8)
        assert resolve_executor("auto", torch.device("cuda"), bank).name == "sorted"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests ran in this process")
def test_interpreter_subprocess():
    """Run this file's kernel tests in a fresh interpreter with ``TRITON_INTERPRET=1`` set from the start."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-x", "-p", "no:cacheprovider"]
    cmd += ["-k", "not subprocess and not without_triton and not compile_for_sm90"]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    summary = out.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, tail


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Every kernel variant compiles for an H100 (sm_90) through Triton and its ptxas, with no GPU.

    The interpreter checks the math; this checks what only the compiler sees (types, layouts, tensor
    core shapes), and that the bf16 dots land on tensor cores (wgmma).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "moelab.kernels.triton.aot_check", "--arch", "90", "--dtypes", "bf16", "--first"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("_")]
    assert "compiled 8 kernel variants for sm_90" in out.stdout, out.stdout
    assert len(lines) == 8 and all(" wgmma " in ln for ln in lines), out.stdout
