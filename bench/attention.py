"""MoBA block-sparse attention against dense causal attention, forward and forward+backward, in one run.

    python -m bench.attention [--seq 4096,16384,32768] [--dtypes fp32,bf16] [--rounds 3]
                              [--no-backward] [--threads N] [--json PATH] [--md PATH]

Problem (issue #12): ``B = 1``, ``H = 8``, ``Dh = 64``, causal self-attention over ``S`` tokens.
Implementations, on the same random ``q, k, v``:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` (on CPU, ATen's
  flash-attention kernel: the anchor);
- ``moba_512x3``: :func:`moelab.attention.moba_attention`, MoBA's setting (block 512, top_k 3);
- ``moba_128x12``: FlashMoBA's small-block setting (block 128, top_k 12: the same budget of 1536
  keys per query as 512 x 3, so the same sparsity at every ``S``).

On CUDA the MoBA rows run the Triton kernel (``backend="auto"``) and ``flash_attn``'s
``flash_attn_func(causal=True)`` is added when it imports.

Reported per (dtype, S, implementation): forward time and forward+backward time (medians over
interleaved rounds), each as a speed-up over ``sdpa`` measured in the same rounds; the peak memory
above the inputs (CPU: allocator events, see ``bench.common.peak_bytes``; CUDA:
``max_memory_allocated``) for forward and forward+backward; and the FLOP ratio, the ideal speed-up:
dense causal attention computes ``S (S + 1) / 2`` query-key pairs per head, MoBA the pairs its gate
selects (own block causal plus ``top_k - 1`` full past blocks where they exist). Nothing is
asserted. Writes JSON (with the machine) and a markdown table.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moelab.attention import moba_attention

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
SETTINGS = {"moba_512x3": (512, 3), "moba_128x12": (128, 12)}


def dense_pairs(s: int) -> int:
    """Query-key pairs of causal attention over ``s`` tokens (one head)."""
    return s * (s + 1) // 2


def moba_pairs(s: int, block_size: int, top_k: int) -> int:
    """Query-key pairs MoBA computes for ``s`` tokens (one head): each query's own block causally,
    plus ``min(top_k - 1, past blocks)`` full past blocks."""
    total = 0
    for t in range(s):
        own = t // block_size
        total += t - own * block_size + 1 + min(top_k - 1, own) * block_size
    return total


def implementations(device: str) -> dict[str, Callable]:
    impls: dict[str, Callable] = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    }
    if device == "cuda":
        try:
            from flash_attn import flash_attn_func  # layout [B, S, H, Dh]

            impls["flash_attn"] = lambda q, k, v: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True
            ).transpose(1, 2)
        except ImportError:
            pass
    for name, (bs, top_k) in SETTINGS.items():
        impls[name] = lambda q, k, v, bs=bs, top_k=top_k: moba_attention(q, k, v, bs, top_k)
    return impls


def bench_shape(
    s: int, dtype: torch.dtype, device: str, rounds: int, backward: bool, heads: int = 8, dh: int = 64
) -> list[dict]:
    gen = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(1, heads, s, dh, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    grad = torch.randn(1, heads, s, dh, generator=gen).to(device=device, dtype=dtype)
    impls = implementations(device)

    def forward(fn: Callable) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn(q, k, v)

        return run

    def train(fn: Callable) -> Callable[[], object]:
        def run() -> object:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            out = fn(qg, kg, vg)
            out.backward(grad)
            return qg.grad, kg.grad, vg.grad

        return run

    rows: dict[str, dict] = {}
    for name, fn in impls.items():  # peak memory (doubles as warm-up)
        rows[name] = {"impl": name, "S": s, "dtype": str(dtype).removeprefix("torch."), "device": device}
        rows[name]["peak_fwd_mib"] = device_peak_bytes(device, forward(fn)) / 2**20
        if backward:
            rows[name]["peak_fwd_bwd_mib"] = device_peak_bytes(device, train(fn)) / 2**20

    def timer(fn: Callable) -> Callable[[], tuple[float, ...]]:
        fwd, trn = forward(fn), train(fn)

        def run() -> tuple[float, ...]:
            sync(device)
            t0 = time.perf_counter()
            out = fwd()
            sync(device)
            t1 = time.perf_counter()
            del out
            if not backward:
                return (t1 - t0,)
            out = trn()
            sync(device)
            t2 = time.perf_counter()
            del out
            return (t1 - t0, t2 - t1)

        return run

    timings = interleaved({n: timer(fn) for n, fn in impls.items()}, rounds)
    dense = dense_pairs(s)
    base = timings["sdpa"]
    for name, ts in timings.items():
        row = rows[name]
        row["fwd_s"] = median([t[0] for t in ts])
        row["fwd_speedup"] = median([b[0] for b in base]) / row["fwd_s"]
        if backward:
            row["fwd_bwd_s"] = median([t[1] for t in ts])
            row["fwd_bwd_speedup"] = median([b[1] for b in base]) / row["fwd_bwd_s"]
        if name in SETTINGS:
            row["flop_ratio"] = dense / moba_pairs(s, *SETTINGS[name])
        else:
            row["flop_ratio"] = 1.0
        print(
            f"  {row['dtype']:>8} S={s:>6} {name:<12} fwd {row['fwd_s']:.3f}s ({row['fwd_speedup']:.2f}x)"
            + (f"  fwd+bwd {row['fwd_bwd_s']:.3f}s ({row['fwd_bwd_speedup']:.2f}x)" if backward else "")
            + f"  ideal {row['flop_ratio']:.1f}x  peak fwd {row['peak_fwd_mib']:.0f} MiB",
            flush=True,
        )
    return list(rows.values())


def markdown(rows: list[dict], info: dict, backward: bool) -> str:
    header = ["dtype", "S", "impl", "fwd s", "fwd vs sdpa"]
    header += ["fwd+bwd s", "fwd+bwd vs sdpa"] if backward else []
    header += ["ideal (FLOP ratio)", "peak fwd MiB"] + (["peak fwd+bwd MiB"] if backward else [])
    table = []
    for r in rows:
        line = [r["dtype"], r["S"], r["impl"], r["fwd_s"], f"{r['fwd_speedup']:.2f}x"]
        line += [r["fwd_bwd_s"], f"{r['fwd_bwd_speedup']:.2f}x"] if backward else []
        line += [f"{r['flop_ratio']:.1f}x", r["peak_fwd_mib"]] + ([r["peak_fwd_bwd_mib"]] if backward else [])
        table.append(line)
    where = info.get("gpu") or f"{info['cpu']}, {info['threads']} threads"
    head = (
        f"MoBA vs dense causal attention, B=1, H=8, Dh=64. {where}, torch {info['torch']}, "
        f"load {info['loadavg_1_5_15']}, {info['date']}, git {info['git']}. Medians of interleaved rounds; "
        "speed-ups are against `sdpa` in the same rounds; peak memory is above the inputs."
    )
    return head + "\n\n" + md_table(header, table) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="4096,16384,32768")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    info = machine_info()
    backward = not args.no_backward
    rows: list[dict] = []
    t0 = time.perf_counter()
    for dname in args.dtypes.split(","):
        if dname not in DTYPES:
            raise ValueError(f"--dtypes takes {', '.join(DTYPES)}; got {dname!r}")
        for s in (int(x) for x in args.seq.split(",")):
            rows += bench_shape(s, DTYPES[dname], args.device, args.rounds, backward)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    report = markdown(rows, info, backward)
    print(report)
    stem = f"attention-{machine_tag()}"
    json_path = args.json or RESULTS_DIR / f"{stem}.json"
    md_path = args.md or RESULTS_DIR / f"{stem}.md"
    write_json(
        json_path,
        {"machine": info, "args": vars(args) | {"json": str(json_path), "md": str(md_path)}, "rows": rows},
    )
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report)
    return rows


if __name__ == "__main__":
    main()
