"""``moelab.functional``: the pure math of every method, in one namespace (as ``torch.nn.functional``).

Modules are thin state around these functions; each is testable alone.

Routing:
    softmax_topk, sample_second_expert       Switch / GShard / Mixtral / DeepSeek-V2 (``topk``)
    sigmoid_topk, group_limited_mask,        DeepSeek-V3 (``sigmoid_topk``)
    bias_update
    expert_choice, expert_choice_capacity    Expert choice (``expert_choice``)
    sinkhorn, sinkhorn_topk                  Sinkhorn balancing (``sinkhorn``, ``ssr``)
    gru_cell, rnn_cell,                      RMoE's layerwise recurrence (``rmoe``)
    recurrent_router_logits
    reuse_group, psr_num_unmasked,           ReXMoE's reuse groups and progressive scaling (``rexmoe``)
    psr_unmask_rank, psr_allowed,
    masked_softmax_topk, split_expert_order
    capacity_schedule, schedule_shape,       DynaMoE's per-token k and layer capacities (``dynamoe``)
    dynamic_topk
    tsallis_topp                             DynMoLE's top-p / broadcast decision (``tsallis_topp``)
    modality_expert_choice, gumbel_sigmoid,  MoMa: expert choice per modality group (``moma``)
    predictor_bce, predicted_selection
    prototype_scores, prototype_gates        ProMoE's prototypical routing (``promoe``)
    pregate_gate, rope_rotate                Read-ME's pre-gate over token ids (``pregate``)
    kmeans_l1, cluster_median,               MixER's gate refit (``mixer``)
    greedy_assignment, lstsq_gate,
    expert_loss_estimate, mixer_gate_update,
    prefix_mean
    soft_moe, soft_moe_logits,               Soft MoE: slots, dispatch and combine softmaxes (``soft``)
    soft_moe_weights, token_expert_routing
    chain_of_experts                         Chain-of-Experts' iterations (``coe``)
    residual_mix                             Residual-MoE's sum or learned mix (``residual_moe``)
    product_key_topk                         exact top-k over n^2 product-key sums from k per side (PEER, OmniMoE)
    peer_topk, omni_topk, batch_norm_rows    PEER's multi-head retrieval, OmniMoE's Cartesian router (``peer``, ``omni``)
    subkey_topc, product_key_merge           the two halves of product-key retrieval (PEER's sparse-backward path)
    feature_modulation, gated_base           MoFME's FiLM experts around one shared base (``mofme``)
    mc_dropout_logits, uar_combine           MoFME's uncertainty-aware router by MC dropout (``uar``)
    uoe_scores, patchwise_select,            Union of Experts' per-sequence token selection (``uoe``)
    uoe_capacity, decompose_mlp,             and the exact split of a dense MLP into E experts
    assemble_mlp
    expert_capacity, capacity_keep_mask,     capacity and drop policies of token-choice routers
    token_choice_routing
Depth routing:
    capacity_count, topk_per_sequence,       the per-sequence gather: k chosen tokens of each row in
    ragged_index, gather_tokens,             position order ([B, k, d]), ragged rows padded last
    scatter_update, positions_of
    mod_topk_targets, mod_update             mixture-of-depths' causal target and residual update (``mod``)
    gamma_mod_selection,                     γ-MoD's masked selection, its k, its aux loss and the
    gamma_mod_topk_count,                    ARank layer choice (``gamma_mod``)
    gamma_mod_aux_loss, lowest_arank_layers
    recursion_layout, default_capacities,    mixture-of-recursions: middle-cycle sharing, nested
    recursion_token_counts, warmed_capacity, capacities, the causal BCE and the depth balance loss (``mor``)
    expert_choice_bce, recursion_balance_loss
    window_mean_pool, focal_loss,            Dr.LLM's router input, its loss, its decisions, and the
    effective_number_weights,                layer-path search that labels them (``drllm``)
    penalized_decisions, decision_routing,
    decisions_of_routing, mcts_layer_paths,
    mcts_layer_paths_batched, path_successors,
    path_to_labels, labels_to_path
    causal_attention_probs,                  FTP's token features and losses, and its per-block
    attention_received, rank_in_sequence,    sparsity schedule search (``ftp``)
    ftp_features, static_keep_targets,
    ftp_guide_loss, ftp_sparsity_loss,
    ftp_distillation_loss, project_schedule,
    search_sparsity_schedule
Attention routing:
    moba_attention, moba_attention_reference, MoBA: each query attends its own key block and the
    moba_gate, moba_block_means,             top_k - 1 best past blocks by q . mean(K_j); cached
    moba_decode, moba_routing,               decoding; FlashMoBA's causal key convolution (``moba``)
    causal_key_conv
    uoe_head_gate, uoe_select_head_tokens,   UoE's selective heads: a per-token gate over heads, each
    head_token_positions,                    head attending among its own tokens (``uoe_attention``)
    gathered_head_attention,
    selective_head_attention
LoRA mixtures:
    grouped_lora, rank_dense_lora            LoRA experts: grouped low-rank GEMMs, or all in rank space
    hard_soft_topk                           LoRA-Mixer's hard-soft top-k (``hardsoft_topk``)
    plackett_luce_log_prob, rloo_advantages, ReMix: sampled subsets, RLOO, effective number of
    rloo_surrogate, sample_without_replacement, experts (``remix``)
    effective_num_experts,
    router_effective_num_experts
    sparse_random_projection, flylora_select, FlyLoRA: frozen sparse A, rank-wise top-k, bias
    flylora_delta, flylora_bias_update       balance (``flylora``)
    new_group_mass, token_types, tag_routing, LLaVA-DyMoE: token typing, TAG, RSR (``dymoe``)
    rsr_separation, rsr_specialization
    glider_local_logits, glider_global_bias, Glider: PHATGOOSE gates + a global bias from
    glider_routing, phatgoose_gate           instruction embeddings (``glider``)
    expert_lora_delta                        one LoRA per MoE expert on fused 3-D weights
Placement (expert parallelism):
    llep_plan, llep_assign                   LLEP's least-loaded plan and each assignment's rank (``llep``)
    eplb_plan, eplb_assign,                  EPLB's redundant experts: replicate, pack onto GPUs,
    balanced_packing, replicate_experts      split an expert's tokens over its replicas (``eplb``)
Losses:
    load_balance_loss, load_balance_seq_loss, z_loss
    erc_epsilon, erc_proxy_tokens,           expert-router coupling (``erc``)
    erc_coupling, erc_loss, erc_diag_dominance
    tsallis_entropy, tsallis_entropy_loss    DynMoLE's entropy (``tsallis_entropy``)
    routing_contrastive_loss                 ProMoE's routing contrastive loss (``rcl``)
Execution:
    dispatch, combine                        rows into expert-sorted order and back
    grouped_mm                               grouped GEMM over expert-sorted rows
    atomic_experts                           single-neuron expert pools, weights gathered per assignment
    activation_forward, activation_backward  the expert non-linearities
"""

