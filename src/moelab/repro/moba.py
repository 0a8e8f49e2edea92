"""``moba`` (``moelab repro moba``): does MoBA recall better with smaller blocks and a key convolution?

FlashMoBA (mit-han-lab/flash-moba; PAPERS.md "other" sec. A.5) argues that MoBA's gate, the score
``q · mean(K_j)`` of each key block, finds the block holding a query's match with a signal-to-noise
ratio that grows like ``sqrt(d / B)``: a smaller block ``B`` (with ``top_k`` raised to keep the same
keys per query) and a short causal depthwise convolution on the keys (``key_conv``) let it route
better, until small-block MoBA with the convolution matches dense attention on associative recall.

The check, per seed, on multi-query associative recall over a long context
(``moelab.data.recall``: ``RECALL_TASK`` pairs scattered through noise, then every key asked
again): the same ``MoELM`` (``RECALL_MODEL``, dense FFNs; the arms differ only in attention) trained
from the same initialisation on the same batches, with

- ``dense``: causal ``scaled_dot_product_attention``;
- ``moba_large``: MoBA, ``LARGE`` (block 32, top 2: 64 keys per query, half the context);
- ``moba_small``: MoBA, ``SMALL`` (block 8, top 8: the same 64 keys);
- ``moba_small_kconv``: ``SMALL`` with a learnable causal key convolution of width 3.

The training objective is the cross-entropy of the asked values only (Zoology's); AdamW, linear
warm-up then cosine decay (our choices, ``RECALL_TRAIN``). Measured per arm on ``EVAL_SEQUENCES``
held-out sequences: ``recall`` (share of queries answered, argmax), ``val_loss`` (the values'
cross-entropy) and ``train_s``. The claim is judged on ``recall``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moelab.repro.rules import Arm, Condition, Reproduction, Rows, diff, higher

RECALL_TASK = {"seq_len": 128, "num_pairs": 8, "num_keys": 32, "num_values": 32, "num_noise": 32}
RECALL_MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "moe_every": 1000, "max_seq_len": 128}
RECALL_TRAIN = {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup_steps": 40, "weight_decay": 0.0}
EVAL_SEQUENCES = 256
LARGE = {"block_size": 32, "top_k": 2}
SMALL = {"block_size": 8, "top_k": 8}
ARMS = {
    "dense": {"attention": "sdpa"},
    "moba_large": {"attention": "moba", "attention_kwargs": dict(LARGE)},
    "moba_small": {"attention": "moba", "attention_kwargs": dict(SMALL)},
    "moba_small_kconv": {"attention": "moba", "attention_kwargs": {**SMALL, "key_conv": 3}},
}
RECALL_MARGIN = 0.02  # recall differences under 2 points count as ties (our choice)


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def _values_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


def train_recall_arm(
    config: dict[str, Any],
    *,
    seed: int,
    task: dict[str, Any],
    train: dict[str, Any],
    eval_ids: torch.Tensor,
    eval_labels: torch.Tensor,
) -> dict[str, float]:
    """Train one ``MoELM`` (``config``: ``MoELMConfig`` fields) on MQAR batches drawn with ``seed``;
    return its held-out ``recall``, ``val_loss`` and ``train_s``."""
    from moelab.data.recall import associative_recall_batch, recall_accuracy
    from moelab.models.config import MoELMConfig
    from moelab.models.lm import MoELM

    torch.manual_seed(seed)
    model = MoELM(MoELMConfig.from_dict(config))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=train["lr"],
        betas=(0.9, 0.98),
    )
    data = torch.Generator().manual_seed(seed)
    steps = int(train["steps"])
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        ids, labels = associative_recall_batch(int(train["batch_size"]), generator=data, **task)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, int(train["warmup_steps"]), float(train["lr"]))
        loss = _values_loss(model(ids).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    logits = []
    with torch.no_grad():
        for chunk in eval_ids.split(32):
            logits.append(model(chunk).logits)
    out = torch.cat(logits)
    return {
        "recall": recall_accuracy(out, eval_labels),
        "val_loss": float(_values_loss(out, eval_labels)),
        "train_s": train_s,
    }


def run_moba_recall(
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path | None = None,
    progress: bool = False,
    console: Any = None,
) -> Rows:
    """One seed of ``moba`` (module docstring). ``model``: ``MoELMConfig`` overrides (the
    reproduction's ``RECALL_MODEL`` on top of ``moelab repro``'s defaults; fields the task fixes,
    the vocabulary and the router settings of an MoE model, are ignored); ``train``: ``steps``,
    ``batch_size``, ``lr``, ``warmup_steps``, ``weight_decay``, ``threads``. Returns one row per arm."""
    from moelab.data.recall import associative_recall_batch, recall_vocab_size
    from moelab.models.config import MoELMConfig
    from moelab.train.resources import torch_threads

    task = dict(RECALL_TASK)
    settings = {**RECALL_TRAIN, **{k: v for k, v in train.items() if k in RECALL_TRAIN and v is not None}}
    known = {"d_model", "n_layers", "n_heads", "moe_every", "max_seq_len", "rope_theta", "dense_hidden"}
    base = {k: v for k, v in model.items() if k in known and k in MoELMConfig.__dataclass_fields__}
    base["vocab_size"] = recall_vocab_size(task["num_keys"], task["num_values"], task["num_noise"])
    base["max_seq_len"] = max(int(base.get("max_seq_len", 0)), task["seq_len"])
    eval_ids, eval_labels = associative_recall_batch(
        EVAL_SEQUENCES, generator=torch.Generator().manual_seed(1_000_003 + seed), **task
    )
    rows: Rows = {}
    with torch_threads(train.get("threads")):
        for label, arm in ARMS.items():
            if progress and console is not None:
                console.print(f"moba seed {seed}: {label}")
            rows[label] = train_recall_arm(
                {**base, **arm},
                seed=seed,
                task=task,
                train=settings,
                eval_ids=eval_ids,
                eval_labels=eval_labels,
            )
    return rows


def _describe(r: Rows) -> str:
    parts = [
        f"{label} {r[label]['recall']:.3f} (val loss {r[label]['val_loss']:.3f}, {r[label]['train_s']:.0f} s)"
        for label in ARMS
    ]
    return (
        f"recall accuracy on {EVAL_SEQUENCES} held-out sequences (S = {RECALL_TASK['seq_len']}, "
        f"{RECALL_TASK['num_pairs']} pairs, {RECALL_TRAIN['steps']} steps): " + "; ".join(parts)
    )


MOBA_RECALL = Reproduction(
    name="moba",
    method="moba",
    paper="MoBA (Lu et al. 2025) with FlashMoBA's small blocks and key convolution; cheap check of PAPERS.md A.5",
    claim=(
        "On long-context associative recall, MoBA at the same keys per query recalls better with small blocks "
        "(8 x top 8) than with large ones (32 x top 2), better still with a causal key convolution, and "
        "small blocks with the convolution match dense attention."
    ),
    arms={label: Arm("none", {}, {}, dict(arm)) for label, arm in ARMS.items()},
    model=RECALL_MODEL,
    train=dict(RECALL_TRAIN),
    conditions=(
        higher("recall", "moba_small", "moba_large", margin=RECALL_MARGIN),
        higher("recall", "moba_small_kconv", "moba_small", margin=RECALL_MARGIN),
        Condition(
            "recall: moba_small_kconv - dense",
            diff("recall", "moba_small_kconv", "dense"),
            "higher",
            threshold=-RECALL_MARGIN,
        ),
    ),
    describe=_describe,
    runner=run_moba_recall,
)
