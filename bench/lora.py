"""Routed LoRA mixtures against the bare projection, a per-expert loop and PEFT's X-LoRA, in one run.

    python -m bench.lora [--projections q_proj,up_proj,down_proj] [--dtypes fp32,bf16] [--rounds 9]
                         [--tokens 4096] [--threads N] [--quick] [--json PATH] [--md PATH]

Problem (issue #13, section 4): SmolLM2-135M's shapes (``d = 576``, MLP width 1536), one adapted
projection at a time: ``q_proj`` 576 -> 576, ``up_proj`` 576 -> 1536, ``down_proj`` 1536 -> 576;
``T = 4096`` tokens, ``E = 8`` LoRA experts of rank ``r = 8`` (``alpha = 8``, PEFT's default:
scaling 1), ``k = 2``. Implementations, on the same input, the same frozen projection and the same
adapters:

- ``base``: the bare frozen ``nn.Linear`` (the anchor);
- ``moelab``: ``moelab.lora.RoutedLoRA(method="mole")`` around that Linear (softmax top-2,
  renormalised, with the mole preset's load-balance loss computed in the forward): router ->
  grouped low-rank GEMMs over the routed rows;
- ``loop``: the same router and adapters, then a Python loop over the experts (rows routed to
  ``e`` -> ``x_e A_e^T B_e^T * scaling``, weighted, ``index_add``): the readable implementation;
- ``xlora``: PEFT's own X-LoRA layer (``XLoraLinearLayer`` over a peft ``lora.Linear``) with the
  same adapters, via ``moelab.integrations.peft.xlora_projection``: the dense mixture, every expert
  on every token, weighted by a softmax classifier (here given the moelab router's gate weights).

Forward is an inference forward (``no_grad``); forward+backward is a training step of the
projection with the base frozen: gradients of ``x``, of the router (X-LoRA: its classifier) and of
the adapters. Before timing, the script checks that ``moelab`` and ``loop`` agree (output and every
gradient, max abs error), that ``xlora`` computes its definition ``W x + b + sum_e p_e(x) * scaling
* B_e A_e x`` (written plainly, in float64) and that it equals a dense moelab mixture on the same
gate (``top_k = E``, no renormalisation); a failed check raises.

Reported per (dtype, projection, implementation): forward and forward+backward time (medians over
interleaved rounds; every round draws a new input, hence a new routing, shared by all), the ratio
to ``base`` in the same rounds (the overhead; goal <= 1.3x for moelab), ``xlora / moelab`` (goal
>= 2x) and the peak memory above the inputs (CPU: allocator events, ``bench.common.peak_bytes``;
CUDA: ``max_memory_allocated``). The roofline: the routed LoRA FLOPs ``2 T k r (d_in + d_out)``
relative to the base GEMM's ``2 T d_in d_out`` (the ideal overhead is 1 + that), with X-LoRA's
dense ``E`` in place of ``k`` and the router's ``2 T d_in E`` beside it. Nothing is asserted about
time. Writes JSON (with the machine) and markdown.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab.integrations.peft import xlora_projection
from moelab.lora import RoutedLoRA

from .common import (
    RESULTS_DIR,
    device_peak_bytes,
    interleaved,
    machine_info,
    machine_tag,
    md_table,
    median,
    set_threads,
    sync,
    write_json,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config: hidden_size 576, intermediate_size 1536).
PROJECTIONS = {"q_proj": (576, 576), "up_proj": (576, 1536), "down_proj": (1536, 576)}
IMPLS = ("base", "moelab", "loop", "xlora")
QUICK_PROJECTION = "up_proj"
# Largest max-abs error, relative to the reference's largest magnitude, that the checks accept.
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


# ----------------------------------------------------------------------------------- FLOPs
def lora_flop_fraction(d_in: int, d_out: int, experts_per_token: int, rank: int) -> float:
    """LoRA FLOPs ``2 T a r (d_in + d_out)`` over the base GEMM's ``2 T d_in d_out`` (``a`` experts per token)."""
    return experts_per_token * rank * (d_in + d_out) / (d_in * d_out)


def router_flop_fraction(d_out: int, num_experts: int) -> float:
    """Router (linear gate) FLOPs ``2 T d_in E`` over the base GEMM's ``2 T d_in d_out``."""
    return num_experts / d_out


