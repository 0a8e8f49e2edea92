"""``MoELM``: a small decoder-only language model whose FFNs are ``moelab.MoE`` layers.

    cfg = MoELMConfig(d_model=128, n_layers=4, router="sigmoid_topk")
    model = MoELM(cfg)
    out = model(input_ids, labels=input_ids)     # input_ids: [B, S] long
    out.loss.backward()                          # CE + every MoE layer's auxiliary loss

Architecture (LLaMA-style, pre-norm): token embedding -> ``n_layers`` x [RMSNorm -> causal
multi-head attention with RoPE (``scaled_dot_product_attention``) -> residual; RMSNorm -> FFN ->
residual] -> RMSNorm -> output projection (tied to the embedding by default). The FFN of block
``i`` is a ``moelab.MoE`` when ``(i + 1) % moe_every == 0`` and a dense SwiGLU MLP otherwise.
Routing is never reimplemented here: the model builds ``moelab.MoE`` layers and passes them one
``RoutingContext`` per forward (flattened ``token_ids``, ``layer_index`` = the block index).

Checkpoints are ``config.json`` + ``model.safetensors`` (``save_pretrained`` /
``from_pretrained``): no pickle anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from moelab import registry
from moelab.core.context import RoutingContext, check_context
from moelab.core.io import save_safetensors
from moelab.core.router import link_routers, router_arguments
from moelab.layers.moe import MoE
from moelab.models.config import MoELMConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MoELMOutput:
    """What ``MoELM.forward`` returns.

    Attributes:
        logits: ``[B, S, vocab]``.
        loss: ``ce_loss + aux_loss`` when labels were given, else None.
        aux_loss: sum of every MoE layer's weighted auxiliary losses (scalar; 0 without MoE layers).
        ce_loss: the next-token cross-entropy alone (mean over non-ignored targets), or None.
    """

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor
    ce_loss: Tensor | None = None


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape ``[max_len, head_dim // 2]`` (Su et al. 2021, RoFormer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, S, hd]`` by position (half-split layout, as LLaMA in transformers)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE, computed by ``scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class DenseFFN(nn.Module):
    """SwiGLU MLP (Shazeer 2020): ``down(silu(gate x) * up x)``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def routed_ffn(cfg: MoELMConfig, num_experts: int | None = None) -> nn.Module:
    """The routed FFN of an MoE block: a ``moelab.MoE`` with ``cfg.router``, or, when ``cfg.router``
    names a registered routed layer other than ``moe`` (``"soft"``), that layer, built with the
    same arguments (its options in ``router_kwargs``). A router that takes ``vocab_size`` gets the
    model's. ``num_experts``: this layer's ``E`` (default ``cfg.num_experts``; Pyramid-MoE's
    ``experts_per_layer``)."""
    e = cfg.num_experts if num_experts is None else num_experts
    router_kwargs = dict(cfg.router_kwargs)
    if cfg.router in registry.names("router") and "vocab_size" not in router_kwargs:
        # routers over token ids (Read-ME's pre-gate) embed the model's vocabulary
        accepted = router_arguments(registry.get("router", cfg.router).obj)
        if accepted is not None and "vocab_size" in accepted:
            router_kwargs["vocab_size"] = cfg.vocab_size
    kwargs = dict(
        shared_experts=cfg.shared_experts,
        aux_losses=dict(cfg.aux_losses),
        aux_loss_kwargs={k: dict(v) for k, v in cfg.aux_loss_kwargs.items()},
        backend=cfg.backend,
    )
    if cfg.router != "moe" and cfg.router in registry.names("layer"):
        layer_cls = registry.get("layer", cfg.router).obj
        return layer_cls(cfg.d_model, e, cfg.top_k, cfg.expert_hidden, router_kwargs=router_kwargs, **kwargs)
    return MoE(
        cfg.d_model,
        e,
        cfg.top_k,
        cfg.expert_hidden,
        router=cfg.router,
        router_kwargs=router_kwargs,
        **kwargs,
    )


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a dense or MoE FFN."""

    def __init__(self, cfg: MoELMConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.ffn: nn.Module = routed_ffn(cfg, cfg.experts_at(index))
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.dense_hidden or 4 * cfg.d_model)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: RoutingContext) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        if self.is_moe:
            y = self.ffn(h, ctx.replace(layer_index=self.index))
            # Chain-of-Experts (paper default): the block output is x_C = norm(x) + y, the residual x
            # is dropped; every other layer keeps the pre-norm residual
            return (x if getattr(self.ffn, "keeps_block_residual", True) else h) + y
        return x + self.ffn(h)


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
        # routers whose state spans layers (RMoE's shared GRU, Read-ME's pre-gate) take it now
        link_routers([m for _, m in self.moe_layers()])

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by ``1/sqrt(2 n_layers)``.

        MoE layers keep their own initialisation (``moelab.MoE``'s router and expert inits).
        """
        std = 0.02
        nn.init.normal_(self.embed.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for blk in self.blocks:
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
            if not isinstance(token_types, Tensor) or token_types.shape != ids.shape or token_types.is_floating_point():
                got = tuple(token_types.shape) if isinstance(token_types, Tensor) else type(token_types).__name__
                raise ValueError(f"token_types must be an integer tensor of input_ids' shape {tuple(ids.shape)}, got {got}")
            changes["token_types"] = token_types.reshape(-1).long()
        ctx = ctx.replace(**changes)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin, ctx)
        h = self.norm(x)
        logits = F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)
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
        return total

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
