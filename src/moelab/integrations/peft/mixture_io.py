"""Save and load a LoRA mixture as a PEFT-shaped adapter folder; build one from PEFT LoRA folders.

A mixture (``moelab.lora.apply``) wraps projections ``W`` of a model as ``W x + sum_e w_e(x) *
scaling * B_e A_e x`` with a router choosing the weights ``w_e``. ``save_mixture`` writes

    folder/
      adapter_config.json          peft_type "MOELAB_LORA_MIXTURE", the mixture config
                                   (moelab.lora.mixture_config), moelab version, expert folders
      router.safetensors           every router tensor, keys "<layer>.<key in the layer>"
      experts/expert_<i>/          expert i as a standard PEFT LoRA folder:
        adapter_config.json        a peft.LoraConfig (r, lora_alpha, target_modules, ...)
        adapter_model.safetensors  base_model.model.<layer>.lora_A.weight [r, d_in], .lora_B.weight [d_out, r]
      expert_parameters.safetensors  only with target_parameters: the LoRA of each fused 3-D expert
                                   parameter, keys "<parameter>.lora_A" [E, r, d_in], ".lora_B" [E, d_out, r]

so ``peft.PeftModel.from_pretrained(base, folder / "experts/expert_<i>")`` loads expert ``i`` as an
ordinary LoRA (``W x + scaling * B_i A_i x``), and ``load_mixture`` rebuilds the mixture bit-exactly.
Everything is JSON and safetensors; nothing is pickled.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from moelab import lora
from moelab.integrations.peft.adapters import (
    CONFIG_NAME,
    LoraAdapter,
    read_json,
    read_lora_adapter,
    read_safetensors,
    write_lora_adapter,
)

MIXTURE_PEFT_TYPE = "MOELAB_LORA_MIXTURE"
FORMAT_VERSION = 1
ROUTER_FILE = "router.safetensors"
FUSED_FILE = "expert_parameters.safetensors"
EXPERTS_DIR = "experts"
# The keys this module adds to mixture_config's fields in adapter_config.json.
_OWN_KEYS = (
    "peft_type",
    "format_version",
    "moelab_version",
    "peft_version",
    "base_model_name_or_path",
    "experts",
    "router_file",
    "fused_file",
)


def _moelab_version() -> str:
    """The installed moelab's version (from the package metadata: no import of ``moelab``'s top level)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moelab")
    except PackageNotFoundError:
        return "unknown"


def expert_folder_name(i: int) -> str:
    """Expert ``i``'s subfolder, relative to the mixture folder."""
    return f"{EXPERTS_DIR}/expert_{i}"


def _submodule_prefix(layer: nn.Module, child: nn.Module, what: str) -> str:
    for name, module in layer.named_modules():
        if module is child:
            return f"{name}." if name else ""
    raise ValueError(f"the mixture layer {type(layer).__name__} does not hold its {what} as a submodule")


def _layer_parts(layer: nn.Module) -> tuple[str, str]:
    """State-dict prefixes of a mixture layer's frozen base projection and its LoRA bank."""
    return _submodule_prefix(layer, layer.base, "base"), _submodule_prefix(layer, layer.bank, "bank")


def _base_model_name(model: nn.Module) -> str | None:
    # transformers models carry it as model.name_or_path / model.config._name_or_path.
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    return str(name) if name else None


def _bank_tensors(layer: nn.Module) -> tuple[Tensor, Tensor, float]:
    """A mixture layer's ``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]`` and ``lora_alpha``."""
    bank = layer.bank
    a_ERD, b_EOR = bank.lora_A, bank.lora_B
    if a_ERD.dim() != 3 or b_EOR.dim() != 3:
        raise ValueError(
            f"the mixture's LoRA bank must hold lora_A [E, r, d_in] and lora_B [E, d_out, r], "
            f"got {tuple(a_ERD.shape)} and {tuple(b_EOR.shape)}"
        )
    # PEFT's scaling is lora_alpha / r: writing the bank's own alpha reproduces its scaling exactly.
    alpha = float(getattr(bank, "alpha", bank.scaling * a_ERD.shape[1]))
    return a_ERD, b_EOR, alpha


