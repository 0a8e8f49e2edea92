"""Product-key pools (issue #10): PEER and OmniMoE at a million atomic experts, against PEER-pytorch.

    python -m bench.pools [--rounds 3] [--threads N] [--json PATH]   # the issue's configuration
    python -m bench.pools --quick                                    # tiny shapes: a smoke test (seconds)

The issue's configuration (CPU): ``N = 2^20`` (1024^2) atomic experts, ``K = 16`` experts per head
(PEER) or per token (OmniMoE), ``d = 512``, 8 heads for PEER, ``T = 4096`` tokens. Three tables,
each measured in one run (interleaved rounds, medians; ``bench/README.md``):

1. **PEER layer**: ``moelab.layers.pools.PEER`` with ``backend="auto"`` (the ``atomic``
   executor), the same layer with ``backend="sorted"``, and lucidrains' ``PEER_pytorch.PEER``
   (``non_competing_scores=False``: softmax over each head's ``k``, as the paper and our default;
   ours with ``query_batchnorm=False``, as lucidrains has none). PEER-pytorch's query projection and
   sub-keys are copied from ours and its two embedding tables *are* ours (the same parameters), so
   all arms compute the same function on the same weights (the max difference of their outputs is
   reported) and the tables are held once. Each arm: forward (autograd on, as in training) and
   forward + backward of ``(y * gy).sum()`` into every parameter and ``x``; gradients are set to
   None before each step (``zero_grad()``'s default), so every step allocates its ``[N, d]``-table
   gradients afresh, in every arm.
2. **OmniMoE layer**: ``moelab.layers.pools.OmniMoE`` (``N``, ``K``, dense SwiGLU branch of width
   ``4 d``, silu), ``atomic`` and ``sorted`` executors.
3. **Routers**: ``PEERRouter`` (8 heads, ``k = 16``, query BatchNorm) and ``OmniRouter`` (``K = 16``)
   alone, forward and forward + backward of their combine weights. OmniMoE's paper reports its
   router at 6.7 ms against PEER's 73 ms (10.9x, GPU); we report our ratio.

**Peak memory** (``peak_mb``): the peak of live tensor memory during one forward + backward, above
the level before it (``bench/common.py``'s ``peak_bytes``: ``torch.profiler`` reads every
allocation and free of c10's CPU allocator, in-process, the same way for every arm). It includes
the two ``[N, d]`` table gradients (``table_grads_mb``; 2 x 2 GiB here), not the parameters
(``params_mb``, held once and shared). The profiled step is also the warm-up.

PEER-pytorch is not a dependency of moelab. Install it into the bench environment only:

    .venv/bin/pip install einops einx && .venv/bin/pip install --no-deps PEER-pytorch==0.2.2

Without it the PEER-pytorch arm is skipped with a message. The full configuration needs ~14 GiB
of RAM (4 GiB of tables, 4 GiB of table gradients, PEER-pytorch's and ``sorted``'s ``[N k H, d]``
gathers); run it alone on the machine. Page faults on the fresh gradient tables are a large part of
every arm's backward; ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's transparent-huge-page hint, recorded in
the JSON) makes them cheaper for all arms alike. Results: ``bench/results/pools-<machine>-<date>``
``.json`` / ``.md`` (not with ``--quick``). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moelab.core.routing import Routing
from moelab.kernels.cpu import atomic as atomic_kernel
from moelab.layers.pools import PEER, OmniMoE
from moelab.ops import get_executor
from moelab.routers.product_key import OmniRouter, PEERRouter

from .common import (
    RESULTS_DIR,
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
FULL = dict(N=2**20, K=16, d=512, heads=8, T=4096)
QUICK = dict(N=64**2, K=4, d=64, heads=2, T=256)
PEER_PYTORCH_INSTALL = (
    ".venv/bin/pip install einops einx && .venv/bin/pip install --no-deps PEER-pytorch==0.2.2"
)


# ----------------------------------------------------------------------------------- the arms
def peer_pytorch_twin(ours: PEER) -> nn.Module | None:
    """lucidrains' ``PEER`` computing what ``ours`` computes, on ``ours``' parameters, or None.

    Built on the meta device (its own ``N x d`` embeddings are never allocated), then given our
    tables as its embeddings (the same ``nn.Parameter`` objects), our query projection rearranged
    to its ``(p h d)`` output layout, and our two sub-key sets stacked as its ``keys [h, n, 2, d]``.
    """
    try:
        from PEER_pytorch import PEER as LucidPEER
    except ImportError as exc:
        print(f"PEER-pytorch arm skipped ({exc}); install it with: {PEER_PYTORCH_INSTALL}")
        return None
    r = ours.router
    half = r.d_key // 2
    with torch.device("meta"):
        lucid = LucidPEER(
            ours.d_model,
            heads=r.heads,
            num_experts=ours.num_experts,
            num_experts_per_head=r.top_k,
            dim_key=half,
            non_competing_scores=False,
        )
    lucid.weight_down_embed.weight = ours.experts.u
    lucid.weight_up_embed.weight = ours.experts.v
    with torch.no_grad():
        # ours: row h * d_key + p * half + j; lucidrains: row p * heads * half + h * half + j
        w = r.query_weight.detach().view(r.heads, 2, half, ours.d_model).transpose(0, 1)
        lucid.to_queries[0].weight = nn.Parameter(w.reshape(-1, ours.d_model).clone())
        lucid.keys = nn.Parameter(torch.stack([r.sub_keys_a.detach(), r.sub_keys_b.detach()], dim=2).clone())
    meta = [n for n, t in [*lucid.named_parameters(), *lucid.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"PEER-pytorch twin still has meta tensors: {meta}")
    return lucid


class Step:
    """One training step of ``module`` on ``x``: ``reset()`` drops the gradients (and runs
    ``before``), ``step()`` runs forward + backward; calling it does both and returns
    ``(forward s, forward + backward s)``."""

    def __init__(self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, before=None):
        self.module, self.x, self.gy, self.before = module, x, gy, before
        self.params = [p for p in module.parameters() if p.requires_grad]

    def reset(self) -> None:
        if self.before is not None:
            self.before()
        self.x.grad = None
        for p in self.params:
            p.grad = None

    def step(self) -> tuple[float, float]:
        with Stopwatch() as fw:
            y = self.module(self.x)
        with Stopwatch() as bw:
            loss = (y * self.gy).sum()
            aux = getattr(self.module, "aux_loss", None)
            if isinstance(aux, torch.Tensor) and aux.requires_grad:
                loss = loss + aux
            loss.backward()
        return (fw.s, fw.s + bw.s)

    def __call__(self) -> tuple[float, float]:
        self.reset()
        return self.step()


class ExpertsOnly(nn.Module):
    """The expert computation alone, on a fixed token-major routing ``[T, k]`` over ``bank``'s tables.

    ``impl``: a moelab executor name, or ``"peer_pytorch_math"``: PEER-pytorch's expert lines
    (``PEER.forward`` after the retrieval), re-typed: both tables gathered per assignment with
    ``F.embedding``, ``h = einsum(x, W_down)``, ``gelu(h) * weight``, ``einsum(., W_up)``.
    The combine weights are a parameter here, so the router's gradient is part of the backward.
    """

    def __init__(self, bank: nn.Module, index_TK: torch.Tensor, weight_TK: torch.Tensor, impl: str):
        super().__init__()
        self.bank, self.impl = bank, impl
        self.register_buffer("index_TK", index_TK)
        self.weight_TK = nn.Parameter(weight_TK.clone())

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.impl == "peer_pytorch_math":
            w_down = F.embedding(self.index_TK, self.bank.u)  # [T, k, d]
            w_up = F.embedding(self.index_TK, self.bank.v)
            h = torch.einsum("td,tkd->tk", x_TD, w_down)
            return torch.einsum("tk,tkd->td", F.gelu(h) * self.weight_TK, w_up)
        routing = Routing.from_topk(self.index_TK, self.weight_TK, self.bank.num_experts, validate=False)
        return get_executor(self.impl)(x_TD, routing, self.bank)


def set_backend(layer: nn.Module, backend: str):
    def before():
        layer.backend = backend

    return before


def measure(
    arms: dict[str, Step], rounds: int, table_grad_bytes: int, params_bytes: int, log=print
) -> list[dict]:
    """Peak memory (one profiled step each, also the warm-up), then interleaved timed rounds.

    The gradients of the previous step are dropped *before* the profiled step: frees of tensors
    that existed before it would otherwise lower the measured peak."""
    peaks = {}
    for name, arm in arms.items():
        arm.reset()
        gc.collect()
        peak, _ = peak_bytes(arm.step)
        peaks[name] = peak
        log(f"  {name}: warm-up done, peak {peak / MB:.0f} MB")
    for arm in arms.values():
        arm.reset()
    gc.collect()
    times = interleaved(arms, rounds)
    for arm in arms.values():
        arm.reset()
    rows = []
    for name, ts in times.items():
        rows.append(
            {
                "impl": name,
                "fwd_ms": round(median([t[0] for t in ts]) * 1e3, 1),
                "fwdbwd_ms": round(median([t[1] for t in ts]) * 1e3, 1),
                "peak_mb": round(peaks[name] / MB, 1),
                "table_grads_mb": round(table_grad_bytes / MB, 1),
                "params_mb": round(params_bytes / MB, 1),
            }
        )
    return rows


def add_ratios(rows: list[dict], base: str) -> None:
    """``x <base>``: base time / arm time (above 1: faster than ``base``); peak over base's."""
    ref = next((r for r in rows if r["impl"] == base), None)
    for r in rows:
        if ref is None:
            continue
        r[f"fwd_x_{base}"] = round(ref["fwd_ms"] / r["fwd_ms"], 2)
        r[f"fwdbwd_x_{base}"] = round(ref["fwdbwd_ms"] / r["fwdbwd_ms"], 2)
        r[f"peak_over_{base}"] = round(r["peak_mb"] / ref["peak_mb"], 2)


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ----------------------------------------------------------------------------------- sections
def bench_peer(cfg: dict, rounds: int, log=print) -> list[dict]:
    n, k, d, h, t = cfg["N"], cfg["K"], cfg["d"], cfg["heads"], cfg["T"]
    torch.manual_seed(0)
    layer = PEER(d, n, k, router_kwargs={"heads": h, "query_batchnorm": False, "non_competing_scores": False})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, d, generator=g).requires_grad_(True)
    gy = torch.randn(t, d, generator=g)
    arms = {
        "moelab_peer": Step(layer, x, gy, set_backend(layer, "auto")),
        "moelab_peer_sorted": Step(layer, x, gy, set_backend(layer, "sorted")),
    }
    check = {}
    with torch.no_grad():
        layer.backend = "auto"
        y_ours = layer(x)
        layer.backend = "sorted"
        check["moelab_peer_sorted"] = float((layer(x) - y_ours).abs().max())
        layer.backend = "auto"
    lucid = peer_pytorch_twin(layer)
    if lucid is not None:
        # its input is [batch, seq, d]: the same tokens, a leaf of their own (its own x.grad)
        x3 = x.detach().view(1, t, d).requires_grad_(True)
        arms["peer_pytorch"] = Step(lucid, x3, gy.view(1, t, d))
        with torch.no_grad():
            check["peer_pytorch"] = float((lucid(x3).view(t, d) - y_ours).abs().max())
    log(f"  max |y - y_moelab_peer|: {check} (max |y| = {float(y_ours.abs().max()):.3g})")
    del y_ours
    rows = measure(arms, rounds, 2 * n * d * 4, param_bytes(layer), log=log)
    for r in rows:
        r["max_abs_diff_vs_moelab_peer"] = check.get(r["impl"], 0.0)
    add_ratios(rows, "peer_pytorch" if lucid is not None else "moelab_peer_sorted")
    rows = [{"table": "peer", **cfg, **r} for r in rows]
    del arms, lucid
    gc.collect()

    # The expert computation alone, on the routing PEER's router gives these tokens.
    log(f"\n## experts alone (PEER's routing: {h} heads x {k} = {h * k} per token)")
    with torch.no_grad():
        routing = layer.router(x.detach())
    index, weight = routing.expert_index.view(t, h * k), routing.weight.view(t, h * k).float()
    impls = ("atomic", "sorted", "peer_pytorch_math")
    arms = {f"experts_{i}": Step(ExpertsOnly(layer.experts, index, weight, i), x, gy) for i in impls}
    check = {}
    with torch.no_grad():
        y_ref = arms["experts_atomic"].module(x)
        for name, arm in arms.items():
            check[name] = float((arm.module(x) - y_ref).abs().max())
    log(f"  max |y - y_experts_atomic|: {check}")
    del y_ref
    expert_rows = measure(arms, rounds, 2 * n * d * 4, param_bytes(layer.experts), log=log)
    for r in expert_rows:
        r["max_abs_diff_vs_experts_atomic"] = check[r["impl"]]
    add_ratios(expert_rows, "experts_peer_pytorch_math")
    return rows + [{"table": "experts", **cfg, **r} for r in expert_rows]


