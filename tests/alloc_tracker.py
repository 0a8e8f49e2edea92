"""``AllocationTracker``: what a block of code allocates on the CPU, for memory tests.

Two records, taken together while the block runs:

- **bytes over time**: ``torch.profiler`` with ``profile_memory=True`` sees every allocation and
  free made through c10's CPU allocator (every tensor's storage, temporaries inside ATen ops and
  buffers of custom ops and C kernels that PyTorch allocates included), with its address. Frees
  are matched to allocations made inside the block (frees of older tensors are ignored); summed
  in time order they give the live bytes at every instant, hence the peak above the level at
  entry (as ``bench/common.py``'s ``peak_bytes``, with the same caveat: memory a library
  allocates outside c10, e.g. oneDNN's scratch, is not seen). The event tree is a private
  profiler API (``experimental_event_tree``), present since torch 1.13;
- **shapes**: a ``TorchDispatchMode`` records the shape of every tensor an ATen op returns, so a
  test can assert that nothing of a given size (``[T, E]``, ``[N, d]``) was ever formed.

``peak(exclude_sizes=...)`` leaves out every allocation (and its free) of exactly those byte sizes:
a test whose parameters' gradients are the only tensors of their size can measure "peak memory
apart from the parameter-sized gradients". Usable by any test: ``from alloc_tracker import
AllocationTracker`` (``tests/`` is on ``sys.path`` through its ``conftest.py``).
"""

from __future__ import annotations

import contextlib
import os
import sys

from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes = shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@contextlib.contextmanager
def _quiet_stderr():
    """This torch build's profiler prints ``USDT`` lines to fd 2 on start and stop; drop them."""
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


class AllocationTracker:
    """``with AllocationTracker() as tr: ...``; then ``tr.peak()``, ``tr.count(nbytes)``, ``tr.shapes``."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.events: list[tuple[int, int]] = []  # (time ns, +bytes allocated / -bytes freed), in order

    def __enter__(self) -> AllocationTracker:
        self._stderr = _quiet_stderr()
        self._stderr.__enter__()
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self._prof.__enter__()
        self._mode = _ShapeRecorder(self.shapes)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self._prof.__exit__(*exc)
        self._stderr.__exit__(*exc)
        # Allocation events with their addresses (the profiler's event tree), so a free is matched to
        # its allocation: frees of tensors that existed before the block (a rebound name, a
        # previous graph) are ignored instead of pulling the live count below its starting level.
        allocs: list[tuple[int, int, int]] = []  # (time ns, address, +bytes / -bytes)
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            fields = node.extra_fields
            if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
                allocs.append((node.start_time_ns, fields.ptr, fields.alloc_size))
        allocs.sort(key=lambda ev: ev[0])
        live: dict[int, int] = {}
        self.events = []
        for t, ptr, nbytes in allocs:
            if nbytes > 0:
                live[ptr] = nbytes
                self.events.append((t, nbytes))
            elif ptr in live:
                self.events.append((t, -live.pop(ptr)))

    def peak(self, exclude_sizes: tuple[int, ...] = ()) -> int:
        """Peak live bytes above the level at entry, leaving out allocations of ``exclude_sizes``."""
        live = peak = 0
        for _, nbytes in self.events:
            if abs(nbytes) in exclude_sizes:
                continue
            live += nbytes
            peak = max(peak, live)
        return peak

    def count(self, nbytes: int) -> int:
        """How many allocations of exactly ``nbytes`` bytes were made."""
        return sum(1 for _, b in self.events if b == nbytes)

    def largest(self, exclude_sizes: tuple[int, ...] = ()) -> int:
        """The largest single allocation, in bytes, leaving out ``exclude_sizes``."""
        return max((b for _, b in self.events if b > 0 and b not in exclude_sizes), default=0)
