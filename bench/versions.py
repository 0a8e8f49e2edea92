"""Two versions of moelab, one run: the MoE layer of a base commit against this checkout.

    python -m bench.versions --base a6396f1 [--rounds 7] [--json bench/results/versions-....json]

Each version runs in its own worker process (``PYTHONPATH`` pointing at that version's ``src``;
the base is checked out with ``git worktree`` into a temporary directory). The workers build the
same problems from the same seeds through the API both versions share (``moelab.MoE(d, E, k,
hidden, router="topk", backend=...)``) and are timed in interleaved rounds: round ``r`` runs
every case in one worker, then the other, the order alternating, so a burst of load on the
shared machine hits both alike. Reported per case: the median times, the ratio of the medians,
and the median of the per-round ratios (head and base measured seconds apart, so drift in the
machine's load cancels; the steadiest of the three).

Cases: the coarse shape (Mixtral-like, fp32) forward+backward, and inference forwards of the
decode shapes (T = 1, 4, 16) in fp32 and bf16 — the numbers issue #8's acceptance names.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# (name, T, d, h, E, k, dtype, backward)
CASES = [
    ("coarse fp32 fwd+bwd", 4096, 1024, 2816, 8, 2, "float32", True),
    ("coarse decode T1 fp32", 1, 1024, 2816, 8, 2, "float32", False),
    ("coarse decode T4 fp32", 4, 1024, 2816, 8, 2, "float32", False),
    ("coarse decode T16 fp32", 16, 1024, 2816, 8, 2, "float32", False),
    ("coarse decode T1 bf16", 1, 1024, 2816, 8, 2, "bfloat16", False),
    ("fine decode T1 fp32", 1, 1024, 512, 64, 8, "float32", False),
    ("fine decode T16 fp32", 16, 1024, 512, 64, 8, "float32", False),
]
DECODE_REPS = 50  # decode forwards per timing (each takes tens of microseconds)


# ----------------------------------------------------------------------------------- worker side
def worker() -> None:
    """Read commands on stdin (``round``, ``info``, ``quit``); answer one JSON line each."""
    import torch

    import moelab

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    built = []
    for name, t, d, h, e, k, dt, bwd in CASES:
        dtype = getattr(torch, dt)
        torch.manual_seed(0)
        layer = moelab.MoE(d, e, k, hidden=h, router="topk", backend="fast").to(dtype)
        layer.train(bwd)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(t, d, generator=g).to(dtype).requires_grad_(bwd)
        built.append((name, layer, x, bwd))

    def once(layer, x, bwd) -> float:
        if bwd:
            for p in layer.parameters():
                p.grad = None
            x.grad = None
            t0 = time.perf_counter()
            layer(x).sum().backward()
            return time.perf_counter() - t0
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(DECODE_REPS):
                layer(x)
            return (time.perf_counter() - t0) / DECODE_REPS

    for _, layer, x, bwd in built:  # warm-up (oneDNN primitives, the skinny kernel's build)
        once(layer, x, bwd)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "round":
            print(json.dumps({name: once(layer, x, bwd) for name, layer, x, bwd in built}), flush=True)
        elif cmd == "info":
            print(json.dumps({"moelab": moelab.__file__, "threads": torch.get_num_threads()}), flush=True)
        elif cmd == "quit":
            return


# ----------------------------------------------------------------------------------- driver side
class Worker:
    def __init__(self, label: str, src: Path, threads: int | None) -> None:
        env = {**os.environ, "PYTHONPATH": str(src)}
        if threads:
            env["BENCH_THREADS"] = str(threads)
        self.label = label
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.versions", "--worker"],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", default="a6396f1", help="base commit (default: the last v1 commit)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.worker:
        return worker()
    sys.path.insert(0, str(REPO))
    from bench.common import machine_info, md_table, median, write_json

    head = git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(base_dir), args.base)
        try:
            workers = [Worker("base", base_dir / "src", args.threads), Worker("head", REPO / "src", args.threads)]
            infos = {w.label: w.ask("info") for w in workers}
            times: dict[str, dict[str, list[float]]] = {w.label: {c[0]: [] for c in CASES} for w in workers}
            for r in range(args.rounds):
                for w in workers if r % 2 == 0 else workers[::-1]:
                    for name, t in w.ask("round").items():
                        times[w.label][name].append(t)
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
            for w in workers:
                w.close()
        finally:
            git("worktree", "remove", "--force", str(base_dir))
    rows = []
    for name, *_ in CASES:
        tb, th = times["base"][name], times["head"][name]
        b, h = median(tb), median(th)
        paired = median([y / x for x, y in zip(tb, th, strict=True)])
        rows.append([name, b * 1e3, h * 1e3, h / b, paired])
    info = machine_info()
    print(f"# moelab {args.base} (base) vs {head}{' + uncommitted changes' if dirty else ''} (head)")
    print(f"{info['cpu']}, {info['cores']} cores, threads {infos['head']['threads']}, torch {info['torch']}, "
          f"load {info['loadavg_1_5_15']}, parallel region {info['parallel_region_us']} us, {args.rounds} rounds\n")  # fmt: skip
    print(md_table(["case", "base ms", "head ms", "head / base", "median of per-round ratios"], rows))
    if args.json:
        write_json(args.json, {"machine": info, "base": args.base, "head": head, "dirty": dirty,
                               "workers": infos, "times_s": times, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
