"""ARank: the rank of a layer's attention maps, as γ-MoD defines it.

Luo et al. 2024, "γ-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language
Models" (code: Yaxin9Luo/Gamma-MOD, ``compute_attention_rank``): for one layer,

    ARank = mean over heads h of  rank( tril(A_h) with the diagonal set to 0 )

with ``A_h [S, S]`` head ``h``'s attention probabilities from a forward pass, and the rank that of
``torch.linalg.matrix_rank`` on the float32 matrix (its default tolerance,
``S * eps * sigma_max``). γ-MoD uses the first sample of a batch; we average over all ``B``
samples given (``attention_rank`` on ``[B, H, S, S]``). A low ARank marks a layer whose tokens
attend redundantly (γ-MoD turns those into mixture-of-depths layers).

Attention maps come from either
* ``capture_sdpa_attention``: a context manager that wraps
  ``torch.nn.functional.scaled_dot_product_attention`` and records the probabilities of every
  call (any model that attends through SDPA, ``moelab.models.MoELM`` included); or
* transformers' ``output_attentions=True`` with the eager attention implementation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention_rank(attn: Tensor) -> float:
    """ARank of one layer's attention probabilities ``[H, S, S]`` or ``[B, H, S, S]``."""
    if not isinstance(attn, Tensor) or attn.dim() not in (3, 4):
        raise ValueError(
            f"attn must be [H, S, S] or [B, H, S, S], got {getattr(attn, 'shape', type(attn).__name__)}"
        )
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention maps must be square [S, S], got {tuple(attn.shape[-2:])}")
    a = attn.detach().float().cpu()
    a = a if a.dim() == 4 else a.unsqueeze(0)
    s = a.shape[-1]
    # tril(A) with a zero diagonal = the strictly lower triangle.
    strict = torch.tril(torch.ones(s, s, dtype=torch.bool), diagonal=-1)
    a = a * strict
    ranks = torch.linalg.matrix_rank(a.reshape(-1, s, s))
    return float(ranks.double().mean())


def sdpa_probs(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Attention probabilities ``[..., H, L, S]`` that ``scaled_dot_product_attention`` uses (fp32)."""
    qf, kf = q.float(), k.float()
    if enable_gqa and qf.shape[-3] != kf.shape[-3]:
        kf = kf.repeat_interleave(qf.shape[-3] // kf.shape[-3], dim=-3)
    sc = scale if scale is not None else 1.0 / math.sqrt(qf.shape[-1])
    scores = qf @ kf.transpose(-2, -1) * sc
    L, S = scores.shape[-2], scores.shape[-1]
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return torch.softmax(scores, dim=-1)


@contextmanager
def capture_sdpa_attention() -> Iterator[list[Tensor]]:
    """Record the attention probabilities of every SDPA call in the block, in call order.

    Works for code that calls ``torch.nn.functional.scaled_dot_product_attention`` through the
    module attribute (``F.scaled_dot_product_attention``). The outputs are unchanged: the original
    kernel still runs; the probabilities are recomputed beside it, detached, on CPU.
    """
    maps: list[Tensor] = []
    original = F.scaled_dot_product_attention

    def wrapped(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        with torch.no_grad():
            maps.append(
                sdpa_probs(query, key, attn_mask, is_causal, scale, bool(kw.get("enable_gqa", False))).cpu()
            )
        return original(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            **kw,
        )

    F.scaled_dot_product_attention = wrapped  # type: ignore[assignment]
    try:
        yield maps
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]


def _is_transformers_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "set_attn_implementation")


@torch.no_grad()
def attention_maps(model: nn.Module, input_ids: Tensor) -> list[Tensor]:
    """Per-layer attention probabilities ``[B, H, S, S]`` of ``model`` on ``input_ids [B, S]``.

    transformers models run with ``output_attentions=True`` under eager attention (restored after);
    anything else (``MoELM``) runs under ``capture_sdpa_attention``.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, S] tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    was_training = model.training
    model.eval()
    try:
        if _is_transformers_model(model):
            old = getattr(model.config, "_attn_implementation", None)
            model.set_attn_implementation("eager")
            try:
                out = model(input_ids=input_ids, output_attentions=True)
            finally:
                if old is not None and old != "eager":
                    model.set_attn_implementation(old)
            maps = [a.detach().float().cpu() for a in (out.attentions or ()) if a is not None]
        else:
            with capture_sdpa_attention() as maps:
                model(input_ids)
    finally:
        model.train(was_training)
    if not maps:
        raise ValueError(
            f"no attention maps were captured from {type(model).__name__}: it neither returns "
            "transformers attentions nor calls torch.nn.functional.scaled_dot_product_attention"
        )
    return maps


def arank_per_layer(model: nn.Module, input_ids: Tensor) -> list[float]:
    """ARank of every attention layer of ``model`` (in call order) on ``input_ids [B, S]``."""
    return [attention_rank(a) for a in attention_maps(model, input_ids)]
