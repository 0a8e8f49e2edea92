"""Shared benchmark plumbing: interleaved timing, allocator-level peak memory, machine info, output.

Every number the benchmarks report is a *ratio measured in one run*: the machine is shared and
its load changes from second to second, so implementations are timed in interleaved rounds
(round r times every implementation once, in a rotating order) and compared by medians over the
same rounds.

Peak memory on CPU: ``tracemalloc`` does not see PyTorch's allocations and process RSS depends on
the allocator's caching. We read the allocator itself: ``torch.profiler`` with
``profile_memory=True`` records every allocation and free made through c10's CPU allocator (every
tensor's storage, including temporaries inside ATen ops). Summing those events in time order gives
the live bytes at every instant; the peak above the starting level is what running the
implementation costs. Memory that libraries allocate outside c10 (MKL/oneDNN internal workspaces)
is not seen, and is not a tensor. This run doubles as the warm-up.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moelab.train.resources import cpu_model


# ----------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """One benchmark problem: ``T`` tokens, width ``d``, SwiGLU expert width ``h``, ``E`` experts,
    ``k`` per token; ``family`` names the transformers experts class ("mixtral" or "olmoe")."""

    name: str
    T: int
    d: int
    h: int
    E: int
    k: int
    family: str

    @property
    def decode(self) -> bool:
        return self.T <= 16

    @property
    def flops_fwd(self) -> float:
        """Active FLOPs of one SwiGLU forward: ``2 N (d * 2h + h * d)``, ``N = T k``."""
        return 2.0 * self.T * self.k * (self.d * 2 * self.h + self.h * self.d)


COARSE = Shape("coarse", 4096, 1024, 2816, 8, 2, "mixtral")  # Mixtral-like (issue #3)
FINE = Shape("fine", 4096, 1024, 512, 64, 8, "olmoe")  # OLMoE / DeepSeek-like (issue #3)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def set_threads(n: int | None = None) -> int:
    """Use ``n`` intra-op threads (default: every core, capped at what the machine has)."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (C-level writes included) while the block runs.

    This torch build's profiler prints ``USDT: ... profiler_start/stop`` lines to stderr from C++
    on every start and stop; they are noise in a benchmark's output.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Run ``fn`` once under the profiler; return (peak live bytes above the start, fn's result).

    The result is returned so the caller can drop it after the measurement (it is part of the peak).
    """
    with (
        quiet_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof,
    ):
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == torch.device("cpu").type or str(e.device_type()).endswith("CPU"):
            live += e.nbytes()
            peak = max(peak, live)
    return peak, out


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def device_peak_bytes(device: str, fn: Callable[[], object]) -> int:
    """Peak bytes above the start while ``fn`` runs once: ``max_memory_allocated`` on CUDA,
    ``peak_bytes`` (the CPU allocator's events) elsewhere. ``fn``'s result is dropped after."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        del out
        return peak
    peak, out = peak_bytes(fn)
    del out
    return peak


def interleaved(
    fns: dict[str, Callable[[], tuple[float, ...]]],
    rounds: int,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[tuple[float, ...]]]:
    """Call every ``fns[name]()`` once per round, rotating the order; collect their returned timings.

    Each function times itself (it may return several phases, e.g. forward and forward+backward).
    ``on_round(r)`` runs before round ``r`` (e.g. to switch every implementation to new inputs).
    """
    names = list(fns)
    out: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
    for r in range(rounds):
        if on_round is not None:
            on_round(r)
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(fns[name]())
    return out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def parallel_region_us(n: int = 200) -> float:
    """Median cost of one small multi-threaded op (``add_`` of 200k floats), in microseconds.

    A direct reading of contention: about 20-40 us on an idle 2-core machine, several ms when other
    processes hold the cores (every intra-op parallel region then waits for a time slice). Reports
    taken with this in the milliseconds say more about the machine's load than about the code.
    """
    a, b = torch.randn(200_000), torch.randn(200_000)
    for _ in range(5):
        a.add_(b)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        a.add_(b)
        ts.append(time.perf_counter() - t0)
    return round(float(statistics.median(ts)) * 1e6, 1)


def machine_info() -> dict:
    """Where the numbers come from: CPU model, cores, threads, torch build, load at the time."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    info = {
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "parallel_region_us": parallel_region_us(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        info["git"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_tag() -> str:
    """``<cpu-or-gpu>-<cores>c``: a filesystem-safe name for the results file."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = machine_info()["cpu"]
        name = f"{name}-{os.cpu_count()}c"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.s`` (perf_counter seconds)."""

    def __enter__(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
