"""``moelab.hf.patch``: swap a transformers model's MoE blocks for moelab layers, in place.

    model = AutoModelForCausalLM.from_pretrained(...)       # OLMoE, Qwen2/3-MoE, Mixtral, DeepSeek-V3, gpt-oss
    moelab.hf.patch(model)                                   # same routing, same logits, moelab execution
    moelab.hf.patch(model, router="expert_choice")           # or any registered router

Each block becomes an ``HFMoE`` (a ``moelab.MoE``) built from a moelab ``Router`` and an
``ExpertBank`` view; both share the block's parameters (no copies), so the model's state dict,
optimizer groups and checkpoints are unchanged by a plain ``patch(model)``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.router import Router, build_router, link_routers
from moelab.integrations.hf.common import backend_name, replace_module
from moelab.integrations.hf.families import FAMILIES, Family, find_blocks
from moelab.integrations.hf.layer import HFMoE, feeder_of


def init_router_from(
    router: Router, weight: Tensor, bias: Tensor | None = None, expert_bias: Tensor | None = None
) -> list[str]:
    """Copy an old gate's ``weight`` (and ``bias`` / DeepSeek ``expert_bias``) into ``router`` where shapes match.

    Returns the names of the tensors that were copied. The router keeps its own tensors (a copy,
    not a share): the old gate is gone from the model once its block is replaced.
    """
    copied = []
    with torch.no_grad():
        for name, src in (("weight", weight), ("bias", bias), ("expert_bias", expert_bias)):
            dst = getattr(router, name, None)
            if src is not None and isinstance(dst, Tensor) and dst.shape == src.shape:
                dst.copy_(src)
                copied.append(name)
    return copied


def _new_router(
    name: str,
    d_model: int,
    num_experts: int,
    top_k: int,
    router_kwargs: dict[str, Any],
    old: dict[str, Tensor | None],
) -> Router:
    kw = dict(router_kwargs)
    kw.setdefault("top_k", top_k)
    router = build_router(name, d_model=d_model, num_experts=num_experts, **kw)
    router.to(old["weight"].device)
    if "weight" not in init_router_from(router, **old):
        warnings.warn(
            f"router {name!r} has no [E, d] = {tuple(old['weight'].shape)} gate weight; it keeps its own init",
            stacklevel=3,
        )
    return router


def patch(
    model: nn.Module,
    router: str | None = None,
    backend: str = "moelab",
    *,
    router_kwargs: dict[str, Any] | None = None,
    aux_losses: dict[str, float] | None = None,
    check_finite: bool = True,
) -> nn.Module:
    """Replace every MoE block of ``model`` with a moelab ``HFMoE`` layer, in place.

    Args:
        model: a transformers model of a supported family (``moelab.hf.FAMILIES``), or one already
            patched (then only ``router`` is applied again).
        router: None keeps the model's own routing, expressed by a core moelab router that
            shares the gate parameters (see ``families.py`` / docs/hf.md); a registered router
            name (``moelab list``) replaces it, initialised from the old gate weight where the
            shapes match.
        backend: ``"moelab"`` or ``"auto"`` (moelab's fastest usable executor) or a moelab
            executor name (``"reference"``, ``"sorted"``, ...).
        router_kwargs: arguments for the new router, or overrides of the model's own router
            (e.g. ``{"bias_update_rate": 1e-3}`` to train DeepSeek-V3's bias as in the paper).
        aux_losses: moelab auxiliary losses for every layer (``{"load_balance": 1e-2}``); their sum is
            ``moelab.aux_loss(model)``. transformers' own ``output_router_logits`` loss keeps working.
        check_finite: each layer raises on NaN/Inf inputs (one reduction per layer).

    A replacing router is linked across the model's patched layers in depth order
    (``moelab.core.router.link_routers``), as ``MoELM`` links its own. Returns ``model``. Token ids reach the routers through a forward pre-hook on ``model``. With
    the model's own routing the state dict keeps the unpatched key names (``save_pretrained``
    writes a checkpoint the original class loads); a replaced router saves under moelab's names
    (``...mlp.router.weight``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if router is not None and not isinstance(router, str):
        raise TypeError(f"router must be None or a registered router name, got {type(router).__name__}")
    if router_kwargs is not None and not isinstance(router_kwargs, dict):
        raise TypeError(f"router_kwargs must be a dict or None, got {type(router_kwargs).__name__}")
    kw = dict(router_kwargs or {})
    executor = backend_name(backend)
    blocks = find_blocks(model)
    patched = [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoE)]
    if not blocks and not patched:
        raise ValueError(
            f"patch(model): {type(model).__name__} has no MoE block of a supported family; "
            f"supported blocks: {sorted(f.block_class for f in FAMILIES.values())}"
        )
    feeder = feeder_of(model)
    layer_index = len(patched)
    for name, block, fam in blocks:
        layer = _patch_block(block, fam, router, kw, aux_losses, executor, check_finite, layer_index)
        layer.set_feeder(feeder)
        replace_module(model, name, layer)
        layer_index += 1
    if router is not None:
        for _, layer in patched:
            old = layer.router
            if hasattr(layer, "_aliases"):  # the model's own router is gone: its key names go too
                layer.use_state_dict_names({})
            layer.router = _new_router(
                router,
                layer.d_model,
                layer.num_experts,
                layer.top_k,
                kw,
                {
                    "weight": old.weight,
                    "bias": getattr(old, "bias", None),
                    "expert_bias": getattr(old, "expert_bias", None),
                },
            )
            layer.router.train(layer.training)
    if router is not None:  # routers with state across layers (rmoe, pregate, rexmoe) take it now
        link_routers([layer for _, layer in patched_layers(model)])
    return model


def _patch_block(
    block: nn.Module,
    fam: Family,
    router: str | None,
    router_kwargs: dict[str, Any],
    aux_losses: dict[str, float] | None,
    backend: str,
    check_finite: bool,
    layer_index: int,
) -> HFMoE:
    gate = fam.gate(block)
    bank = fam.bank(block.experts)
    top_k = int(gate.top_k)
    if router is None:
        new_router = fam.own_router(block, router_kwargs)
    else:
        new_router = _new_router(
            router,
            bank.d_model,
            bank.num_experts,
            top_k,
            router_kwargs,
            {
                "weight": gate.weight,
                "bias": getattr(gate, "bias", None),
                "expert_bias": getattr(gate, "e_score_correction_bias", None),
            },
        )
    shared = fam.shared(block)
    layer = HFMoE(
        bank.d_model,
        bank.num_experts,
        top_k,
        router=new_router,
        experts=bank,
        shared_experts=shared if shared is not None else 0,
        aux_losses=aux_losses,
        backend=backend,
        check_finite=check_finite,
        layer_index=layer_index,
        returns_scores=fam.returns_scores,
        family=fam.name,
    )
    if router is None and fam.state_dict_names:
        layer.use_state_dict_names(fam.state_dict_names)
    return layer.train(block.training)


def patched_layers(model: nn.Module) -> list[tuple[str, HFMoE]]:
    """``(name, layer)`` of every ``HFMoE`` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoE)]
