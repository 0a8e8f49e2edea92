"""``moelab.functional``: the pure math of every method, in one namespace (as ``torch.nn.functional``).

Modules are thin state around these functions; each is testable alone.

Routing:
    softmax_topk, sample_second_expert       Switch / GShard / Mixtral / DeepSeek-V2 (``topk``)
    sigmoid_topk, group_limited_mask,        DeepSeek-V3 (``sigmoid_topk``)
    bias_update
    expert_choice, expert_choice_capacity    Expert choice (``expert_choice``)
    sinkhorn, sinkhorn_topk                  Sinkhorn balancing (``sinkhorn``, ``ssr``)
    expert_capacity, capacity_keep_mask,     capacity and drop policies of token-choice routers
    token_choice_routing
Losses:
    load_balance_loss, load_balance_seq_loss, z_loss
Execution:
    dispatch, combine                        rows into expert-sorted order and back
    grouped_mm                               grouped GEMM over expert-sorted rows
    activation_forward, activation_backward  the expert non-linearities
"""

from moelab.core.activations import activation_backward, activation_forward
from moelab.kernels.grouped_mm import grouped_mm
from moelab.losses.balance import load_balance_loss, load_balance_seq_loss, z_loss
from moelab.ops.rows import combine, dispatch
from moelab.routers.capacity import capacity_keep_mask, expert_capacity, token_choice_routing
from moelab.routers.expert_choice import expert_choice, expert_choice_capacity
from moelab.routers.sigmoid_topk import bias_update, group_limited_mask, sigmoid_topk
from moelab.routers.sinkhorn import sinkhorn, sinkhorn_topk
from moelab.routers.topk import sample_second_expert, softmax_topk

__all__ = [
    "activation_backward",
    "activation_forward",
    "bias_update",
    "capacity_keep_mask",
    "combine",
    "dispatch",
    "expert_capacity",
    "expert_choice",
    "expert_choice_capacity",
    "grouped_mm",
    "group_limited_mask",
    "load_balance_loss",
    "load_balance_seq_loss",
    "sample_second_expert",
    "sigmoid_topk",
    "sinkhorn",
    "sinkhorn_topk",
    "softmax_topk",
    "token_choice_routing",
    "z_loss",
]
