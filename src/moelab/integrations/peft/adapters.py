"""Plain PEFT LoRA adapter folders: read one into tensors, write one from tensors. Never pickle.

A PEFT LoRA folder (what ``PeftModel.save_pretrained`` writes) holds

- ``adapter_config.json``: a serialised ``peft.LoraConfig`` (``peft_type: "LORA"``, ``r``,
  ``lora_alpha``, ``target_modules``, ...);
- ``adapter_model.safetensors``: for every adapted ``nn.Linear`` at module path ``<path>`` of the
  base model, ``base_model.model.<path>.lora_A.weight`` ``[r, d_in]`` and
  ``base_model.model.<path>.lora_B.weight`` ``[d_out, r]`` (the adapter name is not in the keys).

The adapted projection computes ``W x + scaling * B (A x)`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` under rsLoRA). Hu et al., *LoRA: Low-Rank Adaptation of Large Language
Models*, ICLR 2022; Kalajdzievski, *A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA*, 2023.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# ``base_model.model.<path>.lora_A.weight``; some savers keep the adapter name (``lora_A.default.weight``).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")

# LoraConfig fields that change what the adapter computes beyond ``W x + scaling * B A x`` on an
# ``nn.Linear``: an adapter using any of them is not a set of plain low-rank experts.
_UNSUPPORTED_FIELDS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "fan_in_fan_out",
    "lora_bias",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
    "rank_pattern",
    "alpha_pattern",
    "megatron_config",
)


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter in memory.

    Attributes:
        folder: where it was read from (None when built in memory).
        rank: ``r``, the same for every module.
        lora_alpha: PEFT's ``lora_alpha``.
        scaling: the factor on ``B A x``: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        lora_dropout: PEFT's ``lora_dropout`` (training only).
        modules: module path -> ``(A [r, d_in], B [d_out, r])``, sorted by path.
        config: the whole ``adapter_config.json`` as read.
    """

    folder: Path | None
    rank: int
    lora_alpha: float
    scaling: float
    lora_dropout: float
    modules: dict[str, tuple[Tensor, Tensor]]
    config: dict[str, Any] = field(default_factory=dict)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a clear ``FileNotFoundError``/``ValueError`` naming ``what``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{what}: {path} must hold a JSON object, got {type(value).__name__}")
    return value


def read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, or a clear error naming ``what``."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{what}: {path} is not a readable safetensors file ({e})") from e


def adapter_scaling(config: dict[str, Any]) -> float:
    """PEFT's scaling of ``B A x`` for a LoRA config dict: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA."""
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def read_lora_adapter(folder: str | Path) -> LoraAdapter:
    """Read a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Refuses, with a ``FileNotFoundError``/``ValueError`` naming the folder: a missing folder or
    file; a config that is not ``peft_type: "LORA"``; LoRA variants that are not plain ``B A x``
    on an ``nn.Linear`` (DoRA, per-module ranks, ``modules_to_save``, fused 3-D parameters, ...);
    pickled weights only (``adapter_model.bin``: moelab never unpickles); keys other than
    ``lora_A``/``lora_B`` weights; shapes that do not agree with ``r``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT LoRA folder {folder} does not exist or is not a directory")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a PEFT adapter folder: it has no {CONFIG_NAME} "
            "(write one with PeftModel.save_pretrained)"
        )
    config = read_json(config_path, "PEFT adapter config")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"{folder} holds a PEFT adapter of type {peft_type!r}; expected a plain LoRA ('LORA')"
        )
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{config_path}: {name} must be a positive number, got {value!r}")
    if config["r"] != int(config["r"]):
        raise ValueError(f"{config_path}: r must be an integer, got {config['r']!r}")
    used = [name for name in _UNSUPPORTED_FIELDS if config.get(name)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    if used:
        raise ValueError(
            f"{folder}: LoRA options {used} are not supported; a mixture expert must be a plain LoRA "
            "(W x + scaling * B A x on nn.Linear modules, one rank for all modules)"
        )

    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        if (folder / PICKLED_WEIGHTS_NAME).is_file():
            raise ValueError(
                f"{folder} has only pickled weights ({PICKLED_WEIGHTS_NAME}); moelab never unpickles. "
                "Re-save the adapter with PeftModel.save_pretrained(..., safe_serialization=True)"
            )
        raise FileNotFoundError(f"{folder} is not a complete PEFT adapter folder: it has no {WEIGHTS_NAME}")
    tensors = read_safetensors(weights_path, "PEFT adapter weights")

    rank = int(config["r"])
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"{weights_path}: key {key!r} is not a LoRA weight "
                f"('{KEY_PREFIX}<module>.lora_A.weight' or '.lora_B.weight'); only plain LoRA adapters are supported"
            )
        pairs.setdefault(match["path"], {})[match["which"]] = value
    if not pairs:
        raise ValueError(f"{weights_path} holds no LoRA weights")
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    for path in sorted(pairs):
        pair = pairs[path]
        missing = [f"lora_{w}" for w in "AB" if w not in pair]
        if missing:
            raise ValueError(f"{weights_path}: module {path!r} has no {missing[0]} weight")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(
                f"{weights_path}: module {path!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"expected [r, d_in] and [d_out, r] with r = {rank}"
            )
        modules[path] = (a, b)
    return LoraAdapter(
        folder=folder,
        rank=rank,
        lora_alpha=config["lora_alpha"],
        scaling=adapter_scaling(config),
        lora_dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        modules=modules,
        config=config,
    )


def write_lora_adapter(
    folder: str | Path,
    modules: dict[str, tuple[Tensor, Tensor]],
    *,
    rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write a standard PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        folder: created if needed.
        modules: module path (relative to the model PEFT will wrap) -> ``(A [r, d_in], B [d_out, r])``.
        rank, lora_alpha, lora_dropout: the ``LoraConfig`` fields; PEFT then scales ``B A x`` by
            ``lora_alpha / rank``.
        base_model_name_or_path, task_type: recorded in the config as PEFT does.

    ``target_modules`` lists the full module paths, so PEFT adapts exactly these modules (its
    matching accepts a path equal to a target). The config is written by ``peft.LoraConfig`` itself.
    """
    folder = Path(folder)
    if not modules:
        raise ValueError("write_lora_adapter: modules is empty; an adapter needs at least one module")
    tensors: dict[str, Tensor] = {}
    for path, (a, b) in modules.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(
                f"write_lora_adapter: module {path!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                f"expected [r, d_in] and [d_out, r] with r = {rank}"
            )
        # Own, contiguous CPU copies: safetensors refuses views and tensors sharing storage.
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = a.detach().to("cpu", copy=True).contiguous()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = b.detach().to("cpu", copy=True).contiguous()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=sorted(modules),
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        inference_mode=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder
