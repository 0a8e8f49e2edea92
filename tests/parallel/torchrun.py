"""Run a worker script under torchrun (gloo, CPU) and read each rank's JSON result.

The test side: ``from torchrun import run_workers``; the worker side: ``run_checks(checks)``
(pytest and the worker script both have this folder on the path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def run_workers(worker: Path, out: Path, nproc: int, timeout: int = 240) -> list[dict[str, Any]]:
    """``torchrun --standalone --nproc_per_node NPROC WORKER OUT`` with one thread per process;
    asserts it exits 0 (showing the tail of its output otherwise) and returns ``OUT/rank<i>.json``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(worker), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def run_checks(checks: Sequence[Callable[[int, int, list[str]], None]]) -> None:
    """The worker's main: join the gloo group, run each ``check(rank, world_size, done)`` (each
    appends its name to ``done``), write ``OUT/rank<i>.json`` (``OUT`` = ``sys.argv[1]``), wait for
    every rank and leave the group."""
    import torch
    import torch.distributed as dist

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, p = dist.get_rank(), dist.get_world_size()
    done: list[str] = []
    try:
        for check in checks:
            check(rank, p, done)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": p, "checks": done}))
        dist.barrier()  # let gloo finish every pending exchange before the group goes away
    finally:
        dist.destroy_process_group()
