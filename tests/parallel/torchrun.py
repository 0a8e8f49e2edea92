"""Run a worker script under torchrun (gloo, CPU) and read each rank's JSON result.

Usable by the distributed tests: ``from torchrun import run_workers`` (pytest puts this folder on
the path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
