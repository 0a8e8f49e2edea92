"""Routers, one family per file. Importing this package registers them (``moelab list --kind router``).

- ``topk``: softmax top-k (Switch, GShard, Mixtral, DeepSeek-V2);
- ``sigmoid_topk``: DeepSeek-V3's sigmoid scores, aux-loss-free bias, group-limited routing;
- ``expert_choice``: each expert takes its top-C tokens;
- ``sinkhorn``, ``ssr``: Sinkhorn-balanced selection (Megatron / S-BASE; Selective Sinkhorn Routing);
- ``rmoe``: RMoE's layerwise recurrent router (one GRU cell shared by every layer);
- ``rexmoe``: ReXMoE, routing over the union of adjacent layers' experts, with progressive scaling;
- ``dynamoe``: DynaMoE, a per-token number of experts under a per-layer capacity schedule;
- ``tsallis_topp``: DynMoLE's top-p router, all experts for uncertain tokens (Tsallis entropy);
- ``hardsoft_topk``: LoRA-Mixer's hard top-k forward with soft (straight-through) gradients;
- ``moma``: MoMa, expert choice inside modality groups of experts (token types), causal predictor;
- ``promoe``: ProMoE, an unconditional expert by token type and prototypical (cosine) routing;
- ``mixer``: MixER, hard top-1 whose gate is refit by K-means + least squares every n steps;
- ``pregate``: Read-ME's pre-gate, a small causal transformer over token ids whose decision every
  layer uses (routing known before the backbone runs);
- ``peer``, ``omni``: product-key retrieval over pools of ~10^6 atomic experts (PEER's multi-head
  BatchNorm'd query; OmniMoE's Cartesian product of two log-softmaxes), layers ``peer``, ``omni``;
- ``uar``: MoFME's uncertainty-aware router (MC-dropout samples of the router, layer ``mofme``);
- ``uoe_select``: Union of Experts' per-sequence, patch-wise token selection (layer ``uoe``);
- ``capacity``: expert capacity and drop policies shared by the token-choice routers.
"""

from moelab.routers.capacity import (
    DROP_POLICIES,
    Capacity,
    capacity_keep_mask,
    expert_capacity,
    token_choice_routing,
)
from moelab.routers.dynamoe import (
    RULES,
    SCHEDULES,
    DynaMoERouter,
    capacity_schedule,
    dynamic_topk,
    mask_routing,
    schedule_shape,
)
from moelab.routers.expert_choice import ExpertChoiceRouter, expert_choice, expert_choice_capacity
from moelab.routers.hardsoft import HardSoftTopKRouter, hard_soft_topk
from moelab.routers.mixer import (
    KMeansResult,
    MixERRouter,
    cluster_median,
    expert_loss_estimate,
    greedy_assignment,
    kmeans_l1,
    lstsq_gate,
    mixer_gate_update,
    prefix_mean,
)
from moelab.routers.moma import (
    MoMaRouter,
    gumbel_sigmoid,
    modality_expert_choice,
    predicted_selection,
    predictor_bce,
    require_token_types,
)
from moelab.routers.pregate import PreGate, PreGateDecision, PreGateRouter, pregate_gate, rope_rotate
from moelab.routers.product_key import (
    OmniRouter,
    PEERRouter,
    RowBatchNorm,
    batch_norm_rows,
    omni_topk,
    peer_topk,
    product_key_topk,
)
from moelab.routers.promoe import ProMoERouter, expert_label_purity, prototype_gates, prototype_scores
from moelab.routers.recurrent import (
    CELL_TYPES,
    RecurrentCell,
    RecurrentRouter,
    gru_cell,
    recurrent_router_logits,
    rnn_cell,
)
from moelab.routers.rexmoe import (
    ReXMoERouter,
    masked_softmax_topk,
    psr_allowed,
    psr_num_unmasked,
    psr_unmask_rank,
    reuse_group,
)
from moelab.routers.sigmoid_topk import SigmoidTopKRouter, bias_update, group_limited_mask, sigmoid_topk
from moelab.routers.sinkhorn import SelectiveSinkhornRouter, SinkhornRouter, sinkhorn, sinkhorn_topk
from moelab.routers.topk import TopKRouter, sample_second_expert, softmax_topk
from moelab.routers.tsallis import TsallisTopPRouter, tsallis_topp
from moelab.routers.uncertainty import UncertaintyAwareRouter, mc_dropout_logits, uar_combine
from moelab.routers.uoe import UoESelectRouter, patchwise_select, uoe_capacity, uoe_scores

__all__ = [
    "CELL_TYPES",
    "DROP_POLICIES",
    "RULES",
    "SCHEDULES",
    "Capacity",
    "DynaMoERouter",
    "ExpertChoiceRouter",
    "HardSoftTopKRouter",
    "KMeansResult",
    "MixERRouter",
    "MoMaRouter",
    "OmniRouter",
    "PEERRouter",
    "PreGate",
    "PreGateDecision",
    "PreGateRouter",
    "ProMoERouter",
    "ReXMoERouter",
    "RecurrentCell",
    "RecurrentRouter",
    "RowBatchNorm",
    "SelectiveSinkhornRouter",
    "SigmoidTopKRouter",
    "SinkhornRouter",
    "TopKRouter",
    "TsallisTopPRouter",
    "UncertaintyAwareRouter",
    "UoESelectRouter",
    "batch_norm_rows",
    "bias_update",
    "capacity_keep_mask",
    "capacity_schedule",
    "cluster_median",
    "dynamic_topk",
    "expert_capacity",
    "expert_choice",
    "expert_choice_capacity",
    "expert_label_purity",
    "expert_loss_estimate",
    "greedy_assignment",
    "group_limited_mask",
    "gru_cell",
    "gumbel_sigmoid",
    "hard_soft_topk",
    "kmeans_l1",
    "lstsq_gate",
    "mask_routing",
    "masked_softmax_topk",
    "mc_dropout_logits",
    "mixer_gate_update",
    "modality_expert_choice",
    "omni_topk",
    "patchwise_select",
    "peer_topk",
    "predicted_selection",
    "predictor_bce",
    "prefix_mean",
    "pregate_gate",
    "product_key_topk",
    "prototype_gates",
    "prototype_scores",
    "psr_allowed",
    "psr_num_unmasked",
    "psr_unmask_rank",
    "recurrent_router_logits",
    "require_token_types",
    "reuse_group",
    "rnn_cell",
    "rope_rotate",
    "sample_second_expert",
    "schedule_shape",
    "sigmoid_topk",
    "sinkhorn",
    "sinkhorn_topk",
    "softmax_topk",
    "token_choice_routing",
    "tsallis_topp",
    "uar_combine",
    "uoe_capacity",
    "uoe_scores",
]