def bench_omni(cfg: dict, rounds: int, log=print) -> list[dict]:
    n, k, d, t = cfg["N"], cfg["K"], cfg["d"], cfg["T"]
    torch.manual_seed(0)
    layer = OmniMoE(d, n, k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, d, generator=g).requires_grad_(True)
    gy = torch.randn(t, d, generator=g)
    arms = {
        "moelab_omni": Step(layer, x, gy, set_backend(layer, "auto")),
        "moelab_omni_sorted": Step(layer, x, gy, set_backend(layer, "sorted")),
    }
    rows = measure(arms, rounds, 2 * n * d * 4, param_bytes(layer), log=log)
    add_ratios(rows, "moelab_omni_sorted")
    return [{"table": "omni", "dense_hidden": layer.dense_hidden, **cfg, **r} for r in rows]


def bench_routers(cfg: dict, rounds: int, log=print) -> list[dict]:
    n, k, d, h, t = cfg["N"], cfg["K"], cfg["d"], cfg["heads"], cfg["T"]
    torch.manual_seed(0)
    routers = {"peer_router": PEERRouter(d, n, k, heads=h), "omni_router": OmniRouter(d, n, k)}
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(1))

    def timed(router):
        params = list(router.parameters())
        scale = torch.linspace(0.5, 1.5, t * router.top_k * getattr(router, "heads", 1))

        def once():
            for p in params:
                p.grad = None
            with Stopwatch() as fw:
                r = router(x)
            with Stopwatch() as bw:
                (r.weight * scale).sum().backward()
            return (fw.s, fw.s + bw.s)

        return once

    arms = {name: timed(r) for name, r in routers.items()}
    for fn in arms.values():
        fn()
    times = interleaved(arms, rounds)
    rows = []
    for name, ts in times.items():
        rows.append(
            {
                "table": "routers",
                **cfg,
                "impl": name,
                "fwd_ms": round(median([t_[0] for t_ in ts]) * 1e3, 2),
                "fwdbwd_ms": round(median([t_[1] for t_ in ts]) * 1e3, 2),
            }
        )
    peer = next(r for r in rows if r["impl"] == "peer_router")
    for r in rows:
        r["fwd_x_peer_router"] = round(peer["fwd_ms"] / r["fwd_ms"], 2)
        r["fwdbwd_x_peer_router"] = round(peer["fwdbwd_ms"] / r["fwdbwd_ms"], 2)
    return rows


