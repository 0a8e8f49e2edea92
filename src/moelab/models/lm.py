"""``MoELM``: a small decoder-only language model whose FFNs are ``moelab.MoE`` layers.

    cfg = MoELMConfig(d_model=128, n_layers=4, router="sigmoid_topk")
    model = MoELM(cfg)
    out = model(input_ids, labels=input_ids)     # input_ids: [B, S] long
    out.loss.backward()                          # CE + every MoE layer's auxiliary loss

Architecture (LLaMA-style, pre-norm): token embedding -> ``n_layers`` x [RMSNorm -> causal
multi-head attention with RoPE (``scaled_dot_product_attention``) -> residual; RMSNorm -> FFN ->
residual] -> RMSNorm -> output projection (tied to the embedding by default). The FFN of block
``i`` is a ``moelab.MoE`` when ``(i + 1) % moe_every == 0`` and a dense SwiGLU MLP otherwise.
The attention can be MoBA (``attention="moba"``) or Union of Experts' selective heads
(``attention="uoe_attention"``: ``SelectiveHeadAttention``, a routed layer whose auxiliary loss
and FLOPs count with the rest; with ``router="uoe"`` every MoE block is a UoE block).
Routing is never reimplemented here: the model builds ``moelab.MoE`` layers and passes them one
``RoutingContext`` per forward (flattened ``token_ids``, ``layer_index`` = the block index).

Checkpoints are ``config.json`` + ``model.safetensors`` (``save_pretrained`` /
``from_pretrained``): no pickle anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from moelab import registry
from moelab.attention.selective_heads import SelectiveHeadAttention
from moelab.core.context import RoutingContext, check_context
from moelab.core.flops import model_flops, reset_flops
from moelab.core.io import save_safetensors
from moelab.core.router import link_routers
from moelab.layers.moe import MoE
from moelab.models.blocks import (
    Attention,
    Block,
    DenseFFN,
    KVCache,
    apply_rope,
    block_cache,
    rope_tables,
    routed_ffn,
)
from moelab.models.config import MoELMConfig

__all__ = [
    "Attention",
    "Block",
    "DenseFFN",
    "KVCache",
    "MoELM",
    "MoELMOutput",
    "apply_rope",
    "block_cache",
    "rope_tables",
    "routed_ffn",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MoELMOutput:
    """What ``MoELM.forward`` returns.

    Attributes:
        logits: ``[B, S, vocab]``.
        loss: ``ce_loss + aux_loss`` when labels were given, else None.
        aux_loss: sum of every MoE layer's weighted auxiliary losses, plus the depth router's and
            the selective-head attentions' (scalar; 0 without any).
        ce_loss: the next-token cross-entropy alone (mean over non-ignored targets), or None.
    """

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    ce_loss: Tensor | None = None


class MoELM(nn.Module):
    """Decoder-only LM with MoE FFNs. See the module docstring.

    ``forward(input_ids [B, S] long, labels=None, ctx=None, token_types=None) -> MoELMOutput``.
    ``labels`` follow the transformers convention: the same positions as ``input_ids`` (usually
    ``labels=input_ids``), shifted inside the model so position ``t`` predicts ``t + 1``; ``-100``
    is ignored. ``token_types`` ``[B, S]`` long (text / image, ``moelab.data.mixed``) reach the
    routers as ``ctx.token_types`` (MoMa, ProMoE read them).
    """

    def __init__(self, config: MoELMConfig) -> None:
        super().__init__()
        if not isinstance(config, MoELMConfig):
            raise TypeError(f"config must be a MoELMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.lm_head = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()
        # a depth router (mixture-of-depths, recursion, pruning) schedules the blocks; None: all in order
        self.depth: Any = None
        if config.depth is not None:
            self.depth = registry.get("depth", config.depth).obj.from_config(
                config, **dict(config.depth_kwargs)
            )
        self.last_num_tokens = 0
        # routers whose state spans layers (RMoE's shared GRU, Read-ME's pre-gate) take it now
        link_routers([m for _, m in self.moe_layers()])

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by ``1/sqrt(2 n_layers)``.

        MoE layers keep their own initialisation (``moelab.MoE``'s router and expert inits). A
        ``SelectiveHeadAttention``'s projections are initialised as the dense attention's (its
        ``o_proj`` as a residual output projection, biases zero); its head gate keeps its own.
        """
        std = 0.02
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for blk in self.blocks:
            if isinstance(blk.attn, SelectiveHeadAttention):
                for proj in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj, blk.attn.o_proj):
                    nn.init.normal_(proj.weight, std=out_std if proj is blk.attn.o_proj else std)
                    if proj.bias is not None:
                        nn.init.zeros_(proj.bias)
            else:
                nn.init.normal_(blk.attn.qkv.weight, std=std)
                nn.init.normal_(blk.attn.out.weight, std=out_std)
            if not blk.is_moe:
                nn.init.normal_(blk.ffn.gate_up.weight, std=std)
                nn.init.normal_(blk.ffn.down.weight, std=out_std)

    # -- introspection ----------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[int, MoE]]:
        """``(block index, MoE layer)`` for every MoE block."""
        return [(b.index, b.ffn) for b in self.blocks if b.is_moe]

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; ``active=True`` counts only ``k / E`` of the routed experts, ``k`` the
        layer's ``experts_per_token`` when it has one (PEER: heads x top_k), else ``top_k``."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        inactive = 0.0
        for i, m in self.moe_layers():
            e = self.config.experts_at(i)
            k = getattr(m, "experts_per_token", self.config.top_k)
            routed = sum(p.numel() for p in m.experts.parameters())
            inactive += (1 - min(k, e) / e) * routed
        return int(total - inactive)

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        ctx: RoutingContext | None = None,
        token_types: Tensor | None = None,
    ) -> MoELMOutput:
        ids = self._check_ids(input_ids, "input_ids")
        b, s = ids.shape
        ctx = check_context(ctx)
        changes = {"batch_shape": (b, s)}
        if ctx.token_ids is None:
            changes["token_ids"] = ids.reshape(-1)
        if token_types is not None:
            if (
                not isinstance(token_types, Tensor)
                or token_types.shape != ids.shape
                or token_types.is_floating_point()
            ):
                got = (
                    tuple(token_types.shape)
                    if isinstance(token_types, Tensor)
                    else type(token_types).__name__
                )
                raise ValueError(
                    f"token_types must be an integer tensor of input_ids' shape {tuple(ids.shape)}, got {got}"
                )
            changes["token_types"] = token_types.reshape(-1).long()
        session = ctx.session
        positions = None
        if session is not None:  # decoding: these tokens follow the ones the session has seen
            start = session.num_seen_tokens
            if start + s > self.config.max_seq_len:
                raise ValueError(
                    f"the session holds {start} tokens; {s} more exceed max_seq_len={self.config.max_seq_len}"
                )
            positions = torch.arange(start, start + s, device=ids.device).expand(b, s)
            changes["positions"] = positions.reshape(-1)
        ctx = ctx.replace(**changes)
        reset_flops(self)
        rope = (self.rope_cos, self.rope_sin)
        x = self.embed(ids)
        if self.depth is not None:
            x = self.depth(x, self.blocks, rope, ctx, positions)
        else:
            for blk in self.blocks:
                x = blk(x, rope, ctx, positions=positions, cache=block_cache(ctx, blk))
        if session is not None:
            session.advance(s)
        h = self.norm(x)
        logits = F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)
        self.last_num_tokens = b * s
        aux = self._aux_loss(x)
        if labels is None:
            return MoELMOutput(logits=logits, loss=None, aux_loss=aux)
        lab = self._check_ids(labels, "labels", allow_ignore=True)
        if lab.shape != ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(ids.shape)}, got {tuple(lab.shape)}")
        ce = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), lab[:, 1:].reshape(-1), ignore_index=-100
        )
        return MoELMOutput(logits=logits, loss=ce + aux, aux_loss=aux, ce_loss=ce)

    def _aux_loss(self, like: Tensor) -> Tensor:
        total = like.new_zeros((), dtype=torch.float32)
        for _, moe in self.moe_layers():
            total = total + moe.aux_loss
        if self.depth is not None:
            total = total + self.depth.aux_loss
        for blk in self.blocks:  # selective-head attention: its head gate's losses (0 without)
            if isinstance(blk.attn, SelectiveHeadAttention):
                total = total + blk.attn.aux_loss
        return total

    # -- compute ----------------------------------------------------------------------------------
    def flops_per_token(self) -> float:
        """Forward FLOPs per input token of the last forward (``moelab.core.flops``): attention,
        FFNs and routers as they ran (a depth-routed block counts only the tokens it processed),
        plus the output projection. Training costs about 3x this (forward + backward)."""
        if self.last_num_tokens == 0:
            return 0.0
        head = 2.0 * self.config.d_model * self.config.vocab_size
        return model_flops(self) / self.last_num_tokens + head

    def flops_by_layer(self) -> dict[str, float]:
        """Forward FLOPs per input token of the last forward, by module name (those that count)."""
        n = max(1, self.last_num_tokens)
        return {
            name: m.flops / n
            for name, m in self.named_modules()
            if isinstance(getattr(m, "flops", None), float) and m.flops
        }

    def _check_ids(self, ids: object, name: str, allow_ignore: bool = False) -> Tensor:
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, S] of token ids, got {type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must be [B, S], got shape {tuple(ids.shape)}")
        if ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"{name} must be an integer tensor (torch.long), got {ids.dtype}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{name} has S={ids.shape[1]} > max_seq_len={self.config.max_seq_len}")
        valid = ids[ids != -100] if allow_ignore else ids
        if valid.numel():
            lo, hi = int(valid.min()), int(valid.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"{name} must lie in [0, vocab_size={self.config.vocab_size})"
                    f"{' or be -100' if allow_ignore else ''}, got [{lo}, {hi}]"
                )
        return ids.long()

    # -- checkpoints ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``directory/config.json`` and ``directory/model.safetensors``. Returns the directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.config.to_json(d / CONFIG_NAME)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_safetensors(state, d / WEIGHTS_NAME, metadata={"format": "pt", "moelab": "MoELM"})
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None) -> MoELM:
        """Load a model written by ``save_pretrained`` (or a trainer checkpoint directory)."""
        d = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name} not found: not a MoELM checkpoint directory")
        model = cls(MoELMConfig.from_json(d / CONFIG_NAME))
        state = load_file(str(d / WEIGHTS_NAME), device=str(device) if device is not None else "cpu")
        model.load_state_dict(state, strict=True)
        return model.to(device) if device is not None else model
