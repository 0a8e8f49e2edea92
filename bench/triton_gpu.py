"""GPU benchmark of the ``triton`` backend: bf16, coarse and fine shapes, forward and forward+backward.

    python -m bench.triton_gpu                      # needs CUDA; without it, says so and exits 0
    python -m bench.triton_gpu --reps 50 --shapes fine
    python -m bench.triton_gpu --smoke --out-dir /tmp/x   # tiny shapes; runs the harness anywhere
                                                          # (CPU: Triton's interpreter), times nothing real

Implementations, with the same weights, the same input and (except MegaBlocks) the same routing:

- ``roofline``: one dense ``F.linear -> SwiGLU -> F.linear`` chain over the ``N = T*k`` rows,
  already gathered: the active FLOPs of the layer with no routing work;
- ``moelab_triton``: this backend (scatter2scatter kernels, ``moelab.ops.triton``);
- ``moelab_sorted``: moelab's ``sorted`` backend, i.e. ``torch.nn.functional.grouped_mm`` (or
  ``torch._grouped_mm``) for both GEMMs around a gather and a scatter;
- ``hf_eager``, ``hf_grouped_mm`` (and ``hf_sonicmoe`` when it runs): transformers 5's experts
  module (``MixtralExperts`` for coarse, ``OlmoeExperts`` for fine) sharing our weights;
- ``scattermoe``: ScatterMoE's ``GLUMLP`` with our weights, when ``scattermoe`` is importable;
- ``megablocks``: MegaBlocks' ``dMoE`` (grouped GLU) with its *own* router and weights at the
  same shapes, when ``megablocks`` is importable (a throughput reference, not the same routing).

Every implementation that shares the routing is checked against ``moelab_sorted`` before it is
timed (``max_rel_err``). Times are medians of ``--reps`` CUDA-event timings after warm-up (which
includes Triton's autotuning). Writes ``bench/results/triton-gpu-<device>-<date>.json`` and ``.md``.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .common import COARSE, FINE, RESULTS_DIR, Shape

SHAPES = {
    "coarse": COARSE,
    "fine": FINE,
}
SMOKE_SHAPES = {
    "coarse": Shape("coarse-smoke", 24, 32, 48, 4, 2, "mixtral"),
    "fine": Shape("fine-smoke", 24, 32, 16, 8, 4, "olmoe"),
}


# ----------------------------------------------------------------------------------- timing
def _timer(device):
    import torch

    if device.type == "cuda":

        def run(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

    else:

        def run(fn: Callable[[], object]) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    return run


def measure(fn: Callable[[], object], device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    timer = _timer(device)
    for _ in range(warmup):
        timer(fn)
    return statistics.median(timer(fn) for _ in range(reps))


def peak_mb(fn: Callable[[], object], device) -> float | None:
    """Peak allocated memory above what was live before ``fn`` (CUDA only)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ----------------------------------------------------------------------------------- problem
class Problem:
    """Weights, input, routing and output gradient shared by every implementation."""

    def __init__(self, shape: Shape, device, dtype, seed: int = 0) -> None:
        import torch

        import moelab
        from moelab.core import Routing

        g = torch.Generator(device="cpu").manual_seed(seed)
        self.shape, self.device, self.dtype = shape, device, dtype
        self.bank = moelab.ExpertBank(shape.E, shape.d, shape.h, "swiglu").to(device=device, dtype=dtype)
        with torch.no_grad():
            self.bank.gate_up_proj.copy_(
                torch.randn(self.bank.gate_up_proj.shape, generator=g) / shape.d**0.5
            )
            self.bank.down_proj.copy_(torch.randn(self.bank.down_proj.shape, generator=g) / shape.h**0.5)
        self.x = torch.randn(shape.T, shape.d, generator=g).to(device=device, dtype=dtype)
        self.gy = torch.randn(shape.T, shape.d, generator=g).to(device=device, dtype=dtype)
        logits = torch.randn(shape.T, shape.E, generator=g).to(device)
        w, idx = torch.softmax(logits, -1).topk(shape.k, dim=-1)
        self.topk_weight = (w / w.sum(-1, keepdim=True)).to(dtype)  # Mixtral renormalisation
        self.topk_index = idx
        self.routing = lambda weight: Routing(
            torch.arange(shape.T, device=device).repeat_interleave(shape.k),
            idx.reshape(-1),
            weight.reshape(-1),
            shape.T,
            shape.E,
            top_k=shape.k,
            validate=False,
        )