# ----------------------------------------------------------------------------------- report
def report(rows: list[dict], info: dict) -> str:
    out = [
        "# Product-key pools: PEER and OmniMoE (issue #10)",
        "",
        f"{info['cpu']}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, git {info['git']}; "
        f"load {info['loadavg_1_5_15']} -> {info.get('loadavg_end')}; parallel region "
        f"{info['parallel_region_us']} us; THP {info.get('thp')}, THP_MEM_ALLOC_ENABLE="
        f"{info.get('THP_MEM_ALLOC_ENABLE')}; atomic C kernel built: {info.get('atomic_kernel')}.",
        "",
        "Times are medians over interleaved rounds; `x <base>` = base time / arm time (above 1 = faster).",
        "`peak MB` = peak live tensor memory of one forward + backward above its start (includes the two",
        "table gradients, `table grads MB`; the parameters are held once, shared by the PEER arms).",
        "",
    ]
    for table, base in (
        ("peer", "peer_pytorch"),
        ("experts", "experts_peer_pytorch_math"),
        ("omni", "moelab_omni_sorted"),
    ):
        part = [r for r in rows if r.get("table") == table]
        if not part:
            continue
        cfg = part[0]
        if not any(r["impl"] == base for r in part):
            base = "moelab_peer_sorted"
        extra = {
            "peer": f", heads = {cfg['heads']} (the layer: router + experts)",
            "experts": f", heads = {cfg['heads']}: the expert computation alone on PEER's routing",
            "omni": f", dense SwiGLU width {cfg.get('dense_hidden')}",
        }[table]
        out += [f"## {table}: N = {cfg['N']}, K = {cfg['K']}, d = {cfg['d']}, T = {cfg['T']}{extra}", ""]
        body = [
            [
                r["impl"], r["fwd_ms"], r["fwdbwd_ms"], r.get(f"fwd_x_{base}"), r.get(f"fwdbwd_x_{base}"),
                r["peak_mb"], r.get(f"peak_over_{base}"), r["table_grads_mb"],
                r.get("max_abs_diff_vs_moelab_peer", r.get("max_abs_diff_vs_experts_atomic", "-")),
            ]
            for r in part
        ]  # fmt: skip
        header = [
            "impl", "fwd ms", "fwd+bwd ms", f"fwd x {base}", f"fwd+bwd x {base}", "peak MB",
            f"peak / {base}", "table grads MB", "max abs diff",
        ]  # fmt: skip
        out += [md_table(header, body), ""]
    part = [r for r in rows if r.get("table") == "routers"]
    if part:
        out += ["## Routers alone (paper, GPU: OmniMoE 6.7 ms vs PEER 73 ms, 10.9x)", ""]
        body = [
            [r["impl"], r["fwd_ms"], r["fwdbwd_ms"], r["fwd_x_peer_router"], r["fwdbwd_x_peer_router"]]
            for r in part
        ]
        out += [md_table(["router", "fwd ms", "fwd+bwd ms", "fwd x peer", "fwd+bwd x peer"], body), ""]
    return "\n".join(out)