def _plain_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_mixture(
    model: nn.Module,
    folder: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``model``'s LoRA mixture as a PEFT-shaped adapter folder (layout in the module docstring).

    Args:
        model: the model ``moelab.lora.apply`` (or ``from_peft_adapters``) was called on. Module
            paths in the files are relative to it, so load the experts into the same kind of
            model (e.g. a ``LlamaForCausalLM``, not its inner ``LlamaModel``).
        folder: created if needed; existing files of the same names are overwritten.
        base_model_name_or_path: recorded in every config; defaults to the model's
            ``name_or_path`` when it has one (transformers models do).
        task_type: PEFT's ``task_type`` for the expert configs (e.g. ``"CAUSAL_LM"``; None: plain
            ``PeftModel``).

    Returns the folder. Only the mixture is written (the base weights are not).
    """
    layers = lora.mixture_layers(model)
    fused = lora.fused_lora_layers(model)
    if not layers and not fused:
        raise ValueError(
            f"save_mixture: {type(model).__name__} has no LoRA mixture layers (call moelab.lora.apply first)"
        )
    config = dict(lora.mixture_config(model))
    clash = sorted(set(config) & set(_OWN_KEYS))
    if clash:  # would be overwritten below and lost on reload
        raise ValueError(f"save_mixture: mixture_config has keys {clash} reserved by the folder format")
    if base_model_name_or_path is None:
        base_model_name_or_path = _base_model_name(model)

    banks = {name: _bank_tensors(layer) for name, layer in layers.items()}
    num_experts = {a.shape[0] for a, _, _ in banks.values()} or {0}
    ranks = {a.shape[1] for a, _, _ in banks.values()} or {0}
    alphas = {s for _, _, s in banks.values()} or {0.0}
    if len(num_experts) != 1 or len(ranks) != 1 or len(alphas) != 1:
        # A PEFT LoRA config has one r and one lora_alpha for all its modules.
        raise ValueError(
            "save_mixture: every mixture layer must have the same number of experts, rank and alpha "
            f"to be saved as PEFT experts; got num_experts {sorted(num_experts)}, ranks {sorted(ranks)}, "
            f"alphas {sorted(alphas)}"
        )
    (n_experts,), (rank,), (alpha,) = num_experts, ranks, alphas
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    dropout = float(config.get("dropout", 0.0) or 0.0)
    for i in range(n_experts):
        write_lora_adapter(
            folder / expert_folder_name(i),
            {name: (a[i], b[i]) for name, (a, b, _) in banks.items()},
            rank=rank,
            lora_alpha=_plain_number(alpha),
            lora_dropout=dropout,
            base_model_name_or_path=base_model_name_or_path,
            task_type=task_type,
        )

    router_tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        base_prefix, bank_prefix = _layer_parts(layer)
        expert_keys = {f"{bank_prefix}lora_A", f"{bank_prefix}lora_B"}
        for key, value in layer.state_dict().items():
            if (base_prefix and key.startswith(base_prefix)) or key in expert_keys:
                continue  # the base is not the mixture's; the experts are in their own folders
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"save_mixture: layer {name!r} has non-tensor state {key!r} ({type(value).__name__}); "
                    "only tensors can be saved"
                )
            router_tensors[f"{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    save_file(router_tensors, str(folder / ROUTER_FILE), metadata={"format": "pt"})
    if fused:
        fused_tensors = {
            f"{name}.{key}": value.detach().to("cpu", copy=True).contiguous()
            for name, adapter in fused.items()
            for key, value in (("lora_A", adapter.lora_A), ("lora_B", adapter.lora_B))
        }
        save_file(fused_tensors, str(folder / FUSED_FILE), metadata={"format": "pt"})

    header = {
        "peft_type": MIXTURE_PEFT_TYPE,
        "format_version": FORMAT_VERSION,
        "moelab_version": _moelab_version(),
        "peft_version": peft.__version__,
        "base_model_name_or_path": base_model_name_or_path,
        "experts": [expert_folder_name(i) for i in range(n_experts)],
        "router_file": ROUTER_FILE,
        **({"fused_file": FUSED_FILE} if fused else {}),
    }
    (folder / CONFIG_NAME).write_text(json.dumps({**header, **config}, indent=2, sort_keys=False) + "\n")
    return folder


def read_mixture_config(folder: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved mixture, checked to be one (not a plain PEFT adapter)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mixture folder {folder} does not exist or is not a directory")
    config = read_json(folder / CONFIG_NAME, "mixture config")
    if config.get("peft_type") != MIXTURE_PEFT_TYPE:
        hint = (
            " (a plain PEFT LoRA: load it with peft.PeftModel.from_pretrained, or use it as an expert "
            "with from_peft_adapters)"
            if config.get("peft_type") == "LORA"
            else ""
        )
        raise ValueError(
            f"{folder} is not a moelab LoRA mixture: its {CONFIG_NAME} has peft_type "
            f"{config.get('peft_type')!r}, expected {MIXTURE_PEFT_TYPE!r}{hint}"
        )
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{folder}: mixture format_version {version!r} is not supported (this moelab reads {FORMAT_VERSION})"
        )
    experts = config.get("experts")
    if not isinstance(experts, list) or not all(isinstance(e, str) for e in experts):
        raise ValueError(f"{folder / CONFIG_NAME}: 'experts' must be a list of subfolder names")
    if not experts and not config.get("fused_file"):
        raise ValueError(
            f"{folder / CONFIG_NAME}: 'experts' is empty and there is no fused_file: nothing to load"
        )
    return config


def _apply_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``moelab.lora.apply`` that the saved config records."""
    params = inspect.signature(lora.apply).parameters
    return {k: v for k, v in config.items() if k in params and k != "model"}