from moelab.attention.moba import (
    causal_key_conv,
    moba_attention,
    moba_attention_reference,
    moba_block_means,
    moba_decode,
    moba_gate,
    moba_routing,
)
from moelab.attention.selective_heads import (
    gathered_head_attention,
    head_token_positions,
    selective_head_attention,
    uoe_head_gate,
    uoe_select_head_tokens,
)
from moelab.core.activations import activation_backward, activation_forward
from moelab.depth.gamma_mod import (
    gamma_mod_aux_loss,
    gamma_mod_selection,
    gamma_mod_topk_count,
    lowest_arank_layers,
)
from moelab.depth.gather import (
    capacity_count,
    gather_tokens,
    positions_of,
    ragged_index,
    scatter_update,
    topk_per_sequence,
)
from moelab.depth.layer_router import (
    decision_routing,
    decisions_of_routing,
    effective_number_weights,
    focal_loss,
    penalized_decisions,
    window_mean_pool,
)
from moelab.depth.mcts import (
    labels_to_path,
    mcts_layer_paths,
    mcts_layer_paths_batched,
    path_successors,
    path_to_labels,
)
from moelab.depth.mod import mod_topk_targets, mod_update
from moelab.depth.prune import (
    attention_received,
    causal_attention_probs,
    ftp_distillation_loss,
    ftp_features,
    ftp_guide_loss,
    ftp_sparsity_loss,
    rank_in_sequence,
    static_keep_targets,
)
from moelab.depth.recursion import (
    default_capacities,
    expert_choice_bce,
    recursion_balance_loss,
    recursion_layout,
    recursion_token_counts,
    warmed_capacity,
)
from moelab.depth.schedule_search import project_schedule, search_sparsity_schedule
from moelab.experts.film import feature_modulation
from moelab.experts.lora import grouped_lora, rank_dense_lora
from moelab.experts.union import split_expert_order
from moelab.kernels.grouped_mm import grouped_mm
from moelab.layers.chain import chain_of_experts
from moelab.layers.mofme import gated_base
from moelab.layers.residual_moe import residual_mix
from moelab.layers.soft_moe import soft_moe, soft_moe_logits, soft_moe_weights, token_expert_routing
from moelab.layers.uoe import assemble_mlp, decompose_mlp
from moelab.lora.dymoe import new_group_mass, rsr_separation, rsr_specialization, tag_routing, token_types
from moelab.lora.flylora import flylora_bias_update, flylora_delta, flylora_select, sparse_random_projection
from moelab.lora.fused import expert_lora_delta
from moelab.lora.glider import glider_global_bias, glider_local_logits, glider_routing, phatgoose_gate
from moelab.lora.remix import (
    effective_num_experts,
    plackett_luce_log_prob,
    rloo_advantages,
    rloo_surrogate,
    router_effective_num_experts,
    sample_without_replacement,
)
from moelab.losses.balance import load_balance_loss, load_balance_seq_loss, z_loss
from moelab.losses.entropy import tsallis_entropy, tsallis_entropy_loss
from moelab.losses.erc import erc_coupling, erc_diag_dominance, erc_epsilon, erc_loss, erc_proxy_tokens
from moelab.losses.rcl import routing_contrastive_loss
from moelab.ops.atomic import atomic_experts
from moelab.ops.rows import combine, dispatch
from moelab.parallel.eplb import balanced_packing, eplb_assign, eplb_plan, replicate_experts
from moelab.parallel.llep import llep_assign, llep_plan
from moelab.routers.capacity import capacity_keep_mask, expert_capacity, token_choice_routing
from moelab.routers.dynamoe import capacity_schedule, dynamic_topk, schedule_shape
from moelab.routers.expert_choice import expert_choice, expert_choice_capacity
from moelab.routers.hardsoft import hard_soft_topk
from moelab.routers.mixer import (
    cluster_median,
    expert_loss_estimate,
    greedy_assignment,
    kmeans_l1,
    lstsq_gate,
    mixer_gate_update,
    prefix_mean,
)
from moelab.routers.moma import gumbel_sigmoid, modality_expert_choice, predicted_selection, predictor_bce
from moelab.routers.pregate import pregate_gate, rope_rotate
from moelab.routers.product_key import (
    batch_norm_rows,
    omni_topk,
    peer_topk,
    product_key_merge,
    product_key_topk,
    subkey_topc,
)
from moelab.routers.promoe import prototype_gates, prototype_scores
from moelab.routers.recurrent import gru_cell, recurrent_router_logits, rnn_cell
from moelab.routers.rexmoe import (
    masked_softmax_topk,
    psr_allowed,
    psr_num_unmasked,
    psr_unmask_rank,
    reuse_group,
)
from moelab.routers.sigmoid_topk import bias_update, group_limited_mask, sigmoid_topk
from moelab.routers.sinkhorn import sinkhorn, sinkhorn_topk
from moelab.routers.topk import sample_second_expert, softmax_topk
from moelab.routers.tsallis import tsallis_topp
from moelab.routers.uncertainty import mc_dropout_logits, uar_combine
from moelab.routers.uoe import patchwise_select, uoe_capacity, uoe_scores