# ----------------------------------------------------------------------------------- the contenders
def build(
    d_in: int, d_out: int, dtype: torch.dtype, device: str, num_experts: int, rank: int, top_k: int, seed: int
) -> tuple[nn.Linear, RoutedLoRA, nn.Module]:
    """``(base, moelab layer, X-LoRA projection)`` sharing the frozen base and the adapters.

    A fresh bank has ``B = 0`` (PEFT's init); ``B`` is drawn ``N(0, 1/r)`` here so the mixture's term
    is as large as the base output and the agreement checks compare something. X-LoRA's classifier
    takes the moelab router's gate weights (no bias), so both weigh experts from the same logits.
    """
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, device=device, dtype=dtype)
    layer = RoutedLoRA(base, num_experts, rank, method="mole", top_k=top_k)
    with torch.no_grad():
        layer.bank.lora_B.normal_(0.0, 1.0 / math.sqrt(rank))
    xlora = xlora_projection(layer)
    with torch.no_grad():
        xlora.classifier.weight.copy_(layer.router.weight)
        xlora.classifier.bias.zero_()
    return base, layer, xlora


def per_expert_loop(layer: RoutedLoRA, x_TD: Tensor) -> Tensor:
    """``W x + b + sum_e sum_{rows routed to e} w * scaling * B_e A_e x``, one expert at a time."""
    y_TO = layer.base(x_TD)
    routing = layer.router(x_TD)
    bank = layer.bank
    delta_TO = torch.zeros_like(y_TO)
    for e in range(bank.num_experts):
        rows = (routing.expert_index == e).nonzero().squeeze(1)
        tokens = routing.token_index[rows]
        weight = routing.weight[rows].to(x_TD.dtype)
        out = (x_TD[tokens] @ bank.lora_A[e].T) @ bank.lora_B[e].T * bank.scaling
        delta_TO = delta_TO.index_add(0, tokens, out * weight[:, None])
    return y_TO + delta_TO


def implementations(
    base: nn.Linear, layer: RoutedLoRA, xlora: nn.Module
) -> dict[str, Callable[[Tensor], Tensor]]:
    return {
        "base": base,
        "moelab": layer,
        "loop": lambda x: per_expert_loop(layer, x),
        "xlora": xlora,
    }


