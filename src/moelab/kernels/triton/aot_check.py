"""Compile the Triton kernels for a CUDA architecture without a GPU, and report registers and spills.

    python -m moelab.ops.triton.aot_check                 # sm_90, bf16, every autotune tile
    python -m moelab.ops.triton.aot_check --arch 80 --dtypes bf16,fp32 --first

Triton's front end, LLVM and the ``ptxas`` it ships run on any machine, so this catches what the
interpreter cannot (type and layout errors, shapes the tensor cores reject, register spills) on
machines with no GPU, CI included. Run it with ``TRITON_INTERPRET`` unset. It does not run the
kernels: correctness is the interpreter tests' job, speed the benchmark's (``bench/triton_gpu.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _ptxas() -> str | None:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return None


def _variants(dtype: str) -> list[tuple[str, dict[str, str], dict]]:
    """(kernel name, pointer types, constexprs) for the variants the backend launches."""
    p = f"*{dtype}"
    prec = "ieee" if dtype == "fp32" else "tf32"
    base = {"UPCAST": False, "PRECISION": prec}
    idx = {"COUNTS": "*i64", "OFFSETS": "*i32"}
    up = {"X": p, "TOK": "*i64", "W": p, "A": p, "HPRE": p, **idx}
    s2s = {"IN": p, "IN_IDX": "*i64", "W": p, "OUT": p, "OUT_IDX": "*i64", "SCALE": "*fp32", **idx}
    bwd = {
        "GY": p,
        "TOK": "*i64",
        "W": p,
        "HPRE": p,
        "WEIGHT": "*fp32",
        "DH": p,
        "AW": p,
        "DWP": "*fp32",
        **idx,
    }
    wg = {"A": p, "B": p, "TOK": "*i64", "OFFSETS": "*i32", "DW": p}
    return [
        ("_up_kernel", up, {**base, "E_P2": 8, "GATED": True, "ACT": 0, "SAVE_PRE": True}),
        ("_up_kernel", up, {**base, "E_P2": 64, "GATED": False, "ACT": 1, "SAVE_PRE": False}),
        ("_s2s_kernel", s2s, {**base, "E_P2": 8, "GATHER_IN": False, "SCATTER_OUT": True, "HAS_SCALE": True}),
        (
            "_s2s_kernel",
            s2s,
            {**base, "E_P2": 64, "GATHER_IN": False, "SCATTER_OUT": False, "HAS_SCALE": False},
        ),
        ("_down_bwd_kernel", bwd, {**base, "E_P2": 8, "GATED": True, "ACT": 0}),
        ("_down_bwd_kernel", bwd, {**base, "E_P2": 64, "GATED": False, "ACT": 2}),
        ("_wgrad_kernel", wg, {**base, "GATHER_A": False, "GATHER_B": True}),
        ("_wgrad_kernel", wg, {**base, "GATHER_A": True, "GATHER_B": False}),
    ]


def compile_all(arch: int = 90, dtypes: tuple[str, ...] = ("bf16",), first_only: bool = False) -> list[dict]:
    """Compile every kernel variant for ``sm_<arch>``; one row per (variant, tile) with ptxas' report."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter does not compile")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from moelab.kernels.triton import kernels as K

    tiles = {
        "_up_kernel": K._UP_TILES,
        "_s2s_kernel": K._GEMM_TILES,
        "_down_bwd_kernel": K._UP_TILES,
        "_wgrad_kernel": K._WGRAD_TILES,
    }
    target = GPUTarget("cuda", arch, 32)
    ptxas = _ptxas()
    rows = []
    for dtype in dtypes:
        for name, ptr_types, constexprs in _variants(dtype):
            fn = getattr(K, name)
            for m, n, k, warps, stages in tiles[name][:1] if first_only else tiles[name]:
                cx = {**constexprs, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
                sig = {a: "constexpr" if a in cx else ptr_types.get(a, "i32") for a in fn.arg_names}
                src = ASTSource(fn=fn, signature=sig, constexprs=cx)
                compiled = triton.compile(
                    src, target=target, options={"num_warps": warps, "num_stages": stages}
                )
                row = {
                    "kernel": name,
                    "dtype": dtype,
                    "flags": {a: v for a, v in constexprs.items() if a not in ("UPCAST", "PRECISION")},
                    "tile": (m, n, k, warps, stages),
                    "shared_bytes": compiled.metadata.shared,
                    "mma": "wgmma"
                    if "wgmma" in compiled.asm["ptx"]
                    else ("mma" if "mma." in compiled.asm["ptx"] else "none"),
                }
                row.update(_ptxas_report(ptxas, compiled.asm["ptx"], arch))
                rows.append(row)
    return rows


def _ptxas_report(ptxas: str | None, ptx: str, arch: int) -> dict:
    if ptxas is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run(
            [ptxas, f"-arch=sm_{arch}{suffix}", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spill.group(1)) if spill else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (80: A100, 90: H100)")
    ap.add_argument("--dtypes", default="bf16", help="comma-separated among bf16, fp16, fp32")
    ap.add_argument("--first", action="store_true", help="only the first tile of each autotune list")
    args = ap.parse_args(argv)
    rows = compile_all(args.arch, tuple(args.dtypes.split(",")), args.first)
    for r in rows:
        print(
            f"{r['kernel']:<17} {r['dtype']:<5} tile={r['tile']} {r['mma']:<5} smem={r['shared_bytes']:>6} "
            f"regs={r.get('registers')} spill={r.get('spill_store_bytes')} {r['flags']}"
        )
    print(f"compiled {len(rows)} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
