"""DeepSpeed-MoE expert slicing: more ranks than experts (Rajbhandari et al. 2022, PAPERS.md item 21).

When the expert-parallel group has ``P = E * S`` ranks, each expert's hidden dimension is split
into ``S`` slices and rank ``e * S + s`` holds slice ``s`` of expert ``e``: the rows
``[s * h / S, (s + 1) * h / S)`` of its input projection (column parallel; for a gated expert the
same rows of the gate and of the up projection) and the same columns of its output projection
(row parallel). An expert MLP is a sum over its hidden units, ``down (act(gate x) * up x) =
sum_s down_s (act(gate_s x) * up_s x)``, so each slice computes a partial output and the partials
sum to the expert's output.

Execution reuses the ``ep`` exchange (``moelab.ops.all_to_all``) with one "slice expert" per rank:
every assignment ``(token, e, w)`` is expanded into ``S`` assignments ``(token, e * S + s, w)``,
so the token's row travels to each of the ``S`` ranks holding a slice of ``e`` (what DeepSpeed
does with an all-gather inside the slice group) and the ``S`` partial outputs come back and are
summed by the weighted combine (the all-reduce of the partial outputs, done where the token
lives). Output and gradients equal the unsliced layer's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank, is_plain_mlp_bank
from moelab.ops.all_to_all import AllToAllDispatcher, group_rank_and_size
from moelab.ops.dispatchers import LocalDispatcher
from moelab.ops.executors import Executor
from moelab.parallel.sharding import moe_layers


def slices_per_expert(num_experts: int, world_size: int) -> int:
    """``S = P / E``; a ``ValueError`` unless ``E`` divides ``P``."""
    if num_experts < 1 or world_size < 1 or world_size % num_experts:
        raise ValueError(
            f"expert slicing needs the group size ({world_size}) to be a multiple of num_experts ({num_experts})"
        )
    return world_size // num_experts


def hidden_slice(bank: ExpertBank, expert: int, index: int, count: int) -> ExpertBank:
    """A one-expert ``ExpertBank`` holding hidden slice ``index`` of ``count`` of expert ``expert``
    (copies): input-projection rows (gate and up rows alike when gated) and output-projection
    columns ``[index * h / count, (index + 1) * h / count)``."""
    if not is_plain_mlp_bank(bank):
        raise TypeError(f"expert slicing splits ExpertBank's fused MLP weights; got {type(bank).__name__}")
    if not 0 <= expert < bank.num_experts:
        raise ValueError(f"expert must lie in [0, {bank.num_experts}), got {expert}")
    if count < 1 or bank.hidden % count:
        raise ValueError(f"the hidden width {bank.hidden} must be divisible by the slice count {count}")
    if not 0 <= index < count:
        raise ValueError(f"index must lie in [0, {count}), got {index}")
    h, part = bank.hidden, bank.hidden // count
    cols = torch.arange(index * part, (index + 1) * part)
    rows = torch.cat([cols, cols + h]) if bank.gated else cols  # gate rows, then up rows
    w_in = bank.w_in.detach()[expert].index_select(0, rows).unsqueeze(0).clone()
    down = bank.down_proj.detach()[expert].index_select(1, cols).unsqueeze(0).clone()
    return ExpertBank.from_parameters(nn.Parameter(w_in), nn.Parameter(down), bank.activation)


class ExpertSlicingDispatcher(AllToAllDispatcher):
    """``ep`` over ``P = E * S`` hidden slices (module docstring): rank ``e * S + s`` holds slice ``s``
    of expert ``e`` (a one-expert bank from ``hidden_slice``).

    Call: ``dispatcher(x [T, d_in], routing over the E experts, this rank's one-slice bank,
    executor) -> y [T, d_out]``. Not registered by name: it needs a sliced bank
    (``shard_experts_sliced``)."""

    name = "ep_sliced"
    contiguous_blocks = False  # slices, not whole experts: gather_experts / clip_grad_norm_ refuse

    def __call__(self, x_TD: Tensor, routing: Routing, bank: nn.Module, executor: Executor) -> Tensor:
        _, size = group_rank_and_size(self.group)
        s = slices_per_expert(routing.num_experts, size)
        if bank.num_experts != 1:
            raise ValueError(f"a sliced rank holds one expert slice, the bank has {bank.num_experts}")
        n = routing.num_assignments
        order = torch.arange(s, device=routing.device)
        # assignment-major expansion (each assignment's S copies adjacent): token-major stays so.
        expanded = Routing(
            token_index=routing.token_index.repeat_interleave(s),
            expert_index=(routing.expert_index.unsqueeze(1) * s + order).reshape(n * s),
            weight=routing.weight.repeat_interleave(s),
            num_tokens=routing.num_tokens,
            num_experts=routing.num_experts * s,
            top_k=None if routing.top_k is None else routing.top_k * s,
            validate=False,
        )
        return super().__call__(x_TD, expanded, bank, executor)


def shard_experts_sliced(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Every ``MoE`` layer of ``module``, in place: this rank keeps its hidden slice of one expert
    (``P = E * S`` ranks) and gets an ``ExpertSlicingDispatcher``. Every rank must hold the same
    global weights before the call."""
    layers = moe_layers(module)
    if not layers:
        raise ValueError(f"shard_experts_sliced found no moelab.MoE layer in {type(module).__name__}")
    rank, size = group_rank_and_size(group)
    for name, layer in layers:
        if not isinstance(layer.dispatcher, LocalDispatcher):
            raise ValueError(f"MoE layer {name or '<root>'}: only 'local' layers can be sharded")
        s = slices_per_expert(layer.num_experts, size)
        if not is_plain_mlp_bank(layer.experts) or layer.experts.hidden % s:
            raise ValueError(
                f"MoE layer {name or '<root>'}: expert slicing needs an ExpertBank whose hidden width is "
                f"divisible by {s}"
            )
    for _, layer in layers:
        s = slices_per_expert(layer.num_experts, size)
        layer.experts = hidden_slice(layer.experts, rank // s, rank % s, s)
        layer.dispatcher = ExpertSlicingDispatcher(group)
    return module