def _wrapped_names(config: dict[str, Any]) -> list[str] | None:
    for key in ("wrapped", "layers", "modules", "wrapped_names"):
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return None


def _load_layers(
    layers: dict[str, nn.Module],
    experts_AB: dict[str, tuple[Tensor, Tensor]],
    router_tensors: dict[str, Tensor],
    where: str,
) -> None:
    """Load every mixture layer's full state (kept base + experts + router), strictly."""
    leftover = set(router_tensors)
    # Longest names first, so a layer whose name prefixes another's never takes its keys.
    for name in sorted(layers, key=len, reverse=True):
        layer = layers[name]
        base_prefix, bank_prefix = _layer_parts(layer)
        state = {k: v for k, v in layer.state_dict().items() if base_prefix and k.startswith(base_prefix)}
        a_ERD, b_EOR = experts_AB[name]
        state[f"{bank_prefix}lora_A"], state[f"{bank_prefix}lora_B"] = a_ERD, b_EOR
        mine = [k for k in leftover if k.startswith(f"{name}.")]
        for k in mine:
            state[k[len(name) + 1 :]] = router_tensors[k]
        leftover -= set(mine)
        current = layer.state_dict()
        for key, value in state.items():
            have = current.get(key)
            if isinstance(have, Tensor) and tuple(have.shape) != tuple(value.shape):
                raise ValueError(
                    f"{where}: layer {name!r} tensor {key!r} has shape {tuple(value.shape)} in the folder, "
                    f"but the mixture built from its config has {tuple(have.shape)}"
                )
        try:
            layer.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{where}: layer {name!r} does not match the saved tensors: {e}") from e
    if leftover:
        raise ValueError(f"{where}: {ROUTER_FILE} has tensors of no mixture layer: {sorted(leftover)[:5]}")


