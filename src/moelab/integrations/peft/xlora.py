"""PEFT's X-LoRA on the same adapters as a moelab mixture, for comparisons and benchmarks.

X-LoRA (Buehler & Buehler, *X-LoRA: Mixture of Low-Rank Adapter Experts*, 2024; ``peft.XLoraConfig``)
is a dense mixture: every adapter runs on every token, each scaled by a classifier's softmax
weight, ``W x + sum_e p_e(x) * scaling * B_e A_e (x)``. Its classifier reads the hidden states of
an extra forward pass of the base model (the "scaling pass"), so a whole X-LoRA model costs one
base forward more than its projections.

- ``xlora_model(base_model, folders)``: the whole-model X-LoRA of ``peft`` over PEFT LoRA folders
  (e.g. the ``experts/expert_<i>`` folders of a saved mixture).
- ``XLoRAProjection`` / ``xlora_projection(layer)``: one projection run by peft's own
  ``XLoraLinearLayer`` with the experts of a moelab mixture layer, and a depth-1 X-LoRA
  classifier on the projection's input in place of the scaling pass: X-LoRA's projection cost,
  for ``bench/lora.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.xlora.layer import XLoraLinearLayer
from torch import Tensor, nn

from moelab.integrations.peft.adapters import read_lora_adapter


def xlora_model(
    base_model: nn.Module,
    folders: Sequence[str | Path],
    *,
    hidden_size: int | None = None,
    task_type: str = "CAUSAL_LM",
    xlora_depth: int = 1,
    **xlora_kwargs: Any,
) -> peft.PeftModel:
    """PEFT's X-LoRA over PEFT LoRA folders, on ``base_model`` (modified in place, as ``get_peft_model`` does).

    Args:
        base_model: a transformers model (X-LoRA reads ``config``, ``hidden_states``). Its
            ``config.use_cache`` is set to False: X-LoRA refuses a KV cache.
        folders: plain PEFT LoRA folders, adapter ``i`` = ``folders[i]``, loaded as adapters
            ``"0"``, ``"1"``, ... (checked with ``read_lora_adapter`` first, for clear errors).
        hidden_size: the classifier's input width; defaults to ``base_model.config.hidden_size``.
        task_type, xlora_depth, **xlora_kwargs: ``peft.XLoraConfig`` fields (``top_k_lora``,
            ``enable_softmax_topk``, ``layerwise_scalings``, ``softmax_temperature``, ...).
            ``xlora_depth=1`` (a single linear classifier) is our default: the closest to a
            moelab router; peft's default is also 1.

    Returns the ``PeftModel``; only the X-LoRA classifier trains (``use_trainable_adapters=False``).
    """
    if isinstance(folders, (str, Path)) or not isinstance(folders, Sequence) or not folders:
        raise ValueError("xlora_model: folders must be a non-empty list of PEFT LoRA folders")
    for folder in folders:
        read_lora_adapter(folder)  # refuses non-LoRA or incomplete folders before peft does
    config = getattr(base_model, "config", None)
    if hidden_size is None:
        hidden_size = getattr(config, "hidden_size", None)
        if hidden_size is None:
            raise ValueError("xlora_model: base_model has no config.hidden_size; pass hidden_size=")
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    xlora_config = peft.XLoraConfig(
        task_type=task_type,
        hidden_size=hidden_size,
        xlora_depth=xlora_depth,
        adapters={str(i): str(Path(f)) for i, f in enumerate(folders)},
        **xlora_kwargs,
    )
    return peft.get_peft_model(base_model, xlora_config)


class XLoRAProjection(nn.Module):
    """One projection as X-LoRA runs it: ``W x + sum_e p_e(x) * scaling * B_e A_e x`` with every expert dense.

    The experts run in peft's ``XLoraLinearLayer`` over a peft ``lora.Linear`` holding one adapter
    per expert, so the cost is peft's own. ``p(x) = softmax(classifier(x) / temperature)`` with
    ``classifier = nn.Linear(d_in, E)``: X-LoRA's depth-1 classifier, here fed the projection's
    input instead of the scaling pass's hidden states (our choice, to time one projection alone).

    Args:
        base: the frozen projection ``W`` (shared, not copied).
        lora_A_ERD: ``[E, r, d_in]``; lora_B_EOR: ``[E, d_out, r]`` (copied into peft's layers).
        scaling: the factor on ``B A x``.
        top_k: X-LoRA's ``top_k_lora`` (keep the k largest ``p_e``; still runs every expert).
        temperature: X-LoRA's ``softmax_temperature``.

    Input ``x`` ``[..., d_in]``; output ``[..., d_out]``.
    """

    def __init__(
        self,
        base: nn.Linear,
        lora_A_ERD: Tensor,
        lora_B_EOR: Tensor,
        scaling: float,
        *,
        top_k: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if lora_A_ERD.dim() != 3 or lora_B_EOR.dim() != 3 or lora_A_ERD.shape[0] != lora_B_EOR.shape[0]:
            raise ValueError(
                f"lora_A_ERD must be [E, r, d_in] and lora_B_EOR [E, d_out, r], got "
                f"{tuple(lora_A_ERD.shape)} and {tuple(lora_B_EOR.shape)}"
            )
        num_experts, rank, d_in = lora_A_ERD.shape
        if (d_in, lora_B_EOR.shape[1]) != (base.in_features, base.out_features) or lora_B_EOR.shape[
            2
        ] != rank:
            raise ValueError(
                f"experts {tuple(lora_A_ERD.shape)}, {tuple(lora_B_EOR.shape)} do not fit base "
                f"{base.in_features} -> {base.out_features}"
            )
        names = [str(e) for e in range(num_experts)]
        lora_config = peft.LoraConfig(r=rank, lora_alpha=scaling * rank, init_lora_weights=False)
        lora = PeftLoraLinear(base, names[0], config=lora_config, r=rank, lora_alpha=scaling * rank)
        for name in names[1:]:
            lora.update_layer(name, rank, lora_alpha=scaling * rank, config=lora_config)
        lora.set_adapter(names)
        with torch.no_grad():
            for e, name in enumerate(names):
                # Only the adapters take the experts' device and dtype; the frozen base keeps its own.
                lora.lora_A[name].to(device=lora_A_ERD.device, dtype=lora_A_ERD.dtype)
                lora.lora_B[name].to(device=lora_B_EOR.device, dtype=lora_B_EOR.dtype)
                lora.lora_A[name].weight.copy_(lora_A_ERD[e])
                lora.lora_B[name].weight.copy_(lora_B_EOR[e])
                lora.scaling[name] = scaling
        self.lora = lora
        self.classifier = nn.Linear(d_in, num_experts, device=lora_A_ERD.device, dtype=lora_A_ERD.dtype)
        self.temperature = temperature
        self.disabled = False  # read by XLoraLinearLayer (X-LoRA's ``disable_adapter``)
        xlora_config = peft.XLoraConfig(
            hidden_size=d_in,
            adapters={name: "" for name in names},
            top_k_lora=top_k,
            softmax_temperature=temperature,
        )
        self._xlora = XLoraLinearLayer(
            model=self, target=lora, target_forward=lora.forward, layer_number=0, config=xlora_config
        )

    def scalings(self, x_BSD: Tensor) -> Tensor:
        """``[B, S, 1, E]``: X-LoRA's per-token expert weights (one "layer")."""
        return torch.softmax(self.classifier(x_BSD) / self.temperature, dim=-1).unsqueeze(-2)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x_BSD = x.reshape(1, -1, shape[-1]) if x.dim() != 3 else x  # X-LoRA indexes [batch, seq, ...]
        y = self._xlora.forward(x_BSD, scalings=self.scalings(x_BSD))
        return y.reshape(*shape[:-1], y.shape[-1])


def xlora_projection(layer: nn.Module, **kwargs: Any) -> XLoRAProjection:
    """``XLoRAProjection`` with the base projection and experts of a moelab mixture layer (``RoutedLoRA``)."""
    bank = getattr(layer, "bank", None)
    if bank is None or not hasattr(layer, "base"):
        raise TypeError(f"xlora_projection needs a moelab LoRA mixture layer, got {type(layer).__name__}")
    return XLoRAProjection(
        layer.base, bank.lora_A.detach(), bank.lora_B.detach(), float(bank.scaling), **kwargs
    )
