"""Tiny random transformers models (MoE families and a dense Llama) of every supported family, built in milliseconds, no download."""

from __future__ import annotations

import torch

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)


def tiny_config(family: str, **overrides):
    """A 2-layer config of ``family`` with E=8 experts, k=2 (DeepSeek-V3: 4 groups, 2 kept)."""
    import transformers as tf

    if family == "olmoe":
        cfg = tf.OlmoeConfig(**_COMMON, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **_COMMON,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            norm_topk_prob=False,
        )
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **_COMMON,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            head_dim=8,
        )
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**_COMMON, num_local_experts=8, num_experts_per_tok=2)
    elif family == "deepseek_v3":
        cfg = tf.DeepseekV3Config(
            **{**_COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(
            **_COMMON,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=16,
            swiglu_limit=0.05,  # small, so that the clamps of the clamped SwiGLU are exercised
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    """A seeded fp32 ``*ForCausalLM`` of ``family`` in eval mode (eager attention, eager experts)."""
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager"
    )
    if family == "deepseek_v3":
        # Give the expert bias non-zero values so that bias-steered selection is exercised.
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.normal_(0.0, 0.05)
    if family == "gpt_oss":
        # transformers initialises the expert biases to zero; make them matter.
        with torch.no_grad():
            for m in model.modules():
                for name in ("gate_up_proj_bias", "down_proj_bias"):
                    if hasattr(m, name):
                        getattr(m, name).normal_(0.0, 0.05)
    return model.eval()


def tiny_ids(batch: int = 2, seq: int = 12, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def tiny_llama(seed: int = 0):
    """A seeded 2-layer fp32 Llama (dense FFN, SwiGLU) for upcycling."""
    import transformers as tf

    cfg = tf.LlamaConfig(**_COMMON)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
