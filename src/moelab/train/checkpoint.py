"""Trainer checkpoints: safetensors + JSON, never pickle.

A checkpoint is a directory ``RUN/checkpoints/step_NNNNNNN/`` holding

- the model: ``config.json`` + ``model.safetensors`` for a ``MoELM`` (a ``MoELM.from_pretrained``
  directory), ``model.safetensors`` (``safetensors.torch.save_model``) for any other module;
- ``optimizer.safetensors`` (the optimizer's tensors) and ``rng.safetensors`` (torch RNG states);
  under expert parallelism the model is saved gathered (unsharded: one process loads it) and the
  optimizer as one shard per rank, ``optimizer.rank{R}.safetensors`` + ``.json``;
- ``tokenizer.json`` when the run used a BPE tokenizer;
- ``trainer_state.json``: step, data position, Python RNG state, optimizer hyper-parameters, the
  train config, the model's class and parameter shapes, the loss history.

Files get the ordinary permissions of the process (``0666 & ~umask``), not safetensors' 0600.
Checkpoints are written to ``step_N.tmp`` and renamed, so a killed run never leaves half a
checkpoint where ``--resume`` looks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_model
from torch import Tensor, nn

from moelab.core.io import save_safetensors

CKPT_DIRNAME = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "moelab-trainer-checkpoint-1"


# ---------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------
def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints`` (or ``out_dir`` itself), or None."""
    d = Path(out_dir)
    root = d / CKPT_DIRNAME if (d / CKPT_DIRNAME).is_dir() else d
    if is_checkpoint(root):
        return root
    steps = sorted(p for p in root.glob("step_*") if is_checkpoint(p))
    return steps[-1] if steps else None


