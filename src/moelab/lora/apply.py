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

``target_parameters`` (PEFT's argument of the same name) names fused 3-D expert parameters of a
transformers MoE model (``"experts.gate_up_proj"``, ``"experts.down_proj"``) by the same rule; each
gets one LoRA per MoE expert, routed by the model's own router (``moelab.lora.fused``).
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
from moelab.experts.lora import PEFT_DEFAULT_LORA_ALPHA
from moelab.lora.fused import add_fused_lora, find_fused_targets, fused_lora_layers, remove_fused_lora
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
    fused: list[str]  # the adapted fused parameters' qualified names


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return model


def check_targets(targets: object, argument: str = "targets") -> str | list[str]:
    if isinstance(targets, str):
        if not targets:
            raise ValueError(f"{argument} must be a non-empty regular expression or a list of names, got ''")
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{argument}: {targets!r} is not a valid regular expression ({e})") from None
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{argument} must be a list of names or one regular expression (str), got {type(targets).__name__}"
        )
    names = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"{argument} must be a non-empty list of non-empty names, got {targets!r}")
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
            f"targets {targets!r} name fused 3-D expert parameters {fused[:3]}; pass those in "
            "target_parameters (one LoRA per MoE expert) and keep nn.Linear projections in targets"
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
    targets: str | Sequence[str] | None,
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
    target_parameters: str | Sequence[str] | None = None,
) -> list[str]:
    """Wrap every ``nn.Linear`` of ``model`` that ``targets`` names in a ``RoutedLoRA``, in place.

    Args:
        model: any ``nn.Module`` (a transformers model, ``MoELM``, ...) without a mixture yet.
        targets: PEFT ``target_modules`` (module docstring): ``["q_proj", "v_proj"]`` or a regex;
            None to adapt only ``target_parameters``.
        method: a mixture preset (``"mole"``, ``"dynmole"``; ``moelab.lora.MIXTURE_PRESETS``)
            whose defaults fill ``router``, ``top_k``, ``router_kwargs``, ``aux_losses`` and
            ``aux_loss_kwargs`` where they are None.
        num_experts, rank, alpha, dropout: each mixture's ``E`` and its experts' LoRA ``r``,
            ``lora_alpha`` (default 8, PEFT's) and ``lora_dropout``.
        router, top_k, router_kwargs, aux_losses, aux_loss_kwargs: as ``moelab.MoE`` (a router
            by registered name); default, without a method: ``"topk"`` with ``top_k=2``, no loss.
        target_parameters: PEFT's ``target_parameters``: fused 3-D expert parameters of a MoE
            model (``["experts.gate_up_proj", "experts.down_proj"]``), each given one LoRA of
            rank ``rank`` per MoE expert, routed by the model's own router (``moelab.lora.fused``;
            ``num_experts`` and the routing arguments do not apply to them, ``dropout`` must be 0).

    Returns the wrapped module names in module order (then the adapted parameters' names).
    Freezes every parameter of ``model``; the new mixtures' parameters train. Refuses
    (``ValueError`` naming the argument) targets that match no module, a target matching a module
    that is not an ``nn.Linear`` or a fused 3-D expert parameter, and a model that already holds a
    mixture. On an error nothing is changed.
    """
    check_model(model)
    if (
        _STATE in vars(model)
        or any(k in vars(model) for k in OTHER_STATES)
        or mixture_layers(model)
        or fused_lora_layers(model)
    ):
        raise ValueError(
            f"model: this {type(model).__name__} already has LoRA mixture layers or adapters "
            "(moelab.lora.apply or apply_flylora); call moelab.lora.remove(model) first"
        )
    if targets is None and target_parameters is None:
        raise ValueError(
            "targets: give nn.Linear module names in targets, fused expert parameters in "
            "target_parameters, or both; both are None"
        )
    if router is not None and not isinstance(router, str):
        # One Router object would be shared by every wrapped projection.
        raise TypeError(f"router must be a registered router name (str) or None, got {type(router).__name__}")
    found = [] if targets is None else find_linear_targets(model, targets := check_targets(targets))
    fused = []
    if target_parameters is not None:
        target_parameters = check_targets(target_parameters, "target_parameters")
        fused = find_fused_targets(model, target_parameters, matches_target)
        if dropout:
            raise ValueError(
                f"dropout must be 0 with target_parameters (a weight-space LoRA), got {dropout!r}"
            )
    chosen = resolve_mixture(method, router, top_k, router_kwargs, aux_losses, aux_loss_kwargs)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    layers, _ = swap_in(
        model,
        found,
        lambda name, module: RoutedLoRA(
            module, num_experts, rank, alpha=alpha, dropout=dropout, method=method, **copy.deepcopy(chosen)
        ),
    )
    for p, _ in flags:
        p.requires_grad_(False)
    added = []
    try:
        for _, owner, attr in fused:
            add_fused_lora(owner, attr, rank, alpha)
            added.append((owner, attr))
    except BaseException:
        for owner, attr in added:
            remove_fused_lora(owner, attr)
        _restore(model, layers, flags)
        raise
    config = {
        "method": method,
        "targets": copy.deepcopy(targets),
        "target_parameters": copy.deepcopy(target_parameters),
        "wrapped": list(layers),
        "wrapped_parameters": [name for name, _, _ in fused],
        "num_experts": num_experts,
        "rank": rank,
        "alpha": float(PEFT_DEFAULT_LORA_ALPHA if alpha is None else alpha),
        "dropout": dropout,
        **chosen,
    }
    vars(model)[_STATE] = _MixtureState(
        config=config, wrapped=list(layers), requires_grad=flags, fused=config["wrapped_parameters"]
    )
    return list(layers) + config["wrapped_parameters"]