def moelab_impl(p: Problem, backend: str):
    from moelab.ops import get_executor

    fn = get_executor(backend).fn

    def run(x, weight):
        return fn(x, p.routing(weight), p.bank)

    return run


def roofline_impl(p: Problem):
    import torch
    import torch.nn.functional as F

    s = p.shape
    # The same number of active rows through one dense expert: the GEMM work with no routing.
    x_rows = p.x.repeat_interleave(s.k, dim=0)
    w_in, w_down = p.bank.gate_up_proj[0], p.bank.down_proj[0]

    def run(x, weight):
        del x, weight
        gate, up = F.linear(x_rows, w_in).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down)
        return y.view(s.T, s.k, s.d).sum(1)

    run.inputs = lambda: (x_rows.detach().requires_grad_(True), torch.zeros(0))
    return run


def hf_impl(p: Problem, implementation: str):
    """transformers' experts module with our weights (shared, not copied)."""
    if p.shape.family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts

        cfg = MixtralConfig(
            hidden_size=p.shape.d,
            intermediate_size=p.shape.h,
            num_local_experts=p.shape.E,
            num_experts_per_tok=p.shape.k,
        )
    else:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as Experts

        cfg = OlmoeConfig(
            hidden_size=p.shape.d,
            intermediate_size=p.shape.h,
            num_experts=p.shape.E,
            num_experts_per_tok=p.shape.k,
        )
    cfg._experts_implementation = implementation
    mod = Experts(cfg)
    mod.gate_up_proj = p.bank.gate_up_proj
    mod.down_proj = p.bank.down_proj

    def run(x, weight):
        return mod(x, p.topk_index, weight)

    return run


def scattermoe_impl(p: Problem):
    import torch
    from scattermoe.mlp import GLUMLP

    s = p.shape
    mod = GLUMLP(s.d, s.h, s.E, s.k, activation=torch.nn.SiLU()).to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        # ScatterMoE computes act(second half) * first half: put our gate rows second.
        gate, up = p.bank.gate_up_proj.chunk(2, dim=1)
        mod.experts.weight.copy_(torch.cat([up, gate], dim=1))
        mod.output_experts.weight.copy_(p.bank.down_proj)

    def run(x, weight):
        return mod(x, weight, p.topk_index)

    return run


def megablocks_impl(p: Problem):
    """MegaBlocks dMoE at the same shapes. Its own router: times the whole layer, routing differs."""
    from functools import partial

    import torch
    from megablocks.layers import dmoe
    from megablocks.layers.arguments import Arguments

    s = p.shape
    args = Arguments(
        hidden_size=s.d,
        ffn_hidden_size=s.h,
        moe_num_experts=s.E,
        moe_top_k=s.k,
        moe_capacity_factor=0,
        init_method=partial(torch.nn.init.normal_, mean=0.0, std=0.02),
        mlp_type="glu",
        mlp_impl="grouped",
        bf16=p.dtype == torch.bfloat16,
        fp16=False,
    )
    layer = dmoe.dMoE(args).to(device=p.device, dtype=p.dtype)

    def run(x, weight):
        del weight
        out = layer(x.view(s.T, 1, s.d))
        return (out[0] if isinstance(out, tuple) else out).view(s.T, s.d)

    run.same_routing = False
    return run


def implementations(p: Problem, include_eager: bool) -> dict[str, Callable[[], object]]:
    """Name -> factory; a factory that raises (missing package, unsupported GPU) is reported, not fatal."""
    impls = {
        "roofline": lambda: roofline_impl(p),
        "moelab_triton": lambda: moelab_impl(p, "triton"),
        "moelab_sorted": lambda: moelab_impl(p, "sorted"),
        "hf_grouped_mm": lambda: hf_impl(p, "grouped_mm"),
        "hf_sonicmoe": lambda: hf_impl(p, "sonicmoe"),
        "scattermoe": lambda: scattermoe_impl(p),
        "megablocks": lambda: megablocks_impl(p),
    }
    if include_eager:
        impls["hf_eager"] = lambda: hf_impl(p, "eager")
    return impls