def find_checkpoint(path: str | Path) -> Path:
    """Like ``latest_checkpoint`` (a run directory, its ``checkpoints`` folder or one checkpoint),
    but a path without a checkpoint is an error: ``FileNotFoundError("no checkpoint under X")``."""
    p = Path(path)
    found = latest_checkpoint(p) if p.is_dir() else None
    if found is None:
        why = "it does not exist" if not p.exists() else f"no {CKPT_DIRNAME}/step_*/{STATE_FILE} in it"
        raise FileNotFoundError(f"no checkpoint under {p} ({why})")
    return found


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory that ``path`` belongs to, when ``path`` is a checkpoint or a
    ``checkpoints`` folder (``RUN/checkpoints/step_N`` -> ``RUN``); None for any other path."""
    p = Path(path)
    if p.name == CKPT_DIRNAME and p.is_dir():
        return p.parent
    if is_checkpoint(p):
        return p.parent.parent if p.parent.name == CKPT_DIRNAME else p.parent
    return None


def resume_path(resume: bool | str | Path | None, out_dir: Path | None) -> Path | None:
    """The checkpoint a run should resume from (``Trainer.train``'s ``resume`` rules), or None.

    ``False``: none, and an ``out_dir`` already holding checkpoints is refused rather than mixed
    with a new run. ``True``: the newest under ``out_dir`` (an error when there is none).
    ``"auto"``: the newest if any. A path: the newest under it (an error when there is none).
    """
    if resume is False or resume is None:
        existing = latest_checkpoint(out_dir) if out_dir is not None and out_dir.is_dir() else None
        if existing is not None:
            raise FileExistsError(
                f"{out_dir} already holds checkpoints (newest: {existing.name}); resume=True (--resume) "
                "continues that run, or choose another out_dir"
            )
        return None
    if resume is True or resume == "auto":
        if out_dir is None:
            raise ValueError("resume=True needs the trainer's out_dir (or pass a checkpoint path)")
        if resume == "auto" and latest_checkpoint(out_dir) is None:
            return None
        return find_checkpoint(out_dir)
    if not isinstance(resume, (str, Path)):
        raise TypeError(f"resume must be a bool, 'auto' or a path, got {type(resume).__name__}")
    return find_checkpoint(resume)


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``."""
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


# ---------------------------------------------------------------------------------------------
# Optimizer and RNG states as tensors + JSON
# ---------------------------------------------------------------------------------------------
def optimizer_to_safe(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors (for safetensors) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_safe(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python_random": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(directory: str | Path) -> None:
    """Give every file in ``directory`` the mode a plain ``open()`` would (``0666 & ~umask``).

    Why: safetensors' ``save_file`` creates its files with mode 0600, so a checkpoint or model
    written for a team could not be read by the group.
    """
    mode = 0o666 & ~_umask()
    for p in Path(directory).iterdir():
        if p.is_file():
            os.chmod(p, mode)


def is_moelm(model: nn.Module) -> bool:
    from moelab.models.lm import MoELM

    return isinstance(model, MoELM)


def save_weights(model: nn.Module, directory: str | Path) -> Path:
    """The model's weights into ``directory``: ``MoELM.save_pretrained`` (config + weights) for a
    ``MoELM``, ``safetensors.torch.save_model`` (tied weights handled) for any other module."""
    d = Path(directory)
    if is_moelm(model):
        model.save_pretrained(d)
    else:
        d.mkdir(parents=True, exist_ok=True)
        save_model(model, str(d / WEIGHTS_FILE), metadata={"format": "pt", "moelab": type(model).__name__})
    normal_permissions(d)
    return d


def load_weights(model: nn.Module, directory: str | Path, device: torch.device | str = "cpu") -> None:
    load_model(model, str(Path(directory) / WEIGHTS_FILE), strict=True, device=str(device))


def save_tokenizer(tokenizer: Any, directory: str | Path) -> None:
    """A BPE tokenizer travels with the weights as ``tokenizer.json`` (bytes need none)."""
    if getattr(tokenizer, "name", "") == "bpe":
        tokenizer.tok.save(str(Path(directory) / "tokenizer.json"))


def model_signature(model: nn.Module) -> dict[str, Any]:
    """The model's class and parameter/buffer shapes: what a checkpoint must match to be loaded."""
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "shapes": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def signature_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two ``model_signature``s, one line each (only the differences)."""
    out = []
    if saved.get("class") != current.get("class"):
        out.append(f"class: {saved.get('class')} -> {current.get('class')}")
    a, b = saved.get("shapes", {}), current.get("shapes", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key, 'absent')} -> {b.get(key, 'absent')}")
    return out


def staging_dir(directory: str | Path) -> Path:
    """Where a checkpoint is written before its rename: ``step_N.tmp`` beside ``step_N``."""
    final = Path(directory)
    return final.with_name(final.name + ".tmp")


def write_optimizer_shard(optimizer: torch.optim.Optimizer, directory: str | Path, rank: int) -> None:
    """One rank's optimizer state (expert parallelism: each rank's experts have their own moments):
    ``optimizer.rank{R}.safetensors`` + ``optimizer.rank{R}.json``."""
    tensors, meta = optimizer_to_safe(optimizer)
    save_safetensors(tensors, Path(directory) / f"optimizer.rank{rank}.safetensors")
    (Path(directory) / f"optimizer.rank{rank}.json").write_text(json.dumps(meta))


def read_optimizer_shard(optimizer: torch.optim.Optimizer, directory: str | Path, rank: int) -> None:
    d = Path(directory)
    path = d / f"optimizer.rank{rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {d} has no optimizer shard for rank {rank} ({path.name})")
    meta = json.loads((d / f"optimizer.rank{rank}.json").read_text())
    optimizer.load_state_dict(optimizer_from_safe(load_file(str(path)), meta))


def write_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    tokenizer: Any = None,
    keep: int | None = None,
    before_rename: Any = None,
) -> Path:
    """Write one checkpoint atomically (``.tmp`` then rename), mark it ``latest``, keep the
    ``keep`` newest ``step_*`` siblings. ``state`` is the trainer's JSON state (without RNG and
    optimizer metadata, which are added here). ``optimizer=None``: the optimizer is written in
    shards by the ranks (``write_optimizer_shard``) while ``before_rename(tmp_dir)`` runs, which
    returns once they are all written."""
    final = Path(directory)
    tmp = staging_dir(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    save_weights(model, tmp)
    opt_meta = None
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_to_safe(optimizer)
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_meta = rng_state()
    save_safetensors(rng_tensors, tmp / "rng.safetensors")
    if tokenizer is not None:
        save_tokenizer(tokenizer, tmp)
    full = {"format": FORMAT, **state, "optimizer": opt_meta, "rng": rng_meta}
    (tmp / STATE_FILE).write_text(json.dumps(full))
    if before_rename is not None:
        before_rename(tmp)
        normal_permissions(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (final.parent / LATEST).write_text(final.name + "\n")
    if keep is not None:
        steps = sorted(p for p in final.parent.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def check_compatible(
    directory: str | Path, *, model: nn.Module, train_config: dict[str, Any], world_size: int
) -> dict[str, Any]:
    """The checkpoint's ``trainer_state.json`` after checking that ``model``, ``train_config``
    and ``world_size`` can resume from it. Each error names only the fields that differ."""
    from moelab.train.config import RESUME_MAY_CHANGE, config_diff

    d = Path(directory)
    state = read_state(d)
    if is_moelm(model) and (d / "config.json").is_file():
        from moelab.models.config import MoELMConfig

        saved = MoELMConfig.from_json(d / "config.json").to_dict()
        diff, what = config_diff(saved, model.config.to_dict()), "model config"
    else:
        diff = signature_diff(state["model"], model_signature(model)) if "model" in state else []
        what = "model"
    if diff:
        raise ValueError(
            f"checkpoint {d} was written for a different {what} (saved -> now): " + "; ".join(diff)
        )
    diff = config_diff(state["train_config"], train_config, ignore=RESUME_MAY_CHANGE)
    if diff:
        raise ValueError(
            f"checkpoint {d} was written with another train config (saved -> now): {'; '.join(diff)}. "
            f"Only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume"
        )
    if state["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {d} was written with world_size={state['world_size']}; resuming with "
            f"{world_size} would change the data order (use the same number of processes)"
        )
    return state


def read_checkpoint(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device | str,
) -> dict[str, Any]:
    """Load weights, optimizer (None: not read; sharded checkpoints use ``read_optimizer_shard``)
    and RNG states from a checkpoint; returns its ``trainer_state.json``."""
    d = Path(directory)
    state = read_state(d)
    load_weights(model, d, device)
    if optimizer is not None:
        optimizer.load_state_dict(
            optimizer_from_safe(load_file(str(d / "optimizer.safetensors")), state["optimizer"])
        )
    set_rng_state(load_file(str(d / "rng.safetensors")), state["rng"])
    return state