__all__ = [
    "activation_backward",
    "activation_forward",
    "assemble_mlp",
    "atomic_experts",
    "attention_received",
    "balanced_packing",
    "batch_norm_rows",
    "bias_update",
    "capacity_count",
    "capacity_keep_mask",
    "capacity_schedule",
    "causal_attention_probs",
    "causal_key_conv",
    "chain_of_experts",
    "cluster_median",
    "combine",
    "decision_routing",
    "decisions_of_routing",
    "decompose_mlp",
    "default_capacities",
    "dispatch",
    "dynamic_topk",
    "effective_num_experts",
    "effective_number_weights",
    "eplb_assign",
    "eplb_plan",
    "erc_coupling",
    "erc_diag_dominance",
    "erc_epsilon",
    "erc_loss",
    "erc_proxy_tokens",
    "expert_capacity",
    "expert_choice",
    "expert_choice_bce",
    "expert_choice_capacity",
    "expert_lora_delta",
    "expert_loss_estimate",
    "feature_modulation",
    "flylora_bias_update",
    "flylora_delta",
    "flylora_select",
    "focal_loss",
    "ftp_distillation_loss",
    "ftp_features",
    "ftp_guide_loss",
    "ftp_sparsity_loss",
    "gamma_mod_aux_loss",
    "gamma_mod_selection",
    "gamma_mod_topk_count",
    "gated_base",
    "gather_tokens",
    "gathered_head_attention",
    "glider_global_bias",
    "glider_local_logits",
    "glider_routing",
    "greedy_assignment",
    "group_limited_mask",
    "grouped_lora",
    "grouped_mm",
    "gru_cell",
    "gumbel_sigmoid",
    "hard_soft_topk",
    "head_token_positions",
    "kmeans_l1",
    "labels_to_path",
    "llep_assign",
    "llep_plan",
    "load_balance_loss",
    "load_balance_seq_loss",
    "lowest_arank_layers",
    "lstsq_gate",
    "masked_softmax_topk",
    "mc_dropout_logits",
    "mcts_layer_paths",
    "mcts_layer_paths_batched",
    "mixer_gate_update",
    "moba_attention",
    "moba_attention_reference",
    "moba_block_means",
    "moba_decode",
    "moba_gate",
    "moba_routing",
    "mod_topk_targets",
    "mod_update",
    "modality_expert_choice",
    "new_group_mass",
    "omni_topk",
    "patchwise_select",
    "path_successors",
    "path_to_labels",
    "peer_topk",
    "penalized_decisions",
    "phatgoose_gate",
    "plackett_luce_log_prob",
    "positions_of",
    "predicted_selection",
    "predictor_bce",
    "prefix_mean",
    "pregate_gate",
    "product_key_merge",
    "product_key_topk",
    "project_schedule",
    "prototype_gates",
    "prototype_scores",
    "psr_allowed",
    "psr_num_unmasked",
    "psr_unmask_rank",
    "ragged_index",
    "rank_dense_lora",
    "rank_in_sequence",
    "recurrent_router_logits",
    "recursion_balance_loss",
    "recursion_layout",
    "recursion_token_counts",
    "replicate_experts",
    "residual_mix",
    "reuse_group",
    "rloo_advantages",
    "rloo_surrogate",
    "rnn_cell",
    "rope_rotate",
    "router_effective_num_experts",
    "routing_contrastive_loss",
    "rsr_separation",
    "rsr_specialization",
    "sample_second_expert",
    "sample_without_replacement",
    "scatter_update",
    "schedule_shape",
    "search_sparsity_schedule",
    "selective_head_attention",
    "sigmoid_topk",
    "sinkhorn",
    "sinkhorn_topk",
    "soft_moe",
    "soft_moe_logits",
    "soft_moe_weights",
    "softmax_topk",
    "sparse_random_projection",
    "split_expert_order",
    "static_keep_targets",
    "subkey_topc",
    "tag_routing",
    "token_choice_routing",
    "token_expert_routing",
    "token_types",
    "topk_per_sequence",
    "tsallis_entropy",
    "tsallis_entropy_loss",
    "tsallis_topp",
    "uar_combine",
    "uoe_capacity",
    "uoe_head_gate",
    "uoe_scores",
    "uoe_select_head_tokens",
    "warmed_capacity",
    "window_mean_pool",
    "z_loss",
]
