"""Sharding MoE layers for expert parallelism (the ``ep`` dispatcher, ``moelab.ops.all_to_all``).

``shard_experts(model, group)`` turns every ``moelab.MoE`` layer of a model (a single layer, a
``MoELM``, any module holding ``MoE`` layers) into its expert-parallel form on this rank: the
bank keeps only this rank's contiguous block of experts (copies of the global bank's rows, so the
weights are identical) and the dispatcher becomes an ``AllToAllDispatcher`` over ``group``. The
router, shared experts and everything else stay replicated. ``gather_experts`` is the inverse
(every rank gets the full bank back, the dispatcher becomes ``local``), for saving a checkpoint
that a single process can load.

A bank is sliced by its ``slice_experts(start, stop)`` method when it has one; otherwise every
parameter and buffer it holds must be expert-major (``[E, ...]``, as ``ExpertBank``'s fused
weights are) and is sliced along dim 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moelab.core.bank import check_bank, expert_major_tensors, rebuilt_bank
from moelab.layers.moe import MoE
from moelab.ops.all_to_all import AllToAllDispatcher, group_rank_and_size, local_expert_count
from moelab.ops.dispatchers import LocalDispatcher


def expert_block(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)``: the global experts rank ``rank`` owns, ``[rank * E_local, (rank + 1) * E_local)``."""
    e_local = local_expert_count(num_experts, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    return rank * e_local, (rank + 1) * e_local


def slice_bank(bank: nn.Module, start: int, stop: int) -> nn.Module:
    """A bank of the global experts ``[start, stop)`` of ``bank``: copies of their rows, same type."""
    check_bank(bank, "bank")
    if not 0 <= start < stop <= bank.num_experts:
        raise ValueError(f"need 0 <= start < stop <= num_experts={bank.num_experts}, got [{start}, {stop})")
    if hasattr(bank, "slice_experts"):
        return bank.slice_experts(start, stop)
    rows = {n: t.detach()[start:stop].clone() for n, t in expert_major_tensors(bank).items()}
    return rebuilt_bank(bank, rows, stop - start)


def moe_layers(module: nn.Module) -> list[tuple[str, MoE]]:
    """``(qualified name, layer)`` for every ``moelab.MoE`` in ``module`` (itself included)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, MoE)]


def shard_experts(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard every ``MoE`` layer of ``module`` over ``group`` in place; returns ``module``.

    Each layer's bank becomes this rank's block of ``E / P`` experts and its dispatcher an
    ``AllToAllDispatcher(group)`` (one per layer, so each counts its own traffic). ``group=None``:
    the default process group (a world of one when none is initialised). Every rank must hold the
    same global weights before the call (same seed, or a broadcast).
    """
    layers = moe_layers(module)
    if not layers:
        raise ValueError(f"shard_experts found no moelab.MoE layer in {type(module).__name__}")
    rank, size = group_rank_and_size(group)
    for name, layer in layers:
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            raise ValueError(f"MoE layer {name or '<root>'} is already sharded (dispatcher 'ep')")
        if not isinstance(layer.dispatcher, LocalDispatcher):
            raise ValueError(
                f"MoE layer {name or '<root>'} has dispatcher {layer.dispatcher.name!r}; only 'local' "
                "layers can be sharded"
            )
        if layer.experts.num_experts != layer.num_experts:
            raise ValueError(
                f"MoE layer {name or '<root>'}: bank has {layer.experts.num_experts} experts, the layer {layer.num_experts}"
            )
    for _, layer in layers:  # check every layer first: a failure leaves the model untouched
        local_expert_count(layer.num_experts, size)
    for _, layer in layers:
        start, stop = expert_block(layer.num_experts, size, rank)
        layer.experts = slice_bank(layer.experts, start, stop)
        layer.dispatcher = AllToAllDispatcher(group)
    return module


def all_gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Every rank's block of ``t`` (equal shapes) concatenated along dim 0, in rank order."""
    _, size = group_rank_and_size(group)
    if size == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, 0)


def _sharded_layers(module: nn.Module, what: str) -> list[tuple[str, MoE]]:
    layers = [(n, m) for n, m in moe_layers(module) if isinstance(m.dispatcher, AllToAllDispatcher)]
    if not layers:
        raise ValueError(f"{what} found no sharded (dispatcher 'ep') MoE layer in {type(module).__name__}")
    for n, m in layers:
        if not m.dispatcher.contiguous_blocks:
            raise ValueError(
                f"{what}: MoE layer {n or '<root>'} (dispatcher {m.dispatcher.name!r}) does not hold "
                "contiguous expert blocks; use its own gather (e.g. gather_logical_experts for eplb)"
            )
    return layers


def gather_experts(module: nn.Module) -> nn.Module:
    """The inverse of ``shard_experts``, in place: every rank gets every layer's full bank back
    (``all_gather`` of the blocks, in rank order) and the ``local`` dispatcher. Collective: every
    rank of each layer's group must call it."""
    for _, layer in _sharded_layers(module, "gather_experts"):
        group, bank = layer.dispatcher.group, layer.experts
        full = {n: all_gather_rows(t, group) for n, t in expert_major_tensors(bank).items()}
        layer.experts = rebuilt_bank(bank, full, layer.num_experts)
        layer.dispatcher = LocalDispatcher()
    return module


def gathered_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every sharded bank's tensors gathered to the full ``[E, ...]``:
    what the unsharded model's ``state_dict`` would be (for a checkpoint rank 0 writes). The module
    is not changed. Collective."""
    state = module.state_dict()
    for prefix, layer in _sharded_layers(module, "gathered_state_dict"):
        pre = f"{prefix}.experts." if prefix else "experts."
        for name, t in expert_major_tensors(layer.experts).items():
            state[pre + name] = all_gather_rows(t, layer.dispatcher.group)
    return state


def clip_grad_norm_(module: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for an expert-parallel model; returns the total norm.

    The norm counts every parameter once: the replicated ones from this rank (their gradients
    are the same on every rank once data parallelism has averaged them) and the sharded experts
    from every rank of the expert-parallel group (their squared norms are all-reduced), so every
    rank computes the same norm and clips by the same factor (a per-rank norm would make the
    replicas drift apart). Same rule as torch: scale by ``min(1, max_norm / (norm + 1e-6))``."""
    layers = _sharded_layers(module, "clip_grad_norm_")
    groups = {id(m.dispatcher.group): m.dispatcher.group for _, m in layers}
    if len(groups) != 1:
        raise ValueError("clip_grad_norm_ needs every sharded layer on the same process group")
    group = next(iter(groups.values()))
    expert_ids = {id(p) for _, m in layers for p in m.experts.parameters()}
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    sq_rep = torch.zeros((), device=device, dtype=torch.float32)
    sq_exp = torch.zeros((), device=device, dtype=torch.float32)
    for p in module.parameters():
        if p.grad is not None:
            sq = p.grad.detach().float().square().sum()
            if id(p) in expert_ids:
                sq_exp += sq
            else:
                sq_rep += sq
    if group_rank_and_size(group)[1] > 1:
        dist.all_reduce(sq_exp, group=group)
    total = (sq_rep + sq_exp).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.dtype))
    return total


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names of the sharded banks' parameters: the ones data parallelism must not
    all-reduce (each rank holds different experts). For
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``."""
    names = []
    for prefix, layer in moe_layers(module):
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            pre = f"{prefix}.experts." if prefix else "experts."
            names += [pre + n for n, _ in layer.experts.named_parameters()]
    return names
