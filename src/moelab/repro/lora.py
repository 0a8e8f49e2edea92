"""LoRA-mixture reproductions on one small harness: ``lora_mixer_entropy``, ``dynmole_entropy``,
``remix_ess`` (ReMix against a softmax MoLoRA without balancing), ``flylora_merge`` (two
single-task adapters averaged, FlyLoRA against LoRA; ``merge_arm``) and ``dymoe_forgetting``
(a 3-task continual sequence on a DyMoE mixture, TAG on / off; ``run_dymoe_arms``).

The harness, per seed (``run_lora_arms``):

1. **base**: a dense ``MoELM`` (``LORA_MODEL``: d = 128, 4 layers, byte tokens, context 256)
   pretrained on the default stdlib corpus for ``train["pretrain_steps"]`` steps with
   ``moelab.train.Trainer`` (``LORA_PRETRAIN``). One base per seed, shared by the arms (each
   arm adapts a deep copy) and by both reproductions run in one process (``_BASES``).
2. **mixture**: ``moelab.lora.apply`` on every attention (``qkv``, ``out``) and FFN
   (``gate_up``, ``down``) projection of the copy, ``NUM_EXPERTS`` = 4 experts of rank
   ``RANK`` = 8, with the arm's router and losses (the method's preset otherwise). The same
   seed draws the same LoRA and router initialisation in every arm.
3. **fine-tuning** on a multi-task mix of the generated built-in tasks (``LORA_TASKS``:
   arithmetic, brackets, sort; ``moelab.data.tasks``), examples packed whole into rows of
   ``SEQ_LEN`` tokens (greedy, no example split; the rest padded; our choice: no padding
   waste, as packing SFT trainers do), plain AdamW on the mixtures' parameters only, linear
   warm-up then cosine decay (``LORA_FINETUNE``); loss = the targets' cross-entropy plus the
   mixtures' auxiliary losses (``moelab.aux_loss``); ``moelab.step_end`` after each optimizer
   step. A ReMix mixture trains by ``remix_rloo_step`` (``rloo_samples`` forwards a step, one
   reward per packed row). The same batches in every arm.
4. **metrics** on each task's val split (packed per task), after ``EARLY_FRACTION`` of the
   steps (``*_early``) and at the end: ``val_loss_<task>`` (target tokens' cross-entropy),
   ``val_loss`` (unweighted mean over tasks, our choice: sort's long targets do not dominate);
   from the mixture layers' routing on the val tokens (padding excluded), averaged over the
   layers (``routing_metrics``): ``entropy`` (mean per-token Shannon entropy of the router's
   softmax, over ``log E``), ``router_ess`` (``1 / sum p^2`` of that softmax over all ``E``
   experts: ``router_effective_num_experts``), ``max_over_mean`` and ``usage_cv`` (the expert-usage histogram's
   max / mean and coefficient of variation), ``ess`` (``(sum w)^2 / sum w^2`` of each token's
   combine weights, ``1 / sum w^2`` when they sum to 1), ``experts_per_token`` and ``task_mi``
   (mutual information between task and expert over ``log E``: how task-specialised the
   routing is). ``train_s``: the arm's fine-tuning seconds.

Exact-match accuracy by greedy decoding is not measured (its cost would exceed the loss
evaluation many times at this budget).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.lora.finetune import (  # noqa: F401 - pack_examples, routing_metrics: re-exported
    EVAL_ROWS,
    ROUTING_METRICS,
    evaluate_tasks,
    pack_examples,
    routing_metrics,
    sequence_losses,
)
from moelab.repro.rules import Arm, Condition, Reproduction, Rows, diff, fmt, lower

LORA_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "moe_every": 1000, "max_seq_len": 256}
SEQ_LEN = 256  # packed row length; arithmetic prompts reach ~270 bytes, longer examples are dropped
LORA_TASKS = ("arithmetic", "brackets", "sort")
TASK_SIZES = {"train": 600, "val": 48, "test": 0}  # examples per task (our choice)
TARGETS = ("qkv", "out", "gate_up", "down")  # MoELM's attention and FFN projections
NUM_EXPERTS = 4
RANK = 8
# Base pretraining (our choice: enough for byte statistics and some Python at this size).
LORA_PRETRAIN = {"pretrain_steps": 200, "pretrain_lr": 3e-3, "pretrain_warmup": 20}
# Mixture fine-tuning (our choice: LoRA at a higher lr than MixLoRA's 2e-4, for a short run
# from B = 0). ``batch_size`` counts packed rows of SEQ_LEN tokens.
LORA_FINETUNE = {"steps": 120, "batch_size": 8, "lr": 2e-3, "warmup_steps": 12, "weight_decay": 0.0}
LORA_TRAIN = {**LORA_PRETRAIN, **LORA_FINETUNE}
EARLY_FRACTION = 1 / 3  # the early checkpoint of "speeds convergence"
EARLY_KEYS = ("val_loss", "entropy", "max_over_mean", "ess", "router_ess")  # measured at the early checkpoint
BALANCE_MARGIN = 0.1  # max/mean load of the shaped arm may exceed the other's by this much (ours)

# flylora_merge: two single-task adapters merged by averaging (our choices: the two generated
# tasks least alike; LoRA at PEFT's usual r = 8 with FlyLoRA's scaling alpha / r = 2; 60 steps per
# adapter keep four adapters per seed near a minute at 2 threads).
MERGE_TASKS = ("arithmetic", "sort")
MERGE_TARGETS = TARGETS  # every projection, as the mixture reproductions
MERGE_LORA_RANK = 8
MERGE_LORA_ALPHA = 16.0
MERGE_TRAIN = {**LORA_TRAIN, "steps": 60, "warmup_steps": 6}

# (seed, model, pretraining settings) -> (MoELMConfig, state dict): one base per seed per process.
_BASES: dict[str, tuple[Any, dict[str, Tensor]]] = {}


# --------------------------------------------------------------------------------- data
def task_data(seed: int) -> tuple[tuple[Tensor, Tensor, Tensor], dict[str, tuple[Tensor, Tensor, Tensor]]]:
    """``(train, {task: val})`` packed rows (``pack_examples``) of ``LORA_TASKS`` for ``seed``;
    the train examples of all tasks shuffled together (seeded) before packing."""
    from moelab.data.tasks import encode_examples, load_tasks
    from moelab.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    pad = tok.encode("\n")[0]
    tasks = load_tasks(LORA_TASKS, seed=seed, sizes=TASK_SIZES)
    train = [ex for t in tasks.values() for ex in t.examples("train")]
    random.Random(seed).shuffle(train)
    packed = pack_examples(encode_examples(train, tok), SEQ_LEN, pad)
    val = {n: pack_examples(encode_examples(t.examples("val"), tok), SEQ_LEN, pad) for n, t in tasks.items()}
    return packed, val


# --------------------------------------------------------------------------------- the base
def pretrained_base(seed: int, model: dict[str, Any], train: dict[str, Any], progress: bool, console: Any):
    """A fresh copy of ``seed``'s pretrained dense ``MoELM`` (trained once per process; module
    docstring). ``model``: ``MoELMConfig`` fields (unknown ones ignored); ``train``: the
    reproduction's settings (``pretrain_steps``, ``pretrain_lr``, ``pretrain_warmup``,
    ``batch_size``, ``threads``)."""
    from moelab.data import load_data
    from moelab.models.config import MoELMConfig
    from moelab.models.lm import MoELM
    from moelab.train.config import TrainConfig
    from moelab.train.trainer import Trainer

    known = {f.name for f in fields(MoELMConfig)}
    settings = {
        "steps": int(train["pretrain_steps"]),
        "batch_size": int(train["batch_size"]),
        "seq_len": SEQ_LEN,
        "lr": float(train["pretrain_lr"]),
        "warmup_steps": min(int(train["pretrain_warmup"]), int(train["pretrain_steps"])),
        "eval_every": 0,
        "eval_batches": 2,
        "seed": seed,
        "threads": int(train.get("threads") or 0),
    }
    chosen = {k: v for k, v in model.items() if k in known}
    key = json.dumps([seed, chosen, settings], sort_keys=True, default=str)
    if key not in _BASES:
        tcfg = TrainConfig.from_dict(settings)
        data = load_data(tcfg.data, tcfg.tokenizer, bpe_vocab_size=tcfg.bpe_vocab_size)
        cfg = MoELMConfig.from_dict(chosen | {"vocab_size": data.vocab_size})
        if cfg.moe_layers:
            raise ValueError(
                f"the LoRA reproductions adapt a dense model: set moe_every > n_layers, got {cfg.moe_every}"
            )
        if cfg.max_seq_len < SEQ_LEN:
            raise ValueError(f"model max_seq_len must be >= {SEQ_LEN} (packed rows), got {cfg.max_seq_len}")
        trainer = Trainer(
            cfg, tcfg, data=data, progress=progress, console=console, description=f"base s{seed}"
        )
        trainer.train()
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        _BASES[key] = (cfg, state)
    cfg, state = _BASES[key]
    net = MoELM(cfg)
    net.load_state_dict(state)
    return net


# --------------------------------------------------------------------------------- metrics
def evaluate(
    model: nn.Module, val: dict[str, tuple[Tensor, Tensor, Tensor]], num_experts: int | None = NUM_EXPERTS
) -> dict[str, float]:
    """``moelab.lora.finetune.evaluate_tasks`` with the harness's ``NUM_EXPERTS`` by default."""
    return evaluate_tasks(model, val, num_experts)


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------- one arm, one seed
def finetune(
    model: nn.Module,
    *,
    seed: int,
    train: dict[str, Any],
    data: tuple[Tensor, Tensor, Tensor],
    val: dict[str, tuple[Tensor, Tensor, Tensor]] | None = None,
    num_experts: int | None = NUM_EXPERTS,
) -> dict[str, float]:
    """Fine-tune ``model``'s trainable parameters on ``data`` (module docstring: AdamW, warm-up
    then cosine, clipping at 1, the seed's batch order). The loss: the targets' cross-entropy
    plus the mixtures' auxiliary losses when ``num_experts`` is set. A model with ReMix routers
    trains by ``remix_rloo_step`` (``train["rloo_samples"]`` forwards per step, one reward per
    packed row; the experts learn from the mean of the ``M`` rows' mean losses, our choice).
    ``moelab.step_end`` runs after every optimizer step (FlyLoRA's bias update). With ``val``,
    measures ``evaluate`` after ``EARLY_FRACTION`` of the steps (``*_early`` keys).
    Returns ``train_s``, ``steps`` and the early keys."""
    from moelab.core.routed import aux_loss
    from moelab.core.router import step_end
    from moelab.lora.remix import REMIX_NUM_SAMPLES, remix_rloo_step, remix_routers

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(train["lr"]), weight_decay=float(train["weight_decay"]))
    ids, labels, _ = data
    steps, batch = int(train["steps"]), int(train["batch_size"])
    warmup = min(int(train["warmup_steps"]), steps)
    early_at = max(1, round(EARLY_FRACTION * steps))
    rloo = bool(remix_routers(model))
    samples = int(train.get("rloo_samples") or REMIX_NUM_SAMPLES)
    order = torch.Generator().manual_seed(seed)
    perm = torch.randperm(ids.shape[0], generator=order)
    cursor = 0
    row: dict[str, float] = {}
    train_s = 0.0
    model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        if cursor + batch > perm.numel():  # a new epoch, reshuffled
            perm, cursor = torch.randperm(ids.shape[0], generator=order), 0
        pick = perm[cursor : cursor + batch]
        cursor += batch
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, warmup, float(train["lr"]))
        if rloo:
            ce, surrogate = remix_rloo_step(
                model, lambda m, b: sequence_losses(m, ids[b], labels[b]), pick, num_samples=samples
            )
            loss = ce + surrogate
        else:
            loss = model(ids[pick], labels=labels[pick]).ce_loss
        if num_experts is not None:
            loss = loss + aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step_end(model)
        train_s += time.perf_counter() - t0
        if val is not None and step + 1 == early_at:
            early = evaluate(model, val, num_experts)
            keys = EARLY_KEYS if num_experts is not None else ("val_loss",)
            row.update({f"{k}_early": early[k] for k in keys})
    row["train_s"] = train_s
    row["steps"] = float(steps)
    return row