def _restore(model: nn.Module, layers: dict[str, nn.Module], flags: list[tuple[nn.Parameter, bool]]) -> None:
    """Put the wrapped layers' ``.base`` modules back and the ``requires_grad`` flags."""
    for name, layer in layers.items():
        parent, child = parent_module(model, name)
        setattr(parent, child, layer.base)
    for p, flag in flags:
        p.requires_grad_(flag)


def remove(model: nn.Module) -> None:
    """Undo ``apply``: put the original module objects back, take the adapters off the fused
    parameters (the parameter objects come back) and restore every parameter's ``requires_grad``
    flag. The base weights were never changed, so ``state_dict()`` and the modules equal the
    model's before ``apply``, bit for bit."""
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
        current[name] = layer
    adapted = fused_lora_layers(model)
    fused = getattr(state, "fused", [])
    missing = [name for name in fused if name not in adapted]
    if missing:
        raise ValueError(
            f"model: the fused parameters {missing[:3]} no longer carry apply()'s LoRA; cannot restore"
        )
    for name in fused:
        owner_name, _, attr = name.rpartition(".")
        remove_fused_lora(model.get_submodule(owner_name) if owner_name else model, attr)
    _restore(model, current, state.requires_grad)
    del vars(model)[key]


def mixture_config(model: nn.Module) -> dict[str, Any]:
    """The arguments ``apply`` built ``model``'s mixture with, JSON-able: ``method``, ``targets``,
    ``target_parameters``, ``wrapped`` (the module names), ``wrapped_parameters`` (the fused
    parameters' names), ``num_experts``, ``rank``, ``alpha``, ``dropout``, ``router``,
    ``router_kwargs``, ``top_k``, ``aux_losses``, ``aux_loss_kwargs`` (the resolved values, the
    method's defaults filled in). ``apply(model, **config minus "wrapped" and
    "wrapped_parameters")`` rebuilds the same mixture on a fresh copy of the base model."""
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


def include_aux_loss(model: nn.Module) -> Any:
    """Make ``model(..., labels=...)`` return a ``loss`` that includes the mixtures' auxiliary
    losses (``moelab.aux_loss``) in training, so a trainer that only reads ``outputs.loss``
    (transformers' ``Trainer``, TRL's ``SFTTrainer``) trains the routers with them.

    A forward hook on ``model``: after each training forward whose output has a ``loss``, it adds
    the sum of the mixture layers' ``aux_loss`` of that forward. Returns the hook's handle
    (``handle.remove()`` undoes it). In eval mode the loss is left as the model computed it.
    ReMix's RLOO router needs its own step (``moelab.lora.remix_rloo_step``): use
    ``moelab.train.finetune`` for it.
    """
    check_model(model)
    if not mixture_layers(model):
        raise ValueError(
            f"model: this {type(model).__name__} has no LoRA mixture layers (call moelab.lora.apply first)"
        )

    def add_aux(module: nn.Module, args: Any, output: Any) -> Any:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None:
            output.loss = loss + sum(layer.aux_loss for layer in mixture_layers(module).values())
        return output

    return model.register_forward_hook(add_aux)
