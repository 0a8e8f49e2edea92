"""``moelab.hf.upcycle``: turn a dense transformers Llama-family model into a mixture of experts.

Sparse upcycling (Komatsuzaki et al., *Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints*, ICLR 2023): every expert starts as a copy of the dense FFN and a new router is
added. With identical experts and combine weights that sum to one per token, the upcycled model
computes exactly the dense model at initialisation; training then lets the experts diverge.

    model = AutoModelForCausalLM.from_pretrained(...)          # Llama, Mistral, Qwen2, SmolLM2, ...
    moelab.hf.upcycle(model, num_experts=8, top_k=2)           # in place; returns model
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from moelab.core.checks import positive_int, top_k_in_range
from moelab.core.router import build_router
from moelab.experts.bank import ExpertBank
from moelab.integrations.hf.common import backend_name, replace_module
from moelab.integrations.hf.families import moelab_activation
from moelab.integrations.hf.layer import HFMoE, feeder_of


def is_dense_ffn(module: nn.Module) -> bool:
    """A Llama-style gated FFN: bias-free ``gate_proj``, ``up_proj``, ``down_proj`` ``nn.Linear`` and ``act_fn``."""
    names = ("gate_proj", "up_proj", "down_proj")
    return hasattr(module, "act_fn") and all(
        isinstance(getattr(module, n, None), nn.Linear) and getattr(module, n).bias is None for n in names
    )


def dense_ffns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every Llama-style FFN named ``mlp`` (one per decoder layer), in order."""
    return [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] == "mlp" and is_dense_ffn(m)]


def upcycled_bank(
    ffn: nn.Module, num_experts: int, noise: float = 0.0, generator: torch.Generator | None = None
) -> ExpertBank:
    """``E`` copies of a dense FFN as a fused bank: ``gate_up_proj[e] = [W_gate; W_up]``, ``down_proj[e] = W_down``.

    ``noise > 0`` multiplies each copy by ``1 + noise * N(0, 1)`` elementwise to break the experts'
    symmetry (our choice, default 0: the upcycled model then equals the dense one exactly).
    """
    w_gate, w_up, w_down = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    with torch.no_grad():
        w_in = torch.cat([w_gate, w_up], 0).unsqueeze(0).repeat(num_experts, 1, 1)
        w_out = w_down.unsqueeze(0).repeat(num_experts, 1, 1)
        if noise > 0:
            for w in (w_in, w_out):
                eps = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device, w.dtype)
                w.mul_(1 + noise * eps)
    return ExpertBank.from_parameters(
        nn.Parameter(w_in, requires_grad=w_gate.requires_grad),
        nn.Parameter(w_out, requires_grad=w_down.requires_grad),
        moelab_activation(ffn.act_fn),
    )


def upcycle(
    dense_model: nn.Module,
    num_experts: int,
    top_k: int,
    *,
    router: str = "topk",
    router_kwargs: dict[str, Any] | None = None,
    router_init_std: float | None = None,
    layers: Iterable[int] | None = None,
    noise: float = 0.0,
    seed: int = 0,
    aux_losses: dict[str, float] | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace the dense FFNs of ``dense_model`` by upcycled moelab MoE layers, in place.

    Args:
        dense_model: a transformers model with Llama-style FFNs (``model.layers[i].mlp`` with
            ``gate_proj/up_proj/down_proj``), e.g. Llama, Mistral, Qwen2, SmolLM2.
        num_experts, top_k: ``E`` and ``k``.
        router: a registered router name (default ``"topk"``); for ``"topk"`` the default is
            ``normalize=True``, so the k combine weights sum to one and the model equals the
            dense one at init (also for k=1, where the router then gets no task gradient:
            pass ``router_kwargs={"normalize": False}`` to train a Switch-style router).
        router_kwargs: more arguments for the router.
        router_init_std: the new gate weights are drawn from ``N(0, std^2)``; default the model's
            ``config.initializer_range`` (0.02 for Llama), else 0.02 (our choice: the dense
            model's own init for a new linear layer).
        layers: indices (into the list of dense FFNs) to upcycle; default all (our choice; the
            paper upcycles every other layer in some runs).
        noise: multiplicative noise on the expert copies (default 0, our choice).
        seed: seeds the router init and the noise.
        aux_losses: moelab auxiliary losses per layer (``moelab.aux_loss(model)``).
        backend: ``"moelab"``/``"auto"`` or a moelab backend name.

    Returns ``dense_model``, now an MoE. The FFN weights are copied ``E`` times (the experts must
    be free to diverge); the old FFN modules are dropped.
    """
    if not isinstance(dense_model, nn.Module):
        raise TypeError(f"dense_model must be a torch nn.Module, got {type(dense_model).__name__}")
    positive_int("num_experts", num_experts)
    top_k_in_range(top_k, num_experts)
    if not isinstance(router, str):
        raise TypeError(f"router must be a registered router name, got {type(router).__name__}")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    ffns = dense_ffns(dense_model)
    if not ffns:
        raise ValueError(
            f"upcycle: {type(dense_model).__name__} has no Llama-style FFN (module 'mlp' with bias-free "
            "gate_proj/up_proj/down_proj nn.Linear)"
        )
    chosen = list(range(len(ffns))) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if not (isinstance(i, int) and 0 <= i < len(ffns))]
    if bad:
        raise ValueError(f"layers must be indices in [0, {len(ffns)}), got {bad}")
    std = router_init_std
    if std is None:
        std = float(getattr(getattr(dense_model, "config", None), "initializer_range", 0.02) or 0.02)
    if not std > 0:
        raise ValueError(f"router_init_std must be > 0, got {std}")
    backend = backend_name(backend)
    kw = dict(router_kwargs or {})
    if router == "topk":
        kw.setdefault("normalize", True)
    kw.setdefault("top_k", top_k)
    gen = torch.Generator().manual_seed(seed)
    feeder = feeder_of(dense_model)
    for layer_index, i in enumerate(chosen):
        name, ffn = ffns[i]
        bank = upcycled_bank(ffn, num_experts, noise, gen)
        d = bank.d_in
        new_router = build_router(router, d_model=d, num_experts=num_experts, **kw)
        with torch.no_grad():
            if isinstance(getattr(new_router, "weight", None), torch.Tensor):
                w = torch.randn(new_router.weight.shape, generator=gen) * std
                new_router.weight.copy_(w)
        new_router.to(ffn.down_proj.weight.device)
        layer = HFMoE(
            d,
            num_experts,
            top_k,
            router=new_router,
            experts=bank,
            aux_losses=aux_losses,
            backend=backend,
            layer_index=layer_index,
            family="upcycled",
        )
        layer.set_feeder(feeder)
        layer.train(ffn.training)
        replace_module(dense_model, name, layer)
    return dense_model
