"""Put routed LoRA mixtures on a model's projections, and take them off exactly.

    names = moelab.lora.apply(model, ["q_proj", "v_proj", "down_proj"], method="mole", num_experts=8)
    ...train: only the mixtures' parameters require grad; loss + moelab.aux_loss(model)...
    moelab.lora.remove(model)        # the original modules and requires_grad flags, bit for bit

``targets`` follow PEFT's ``LoraConfig.target_modules``: a list of names, each matching a module
whose qualified name equals it or ends with ``"." + name``; or one string, a regular expression
the whole qualified name must match. Every matched module must be an ``nn.Linear``; each is
replaced in its parent by a ``RoutedLoRA`` holding the original object as ``.base``. Like PEFT,
``apply`` freezes every parameter of the model, so only the mixtures train; it remembers the
``requires_grad`` flags so that ``remove`` restores them.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from moelab.core.context import RoutingContext, check_context
from moelab.lora.layer import RoutedLoRA
from moelab.lora.presets import resolve_mixture

# Where ``apply`` keeps what ``remove`` and ``mixture_config`` need: an instance attribute of the
# model, outside its modules, parameters and state dict.
_STATE = "_moelab_lora_mixture"
# Other adapter methods of moelab.lora that swap modules the same way (FlyLoRA) keep their state
# under these attributes: an object with ``.wrapped``, ``.requires_grad`` and ``.layer_type``.
OTHER_STATES = ("_moelab_flylora",)


@dataclass
class _MixtureState:
    config: dict[str, Any]
    wrapped: list[str]
    requires_grad: list[tuple[nn.Parameter, bool]]


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return model


def check_targets(targets: object) -> str | list[str]:
    if isinstance(targets, str):
        if not targets:
            raise ValueError(
                "targets must be a non-empty regular expression or a list of module names, got ''"
            )
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets: {targets!r} is not a valid regular expression ({e})") from None
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise TypeError(
            f"targets must be a list of module names or one regular expression (str), got {type(targets).__name__}"
        )
    names = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"targets must be a non-empty list of non-empty module names, got {targets!r}")
    return names


def matches_target(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's ``target_modules`` rule: a regex the whole name matches, or a list of names each
    equal to ``name`` or a suffix of it after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def parent_module(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def mixture_layers(model: nn.Module) -> dict[str, RoutedLoRA]:
    """``{qualified name: RoutedLoRA}`` of every LoRA mixture layer in ``model``, in module order
    (empty when there is none)."""
    return {n: m for n, m in check_model(model).named_modules() if isinstance(m, RoutedLoRA)}


def find_linear_targets(model: nn.Module, targets: str | list[str]) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every module of ``model`` that ``targets`` names (``matches_target``),
    in module order; a ``ValueError`` when one is not an ``nn.Linear``, when a target names a fused
    3-D expert parameter, or when nothing matches (listing the model's projection names)."""
    found = [(n, m) for n, m in model.named_modules() if n and matches_target(n, targets)]
    not_linear = [f"{n} ({type(m).__name__})" for n, m in found if not isinstance(m, nn.Linear)]
    if not_linear:
        raise ValueError(
            f"targets {targets!r} match modules that are not nn.Linear: {not_linear[:5]}; "
            "name the projections inside them (e.g. 'q_proj', 'down_proj')"
        )
    fused = [n for n, p in model.named_parameters() if p.dim() == 3 and matches_target(n, targets)]
    if fused:
        raise ValueError(
            f"targets {targets!r} name fused 3-D expert parameters {fused[:3]}; LoRA mixtures on fused "
            "expert weights are not supported yet: target nn.Linear projections"
        )
    if not found:
        suffixes = sorted(
            {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ValueError(
            f"targets {targets!r} match no module of the {type(model).__name__}; "
            f"its nn.Linear modules end with {suffixes[:20]}"
        )
    return found


def swap_in(
    model: nn.Module, found: list[tuple[str, nn.Linear]], build: Any
) -> tuple[dict[str, nn.Module], list[tuple[nn.Parameter, bool]]]:
    """Wrap each found projection: ``build(name, module)`` makes its layer; then every parameter of
    ``model`` is frozen (the layers' own are created after) and the layers replace the modules,
    numbered in module order (``layer_index``). Returns ``(layers by name, the requires_grad flags
    before)``, which ``remove`` restores. If a build fails, the flags are restored and nothing is
    swapped."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    layers: dict[str, nn.Module] = {}
    try:
        for name, module in found:
            layers[name] = build(name, module)
    except BaseException:
        for p, flag in flags:  # a layer freezes its base when built
            p.requires_grad_(flag)
        raise
    for p, _ in flags:
        p.requires_grad_(False)
    for i, (name, layer) in enumerate(layers.items()):
        parent, child = parent_module(model, name)
        setattr(parent, child, layer)
        layer.layer_index = i
    return layers, flags


def apply(
    model: nn.Module,
    targets: str | Sequence[str],
    *,
    method: str | None = None,
    num_experts: int = 4,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    router: str | None = None,
    top_k: int | None = None,
    router_kwargs: dict[str, Any] | None = None,
    aux_losses: dict[str, float] | None = None,
    aux_loss_kwargs: dict[str, dict] | None = None,
) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` that ``targets`` names in a ``RoutedLoRA``, in place.

    Args:
        model: any ``nn.Module`` (a transformers model, ``MoELM``, ...) without a mixture yet.
        targets: PEFT ``target_modules`` (module docstring): ``["q_proj", "v_proj"]`` or a regex.
        method: a mixture preset (``"mole"``, ``"dynmole"``; ``moelab.lora.MIXTURE_PRESETS``)
            whose defaults fill ``router``, ``top_k``, ``router_kwargs``, ``aux_losses`` and
            ``aux_loss_kwargs`` where they are None.
        num_experts, rank, alpha, dropout: each mixture's ``E`` and its experts' LoRA ``r``,
            ``lora_alpha`` (default 8, PEFT's) and ``lora_dropout``.
        router, top_k, router_kwargs, aux_losses, aux_loss_kwargs: as ``moelab.MoE`` (a router
            by registered name); default, without a method: ``"topk"`` with ``top_k=2``, no loss.

    Returns the wrapped module names in module order. Freezes every parameter of ``model``; the
    new mixtures' parameters train. Refuses (``ValueError`` naming the argument) targets that
    match no module, a target matching a module that is not an ``nn.Linear`` or a fused 3-D
    expert parameter, and a model that already holds a mixture. On an error nothing is changed.
    """
    check_model(model)
    if _STATE in vars(model) or any(k in vars(model) for k in OTHER_STATES) or mixture_layers(model):
        raise ValueError(
            f"model: this {type(model).__name__} already has LoRA mixture layers or adapters "
            "(moelab.lora.apply or apply_flylora); call moelab.lora.remove(model) first"
        )
    targets = check_targets(targets)
    if router is not None and not isinstance(router, str):
        # One Router object would be shared by every wrapped projection.
        raise TypeError(f"router must be a registered router name (str) or None, got {type(router).__name__}")
    found = find_linear_targets(model, targets)
    chosen = resolve_mixture(method, router, top_k, router_kwargs, aux_losses, aux_loss_kwargs)
    layers, flags = swap_in(
        model,
        found,
        lambda name, module: RoutedLoRA(
            module, num_experts, rank, alpha=alpha, dropout=dropout, method=method, **copy.deepcopy(chosen)
        ),
    )
    first = next(iter(layers.values())).experts
    config = {
        "method": method,
        "targets": copy.deepcopy(targets),
        "wrapped": list(layers),
        "num_experts": num_experts,
        "rank": rank,
        "alpha": first.alpha,
        "dropout": first.dropout,
        **chosen,
    }
    vars(model)[_STATE] = _MixtureState(config=config, wrapped=list(layers), requires_grad=flags)
    return list(layers)


def remove(model: nn.Module) -> None:
    """Undo ``apply``: put the original module objects back and restore every parameter's
    ``requires_grad`` flag. The base weights were never changed, so ``state_dict()`` and the
    modules equal the model's before ``apply``, bit for bit."""
    key = next((k for k in (_STATE, *OTHER_STATES) if k in vars(check_model(model))), None)
    if key is None:
        raise ValueError(f"model: this {type(model).__name__} has no LoRA mixture from moelab.lora.apply")
    state = vars(model)[key]
    layer_type = getattr(state, "layer_type", RoutedLoRA)
    current = {}
    for name in state.wrapped:
        try:
            parent, child = parent_module(model, name)
            layer = getattr(parent, child)
        except AttributeError:
            layer = None
        if not isinstance(layer, layer_type):
            raise ValueError(
                f"model: {name!r} is no longer the {layer_type.__name__} apply() put there; cannot restore it"
            )
        current[name] = (parent, child, layer)
    for parent, child, layer in current.values():
        setattr(parent, child, layer.base)
    for p, flag in state.requires_grad:
        p.requires_grad_(flag)
    del vars(model)[key]


def mixture_config(model: nn.Module) -> dict[str, Any]:
    """The arguments ``apply`` built ``model``'s mixture with, JSON-able: ``method``, ``targets``,
    ``wrapped`` (the module names), ``num_experts``, ``rank``, ``alpha``, ``dropout``, ``router``,
    ``router_kwargs``, ``top_k``, ``aux_losses``, ``aux_loss_kwargs`` (the resolved values, the
    method's defaults filled in). ``apply(model, **config minus "wrapped")`` rebuilds the same
    mixture on a fresh copy of the base model."""
    state = vars(check_model(model)).get(_STATE)
    if state is None:
        raise ValueError(f"model: this {type(model).__name__} has no LoRA mixture from moelab.lora.apply")
    config = copy.deepcopy(state.config)
    if not isinstance(config["router"], str):
        raise ValueError("mixture_config: the mixture's router is not a registered name; it cannot be saved")
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"mixture_config: the mixture's arguments are not JSON-able ({e})") from None
    return config


@contextmanager
def use_context(model: nn.Module, ctx: RoutingContext) -> Iterator[list[str]]:
    """Run ``model``'s mixture layers with ``ctx`` (token ids, token types, the step, a session)
    while the block runs; each layer derives its own ``layer_index``. Yields the layer names; the
    previous contexts come back on exit."""
    ctx = check_context(ctx)
    layers = mixture_layers(model)
    if not layers:
        raise ValueError(f"model: this {type(model).__name__} has no LoRA mixture layers")
    before = {name: layer.context for name, layer in layers.items()}
    for layer in layers.values():
        layer.context = ctx
    try:
        yield list(layers)
    finally:
        for name, layer in layers.items():
            layer.context = before[name]