# ----------------------------------------------------------------------------------- running
def bench_one(p: Problem, name: str, run, reference, reps: int, warmup: int) -> dict:

    s = p.shape
    inputs = getattr(run, "inputs", None)

    def fresh():
        if inputs is not None:
            return inputs()
        return p.x.detach().clone().requires_grad_(True), p.topk_weight.detach().clone().requires_grad_(True)

    x, w = fresh()
    y = run(x, w)
    err = None
    if reference is not None and getattr(run, "same_routing", True) and name != "roofline":
        err = float(
            (y.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-9)
        )

    def fwd():
        run(x, w)

    def fwdbwd():
        out = run(x, w)
        out.backward(p.gy)

    fwd_ms = measure(fwd, p.device, reps, warmup)
    fwdbwd_ms = measure(fwdbwd, p.device, reps, warmup)
    mem = peak_mb(fwdbwd, p.device)
    row = {
        "shape": s.name,
        "dtype": str(p.dtype).replace("torch.", ""),
        "impl": name,
        "fwd_ms": round(fwd_ms, 4),
        "fwdbwd_ms": round(fwdbwd_ms, 4),
        "peak_mb": None if mem is None else round(mem, 1),
        "tflops_fwd": round(s.flops_fwd / fwd_ms / 1e9, 2),
        "tflops_fwdbwd": round(3 * s.flops_fwd / fwdbwd_ms / 1e9, 2),
        "max_rel_err": None if err is None else float(f"{err:.3g}"),
    }
    if not getattr(run, "same_routing", True):
        row["note"] = "own router and weights; same shapes"
    return row


def run_shape(shape: Shape, device, dtype, reps: int, warmup: int, include_eager: bool) -> list[dict]:
    import torch

    p = Problem(shape, device, dtype)
    with torch.no_grad():
        reference = moelab_impl(p, "sorted")(p.x, p.topk_weight)
    rows = []
    for name, factory in implementations(p, include_eager).items():
        try:
            run = factory()
            row = bench_one(p, name, run, reference, reps, warmup)
        except Exception as e:  # a missing package or an unsupported device: report and go on
            row = {"shape": shape.name, "dtype": str(dtype).replace("torch.", ""), "impl": name}
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Triton backend on {meta['device']}",
        "",
        f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}; {meta['dtype']}; "
        f"median of {meta['reps']} runs after {meta['warmup']} warm-up runs. "
        "Produced by `python -m bench.triton_gpu`.",
        "",
        "| shape | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak MB "
        "| triton speed-up (fwd+bwd) | max rel err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_shape: dict[str, list[dict]] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], []).append(r)
    for shape, rs in by_shape.items():
        ours = next((r for r in rs if r["impl"] == "moelab_triton" and "error" not in r), None)
        for r in rs:
            if "error" in r:
                lines.append(f"| {shape} | {r['impl']} | n/a | n/a | | | | | {r['error']} |")
                continue
            speed = f"{r['fwdbwd_ms'] / ours['fwdbwd_ms']:.2f}x" if ours else ""
            err = "" if r.get("max_rel_err") is None else f"{r['max_rel_err']:.2g}"
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(
                f"| {shape} | {r['impl']}{note} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r['tflops_fwd']} "
                f"| {r['tflops_fwdbwd']} | {r['peak_mb'] if r['peak_mb'] is not None else ''} | {speed} | {err} |"
            )
    lines += [
        "",
        "*triton speed-up*: this row's fwd+bwd time over `moelab_triton`'s (above 1: Triton is faster). "
        "*max rel err*: max |y - y_sorted| / max |y_sorted| of the forward, against `moelab_sorted` "
        "on the same routing.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="coarse,fine", help="comma-separated: coarse, fine")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-eager", action="store_true", help="skip transformers' eager loop")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device; times mean nothing")
    args = ap.parse_args(argv)

    if args.smoke:
        # On CPU the triton backend only runs under the interpreter, which must be on before
        # Triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench/triton_gpu.py needs a CUDA GPU; none here, so nothing was measured (exit 0).")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    table = SMOKE_SHAPES if args.smoke else SHAPES
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {sorted(table)}")
    reps, warmup = (1, 0) if args.smoke else (args.reps, args.warmup)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    meta = {
        "device": dev_name,
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "dtype": "bfloat16",
        "reps": reps,
        "warmup": warmup,
        "smoke": args.smoke,
    }
    rows = []
    for n in names:
        rows += run_shape(table[n], device, dtype, reps, warmup, include_eager=not args.no_eager)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev_name).strip("-").lower() or "device"
    stem = args.out_dir / f"triton-gpu-{slug}-{meta['date']}{'-smoke' if args.smoke else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