def finetune_arm(
    base: nn.Module,
    arm: Arm,
    *,
    method: str,
    seed: int,
    train: dict[str, Any],
    data: tuple[Tensor, Tensor, Tensor],
    val: dict[str, tuple[Tensor, Tensor, Tensor]],
) -> dict[str, float]:
    """Put ``arm``'s mixture (``method``'s preset, ``arm.router`` / ``router_kwargs`` /
    ``aux_losses`` instead of the preset's) on a deep copy of ``base``, fine-tune it on ``data``
    (``finetune``) and measure on ``val`` (module docstring). Returns the arm's row."""
    from moelab.lora import apply

    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # the same LoRA and router initialisation in every arm
    apply(
        model,
        list(TARGETS),
        method=method,
        num_experts=NUM_EXPERTS,
        rank=RANK,
        router=arm.router,
        router_kwargs=dict(arm.router_kwargs),
        aux_losses=dict(arm.aux_losses),
    )
    row = finetune(model, seed=seed, train=train, data=data, val=val)
    timing = {k: row.pop(k) for k in ("train_s", "steps")}
    row.update(evaluate(model, val))
    row.update(timing)
    return row


def train_settings(
    defaults: dict[str, Any], train: dict[str, Any], extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``defaults`` with ``train``'s overrides of their keys (and of ``extra`` keys); ``threads``."""
    known = {*defaults, *extra}
    settings = {**defaults, **{k: v for k, v in train.items() if k in known and v is not None}}
    settings["threads"] = train.get("threads")
    return settings


def _settings(train: dict[str, Any]) -> dict[str, Any]:
    """``LORA_TRAIN`` with ``train``'s overrides of its keys and ``rloo_samples``; ``threads``."""
    return train_settings(LORA_TRAIN, train, ("rloo_samples",))


def run_lora_arms(
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path | None = None,
    progress: bool = False,
    console: Any = None,
    method: str,
    arms: dict[str, Arm],
    methods: dict[str, str] | None = None,
) -> Rows:
    """One seed of a LoRA-mixture reproduction (module docstring): the seed's base, then every
    arm of ``arms`` with ``method``'s mixture (``methods[label]`` instead where given). ``model``:
    ``MoELMConfig`` overrides (fields a dense byte model does not use are ignored); ``train``:
    ``LORA_TRAIN``'s keys, ``rloo_samples`` and ``threads``. Returns one row per arm and
    ``_base`` (the base's val loss on the tasks)."""
    from moelab.train.resources import torch_threads

    settings = _settings(train)
    base = pretrained_base(seed, {**LORA_MODEL, **model}, settings, progress, console)
    rows: Rows = {}
    with torch_threads(settings["threads"]):
        data, val = task_data(seed)
        base_row = evaluate(base, val, num_experts=None)
        for label, arm in arms.items():
            arm_method = (methods or {}).get(label, method)
            if progress and console is not None:
                console.print(f"{arm_method} seed {seed}: {label}")
            rows[label] = finetune_arm(
                base, arm, method=arm_method, seed=seed, train=settings, data=data, val=val
            )
    rows["_base"] = base_row
    return rows


# --------------------------------------------------------------------------------- adapter merging
def single_task_data(
    seed: int, tasks: tuple[str, ...]
) -> dict[str, tuple[tuple[Tensor, Tensor, Tensor], ...]]:
    """``{task: (train, val)}`` packed rows (``pack_examples``) of each task alone, for ``seed``."""
    from moelab.data.tasks import encode_examples, load_tasks
    from moelab.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    pad = tok.encode("\n")[0]
    loaded = load_tasks(tasks, seed=seed, sizes=TASK_SIZES)
    out = {}
    for name, t in loaded.items():
        train = list(t.examples("train"))
        random.Random(seed).shuffle(train)
        out[name] = (
            pack_examples(encode_examples(train, tok), SEQ_LEN, pad),
            pack_examples(encode_examples(t.examples("val"), tok), SEQ_LEN, pad),
        )
    return out


def _with_adapter(base: nn.Module, kind: str, seed: int) -> nn.Module:
    """A deep copy of ``base`` with a fresh ``kind`` adapter (``"flylora"``: ``apply_flylora`` at
    the paper's r = 32, k = 8, A from ``seed``; ``"lora"``: a one-expert ``moelab.lora`` mixture,
    a plain LoRA of rank ``MERGE_LORA_RANK``) on ``MERGE_TARGETS``. The same seed gives the same
    initialisation, so adapters of one kind share their starting point (FlyLoRA: its frozen A)."""
    from moelab.lora import apply, apply_flylora

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if kind == "flylora":
        apply_flylora(model, list(MERGE_TARGETS), seed=seed)
    elif kind == "lora":
        apply(
            model,
            list(MERGE_TARGETS),
            num_experts=1,
            top_k=1,
            rank=MERGE_LORA_RANK,
            alpha=MERGE_LORA_ALPHA,
            router="topk",
            aux_losses={},
        )
    else:
        raise ValueError(f"kind must be 'flylora' or 'lora', got {kind!r}")
    return model


def _adapter_state(model: nn.Module, kind: str) -> dict[str, Tensor]:
    """The adapter's tensors: ``flylora_state`` (A, B, bias), or every trainable parameter of the
    LoRA (its ``lora_A``, ``lora_B`` and the one-expert router, whose weight is always 1)."""
    from moelab.lora import flylora_state

    if kind == "flylora":
        return flylora_state(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_adapter(model: nn.Module, kind: str, state: dict[str, Tensor]) -> None:
    from moelab.lora import load_flylora_state

    if kind == "flylora":
        load_flylora_state(model, state)
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def merge_arm(
    base: nn.Module,
    kind: str,
    *,
    seed: int,
    train: dict[str, Any],
    tasks: dict[str, tuple[tuple[Tensor, Tensor, Tensor], ...]],
) -> dict[str, float]:
    """Train one ``kind`` adapter per task of ``tasks`` (``single_task_data``) from the same
    initialisation, merge them by averaging (``merge_flylora`` / ``merge_lora``: every tensor
    averaged, as FlyLoRA's ``fast_lora_average``) and measure each task's val loss with its own
    adapter (``own_<task>``) and with the merge (``merged_<task>``). ``degradation``: the mean
    over tasks of merged - own. ``train_s``: the adapters' fine-tuning seconds together."""
    from moelab.lora import merge_flylora, merge_lora

    row: dict[str, float] = {"train_s": 0.0}
    states = []
    for name, (data, val) in tasks.items():
        model = _with_adapter(base, kind, seed)
        done = finetune(model, seed=seed, train=train, data=data, num_experts=None)
        row["train_s"] += done["train_s"]
        row["steps"] = done["steps"]
        row[f"own_{name}"] = evaluate(model, {name: val}, num_experts=None)["val_loss"]
        states.append(_adapter_state(model, kind))
    merged = (merge_flylora if kind == "flylora" else merge_lora)(states)
    _load_adapter(model, kind, merged)
    for name, (_, val) in tasks.items():
        row[f"merged_{name}"] = evaluate(model, {name: val}, num_experts=None)["val_loss"]
    row["degradation"] = sum(row[f"merged_{t}"] - row[f"own_{t}"] for t in tasks) / len(tasks)
    return row


def run_merge_arms(
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path | None = None,
    progress: bool = False,
    console: Any = None,
    kinds: tuple[str, ...] = ("flylora", "lora"),
) -> Rows:
    """One seed of ``flylora_merge``: the seed's base (shared with the other LoRA reproductions),
    then ``merge_arm`` for each adapter kind on ``MERGE_TASKS``. ``_base``: the base's val loss
    per task (``own_<task>`` / ``merged_<task>`` keys, both the base's)."""
    from moelab.train.resources import torch_threads

    settings = _settings(train)
    base = pretrained_base(seed, {**LORA_MODEL, **model}, settings, progress, console)
    rows: Rows = {}
    with torch_threads(settings["threads"]):
        tasks = single_task_data(seed, MERGE_TASKS)
        base_row: dict[str, float] = {}
        for name, (_, val) in tasks.items():
            base_row[f"own_{name}"] = base_row[f"merged_{name}"] = evaluate(
                base, {name: val}, num_experts=None
            )["val_loss"]
        for kind in kinds:
            if progress and console is not None:
                console.print(f"flylora_merge seed {seed}: {kind}")
            rows[kind] = merge_arm(base, kind, seed=seed, train=settings, tasks=tasks)
    rows["_base"] = base_row
    return rows


# --------------------------------------------------------------------------------- the reproductions
def _routing_text(r: dict[str, float]) -> str:
    return (
        f"entropy {fmt(r['entropy'])}, max/mean load {fmt(r['max_over_mean'])} (CV {fmt(r['usage_cv'])}), "
        f"ESS {fmt(r['ess'])}, task MI {fmt(r['task_mi'])}, val loss {r['val_loss']:.3f}"
    )


def _describe_pair(on: str, off: str, what: str) -> Any:
    def describe(r: Rows) -> str:
        tasks = ", ".join(
            f"{t} {r[on][f'val_loss_{t}']:.3f} / {r[off][f'val_loss_{t}']:.3f}" for t in LORA_TASKS
        )
        return (
            f"{what}; after {r[on]['steps']:.0f} steps on {', '.join(LORA_TASKS)} (mean over seeds, "
            f"{NUM_EXPERTS} experts of rank {RANK} on qkv/out/gate_up/down of a {LORA_MODEL['n_layers']}-layer "
            f"d={LORA_MODEL['d_model']} byte LM): {on}: {_routing_text(r[on])}; {off}: {_routing_text(r[off])}. "
            f"Val loss after {EARLY_FRACTION:.2g} of the steps {r[on]['val_loss_early']:.3f} / "
            f"{r[off]['val_loss_early']:.3f}; per task {tasks}; base (no mixture) {r['_base']['val_loss']:.3f}; "
            f"{r[on]['train_s']:.0f} s / {r[off]['train_s']:.0f} s per arm"
        )

    return describe


def _arms_without(method: str, loss: str, on: str, off: str) -> dict[str, Arm]:
    """Two arms of ``method``'s preset: ``on`` with every preset loss, ``off`` without ``loss``."""
    from moelab.lora.presets import get_preset

    preset = get_preset(method)
    kwargs = dict(preset.router_kwargs)
    rest = {k: v for k, v in preset.aux_losses.items() if k != loss}
    return {on: Arm(preset.router, kwargs, dict(preset.aux_losses)), off: Arm(preset.router, kwargs, rest)}


LORA_MIXER_ARMS = _arms_without("lora_mixer", "tsallis_entropy", "entropy_on", "entropy_off")
DYNMOLE_ARMS = _arms_without("dynmole", "tsallis_entropy", "tsallis", "no_tsallis")

LORA_MIXER_ENTROPY = Reproduction(
    name="lora_mixer_entropy",
    method="lora_mixer",
    paper="LoRA-Mixer (hustcselwb 2025): specialisation balance loss (its form ours); PAPERS.md B",
    claim=(
        "The entropy-shaping term of LoRA-Mixer's specialisation balance loss lowers the per-token router "
        "entropy while expert usage stays balanced (max/mean load no worse by more than "
        f"{BALANCE_MARGIN})."
    ),
    arms=LORA_MIXER_ARMS,
    conditions=(
        lower("entropy", "entropy_on", "entropy_off", name="router entropy / log E"),
        Condition(
            "max/mean load: entropy_on - entropy_off",
            diff("max_over_mean", "entropy_on", "entropy_off"),
            "lower",
            threshold=BALANCE_MARGIN,
        ),
    ),
    describe=_describe_pair(
        "entropy_on", "entropy_off", "hard-soft top-2, load balance 1e-2, entropy term 1e-2 on / off"
    ),
    model=LORA_MODEL,
    train=dict(LORA_TRAIN),
    runner=functools.partial(run_lora_arms, method="lora_mixer", arms=LORA_MIXER_ARMS),
)

DYNMOLE_ENTROPY = Reproduction(
    name="dynmole_entropy",
    method="dynmole",
    paper="DynMoLE (Li et al. 2025); code mikecovlee/DynMoLE; PAPERS.md B",
    claim=(
        "DynMoLE's Tsallis entropy loss lowers the router's entropy and speeds convergence (a lower val loss "
        f"after {EARLY_FRACTION:.2g} of the fine-tuning steps)."
    ),
    arms=DYNMOLE_ARMS,
    conditions=(
        lower("entropy", "tsallis", "no_tsallis", name="router entropy / log E"),
        lower("val_loss_early", "tsallis", "no_tsallis", name="val loss at 1/3 of the steps"),
    ),
    describe=_describe_pair(
        "tsallis",
        "no_tsallis",
        "tsallis_topp (top-p 0.75, threshold 0.9), Tsallis loss 1e-2 on / off, load balance 1e-3",
    ),
    model=LORA_MODEL,
    train=dict(LORA_TRAIN),
    runner=functools.partial(run_lora_arms, method="dynmole", arms=DYNMOLE_ARMS),
)


def _mole_router_kwargs() -> dict[str, Any]:
    from moelab.lora.presets import get_preset

    return dict(get_preset("mole").router_kwargs)


# ReMix against a softmax MoLoRA without balancing (the collapse ReMix's paper describes is of an
# unbalanced router; MixLoRA's balance loss would hide it). The same top-2 and experts in both.
REMIX_ARMS = {
    "remix": Arm("remix", {}, {}),
    "mole": Arm("topk", dict(_mole_router_kwargs()), {}),
}
REMIX_METHODS = {"remix": "remix", "mole": "mole"}
# ReMix runs M = 4 forwards and backwards per step (RLOO), about 4x a MoLoRA step: 48 steps keep
# one seed of both arms near a minute at 2 threads (our choice). The base is the other
# reproductions' (same pretraining and batch).
REMIX_TRAIN = {**LORA_TRAIN, "steps": 48, "warmup_steps": 5, "rloo_samples": 4}
ESS_MARGIN = 0.2  # ReMix's combine-weight ESS must exceed MoLoRA's by more than this (ours)


def _describe_remix(r: Rows) -> str:
    def arm(label: str) -> str:
        x = r[label]
        return (
            f"{label}: combine-weight ESS {fmt(x['ess'])} (early {fmt(x['ess_early'])}), router ESS "
            f"{fmt(x['router_ess'])} of {NUM_EXPERTS} (early {fmt(x['router_ess_early'])}), entropy "
            f"{fmt(x['entropy'])}, max/mean load {fmt(x['max_over_mean'])}, val loss {x['val_loss']:.3f} "
            f"({x['train_s']:.0f} s)"
        )

    return (
        f"top-2 of {NUM_EXPERTS} LoRA experts of rank {RANK} on qkv/out/gate_up/down of a "
        f"{LORA_MODEL['n_layers']}-layer d={LORA_MODEL['d_model']} byte LM, {r['remix']['steps']:.0f} steps on "
        f"{', '.join(LORA_TASKS)} (mean over seeds). ReMix (equal weights 1/2, RLOO with M = "
        f"{REMIX_TRAIN['rloo_samples']}, top-k at eval) vs softmax MoLoRA (MixLoRA's renormalised top-2, no "
        f"balance loss); ESS = 1 / sum w^2 on the val tokens. {arm('remix')}; {arm('mole')}; base val loss "
        f"{r['_base']['val_loss']:.3f}"
    )


REMIX_ESS = Reproduction(
    name="remix_ess",
    method="remix",
    paper="ReMix (Qiu et al., ICLR 2026, arXiv 2603.10160; no code published); PAPERS.md B.6",
    claim=(
        "ReMix keeps the effective number of experts (ESS = 1 / sum w^2 of the combine weights) near k, "
        "while a softmax MoLoRA's router (no balance loss) collapses toward 1: ReMix's ESS exceeds "
        f"MoLoRA's by more than {ESS_MARGIN}."
    ),
    arms=REMIX_ARMS,
    # diff > ESS_MARGIN as the threshold (not a band around 0): a MoLoRA within the margin of k
    # has not collapsed, and the claim then does not hold.
    conditions=(
        Condition(
            "combine-weight ESS: remix - mole", diff("ess", "remix", "mole"), "higher", threshold=ESS_MARGIN
        ),
    ),
    describe=_describe_remix,
    model=LORA_MODEL,
    train=dict(REMIX_TRAIN),
    runner=functools.partial(run_lora_arms, method="remix", arms=REMIX_ARMS, methods=REMIX_METHODS),
)


def _describe_merge(r: Rows) -> str:
    def arm(label: str) -> str:
        x = r[label]
        tasks = ", ".join(f"{t} {x[f'own_{t}']:.3f} -> {x[f'merged_{t}']:.3f}" for t in MERGE_TASKS)
        return f"{label}: {tasks}, degradation {x['degradation']:+.3f} ({x['train_s']:.0f} s)"

    base = ", ".join(f"{t} {r['_base'][f'own_{t}']:.3f}" for t in MERGE_TASKS)
    return (
        f"two adapters ({' and '.join(MERGE_TASKS)}) trained separately for {r['flylora']['steps']:.0f} steps each "
        f"from the same initialisation, merged by averaging; val loss own adapter -> merged (mean over seeds). "
        f"FlyLoRA r = 32, k = 8, alpha 64 (paper); LoRA r = {MERGE_LORA_RANK}, alpha {MERGE_LORA_ALPHA:g}; on "
        f"{'/'.join(MERGE_TARGETS)} of the {LORA_MODEL['n_layers']}-layer d={LORA_MODEL['d_model']} byte LM. "
        f"{arm('flylora')}; {arm('lora')}; base {base}"
    )


FLYLORA_MERGE = Reproduction(
    name="flylora_merge",
    method="flylora",
    paper="FlyLoRA (Zou et al., NeurIPS 2025); code gfyddha/FlyLoRA merge_lora_adapters.py; PAPERS.md B",
    claim=(
        "Merging two task adapters by averaging degrades FlyLoRA less than LoRA (degradation = the mean "
        "over the two tasks of merged val loss - own-adapter val loss)."
    ),
    arms={"flylora": Arm("flylora"), "lora": Arm("topk", {}, {})},
    conditions=(lower("degradation", "flylora", "lora", name="merge degradation"),),
    describe=_describe_merge,
    model=LORA_MODEL,
    train=dict(MERGE_TRAIN),
    runner=run_merge_arms,
)


# --------------------------------------------------------------------------------- continual tuning (DyMoE)
# dymoe_forgetting: a 3-task sequence on one DyMoE mixture (our choices: DYMOE_TASKS in the order
# of the multi-task reproductions; 2 experts per task, so the first expansion starts near an even
# old / new split; 40 steps per task keep one seed of both arms near a minute at 2 threads: task 1
# is trained once and shared, each arm then trains tasks 2 and 3).
DYMOE_TASKS = LORA_TASKS
DYMOE_EXPERTS_PER_TASK = 2
DYMOE_TRAIN = {**LORA_TRAIN, "steps": 40, "warmup_steps": 4}


def new_group_drift(model: nn.Module, val: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
    """On ``val``'s real tokens, under the ``guidance`` already active on ``model``: ``drift``,
    the mean router mass on the newest expert group (``layer.new_group_mass``), and
    ``new_typed``, the share of tokens typed NEW (those TAG leaves on the new experts), both
    averaged over the expanded layers."""
    from moelab.lora.dymoe import NEW, expanded_layers

    layers = list(expanded_layers(model).values())
    if not layers:
        raise ValueError("new_group_drift: the model has no expanded mixture layer")
    ids, _, mask = val
    mass, typed, tokens = 0.0, 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, ids.shape[0], EVAL_ROWS):
            chunk = slice(lo, lo + EVAL_ROWS)
            model(ids[chunk])
            valid_T = mask[chunk].reshape(-1)
            tokens += int(valid_T.sum())
            for layer in layers:
                mass += float(layer.new_group_mass[valid_T].sum())
                typed += float((layer.token_types[valid_T] == NEW).sum())
    model.train(was_training)
    n = max(1, tokens) * len(layers)
    return {"drift": mass / n, "new_typed": typed / n}


def continual_arm(
    model: nn.Module,
    *,
    tag: bool,
    seed: int,
    train: dict[str, Any],
    tasks: dict[str, tuple[tuple[Tensor, Tensor, Tensor], ...]],
    row: dict[str, float],
) -> dict[str, float]:
    """Continue a DyMoE mixture trained on the first task of ``tasks`` (``{task: (train, val)}``,
    in order) through the others: per task ``expand`` by ``DYMOE_EXPERTS_PER_TASK``, then
    ``finetune`` on that task alone under ``guidance`` (typing and RSR always, TAG when ``tag``;
    the documented defaults: thresholds 0.2 / 0.5, RSR 1e-2 + 1e-2), ``after_<task>`` its val loss right after. Final metrics
    under the last task's guidance: ``val_loss_<task>``, ``val_loss``, ``forgetting`` (mean over
    all but the last task of final - after), ``drift`` / ``new_typed`` (``new_group_drift``,
    mean over the old tasks), ``train_s`` (all tasks). ``row`` holds the first task's
    ``after_<task>`` and ``train_s``."""
    from moelab.lora.dymoe import expand, guidance

    names = list(tasks)
    row = dict(row)
    for name in names[1:]:
        expand(model, DYMOE_EXPERTS_PER_TASK)
        data, val = tasks[name]
        with guidance(model, tag=tag):
            done = finetune(model, seed=seed, train=train, data=data)
            row[f"after_{name}"] = evaluate(model, {name: val}, num_experts=None)["val_loss"]
        row["train_s"] += done["train_s"]
        row["steps"] = done["steps"]
    old = names[:-1]
    with guidance(model, tag=tag):
        for name in names:
            row[f"val_loss_{name}"] = evaluate(model, {name: tasks[name][1]}, num_experts=None)["val_loss"]
        drifts = [new_group_drift(model, tasks[name][1]) for name in old]
    row["val_loss"] = sum(row[f"val_loss_{t}"] for t in names) / len(names)
    row["forgetting"] = sum(row[f"val_loss_{t}"] - row[f"after_{t}"] for t in old) / len(old)
    for key in ("drift", "new_typed"):
        row[key] = sum(d[key] for d in drifts) / len(drifts)
    return row


def run_dymoe_arms(
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path | None = None,
    progress: bool = False,
    console: Any = None,
) -> Rows:
    """One seed of ``dymoe_forgetting``: the seed's base (shared with the other LoRA
    reproductions), a ``dymoe`` mixture of ``DYMOE_EXPERTS_PER_TASK`` experts (rank ``RANK``) on
    ``TARGETS`` trained on the first of ``DYMOE_TASKS`` alone (once, shared by both arms), then
    ``continual_arm`` with TAG (``tag``) and without (``no_tag``) from deep copies of it.
    ``_base``: the base's val loss per task (``val_loss_<task>`` and ``after_<task>``)."""
    from moelab.lora import apply
    from moelab.train.resources import torch_threads

    settings = _settings(train)
    base = pretrained_base(seed, {**LORA_MODEL, **model}, settings, progress, console)
    rows: Rows = {}
    with torch_threads(settings["threads"]):
        tasks = single_task_data(seed, DYMOE_TASKS)
        base_row: dict[str, float] = {}
        for name, (_, val) in tasks.items():
            base_row[f"val_loss_{name}"] = base_row[f"after_{name}"] = evaluate(
                base, {name: val}, num_experts=None
            )["val_loss"]
        first = DYMOE_TASKS[0]
        torch.manual_seed(seed)
        apply(base, list(TARGETS), method="dymoe", num_experts=DYMOE_EXPERTS_PER_TASK, rank=RANK)
        data, val = tasks[first]
        done = finetune(base, seed=seed, train=settings, data=data)
        start = {f"after_{first}": evaluate(base, {first: val}, num_experts=None)["val_loss"]}
        start["train_s"] = done["train_s"]
        for label, tag in (("tag", True), ("no_tag", False)):
            if progress and console is not None:
                console.print(f"dymoe_forgetting seed {seed}: {label}")
            torch.manual_seed(seed)  # the same new experts and router rows in both arms
            rows[label] = continual_arm(
                copy.deepcopy(base), tag=tag, seed=seed, train=settings, tasks=tasks, row=start
            )
    base_row["val_loss"] = sum(base_row[f"val_loss_{t}"] for t in DYMOE_TASKS) / len(DYMOE_TASKS)
    rows["_base"] = base_row
    return rows


def _describe_dymoe(r: Rows) -> str:
    def arm(label: str) -> str:
        x = r[label]
        tasks = ", ".join(f"{t} {x[f'after_{t}']:.3f} -> {x[f'val_loss_{t}']:.3f}" for t in DYMOE_TASKS)
        return (
            f"{label}: {tasks}; forgetting {x['forgetting']:+.3f}, old-task routing mass on the newest experts "
            f"{fmt(x['drift'])} (typed new {fmt(x['new_typed'])}) ({x['train_s']:.0f} s)"
        )

    base = ", ".join(f"{t} {r['_base'][f'val_loss_{t}']:.3f}" for t in DYMOE_TASKS)
    return (
        f"{' -> '.join(DYMOE_TASKS)}, {r['tag']['steps']:.0f} steps per task, {DYMOE_EXPERTS_PER_TASK} new "
        f"LoRA experts of rank {RANK} per task (old frozen, top-2) on qkv/out/gate_up/down of the "
        f"{LORA_MODEL['n_layers']}-layer d={LORA_MODEL['d_model']} byte LM; RSR 1e-2 + 1e-2 in both arms, TAG on / "
        f"off; val loss right after its task -> after the sequence (mean over seeds). {arm('tag')}; "
        f"{arm('no_tag')}; base {base}"
    )


DYMOE_FORGETTING = Reproduction(
    name="dymoe_forgetting",
    method="dymoe",
    paper="LLaVA-DyMoE (continual tuning with a dynamic LoRA MoE; no code published); PAPERS.md §B.10",
    claim=(
        "TAG (token assignment guidance) reduces old-task forgetting in a 3-task sequence (forgetting = the "
        "mean over the first two tasks of final val loss - val loss right after training that task)."
    ),
    arms={"tag": Arm("topk", {"normalize": True}, {}), "no_tag": Arm("topk", {"normalize": True}, {})},
    conditions=(lower("forgetting", "tag", "no_tag", name="old-task forgetting"),),
    describe=_describe_dymoe,
    model=LORA_MODEL,
    train=dict(DYMOE_TRAIN),
    runner=run_dymoe_arms,
)

LORA: list[Reproduction] = [LORA_MIXER_ENTROPY, DYNMOLE_ENTROPY, REMIX_ESS, FLYLORA_MERGE, DYMOE_FORGETTING]
