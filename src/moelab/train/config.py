"""``TrainConfig`` (everything about a run that is not the model) and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

# Fields a resumed run may change: they decide how long to go on, how often to look, where to
# run and how many threads to use, not which weights the steps produce.
RESUME_MAY_CHANGE = frozenset(
    {
        "steps",
        "eval_every",
        "eval_batches",
        "final_eval_batches",
        "ckpt_every",
        "keep_checkpoints",
        "log_every",
        "device",
        "threads",
    }
)


@dataclass
class TrainConfig:
    """Everything about a run that is not the model.

    Attributes:
        steps: optimizer steps in the run (the cosine schedule ends here).
        batch_size: sequences (examples) per step *per rank*; the global batch is ``batch_size * world_size``.
        seq_len: tokens per sequence (token data only).
        lr, min_lr_ratio: peak learning rate; the cosine decays to ``lr * min_lr_ratio``.
        warmup_steps: linear warmup from ``lr / warmup_steps`` to ``lr``.
        weight_decay: AdamW decay on matrices (``dim >= 2``); norms and biases are not decayed.
        beta1, beta2, eps: AdamW.
        grad_clip: max global gradient norm (0 disables clipping).
        bf16: run forward/backward under bf16 autocast (weights and optimizer stay fp32).
        eval_every: evaluate every N steps (0: only at the end); always at the last step.
        eval_batches: val batches per evaluation (global, spread over ranks).
        final_eval_batches: val batches of the final evaluation, the one the result reports
            (0: ``eval_batches``). More windows make the final val loss's standard error
            smaller without slowing the evaluations along the way; the loss curve keeps the
            ``eval_batches`` windows at every point, the last one included.
        ckpt_every: write a checkpoint every N steps (0: none); ``keep_checkpoints`` newest kept.
        seed: seeds model init, data order and every RNG.
        data: ``"stdlib"``, text files/folders (comma separated), or ``"hf:NAME"``.
        tokenizer: ``"bytes"`` or ``"bpe"``; ``bpe_vocab_size`` for the latter.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        log_every: progress refresh interval in steps.
        locality: after the final evaluation, also measure each MoE layer's local routing
            consistency and expert-cache hit rates on the val windows
            (``moelab.analysis.locality``: SRP and SCH at L = 16, caches of 2k experts);
            ``TrainResult.locality`` holds them. Off by default (a second or two per layer).
        diagnostics: losses whose ``diagnostics(layer)`` the result records on every routed layer
            they apply to, also where the layer does not train with them (a baseline arm's ERC
            coupling); a layer's own losses are always diagnosed. Default: none (ERC's costs
            ``E^2`` expert-gate activations per layer).
        ep: expert parallelism: shard every MoE layer's experts over this many processes
            (``moelab.parallel.sharding.shard_experts``, dispatcher ``ep``); 1 is off. Under
            torchrun it must equal the number of processes (each is also a data-parallel replica
            of the non-expert weights) and divide every layer's expert count.
        threads: PyTorch intra-op threads while training on CPU; 0 picks
            ``moelab.train.resources.DEFAULT_THREADS`` (1: measured fastest for these model sizes,
            see docs/training.md). The previous count is restored when ``train()`` returns.
    """

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    bf16: bool = False
    eval_every: int = 100
    eval_batches: int = 8
    final_eval_batches: int = 0
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    data: str = "stdlib"
    tokenizer: str = "bytes"
    bpe_vocab_size: int = 4096
    device: str = "cpu"
    log_every: int = 5
    locality: bool = False
    diagnostics: list[str] = field(default_factory=list)
    threads: int = 0
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every", "keep_checkpoints", "ep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "final_eval_batches", "ckpt_every", "seed", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.grad_clip and weight_decay must be >= 0")
        if not isinstance(self.diagnostics, (list, tuple)) or not all(
            isinstance(n, str) for n in self.diagnostics
        ):
            raise TypeError(f"TrainConfig.diagnostics must be a list of loss names, got {self.diagnostics!r}")
        self.diagnostics = list(self.diagnostics)
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"TrainConfig.device must be 'cpu', 'cuda[:i]' or 'auto', got {self.device!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * progress))


def config_diff(
    saved: dict[str, Any], current: dict[str, Any], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """``["seed: 0 -> 1", ...]``: the fields whose values differ (``saved -> current``), sorted."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<unset>"), current.get(key, "<unset>")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
