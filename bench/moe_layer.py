"""MoE layer benchmark: every moelab backend against the GEMM roofline and transformers' experts.

    python -m bench.moe_layer --quick --json runs/bench-quick.json   # coarse fp32 only, < 2 min
    python -m bench.moe_layer                                       # every shape and dtype

Implementations, all with the same weights, the same input and the same routing:

- ``roofline``: one dense ``F.linear -> SwiGLU -> F.linear`` chain over ``N = T*k`` rows, i.e.
  exactly the active FLOPs of the layer with no routing work at all;
- ``hf_eager`` / ``hf_grouped_mm``: transformers' own experts module (``MixtralExperts`` for the
  coarse shape, ``OlmoeExperts`` for the fine one) built from a tiny config with our weights copied
  in, under ``config._experts_implementation = "eager"`` and ``"grouped_mm"``;
- ``moelab_<backend>``: every registered moelab backend usable on this device.

Training shapes time one forward (with autograd on, as in a training step) and one forward +
backward (``fwd_ms``, ``fwdbwd_ms``); decode shapes (``T <= 16``) time an inference forward under
``no_grad`` and leave ``fwdbwd_ms`` empty. ``peak_mb`` is the peak of live tensor memory while the
implementation runs (fwd+bwd, or fwd for decode) plus the size of its inputs (x, its weights, the
routing); see ``bench/common.py`` for how it is read from the allocator.

Each row: ``{"shape", "dtype", "impl", "fwd_ms", "fwdbwd_ms", "peak_mb"}`` (plus extra fields).
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import moelab
from moelab.core.activations import activation_backward, activation_forward
from moelab.experts.bank import ExpertBank
from moelab.kernels.cpu.gemm import linear, uses_onednn
from moelab.ops import executor_names, get_executor, resolve_executor

from .common import (
    COARSE,
    FINE,
    RESULTS_DIR,
    Shape,
    Stopwatch,
    interleaved,
    machine_info,
    machine_tag,
    md_table,
    median,
    peak_bytes,
    set_threads,
    write_json,
)

MB = 1024 * 1024


DECODE_T = (1, 4, 16)
# --quick keeps to two minutes: it leaves out the readable reference (not a contender) and the
# oneDNN roofline (a diagnostic); the full run has both.
QUICK_SKIP = ("moelab_reference", "roofline_onednn")
# The full run keeps `make bench` under ten minutes on 2 cores: the readable reference's
# fwd+bwd on the fine shape (64 experts) takes ~11 s per round (as long as everything else on that
# shape together); it is measured on the coarse and decode shapes.
FULL_SKIP = {"fine": ("moelab_reference",)}


def all_shapes() -> list[Shape]:
    out = [COARSE, FINE]
    for base in (COARSE, FINE):
        for t in DECODE_T:
            out.append(Shape(f"{base.name}-decode-T{t}", t, base.d, base.h, base.E, base.k, base.family))
    return out


# ----------------------------------------------------------------------------------- problem set-up
@dataclass
class Problem:
    shape: Shape
    dtype: torch.dtype
    x: torch.Tensor  # [T, d]
    routes: list[tuple[torch.Tensor, torch.Tensor]]  # per round: ([T, k] long ids, [T, k] fp32 weights)
    bank: ExpertBank
    grad_y: torch.Tensor  # [T, d]

    @property
    def idx(self) -> torch.Tensor:
        return self.routes[0][0]

    @property
    def w(self) -> torch.Tensor:
        return self.routes[0][1]


_BANK_CACHE: dict[tuple, ExpertBank] = {}


def _bank(shape: Shape, dtype: torch.dtype, seed: int) -> ExpertBank:
    """The expert weights, shared by the shapes that differ only in T (one bank kept at a time)."""
    key = (shape.E, shape.d, shape.h, dtype, seed)
    if key not in _BANK_CACHE:
        _BANK_CACHE.clear()
        g = torch.Generator().manual_seed(seed)
        bank = ExpertBank(shape.E, shape.d, shape.h, "swiglu")
        with torch.no_grad():
            bank.gate_up_proj.normal_(0, shape.d**-0.5, generator=g)
            bank.down_proj.normal_(0, shape.h**-0.5, generator=g)
        _BANK_CACHE[key] = bank.to(dtype)
    return _BANK_CACHE[key]


def make_problem(shape: Shape, dtype: torch.dtype, seed: int = 0, n_routes: int = 1) -> Problem:
    """Weights, input and ``n_routes`` routings: one per timed round, as in training, where the
    routing (and so every expert's row count) changes at each step; routing 0 is the warm-up's."""
    bank = _bank(shape, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape.T, shape.d, generator=g).to(dtype)
    grad_y = torch.randn(shape.T, shape.d, generator=g).to(dtype)
    routes = []
    for _ in range(n_routes):
        # Mixtral-style routing from random logits: softmax, top-k, renormalised (router in fp32).
        logits = torch.randn(shape.T, shape.E, generator=g)
        w, idx = torch.topk(logits.softmax(-1), shape.k, dim=-1)
        routes.append((idx, w / w.sum(-1, keepdim=True)))
    return Problem(shape, dtype, x, routes, bank, grad_y)


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def minimum_bytes(p: Problem) -> int:
    """The memory any fwd+bwd must hold at some point (the denominator of the peak ratio).

    inputs (x, routing) + weights + the activation the math must save (the pre-activation
    ``h_in [N, 2h]``: rebuilding it costs a third of the forward's FLOPs) + what a fwd+bwd
    produces (y, dx, the weight gradients, the routing-weight gradient). The weight gradients are
    included because no implementation can finish a backward without them.
    """
    s = p.shape
    n = s.T * s.k
    el = p.x.element_size()
    params = sum(t.numel() for t in p.bank.parameters()) * el
    routing = _nbytes(p.idx, p.w)
    x = _nbytes(p.x)
    if s.decode:  # inference: inputs + weights + output
        return x + params + routing + x
    h_in = n * 2 * s.h * el
    return x + params + routing + h_in + x + x + params + _nbytes(p.w)


# ----------------------------------------------------------------------------------- implementations
@dataclass
class Impl:
    name: str
    forward: object  # () -> y [T, d] (or [N, d] for the roofline)
    leaves: list[torch.Tensor]  # tensors whose .grad is reset between runs
    input_bytes: int


def _hf_experts(p: Problem, impl: str):
    s = p.shape
    if s.family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Cls

        cfg = MixtralConfig(
            hidden_size=s.d, intermediate_size=s.h, num_local_experts=s.E, num_experts_per_tok=s.k
        )
    else:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeExperts as Cls

        cfg = OlmoeConfig(hidden_size=s.d, intermediate_size=s.h, num_experts=s.E, num_experts_per_tok=s.k)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mod = Cls(cfg)
    return mod


class _OneDnnChain(torch.autograd.Function):
    """``silu(x W1g^T) * (x W1u^T) @ W2^T`` with oneDNN GEMMs where moelab uses them."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        h = linear(x, w1)
        a = activation_forward(h, "swiglu")
        ctx.save_for_backward(x, w1, w2, h)
        return linear(a, w2)

    @staticmethod
    def backward(ctx, gy):
        x, w1, w2, h = ctx.saved_tensors
        a = activation_forward(h, "swiglu")
        gw2 = torch.mm(gy.t(), a)
        dh = activation_backward(h, linear(gy, w2.t()), "swiglu")
        return linear(dh, w1.t()), torch.mm(dh.t(), x), gw2


def make_impls(p: Problem, include: set[str] | None = None, cur: dict | None = None) -> list[Impl]:
    """Every implementation as a closure; ``cur["r"]`` picks the routing (round) they all use."""
    s, dt = p.shape, p.dtype
    cur = cur if cur is not None else {"r": 0}
    x = p.x.detach().clone().requires_grad_(not s.decode)
    routes = [(i, w.detach().clone().requires_grad_(not s.decode)) for i, w in p.routes]
    ws = [w for _, w in routes]
    impls: list[Impl] = []
    routing_bytes = _nbytes(p.idx, p.w)
    bank_bytes = sum(_nbytes(t) for t in p.bank.parameters())

    # roofline: one dense chain with the layer's active FLOPs (N = T*k rows, one expert's weights).
    g = torch.Generator().manual_seed(1)
    n = s.T * s.k
    x_rows = (torch.randn(n, s.d, generator=g).to(dt)).requires_grad_(not s.decode)
    w1 = (torch.randn(2 * s.h, s.d, generator=g) * s.d**-0.5).to(dt).requires_grad_(not s.decode)
    w2 = (torch.randn(s.d, s.h, generator=g) * s.h**-0.5).to(dt).requires_grad_(not s.decode)

    def roofline():
        gate, up = F.linear(x_rows, w1).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    impls.append(Impl("roofline", roofline, [x_rows, w1, w2], _nbytes(x_rows, w1, w2)))
    if uses_onednn(x_rows) and s.name == COARSE.name:
        # The same chain with its GEMMs routed as moelab.kernels.cpu.gemm routes them (oneDNN for the
        # activation GEMMs, torch.mm for the weight gradients): separates GEMM-library gains
        # from everything else. A diagnostic, run on the coarse shape only (time budget).
        def roofline_onednn():
            return _OneDnnChain.apply(x_rows, w1, w2)

        impls.append(Impl("roofline_onednn", roofline_onednn, [x_rows, w1, w2], _nbytes(x_rows, w1, w2)))

    # transformers' experts module, our weights copied in; eager and grouped_mm share the parameters.
    try:
        hf = {name: _hf_experts(p, name) for name in ("eager", "grouped_mm")}
    except ImportError:
        hf = {}
    if hf:
        gate_up = torch.nn.Parameter(p.bank.gate_up_proj.detach().clone(), requires_grad=not s.decode)
        down = torch.nn.Parameter(p.bank.down_proj.detach().clone(), requires_grad=not s.decode)
        for name, mod in hf.items():
            mod.gate_up_proj, mod.down_proj = gate_up, down

            def run(mod=mod):
                idx, w = routes[cur["r"]]
                return mod(x, idx, w)

            impls.append(
                Impl(f"hf_{name}", run, [x, *ws, gate_up, down], _nbytes(p.x, gate_up, down) + routing_bytes)
            )

    if s.decode:
        # The bandwidth floor of decoding: read every touched expert's weights once (a sum of
        # each), which any implementation must do; no GEMM, no routing.
        touched = [sorted(set(i.flatten().tolist())) for i, _ in routes]
        w_in_all, w_down_all = p.bank.w_in.detach(), p.bank.down_proj.detach()

        def weights_read():
            total = x.new_zeros(())
            for e in touched[cur["r"]]:
                total = total + w_in_all[e].sum() + w_down_all[e].sum()
            return total

        impls.append(Impl("weights_read", weights_read, [], 0))

    # moelab backends, through the Routing contract (a fresh Routing per call: no cached sort).
    bank = p.bank
    bank.requires_grad_(not s.decode)
    for name in executor_names():
        b = get_executor(name)
        if not b.usable(p.x.device, bank):
            continue

        def run(b=b):
            idx, w = routes[cur["r"]]
            r = moelab.Routing.from_topk(idx, w, s.E, validate=False)
            return b(x, r, bank)

        impls.append(
            Impl(
                f"moelab_{name}", run, [x, *ws, *bank.parameters()], _nbytes(p.x) + bank_bytes + routing_bytes
            )
        )
    if include:
        impls = [i for i in impls if i.name in include]
    return impls


def _reset(leaves: list[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def bench_shape(
    p: Problem, rounds: int, include: set[str] | None = None, exclude: tuple[str, ...] = (), log=print
) -> list[dict]:
    """Time and measure every implementation on one problem; rows in the documented format."""
    s = p.shape
    cur = {"r": 0}
    impls = [i for i in make_impls(p, include, cur) if i.name not in exclude]
    gy_full = p.grad_y
    gy_rows = torch.randn(s.T * s.k, s.d, generator=torch.Generator().manual_seed(2)).to(p.dtype)

    def runner(impl: Impl):
        gy = gy_rows if impl.name.startswith("roofline") else gy_full

        if s.decode:

            def once():
                with torch.no_grad(), Stopwatch() as sw:
                    y = impl.forward()
                del y
                return (sw.s,)

            def measured():
                with torch.no_grad():
                    return impl.forward()

        else:

            def once():
                _reset(impl.leaves)
                with Stopwatch() as fw:
                    y = impl.forward()
                with Stopwatch() as bw:
                    y.backward(gy)
                del y
                _reset(impl.leaves)
                return (fw.s, fw.s + bw.s)

            def measured():
                _reset(impl.leaves)
                y = impl.forward()
                y.backward(gy)
                return y

        return once, measured

    fns = {}
    peaks = {}
    for impl in impls:
        once, measured = runner(impl)
        # Warm-up run = the memory measurement.
        peak, out = peak_bytes(measured)
        del out
        _reset(impl.leaves)
        peaks[impl.name] = peak + impl.input_bytes
        fns[impl.name] = once
    # Round r runs every implementation on routing r + 1 (routing 0 was the warm-up's).
    times = interleaved(fns, rounds, on_round=lambda r: cur.__setitem__("r", (r + 1) % len(p.routes)))
    rows = []
    minimum = minimum_bytes(p)
    dname = str(p.dtype).replace("torch.", "")
    for impl in impls:
        ts = times[impl.name]
        fwd = median([t[0] for t in ts]) * 1e3
        fwdbwd = None if s.decode else median([t[1] for t in ts]) * 1e3
        rows.append(
            {
                "shape": s.name,
                "dtype": dname,
                "impl": impl.name,
                "fwd_ms": round(fwd, 3),
                "fwdbwd_ms": None if fwdbwd is None else round(fwdbwd, 3),
                "peak_mb": round(peaks[impl.name] / MB, 1),
                "min_mb": round(minimum / MB, 1),
                "rounds": rounds,
                "T": s.T,
                "d": s.d,
                "h": s.h,
                "E": s.E,
                "k": s.k,
            }
        )
    auto = resolve_executor("auto", p.x.device, p.bank).name
    for r in rows:
        r["auto"] = f"moelab_{auto}"
    log(format_ratios(rows))
    return rows


# ----------------------------------------------------------------------------------- reporting
def _best_hf(rows: list[dict], key: str) -> dict | None:
    hf = [r for r in rows if r["impl"].startswith("hf_") and r[key] is not None]
    return min(hf, key=lambda r: r[key]) if hf else None


def ratio_rows(rows: list[dict]) -> list[list[object]]:
    """Per implementation: times, roofline efficiency (roofline_ms / ms), speed-up over best HF."""
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["dtype"]), []).append(r)
    for (shape, dtype), rs in by.items():
        roof = next((r for r in rs if r["impl"] == "roofline"), None)
        for r in rs:
            cells = [shape, dtype, r["impl"], r["fwd_ms"], r["fwdbwd_ms"], r["peak_mb"]]
            for key in ("fwd_ms", "fwdbwd_ms"):
                cells.append(roof[key] / r[key] if roof and r[key] and roof[key] else None)
            for key in ("fwd_ms", "fwdbwd_ms"):
                best = _best_hf(rs, key)
                cells.append(best[key] / r[key] if best and r[key] else None)
            cells.append(r["peak_mb"] / r["min_mb"] if r.get("min_mb") else None)
            out.append(cells)
    return out


RATIO_HEADER = [
    "shape", "dtype", "impl", "fwd ms", "fwd+bwd ms", "peak MB",
    "fwd eff.", "fwd+bwd eff.", "fwd x best HF", "fwd+bwd x best HF", "peak/min",
]  # fmt: skip


def format_ratios(rows: list[dict]) -> str:
    return md_table(RATIO_HEADER, ratio_rows(rows))


def targets(rows: list[dict], ours: str) -> list[list[object]]:
    """The issue's CPU targets, each with the measured value and met / gap."""

    def get(shape, dtype, impl, key):
        for r in rows:
            if r["shape"] == shape and r["dtype"] == dtype and r["impl"] == impl:
                return r[key]
        return None

    out = []
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: (d != "float32", d))
    for dt in dtypes:
        for shape, key, goal, label in (
            ("coarse", "fwd_ms", 0.95, "coarse fwd >= 0.95 of roofline"),
            ("coarse", "fwdbwd_ms", 0.9, "coarse fwd+bwd >= 0.9 of roofline"),
            ("fine", "fwdbwd_ms", 0.7, "fine fwd+bwd >= 0.7 of roofline"),
        ):
            roof, mine = get(shape, dt, "roofline", key), get(shape, dt, ours, key)
            if roof and mine:
                v = roof / mine
                out.append([label, dt, f"{v:.2f}", "met" if v >= goal else f"gap {goal - v:.2f}"])
        for r in rows:
            if r["dtype"] == dt and "decode" in r["shape"] and r["impl"] == ours:
                eager = get(r["shape"], dt, "hf_eager", "fwd_ms")
                floor = get(r["shape"], dt, "weights_read", "fwd_ms")
                if eager:
                    v = eager / r["fwd_ms"]
                    status = "met" if v >= 2 else f"gap {2 - v:.2f}x"
                    if v < 2 and floor:
                        # What bounds it: reading the touched weights once, with no arithmetic,
                        # is only eager/floor faster than hf_eager.
                        status += f"; reading the weights alone: {eager / floor:.2f}x hf_eager"
                    out.append([f"{r['shape']} >= 2x hf_eager", dt, f"{v:.2f}x", status])
        for shape in ("coarse", "fine"):
            peak, mn = get(shape, dt, ours, "peak_mb"), get(shape, dt, ours, "min_mb")
            if peak and mn:
                v = peak / mn
                out.append(
                    [
                        f"{shape} peak fwd+bwd <= 1.25x min",
                        dt,
                        f"{v:.2f}x",
                        "met" if v <= 1.25 else f"gap {v - 1.25:.2f}x",
                    ]
                )
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Left: training shapes, roofline time / fwd+bwd time. Right: decode, speed-up over hf_eager."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def by(shape, dt):
        return {r["impl"]: r for r in rows if r["shape"] == shape and r["dtype"] == dt}

    train = sorted({(r["shape"], r["dtype"]) for r in rows if r["fwdbwd_ms"]})
    decode = sorted(
        {(r["shape"], r["dtype"]) for r in rows if not r["fwdbwd_ms"]},
        key=lambda g: (g[0].split("-")[0], int(g[0].rsplit("T", 1)[-1]), g[1]),
    )
    impls = sorted({r["impl"] for r in rows if not r["impl"].startswith("roofline")})
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
    panels = [(g, k) for g, k in ((train, "train"), (decode, "decode")) if g]
    ratios = [1.0 if k == "train" else 2.0 for _, k in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5 * sum(ratios), 4.2), squeeze=False, gridspec_kw={"width_ratios": ratios}
    )
    for ax, (groups, kind) in zip(axes[0], panels, strict=True):
        names = [i for i in impls if kind == "decode" or i != "weights_read"]
        width = 0.8 / max(1, len(names))
        for i, impl in enumerate(names):
            vals = []
            for shape, dt in groups:
                rs = by(shape, dt)
                me = rs.get(impl)
                if kind == "train":
                    ref = rs.get("roofline")
                    vals.append(ref["fwdbwd_ms"] / me["fwdbwd_ms"] if ref and me and me["fwdbwd_ms"] else 0.0)
                else:
                    ref = rs.get("hf_eager")
                    vals.append(ref["fwd_ms"] / me["fwd_ms"] if ref and me else 0.0)
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=impl, color=colors[impl])
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        if kind == "decode":
            ax.axhline(2.0, color="tab:red", lw=0.8, ls=":")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        labels = [
            f"{sh.replace('-decode-', ' ')}\n{dt.replace('bfloat', 'bf').replace('float', 'fp')}"
            for sh, dt in groups
        ]
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("roofline / fwd+bwd time" if kind == "train" else "speed-up over hf_eager (fwd)")
        ax.set_title("training shapes (T=4096)" if kind == "train" else "decode (T<=16), inference")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8)
    fig.suptitle("moelab MoE layer on CPU (bench/moe_layer.py)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def auto_check(rows: list[dict]) -> list[list[object]]:
    """Per shape: the backend ``auto`` picks and the fastest moelab backend measured (fwd+bwd for
    training shapes, fwd for decode), with the ratio. ``auto`` must never be the slower one."""
    out = []
    for shape, dt in sorted({(r["shape"], r["dtype"]) for r in rows}, key=lambda g: (g[1] != "float32", g)):
        rs = [r for r in rows if r["shape"] == shape and r["dtype"] == dt and r["impl"].startswith("moelab_")]
        if not rs:
            continue
        key = "fwdbwd_ms" if rs[0]["fwdbwd_ms"] else "fwd_ms"
        auto = rs[0].get("auto")
        best = min(rs, key=lambda r: r[key])
        mine = next((r for r in rs if r["impl"] == auto), None)
        if mine is None:
            continue
        ratio = mine[key] / best[key]
        verdict = "auto is fastest" if best["impl"] == auto else f"{best['impl']} is {ratio:.2f}x faster"
        out.append([shape, dt, auto, best["impl"], f"{ratio:.2f}", verdict])
    return out


def markdown_report(rows: list[dict], info: dict, ours: str) -> str:
    parts = [
        "# MoE layer benchmark",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads; torch {info['torch']}, "
        f"transformers {info.get('transformers')}; {info['date']}; load average at start "
        f"{info['loadavg_1_5_15']}, at end {info.get('loadavg_end')}; one small 2-thread op took "
        f"{info.get('parallel_region_us')} us at the start, {info.get('parallel_region_us_end')} us at the end "
        "(~20-40 us when the cores are free; see bench/README.md).",
        "",
        "`eff.` = roofline time / implementation time (1.0 = as fast as one dense GEMM chain with the same "
        "active FLOPs). `x best HF` = best transformers implementation's time / implementation time. "
        "`peak/min` = peak live memory / the minimum any implementation must hold (bench/README.md).",
        "",
        "## Targets",
        "",
        md_table(["target", "dtype", f"measured ({ours})", "status"], targets(rows, ours)),
        "",
        '## `backend="auto"` against every moelab backend',
        "",
        md_table(
            ["shape", "dtype", "auto picks", "fastest moelab backend", "auto time / fastest", "verdict"],
            auto_check(rows),
        ),  # fmt: skip
        "",
        "## All implementations",
        "",
        format_ratios(rows),
        "",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------- entry point
def run(quick: bool = False, rounds: int | None = None, shapes: list[str] | None = None,
        dtypes: list[str] | None = None, log=print) -> list[dict]:  # fmt: skip
    """Run the benchmark; return the rows."""
    todo = [COARSE] if quick else all_shapes()
    if shapes:
        todo = [s for s in all_shapes() if s.name in shapes]
    dts = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    if dtypes:
        dts = [getattr(torch, d) for d in dtypes]
    rows: list[dict] = []
    t0 = time.perf_counter()
    for dt in dts:
        for s in todo:
            n = rounds or (5 if not s.decode else 15)
            log(
                f"\n## {s.name} {str(dt).replace('torch.', '')}: T={s.T} d={s.d} h={s.h} E={s.E} k={s.k}, {n} rounds"
            )
            p = make_problem(s, dt, n_routes=n + 1)
            skip = QUICK_SKIP if quick else FULL_SKIP.get(s.name, ())
            rows += bench_shape(p, n, include=None, exclude=skip, log=log)
            del p
            log(f"({time.perf_counter() - t0:.0f} s elapsed)")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="coarse fp32 only (< 2 minutes)")
    ap.add_argument("--json", type=Path, default=None, help="where to write the rows (JSON list)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up (>= 5)")
    ap.add_argument("--shapes", default=None, help="comma-separated subset, e.g. coarse,fine-decode-T1")
    ap.add_argument("--dtypes", default=None, help="comma-separated subset of float32,bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--ours", default="moelab_fast", help="the implementation the targets table judges")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    info = machine_info()
    rows = run(
        quick=args.quick,
        rounds=args.rounds,
        shapes=args.shapes.split(",") if args.shapes else None,
        dtypes=args.dtypes.split(",") if args.dtypes else None,
    )
    end = machine_info()
    info["loadavg_end"], info["parallel_region_us_end"] = end["loadavg_1_5_15"], end["parallel_region_us"]
    ours = args.ours if any(r["impl"] == args.ours for r in rows) else rows[-1]["auto"]
    print("\n" + md_table(["target", "dtype", f"measured ({ours})", "status"], targets(rows, ours)))
    if args.json is not None:
        write_json(args.json, rows)
    if not args.quick and args.json is None:
        stem = f"{machine_tag()}-{_dt.date.today().isoformat()}"
        write_json(RESULTS_DIR / f"{stem}.json", {"machine": info, "rows": rows})
        (RESULTS_DIR / f"{stem}.md").write_text(markdown_report(rows, info, ours))
        plot(rows, RESULTS_DIR / f"{stem}.png")
        print(f"wrote {RESULTS_DIR / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