def trainable(impl: str, layer: RoutedLoRA, xlora: nn.Module) -> list[nn.Parameter]:
    """The parameters a training step of ``impl`` differentiates (the base is frozen everywhere)."""
    if impl == "base":
        return []
    module = xlora if impl == "xlora" else layer
    return [p for p in module.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------- checks
def _rel_err(got: Tensor, ref: Tensor) -> tuple[float, float]:
    """``(max abs error, that over the reference's max magnitude)``, in float64."""
    err = (got.double() - ref.double()).abs().max().item()
    return err, err / max(ref.double().abs().max().item(), 1e-30)


def check_agreement(
    base: nn.Linear, layer: RoutedLoRA, xlora: nn.Module, x_TD: Tensor, grad_TO: Tensor
) -> dict[str, float]:
    """Max abs errors of moelab vs the loop (output, grads of x, router, A, B), of X-LoRA vs its
    definition in float64, and of X-LoRA vs a dense moelab mixture on the same gate. Raises when an
    error exceeds ``CHECK_TOL`` relative to the reference's magnitude."""
    dtype = x_TD.dtype
    out: dict[str, float] = {}
    failures: list[str] = []

    def record(name: str, got: Tensor, ref: Tensor) -> None:
        err, rel = _rel_err(got, ref)
        out[name] = err
        if not rel <= CHECK_TOL[dtype]:
            failures.append(f"{name}: max abs err {err:.3g} ({rel:.3g} of the reference's max)")

    params = [layer.router.weight, layer.bank.lora_A, layer.bank.lora_B]

    def step(fn: Callable[[Tensor], Tensor]) -> list[Tensor]:
        for p in params:
            p.grad = None
        xg = x_TD.detach().requires_grad_()
        y = fn(xg)
        y.backward(grad_TO)
        return [y.detach(), xg.grad] + [p.grad.clone() for p in params]

    got = step(layer)
    ref = step(lambda x: per_expert_loop(layer, x))
    for name, g, r in zip(("y", "grad_x", "grad_router", "grad_A", "grad_B"), got, ref, strict=True):
        record(f"moelab_vs_loop_{name}", g, r)
    for p in params:
        p.grad = None

    with torch.no_grad():
        y_xlora = xlora(x_TD)
        # X-LoRA's definition, written plainly in float64 from the same weights.
        x64 = x_TD.double()
        logits = nn.functional.linear(x64, xlora.classifier.weight.double(), xlora.classifier.bias.double())
        p_TE = torch.softmax(logits / xlora.temperature, dim=-1)
        A, B = layer.bank.lora_A.double(), layer.bank.lora_B.double()
        lora_TEO = torch.einsum("eor,erd,td->teo", B, A, x64) * layer.bank.scaling
        ref64 = nn.functional.linear(x64, base.weight.double(), base.bias.double())
        ref64 = ref64 + torch.einsum("te,teo->to", p_TE, lora_TEO)
        record("xlora_vs_definition_y", y_xlora, ref64)
        # The same dense mixture run by moelab: top_k = E, softmax weights not renormalised.
        dense = RoutedLoRA(
            base,
            layer.num_experts,
            layer.bank.rank,
            alpha=layer.bank.alpha,
            router="topk",
            top_k=layer.num_experts,
            router_kwargs={"normalize": False},
        )
        dense.router.weight.copy_(layer.router.weight)
        dense.bank.lora_A.copy_(layer.bank.lora_A)
        dense.bank.lora_B.copy_(layer.bank.lora_B)
        record("xlora_vs_moelab_dense_y", y_xlora, dense(x_TD))
    if failures:
        raise AssertionError(
            f"agreement checks failed ({str(dtype).removeprefix('torch.')}): " + "; ".join(failures)
        )
    return out


# ----------------------------------------------------------------------------------- timing
def bench_projection(
    proj: str,
    dtype: torch.dtype,
    device: str,
    rounds: int,
    tokens: int,
    num_experts: int,
    rank: int,
    top_k: int,
) -> tuple[list[dict], dict[str, float]]:
    d_in, d_out = PROJECTIONS[proj]
    base, layer, xlora = build(d_in, d_out, dtype, device, num_experts, rank, top_k, seed=d_in * 7 + d_out)
    impls = implementations(base, layer, xlora)
    gen = torch.Generator().manual_seed(d_in + d_out)

    def draw() -> tuple[Tensor, Tensor]:
        x = torch.randn(tokens, d_in, generator=gen).to(device=device, dtype=dtype)
        g = torch.randn(tokens, d_out, generator=gen).to(device=device, dtype=dtype)
        return x, g

    state: dict[str, Tensor] = {}
    state["x"], state["grad"] = draw()
    checks = check_agreement(base, layer, xlora, state["x"], state["grad"])

    def forward(fn: Callable[[Tensor], Tensor]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn(state["x"])

        return run

    def train(fn: Callable[[Tensor], Tensor], params: list[nn.Parameter]) -> Callable[[], object]:
        def run() -> object:
            xg = state["x"].detach().requires_grad_()
            fn(xg).backward(state["grad"])
            return [xg.grad] + [p.grad for p in params]

        return run

    def clear(params: list[nn.Parameter]) -> None:
        for p in params:
            p.grad = None

    dname = str(dtype).removeprefix("torch.")
    rows: dict[str, dict] = {}
    for name, fn in impls.items():  # peak memory (doubles as warm-up)
        params = trainable(name, layer, xlora)
        rows[name] = {"impl": name, "projection": proj, "d_in": d_in, "d_out": d_out, "dtype": dname}
        rows[name]["peak_fwd_mib"] = device_peak_bytes(device, forward(fn)) / 2**20
        clear(params)
        rows[name]["peak_fwd_bwd_mib"] = device_peak_bytes(device, train(fn, params)) / 2**20
        clear(params)

    def timer(name: str, fn: Callable[[Tensor], Tensor]) -> Callable[[], tuple[float, ...]]:
        params = trainable(name, layer, xlora)
        fwd, trn = forward(fn), train(fn, params)

        def run() -> tuple[float, ...]:
            sync(device)
            t0 = time.perf_counter()
            out = fwd()
            sync(device)
            t1 = time.perf_counter()
            del out
            clear(params)  # each step allocates its gradients, as after optimizer.zero_grad()
            sync(device)
            t2 = time.perf_counter()
            out = trn()
            sync(device)
            t3 = time.perf_counter()
            del out
            clear(params)
            return (t1 - t0, t3 - t2)

        return run

    def on_round(r: int) -> None:
        if r > 0:  # round 0 uses the checked input
            state["x"], state["grad"] = draw()

    timings = interleaved({n: timer(n, fn) for n, fn in impls.items()}, rounds, on_round)
    base_fwd = median([t[0] for t in timings["base"]])
    base_trn = median([t[1] for t in timings["base"]])
    for name, ts in timings.items():
        row = rows[name]
        row["fwd_ms"] = 1e3 * median([t[0] for t in ts])
        row["fwd_bwd_ms"] = 1e3 * median([t[1] for t in ts])
        row["fwd_vs_base"] = row["fwd_ms"] / (1e3 * base_fwd)
        row["fwd_bwd_vs_base"] = row["fwd_bwd_ms"] / (1e3 * base_trn)
    for name in IMPLS:  # X-LoRA's time over each implementation's (the moelab row carries the goal)
        rows[name]["xlora_over_this_fwd"] = rows["xlora"]["fwd_ms"] / rows[name]["fwd_ms"]
        rows[name]["xlora_over_this_fwd_bwd"] = rows["xlora"]["fwd_bwd_ms"] / rows[name]["fwd_bwd_ms"]
        row = rows[name]
        print(
            f"  {dname:>8} {proj:<9} {name:<7} fwd {row['fwd_ms']:8.2f} ms ({row['fwd_vs_base']:.2f}x base)"
            f"  fwd+bwd {row['fwd_bwd_ms']:8.2f} ms ({row['fwd_bwd_vs_base']:.2f}x base)"
            f"  peak fwd {row['peak_fwd_mib']:.0f} / fwd+bwd {row['peak_fwd_bwd_mib']:.0f} MiB",
            flush=True,
        )
    return [rows[n] for n in IMPLS], checks


def roofline(projections: list[str], num_experts: int, rank: int, top_k: int) -> list[dict]:
    out = []
    for proj in projections:
        d_in, d_out = PROJECTIONS[proj]
        out.append(
            {
                "projection": proj,
                "d_in": d_in,
                "d_out": d_out,
                "routed_lora_flops_over_base": lora_flop_fraction(d_in, d_out, top_k, rank),
                "dense_lora_flops_over_base": lora_flop_fraction(d_in, d_out, num_experts, rank),
                "router_flops_over_base": router_flop_fraction(d_out, num_experts),
            }
        )
    return out


# ----------------------------------------------------------------------------------- report
def markdown(
    rows: list[dict], checks: list[dict], roof: list[dict], info: dict, args: argparse.Namespace
) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['threads']} threads"
    head = (
        f"Routed LoRA mixture (moelab `RoutedLoRA`, method mole) vs the bare projection, a per-expert loop "
        f"and PEFT's X-LoRA layer. SmolLM2-135M shapes, T={args.tokens}, E={args.experts}, r={args.rank}, "
        f"k={args.top_k}. {where}, torch {info['torch']}, load {info['loadavg_1_5_15']}, "
        f"parallel region {info['parallel_region_us']} us, {info['date']}, git {info['git']}. Medians of "
        f"{args.rounds} interleaved rounds (a new input, hence a new routing, every round); ratios are "
        "against `base` in the same rounds; fwd = inference forward, fwd+bwd = training step with the "
        "base frozen; peak memory is above the inputs."
    )
    header = ["dtype", "projection", "impl", "fwd ms", "fwd vs base", "fwd+bwd ms", "fwd+bwd vs base"]
    header += ["xlora / this fwd", "xlora / this fwd+bwd", "peak fwd MiB", "peak fwd+bwd MiB"]
    table = [
        [
            r["dtype"],
            r["projection"],
            r["impl"],
            r["fwd_ms"],
            f"{r['fwd_vs_base']:.2f}x",
            r["fwd_bwd_ms"],
            f"{r['fwd_bwd_vs_base']:.2f}x",
            f"{r['xlora_over_this_fwd']:.2f}x",
            f"{r['xlora_over_this_fwd_bwd']:.2f}x",
            r["peak_fwd_mib"],
            r["peak_fwd_bwd_mib"],
        ]
        for r in rows
    ]
    goals_header = ["dtype", "projection", "moelab overhead fwd / fwd+bwd (goal <= 1.3x)"]
    goals_header += ["xlora / moelab fwd / fwd+bwd (goal >= 2x)"]
    goals = []
    for r in rows:
        if r["impl"] != "moelab":
            continue
        over = max(r["fwd_vs_base"], r["fwd_bwd_vs_base"])
        speed = min(r["xlora_over_this_fwd"], r["xlora_over_this_fwd_bwd"])
        goals.append(
            [
                r["dtype"],
                r["projection"],
                f"{r['fwd_vs_base']:.2f}x / {r['fwd_bwd_vs_base']:.2f}x {'met' if over <= 1.3 else 'missed'}",
                f"{r['xlora_over_this_fwd']:.2f}x / {r['xlora_over_this_fwd_bwd']:.2f}x "
                + ("met" if speed >= 2.0 else "missed"),
            ]
        )
    roof_header = ["projection", "d_in -> d_out", f"routed LoRA FLOPs / base (k={args.top_k})"]
    roof_header += [f"dense LoRA FLOPs / base (E={args.experts}, X-LoRA)", "router FLOPs / base"]
    roof_rows = [
        [
            r["projection"],
            f"{r['d_in']} -> {r['d_out']}",
            f"{r['routed_lora_flops_over_base']:.3f} (ideal overhead {1 + r['routed_lora_flops_over_base']:.3f}x)",
            f"{r['dense_lora_flops_over_base']:.3f}",
            f"{r['router_flops_over_base']:.4f}",
        ]
        for r in roof
    ]
    check_names = [k for k in checks[0] if k not in ("dtype", "projection")] if checks else []
    check_rows = [[c["dtype"], c["projection"]] + [f"{c[k]:.2e}" for k in check_names] for c in checks]
    parts = [
        head,
        md_table(header, table),
        "Goals (issue #13):",
        md_table(goals_header, goals),
        "Roofline: LoRA FLOPs `2 T a r (d_in + d_out)` over the base GEMM's `2 T d_in d_out` "
        "(`a` = k routed, E dense); the router's gate is `2 T d_in E`.",
        md_table(roof_header, roof_rows),
        "Agreement before timing (max abs error; the mixture term is drawn as large as the base output): "
        "moelab vs the per-expert loop (output and gradients), X-LoRA vs its definition in float64, "
        "X-LoRA vs a dense moelab mixture (top_k = E, not renormalised) on the same gate.",
        md_table(["dtype", "projection"] + check_names, check_rows),
    ]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--projections", default=",".join(PROJECTIONS))
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_PROJECTION}, fp32, 2 rounds (< 1 minute)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.projections, args.dtypes, args.rounds = QUICK_PROJECTION, "fp32", 2
    projections = args.projections.split(",")
    for proj in projections:
        if proj not in PROJECTIONS:
            raise ValueError(f"--projections takes {', '.join(PROJECTIONS)}; got {proj!r}")
    dtypes = args.dtypes.split(",")
    for dname in dtypes:
        if dname not in DTYPES:
            raise ValueError(f"--dtypes takes {', '.join(DTYPES)}; got {dname!r}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
    set_threads(args.threads)
    info = machine_info()
    rows: list[dict] = []
    checks: list[dict] = []
    t0 = time.perf_counter()
    for dname in dtypes:
        for proj in projections:
            got, chk = bench_projection(
                proj,
                DTYPES[dname],
                args.device,
                args.rounds,
                args.tokens,
                args.experts,
                args.rank,
                args.top_k,
            )
            rows += got
            checks.append({"dtype": got[0]["dtype"], "projection": proj} | chk)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    roof = roofline(projections, args.experts, args.rank, args.top_k)
    report = markdown(rows, checks, roof, info, args)
    print(report)
    stem = f"lora-{machine_tag()}"
    json_path = args.json or RESULTS_DIR / f"{stem}.json"
    md_path = args.md or RESULTS_DIR / f"{stem}.md"
    write_json(
        json_path,
        {
            "machine": info,
            "args": vars(args) | {"json": str(json_path), "md": str(md_path)},
            "rows": rows,
            "roofline": roof,
            "checks": checks,
        },
    )
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report)
    return rows


if __name__ == "__main__":
    main()
