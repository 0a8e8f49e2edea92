"""Devices and data parallelism for the trainer: ``torch.distributed`` under ``torchrun``.

Under ``torchrun`` (``WORLD_SIZE > 1``) the default process group is initialised (gloo on CPU,
nccl on GPU) and the model is wrapped in ``DistributedDataParallel``; each rank reads its own
slice of every global batch, evaluation sums are all-reduced, and only rank 0 writes files.
"""

from __future__ import annotations

import gc
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; initialises the default process group under torchrun."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda if available else cpu; a bare ``"cuda"`` takes ``LOCAL_RANK``'s GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if dev.index is None and "LOCAL_RANK" in os.environ:
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def wrap_ddp(model: nn.Module, device: torch.device, ignore: list[str] | None = None) -> nn.Module:
    """``model`` in ``DistributedDataParallel``, without buffer broadcasts.

    Buffers (DeepSeek's expert bias) stay in sync by construction: the router all-reduces its
    load before every bias update. Broadcasting them would clobber per-rank counts. ``ignore``:
    parameter names DDP must neither broadcast nor all-reduce (expert-parallel shards, which
    differ by rank).
    """
    ddp = nn.parallel.DistributedDataParallel
    if ignore:
        ddp._set_params_and_buffers_to_ignore_for_model(model, sorted(ignore))
    no_sync = (
        {"forward_sync_buffers": False}  # torch >= 2.13 spelling
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def max_over_ranks(n: int) -> int:
    """The largest ``n`` over ranks (``n`` itself without a process group)."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return n
    t = torch.tensor([n], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (a no-op without a process group)."""
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_floats(values: list[float]) -> list[float]:
    """Every rank's ``values`` concatenated in rank order (``values`` itself without a group)."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return list(values)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [float(v) for v in values])
    return [v for part in parts for v in part]


def check_replicas(model: nn.Module, skip: frozenset[str] | set[str] = frozenset()) -> None:
    """Under DDP: raise if the ranks' weights differ (they must be bit-identical). ``skip``:
    parameter names that differ by design (expert-parallel shards)."""
    vec = torch.stack([p.detach().double().sum() for n, p in model.named_parameters() if n not in skip]).cpu()
    lo, hi = vec.clone(), vec.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError("DDP replicas diverged: parameters differ across ranks")


def release_ddp(world_size: int) -> None:
    """Finish outstanding communication once the caller dropped its DDP wrapper (see ``Trainer.close``).

    Why: if the wrapper outlives the process group, its reducer holds the group's last reference
    and destroys it when Python frees the trainer, joining gloo's worker threads while holding the
    GIL; a worker still releasing a finished all-reduce needs the GIL to drop its tensors, and the
    process hangs at exit (seen in 3 of 12 two-process runs).
    """
    if world_size > 1 and is_distributed():
        gc.collect()
        dist.barrier()  # waits with the GIL released: gloo's threads finish their clean-up