def environment() -> dict:
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = None
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
    return {
        "thp": thp,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "cpu_flags": [f for f in wanted if f" {f}" in flags],
        "atomic_kernel": atomic_kernel.can_use(torch.empty(1)),
    }


def run(
    quick: bool = False,
    rounds: int | None = None,
    tables: list[str] | None = None,
    overrides: dict[str, int] | None = None,
    log=print,
) -> list[dict]:
    cfg = {**(QUICK if quick else FULL), **(overrides or {})}
    rounds = rounds or (2 if quick else 3)
    tables = tables or ["peer", "omni", "routers"]
    rows: list[dict] = []
    for name, fn in (("peer", bench_peer), ("omni", bench_omni), ("routers", bench_routers)):
        if name not in tables:
            continue
        log(f"\n## {name}: {cfg}")
        rows += fn(cfg, rounds, log=log)
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"tiny shapes {QUICK} (seconds); writes no results")
    ap.add_argument(
        "--rounds", type=int, default=None, help="timed rounds after the profiled warm-up (default 3)"
    )
    ap.add_argument("--tables", default=None, help="comma-separated subset of peer,omni,routers")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument(
        "--set",
        default=None,
        help="override the configuration, e.g. N=65536,d=256,T=1024 (writes no results)",
    )
    args = ap.parse_args(argv)
    overrides = {}
    for item in filter(None, (args.set or "").split(",")):
        key, _, value = item.partition("=")
        if key not in FULL or not value.isdigit():
            ap.error(f"--set takes key=int pairs with keys {sorted(FULL)}, got {item!r}")
        overrides[key] = int(value)
    set_threads(args.threads)
    info = {**machine_info(), **environment()}
    rows = run(args.quick, args.rounds, args.tables.split(",") if args.tables else None, overrides)
    end = machine_info()
    info["loadavg_end"], info["parallel_region_us_end"] = end["loadavg_1_5_15"], end["parallel_region_us"]
    text = report(rows, info)
    print("\n" + text)
    payload = {"machine": info, "rows": rows}
    if args.json is not None:
        write_json(args.json, payload)
    if not args.quick and not overrides:
        stem = f"pools-{machine_tag()}-{_dt.date.today().isoformat()}"
        write_json(RESULTS_DIR / f"{stem}.json", payload)
        (RESULTS_DIR / f"{stem}.md").write_text(text + "\n")
        print(f"wrote {RESULTS_DIR / stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