def _stack_experts(
    adapters: Sequence[LoraAdapter], names: Iterable[str], scale_to: float | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per layer, the experts' ``A`` stacked ``[E, r, d_in]`` and ``B`` stacked ``[E, d_out, r]``.

    With ``scale_to``, expert ``i``'s ``B`` is multiplied by ``scaling_i / scale_to`` so that one
    shared scaling reproduces each adapter's own (skipped, bits kept, where they are equal).
    """
    out = {}
    for name in names:
        a = torch.stack([ad.modules[name][0] for ad in adapters])
        bs = []
        for ad in adapters:
            b = ad.modules[name][1]
            if scale_to is not None and ad.scaling != scale_to:
                b = b * (ad.scaling / scale_to)
            bs.append(b)
        out[name] = (a, torch.stack(bs))
    return out


def _check_no_mixture(model: nn.Module, who: str) -> None:
    if lora.mixture_layers(model) or lora.fused_lora_layers(model):
        raise ValueError(f"{who}: the model already has a LoRA mixture; call moelab.lora.remove(model) first")


def _load_fused(model: nn.Module, folder: Path, config: dict[str, Any]) -> None:
    """Load the fused expert parameters' LoRA tensors (``FUSED_FILE``) into the adapters ``apply`` made."""
    adapters = lora.fused_lora_layers(model)
    if not config.get("fused_file"):
        if adapters:
            raise ValueError(f"{folder}: the config adapts fused parameters but names no fused_file")
        return
    tensors = read_safetensors(folder / config["fused_file"], "fused expert LoRA")
    expected = {f"{name}.{key}" for name in adapters for key in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        raise ValueError(
            f"{folder}: {config['fused_file']} holds {sorted(tensors)[:4]}, the model's adapted fused "
            f"parameters need {sorted(expected)[:4]}; is this the same architecture?"
        )
    with torch.no_grad():
        for name, adapter in adapters.items():
            for key in ("lora_A", "lora_B"):
                have, saved = getattr(adapter, key), tensors[f"{name}.{key}"]
                if have.shape != saved.shape:
                    raise ValueError(
                        f"{folder}: {name}.{key} has shape {tuple(saved.shape)} in the folder, "
                        f"{tuple(have.shape)} in the model"
                    )
                have.copy_(saved)


def load_mixture(model: nn.Module, folder: str | Path) -> list[str]:
    """Apply a mixture saved by ``save_mixture`` to a fresh base ``model`` and load all its tensors.

    The model must be the same architecture as the one saved (same module paths and shapes) and
    carry no mixture yet. Its parameters and logits then equal the saved model's bit for bit
    (given the same base weights). On any error the model is left without a mixture.

    Returns the wrapped module names.
    """
    folder = Path(folder)
    config = read_mixture_config(folder)
    _check_no_mixture(model, "load_mixture")
    adapters = [read_lora_adapter(folder / sub) for sub in config["experts"]]
    router_tensors = read_safetensors(folder / config.get("router_file", ROUTER_FILE), "mixture router")
    ranks = {ad.rank for ad in adapters}
    if len(ranks) > 1:
        raise ValueError(f"{folder}: the experts have different ranks {sorted(ranks)}")

    names = lora.apply(model, **_apply_arguments(config))
    try:
        expected = _wrapped_names(config)
        modules = [n for n in names if n not in set(config.get("wrapped_parameters") or [])]
        if expected is not None and sorted(modules) != sorted(expected):
            raise ValueError(
                f"{folder}: the config's targets wrap {sorted(modules)} in this model, but the mixture was "
                f"saved with {sorted(expected)}; is this the same architecture?"
            )
        _load_fused(model, folder, config)
        layers = lora.mixture_layers(model)
        if not layers and not adapters:
            return names
        if not layers or not adapters:
            raise ValueError(f"{folder}: {len(adapters)} expert folders for {len(layers)} mixture layers")
        scaling = float(next(iter(layers.values())).bank.scaling)
        for ad in adapters:
            if not math.isclose(ad.scaling, scaling, rel_tol=1e-6):
                raise ValueError(
                    f"{ad.folder}: the expert's scaling {ad.scaling:g} (lora_alpha / r) differs from the "
                    f"mixture config's {scaling:g} (alpha / rank); was the folder edited?"
                )
            if set(ad.modules) != set(layers):
                raise ValueError(
                    f"{ad.folder}: the expert adapts {sorted(ad.modules)}, the mixture wraps {sorted(layers)}"
                )
        if len(adapters) != next(iter(layers.values())).bank.lora_A.shape[0]:
            raise ValueError(
                f"{folder}: {len(adapters)} expert folders, but the config builds "
                f"{next(iter(layers.values())).bank.lora_A.shape[0]} experts"
            )
        _load_layers(layers, _stack_experts(adapters, layers), router_tensors, str(folder))
    except BaseException:
        lora.remove(model)
        raise
    return names


def from_peft_adapters(
    model: nn.Module,
    folders: Sequence[str | Path],
    *,
    freeze_experts: bool = False,
    **mixture_kwargs: Any,
) -> list[str]:
    """Build a LoRA mixture on ``model`` whose experts are existing PEFT LoRA adapters.

    Args:
        model: the base model the adapters were trained on (module paths relative to it).
        folders: PEFT LoRA folders, expert ``i`` = ``folders[i]``. They must all be plain LoRAs
            with the same rank and the same adapted modules.
        freeze_experts: make the experts' ``lora_A``/``lora_B`` non-trainable (the router alone
            then trains, as in X-LoRA's default). Default False (our choice: the router and the
            experts both train, as after ``moelab.lora.apply``).
        **mixture_kwargs: passed to ``moelab.lora.apply`` (``method``, ``router``, ``top_k``,
            ``router_kwargs``, ``aux_losses``, ...). ``targets``, ``num_experts`` and ``rank`` come
            from the adapters. ``alpha`` defaults to the first adapter's scaling times the rank
            and ``dropout`` to its ``lora_dropout``.

    Adapters with different scalings (``lora_alpha``, rsLoRA) are folded into one: expert ``i``'s
    ``B`` is multiplied by ``scaling_i / scaling``, so each expert alone still computes its own
    adapter. The router is fresh.

    Returns the wrapped module names.
    """
    if isinstance(folders, (str, Path)) or not isinstance(folders, Sequence):
        raise TypeError(f"folders must be a list of PEFT LoRA folders, got {type(folders).__name__}")
    if not folders:
        raise ValueError("folders is empty: give at least one PEFT LoRA folder")
    for key in ("targets", "num_experts", "rank"):
        if key in mixture_kwargs:
            raise ValueError(f"from_peft_adapters: {key} comes from the adapters; do not pass {key}=")
    _check_no_mixture(model, "from_peft_adapters")
    adapters = [read_lora_adapter(f) for f in folders]

    first = adapters[0]
    for ad in adapters[1:]:
        if ad.rank != first.rank:
            raise ValueError(
                f"PEFT adapters must share one rank to be mixture experts: {first.folder} has r={first.rank}, "
                f"{ad.folder} has r={ad.rank}"
            )
        if set(ad.modules) != set(first.modules):
            only_first = sorted(set(first.modules) - set(ad.modules))
            only_this = sorted(set(ad.modules) - set(first.modules))
            raise ValueError(
                "PEFT adapters must adapt the same modules: "
                f"only {first.folder} adapts {only_first[:4] or 'none'}, only {ad.folder} adapts {only_this[:4] or 'none'}"
            )
        for name, (a, b) in ad.modules.items():
            a0, b0 = first.modules[name]
            if a.shape != a0.shape or b.shape != b0.shape:
                raise ValueError(
                    f"module {name!r}: {first.folder} has A {tuple(a0.shape)}, B {tuple(b0.shape)}; "
                    f"{ad.folder} has A {tuple(a.shape)}, B {tuple(b.shape)}"
                )

    rank = first.rank
    modules = dict(model.named_modules())
    for name, (a, b) in first.modules.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            found = "missing" if module is None else type(module).__name__
            raise ValueError(
                f"{first.folder} adapts {name!r}, which in this model is {found}, not an nn.Linear"
            )
        if (module.in_features, module.out_features) != (a.shape[1], b.shape[0]):
            raise ValueError(
                f"{first.folder} adapts {name!r} as {a.shape[1]} -> {b.shape[0]}, but the model's module is "
                f"{module.in_features} -> {module.out_features}"
            )

    alpha = mixture_kwargs.pop("alpha", None)
    if alpha is None:
        # The first adapter's own lora_alpha where PEFT scales by alpha / r: its scaling, bit for bit.
        alpha = first.scaling * rank if first.config.get("use_rslora") else first.lora_alpha
    mixture_kwargs.setdefault("dropout", first.lora_dropout)
    targets = sorted(first.modules)
    names = lora.apply(model, targets, num_experts=len(adapters), rank=rank, alpha=alpha, **mixture_kwargs)
    try:
        layers = lora.mixture_layers(model)
        if sorted(layers) != targets:
            raise ValueError(
                f"the adapters' modules {targets} wrapped {sorted(layers)} in this model; "
                "module paths must be relative to the model passed"
            )
        scaling = float(next(iter(layers.values())).bank.scaling)
        stacked = _stack_experts(adapters, targets, scale_to=scaling)
        with torch.no_grad():
            for name, layer in layers.items():
                a_ERD, b_EOR = stacked[name]
                layer.bank.lora_A.copy_(a_ERD)
                layer.bank.lora_B.copy_(b_EOR)
                if freeze_experts:
                    layer.bank.lora_A.requires_grad_(False)
                    layer.bank.lora_B.requires_grad_(False)
    except BaseException:
        lora.remove(model)
        raise
    return names
