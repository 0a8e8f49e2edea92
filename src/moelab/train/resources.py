"""CPU threads and machine load for training runs.

PyTorch starts with one intra-op thread per core it can see. For the small models moelab trains
(d_model 128, batches of 2k tokens) the matrices are too small to split well, and on a shared or
busy machine extra threads mostly wait on each other. Measured on a 2-core machine with other
work running (load average 0.9-2.0), 20 training steps of the demo model took 6.9-7.6 s with one
thread (6 runs) and 5.4-37.6 s with two (6 runs: 5.4, 8.8, 19.3, 21.5, 22.3, 37.6 s): two threads
win by 1.3x at best on an idle moment and lose up to 5x when another process competes. So a
run uses ``DEFAULT_THREADS`` per process unless told otherwise (``--threads``,
``TrainConfig.threads``), and parallel ``compare`` workers use one each (docs/training.md).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEFAULT_THREADS = 1


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup (v2) CPU quota if any."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def resolve_threads(threads: int | None) -> int:
    """``threads`` itself, or ``DEFAULT_THREADS`` for 0/None."""
    if threads is None or threads == 0:
        return DEFAULT_THREADS
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0: default), got {threads!r}")
    return threads


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``resolve_threads(threads)`` intra-op threads; restore the count after."""
    import torch

    n = resolve_threads(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def load_warning(workers: int = 1) -> str | None:
    """One line when the 1-minute load average already exceeds the cores (else None).

    ``workers``: the processes about to start (mentioned so the reader can judge the timings).
    """
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        return None
    cores = available_cores()
    if load <= cores:
        return None
    return (
        f"warning: load average {load:.1f} exceeds the {cores} core(s) before starting {workers} "
        "training process(es): other work is running, so this run will be slower and its timings noisy"
    )


def cpu_model() -> str:
    """The CPU's model name and its widest vector extensions (results depend on them)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "neon") if f in flags]
    return f"{name} ({', '.join(ext)})" if ext else name
