"""``MoELMConfig``: the plain, JSON-round-trippable config of the reference decoder LM."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from moelab.core.checks import positive_int, top_k_in_range

ATTENTIONS = ("sdpa", "moba", "uoe_attention")
# SelectiveHeadAttention's arguments that MoELMConfig sets itself (d_model, n_heads; head_dim
# = d_model / n_heads, which the RoPE tables are built for)
_UOE_FROM_CONFIG = ("d_model", "n_heads", "head_dim")


def _default_aux_losses() -> dict[str, float]:
    return {"load_balance": 1e-2, "z": 1e-3}


def _check_uoe_attention_kwargs(kwargs: dict[str, Any], d_model: int, n_heads: int) -> None:
    """``attention_kwargs`` for ``attention="uoe_attention"``: known names, and values that
    ``SelectiveHeadAttention`` accepts (built once on the meta device: its own checks, no memory).
    Errors name the argument, prefixed with ``attention_kwargs``."""
    import inspect

    import torch

    from moelab.attention.selective_heads import SelectiveHeadAttention

    params = inspect.signature(SelectiveHeadAttention.__init__).parameters
    allowed = [n for n in params if n not in ("self", *_UOE_FROM_CONFIG)]
    given = set(kwargs)
    fixed = sorted(given & set(_UOE_FROM_CONFIG))
    if fixed:
        raise ValueError(
            f"attention_kwargs must not set {fixed} for attention='uoe_attention': d_model and n_heads "
            "come from the config, and head_dim is d_model / n_heads (the RoPE tables')"
        )
    unknown = sorted(given - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown attention_kwargs {unknown} for attention='uoe_attention'; known: {sorted(allowed)}"
        )
    if kwargs.get("causal", True) is not True:
        raise ValueError(
            f"attention_kwargs causal must be True for attention='uoe_attention' (MoELM is a causal "
            f"language model), got {kwargs['causal']!r}"
        )
    try:
        with torch.device("meta"):
            SelectiveHeadAttention(d_model, n_heads, **kwargs)
    except (TypeError, ValueError) as e:
        raise type(e)(f"attention_kwargs for attention='uoe_attention': {e}") from None


@dataclass
class MoELMConfig:
    """Config of ``MoELM``, a small decoder-only LM with MoE feed-forward layers.

    Attributes:
        vocab_size: tokenizer size (256 = bytes, the default tokenizer).
        d_model: residual width ``d``.
        n_layers: transformer blocks.
        n_heads: attention heads (``d_model`` must divide by it; head dim must be even for RoPE).
        max_seq_len: longest sequence (RoPE tables are built up to it).
        moe_every: block ``i`` has an MoE FFN when ``(i + 1) % moe_every == 0``, a dense SwiGLU
            FFN otherwise (1: every block is MoE; 2: every second block, as in GShard/Switch).
        num_experts, top_k: ``E`` and ``k`` of the MoE layers.
        experts_per_layer: ``E`` of each MoE layer, in depth order (Pyramid-MoE, DeepSpeed-MoE:
            more experts in deeper layers, e.g. ``[8, 8, 16, 16]``); None: ``num_experts`` in every
            MoE layer.
        expert_hidden: each expert's hidden width; None: ``moelab.MoE``'s default ``4 d / k``.
        dense_hidden: the dense FFN's hidden width; None: ``4 d`` (the same active width as an
            MoE layer with the default expert width).
        router: a registered router name (``moelab list``), or a registered routed layer that
            replaces the whole MoE layer (``"soft"``: Soft MoE).
        router_kwargs: extra router arguments (``capacity_factor``, ``bias_update_rate``, ...).
        aux_losses: auxiliary losses by name and coefficient, for every MoE layer.
        aux_loss_kwargs: parameters of those losses by name (``{"erc": {"alpha": 0.5}}``).
        shared_experts: always-on shared experts per MoE layer (DeepSeekMoE); 0 for none.
        backend: expert execution backend, ``"auto"`` or a name from ``moelab.ops.backend_names()``.
        rope_theta: RoPE base.
        tie_embeddings: share the input embedding and the output projection.
        depth: a registered depth router (``moelab list depth``: ``mod``, ``mor``, ...) that
            schedules the blocks (which tokens each runs, how often); None: every block on every
            token, in order.
        depth_kwargs: its options (``{"capacity": 0.125}``); see the method's docs page.
        attention: ``"sdpa"`` (dense causal attention), ``"moba"`` (MoBA block-sparse attention,
            ``moelab.attention.moba``) or ``"uoe_attention"`` (Union of Experts' selective
            multi-head attention, ``moelab.attention.selective_heads.SelectiveHeadAttention``: each
            token picks ``heads_per_token`` of the ``n_heads`` heads; with ``router="uoe"`` a block
            is a UoE block). Neither ``moba`` nor ``uoe_attention`` runs under a depth router;
            ``uoe_attention`` has no KV cache (``moelab.generate(..., use_cache=False)``).
        attention_kwargs: for ``moba``: ``block_size``, ``top_k`` and ``key_conv`` (None, or
            FlashMoBA's key-convolution width, 3 or 5); see docs/methods/moba.md. For
            ``uoe_attention``: SelectiveHeadAttention's arguments other than ``d_model``,
            ``n_heads`` and ``head_dim`` (the config's): ``heads_per_token`` (default
            ``n_heads // 2``), ``capacity``, ``pad_to_capacity``, ``scale_by_gate``,
            ``rope_positions`` (default ``"token"``), ``aux_losses`` and ``aux_loss_kwargs`` (the
            head gate's own, separate from the MoE layers' ``aux_losses``), ``bias``,
            ``gate_bias``, ``normalize``, ``eps``, ``check_finite``; ``causal`` must stay True.
            Checked when the config is built; see docs/methods/uoe_attention.md.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    moe_every: int = 1
    num_experts: int = 8
    top_k: int = 2
    experts_per_layer: list[int] | None = None
    expert_hidden: int | None = None
    dense_hidden: int | None = None
    router: str = "topk"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    aux_losses: dict[str, float] = field(default_factory=_default_aux_losses)
    aux_loss_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    shared_experts: int = 0
    backend: str = "auto"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    depth: str | None = None
    depth_kwargs: dict[str, Any] = field(default_factory=dict)
    attention: str = "sdpa"
    attention_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "moe_every",
            "num_experts",
        ):
            positive_int(name, getattr(self, name))
        top_k_in_range(self.top_k, self.num_experts)
        for name in ("expert_hidden", "dense_hidden"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.experts_per_layer is not None:
            counts = self.experts_per_layer
            if not isinstance(counts, (list, tuple)) or len(counts) != len(self.moe_layers):
                raise ValueError(
                    f"experts_per_layer must list one expert count per MoE layer ({len(self.moe_layers)}), "
                    f"got {counts!r}"
                )
            for n in counts:
                top_k_in_range(self.top_k, positive_int("experts_per_layer[i]", n))
            self.experts_per_layer = [int(n) for n in counts]
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if (
            isinstance(self.shared_experts, bool)
            or not isinstance(self.shared_experts, int)
            or self.shared_experts < 0
        ):
            raise ValueError(f"shared_experts must be an int >= 0, got {self.shared_experts!r}")
        if not isinstance(self.router, str):
            raise TypeError(
                f"router must be a registered router name (str), got {type(self.router).__name__}"
            )
        if not isinstance(self.router_kwargs, dict):
            raise TypeError(f"router_kwargs must be a dict, got {type(self.router_kwargs).__name__}")
        if not isinstance(self.aux_losses, dict):
            raise TypeError(
                f"aux_losses must be a dict name -> coefficient, got {type(self.aux_losses).__name__}"
            )
        if not isinstance(self.aux_loss_kwargs, dict):
            raise TypeError(
                f"aux_loss_kwargs must be a dict loss name -> parameters, got {type(self.aux_loss_kwargs).__name__}"
            )
        if self.depth is not None and not isinstance(self.depth, str):
            raise TypeError(
                f"depth must be a registered depth router name (str) or None, got {type(self.depth).__name__}"
            )
        if not isinstance(self.depth_kwargs, dict):
            raise TypeError(f"depth_kwargs must be a dict, got {type(self.depth_kwargs).__name__}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not isinstance(self.attention_kwargs, dict):
            raise TypeError(f"attention_kwargs must be a dict, got {type(self.attention_kwargs).__name__}")
        if self.attention == "moba" and self.depth is not None:
            raise ValueError(
                "attention='moba' with a depth router is not supported (MoBA's blocks need every token "
                "of a sequence in order; depth routers gather subsets)"
            )
        if self.attention == "uoe_attention":
            if self.depth is not None:
                raise ValueError(
                    "attention='uoe_attention' with a depth router is not supported (depth routers "
                    "gather subsets of tokens padded to a rectangle; SelectiveHeadAttention has no "
                    "validity mask, so padding rows would pick heads and be attended to)"
                )
            _check_uoe_attention_kwargs(self.attention_kwargs, self.d_model, self.n_heads)
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        """Whether block ``i`` (0-based) has an MoE FFN."""
        return (i + 1) % self.moe_every == 0

    def experts_at(self, i: int) -> int:
        """``E`` of block ``i``'s MoE layer (``experts_per_layer`` when set, else ``num_experts``)."""
        if self.experts_per_layer is None:
            return self.num_experts
        return self.experts_per_layer[self.moe_layers.index(i)]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    # -- plain-data round trip -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoELMConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"MoELMConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MoELMConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        """The config as JSON; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> MoELMConfig:
        """Parse a JSON string, or read a ``.json`` file."""
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            where = f" in {p}" if p is not None else ""
            raise ValueError(f"MoELMConfig JSON{where} is not valid JSON: {e}") from None
        return cls.from_dict(d)
