"""The training loop for ``MoELM``: AdamW, warmup + cosine, clipping, eval, exact-resume checkpoints, DDP.

    trainer = Trainer(MoELMConfig(d_model=128), TrainConfig(steps=300), out_dir="runs/x")
    result = trainer.train()            # or train(resume=True) after an interruption

One optimizer step per batch: forward (optionally under bf16 autocast), ``loss = CE + aux``,
backward, gradient clipping, ``AdamW.step``, then ``moelab.step_end(model)`` (routers' updates
outside autograd, e.g. DeepSeek-V3's expert bias).

Checkpoints (every ``ckpt_every`` steps, under ``out_dir/checkpoints/step_NNNNNNN/``) hold no
pickle: ``config.json`` + ``model.safetensors`` (a ``MoELM.from_pretrained`` directory), the
optimizer's tensors in ``optimizer.safetensors``, the torch RNG states in ``rng.safetensors``,
and ``trainer_state.json`` (step, data position, Python RNG state, optimizer hyper-parameters,
the train config and the loss history). Resuming restores all of it, so a run interrupted after
a checkpoint and resumed ends with bit-identical weights (CPU, fp32) to one that never stopped.

Under ``torchrun`` (``WORLD_SIZE > 1``) the model is wrapped in ``DistributedDataParallel``
(gloo on CPU, nccl on GPU); each rank reads its own slice of every global batch, evaluation is
sharded and all-reduced, and only rank 0 prints and writes files.
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from moelab.analysis.locality import layer_locality
from moelab.core.context import RoutingContext
from moelab.core.router import step_end
from moelab.core.tracing import trace
from moelab.data import Batches, Data, eval_batches, load_data
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM

CKPT_DIRNAME = "checkpoints"
LATEST = "latest"


@dataclass
class TrainConfig:
    """Everything about a run that is not the model.

    Attributes:
        steps: optimizer steps in the run (the cosine schedule ends here).
        batch_size: sequences per step *per rank*; the global batch is ``batch_size * world_size``.
        seq_len: tokens per sequence.
        lr, min_lr_ratio: peak learning rate; the cosine decays to ``lr * min_lr_ratio``.
        warmup_steps: linear warmup from ``lr / warmup_steps`` to ``lr``.
        weight_decay: AdamW decay on matrices (``dim >= 2``); norms and biases are not decayed.
        beta1, beta2, eps: AdamW.
        grad_clip: max global gradient norm (0 disables clipping).
        bf16: run forward/backward under bf16 autocast (weights and optimizer stay fp32).
        eval_every: evaluate every N steps (0: only at the end); always at the last step.
        eval_batches: val batches per evaluation (global, spread over ranks).
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
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    data: str = "stdlib"
    tokenizer: str = "bytes"
    bpe_vocab_size: int = 4096
    device: str = "cpu"
    log_every: int = 5
    locality: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "log_every", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.grad_clip and weight_decay must be >= 0")
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


# ---------------------------------------------------------------------------------------------
# Routing statistics during training (cheap: counts only, from a hook on each router)
# ---------------------------------------------------------------------------------------------
class RoutingMonitor:
    """Per-layer expert loads of every training forward, from a forward hook on each router.

    ``last_imbalance()``: the largest max/mean expert load over MoE layers in the last forward.
    ``totals()``: loads, drops and token counts summed since the last ``reset()``.
    """

    def __init__(self, model: MoELM) -> None:
        self.handles = []
        self.last: dict[int, Tensor] = {}
        self.reset()
        for idx, moe in model.moe_layers():
            self.handles.append(moe.router.register_forward_hook(self._hook(idx)))

    def reset(self) -> None:
        self.load: dict[int, Tensor] = {}
        self.requested: dict[int, float] = {}
        self.assigned: dict[int, float] = {}

    def _hook(self, idx: int) -> Callable:
        def fn(module: nn.Module, args: Any, routing: Any) -> None:
            if not module.training:
                return
            counts = routing.tokens_per_expert().detach()
            self.last[idx] = counts
            self.load[idx] = counts.double() if idx not in self.load else self.load[idx] + counts.double()
            n = float(routing.num_assignments)
            req = float(routing.requested.sum()) if routing.requested is not None else n
            self.requested[idx] = self.requested.get(idx, 0.0) + req
            self.assigned[idx] = self.assigned.get(idx, 0.0) + n

        return fn

    def last_imbalance(self) -> float:
        vals = [float(c.max()) / max(float(c.float().mean()), 1e-9) for c in self.last.values()]
        return max(vals) if vals else float("nan")

    def drop_rate(self) -> float:
        req = sum(self.requested.values())
        return 0.0 if req == 0 else 1.0 - sum(self.assigned.values()) / req

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    """``(rank, world_size)``; initialises the default process group under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
        if dev.index is None and "LOCAL_RANK" in os.environ:
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


# ---------------------------------------------------------------------------------------------
# Checkpoint (de)serialisation: safetensors + JSON, never pickle
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


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints`` (or ``out_dir`` itself), or None."""
    d = Path(out_dir)
    root = d / CKPT_DIRNAME if (d / CKPT_DIRNAME).is_dir() else d
    if (root / "trainer_state.json").is_file():
        return root
    steps = sorted(p for p in root.glob("step_*") if (p / "trainer_state.json").is_file())
    return steps[-1] if steps else None


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a run measured. ``routing`` is ``moelab.trace``'s per-layer summary on the val set."""

    step: int
    val_loss: float
    val_ppl: float
    tokens_per_s: float
    train_time_s: float
    history: dict[str, list[float]]
    train_cpu_time_s: float = 0.0
    tokens_per_cpu_s: float = 0.0
    threads: int = 1
    routing: list[dict[str, Any]] = field(default_factory=list)
    load: list[list[float]] = field(default_factory=list)  # [layers, E]: share of assignments / (1/E)
    no_expert_rate: float = 0.0  # share of val tokens that no expert processed
    locality: list[dict[str, Any]] = field(default_factory=list)  # per layer, with TrainConfig.locality
    train_drop_rate: float = 0.0
    params: int = 0
    active_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Train a ``MoELM`` (see the module docstring).

    Args:
        model_config: the model; its ``vocab_size`` is set from the tokenizer.
        train_config: the run.
        out_dir: where checkpoints and the final model go (None: write nothing).
        data: pre-loaded ``Data`` (else loaded from ``train_config.data``/``tokenizer``).
        progress: show a rich progress bar (rank 0 only).
        description: the progress bar's label.
        console: a ``rich.console.Console`` for the bar and messages (default: a new one).
    """

    def __init__(
        self,
        model_config: MoELMConfig,
        train_config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        data: Data | None = None,
        progress: bool = True,
        description: str = "train",
        console: Any = None,
    ) -> None:
        self.cfg = train_config
        self.device = resolve_device(train_config.device)
        self.rank, self.world_size = init_distributed(self.device)
        self.is_main = self.rank == 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress and self.is_main
        self.description = description
        self.console = console
        if data is None:
            sources = train_config.data.split(",") if "," in train_config.data else train_config.data
            data = load_data(sources, train_config.tokenizer, bpe_vocab_size=train_config.bpe_vocab_size)
        self.data = data
        if model_config.vocab_size != data.vocab_size:
            model_config = MoELMConfig.from_dict({**model_config.to_dict(), "vocab_size": data.vocab_size})
        if model_config.max_seq_len < train_config.seq_len:
            raise ValueError(
                f"seq_len={train_config.seq_len} exceeds the model's max_seq_len={model_config.max_seq_len}"
            )
        self.model_config = model_config

        torch.manual_seed(train_config.seed)
        random.seed(train_config.seed)
        self.model = MoELM(model_config).to(self.device)
        self.ddp_model: nn.Module = self.model
        if self.world_size > 1:
            # Buffers (DeepSeek's expert bias) stay in sync by construction: the router all-reduces
            # its load before every bias update. Broadcasting them would clobber per-rank counts.
            ddp = nn.parallel.DistributedDataParallel
            no_sync = (
                {"forward_sync_buffers": False}  # torch >= 2.13 spelling
                if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
                else {"broadcast_buffers": False}
            )
            self.ddp_model = ddp(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_sync
            )
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": train_config.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=train_config.lr,
            betas=(train_config.beta1, train_config.beta2),
            eps=train_config.eps,
        )
        self.batches = Batches(
            data.train_tokens,
            train_config.seq_len,
            train_config.batch_size,
            seed=train_config.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.val = eval_batches(
            data.val_tokens,
            train_config.seq_len,
            train_config.batch_size,
            train_config.eval_batches,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.step = 0
        self.history: dict[str, list[float]] = {
            "step": [],
            "loss": [],
            "aux_loss": [],
            "lr": [],
            "eval_step": [],
            "val_loss": [],
        }
        self.monitor = RoutingMonitor(self.model)
        self.train_time = 0.0
        self.train_cpu_time = 0.0
        self.tokens_seen = 0

    # -- one step ---------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the next batch. Returns ``(ce loss, aux loss)`` of this rank."""
        self.model.train()
        lr = lr_at(self.step, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x = self.batches.next().to(self.device)
        with self._autocast():
            out = self.ddp_model(x, labels=x, ctx=RoutingContext(step=self.step))
        out.loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_end(self.model)
        self.step += 1
        ce, aux = float(out.ce_loss.detach()), float(out.aux_loss.detach())
        self.history["step"].append(self.step)
        self.history["loss"].append(ce)
        self.history["aux_loss"].append(aux)
        self.history["lr"].append(lr)
        return ce, aux

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, with_trace: bool = False) -> dict[str, Any]:
        """Mean val cross-entropy (nats/token) and perplexity; with ``with_trace``, routing stats too."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        tr_ctx = trace(self.model) if with_trace and self.model.moe_layers() else nullcontext()
        lengths: list[int] = []  # the val windows, in trace order
        with tr_ctx as tr:
            for x in self.val:
                x = x.to(self.device)
                lengths += [x.shape[1]] * x.shape[0]
                with self._autocast():
                    out = self.model(x, labels=x)
                n = x.shape[0] * (x.shape[1] - 1)
                total += torch.tensor([float(out.ce_loss) * n, n], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(total)
        loss = float(total[0] / total[1])
        res: dict[str, Any] = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if tr is not None:
            res["routing"] = tr.summary()
            load, no_expert, ntok = [], 0, 0
            for name in tr.layers:
                r = tr.routing(name)
                counts = r.tokens_per_expert().double()
                load.append((counts / counts.mean().clamp_min(1e-12)).tolist())
                no_expert += int((r.experts_per_token() == 0).sum())
                ntok += r.num_tokens
            res["load"] = load
            res["no_expert_rate"] = no_expert / max(ntok, 1)
            if self.cfg.locality:
                res["locality"] = [
                    {"layer": name, **layer_locality(tr.routing(name), lengths, k=self.model.config.top_k)}
                    for name in tr.layers
                ]
        self.model.train()
        return res

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | Path | None = None) -> Path | None:
        """Write a checkpoint (rank 0). Default location: ``out_dir/checkpoints/step_NNNNNNN``."""
        if directory is None:
            if self.out_dir is None:
                raise ValueError("save_checkpoint needs a directory or the trainer's out_dir")
            directory = self.out_dir / CKPT_DIRNAME / f"step_{self.step:07d}"
        final = Path(directory)
        if not self.is_main:
            return final
        tmp = final.with_name(final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.model.save_pretrained(tmp)
        opt_tensors, opt_meta = optimizer_to_safe(self.optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        tok = self.data.tokenizer
        self._save_tokenizer(tmp)
        state = {
            "format": "moelab-trainer-checkpoint-1",
            "step": self.step,
            "world_size": self.world_size,
            "data": self.batches.state_dict(),
            "tokenizer": getattr(tok, "name", "bytes"),
            "train_config": asdict(self.cfg),
            "optimizer": opt_meta,
            "rng": rng_meta,
            "history": self.history,
            "train_time_s": self.train_time,
            "train_cpu_time_s": self.train_cpu_time,
            "tokens_seen": self.tokens_seen,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final.parent / LATEST).write_text(final.name + "\n")
        self._prune(final.parent)
        return final

    def _save_tokenizer(self, directory: Path) -> None:
        """A BPE tokenizer travels with the weights as ``tokenizer.json`` (bytes need none)."""
        tok = self.data.tokenizer
        if getattr(tok, "name", "") == "bpe":
            tok.tok.save(str(Path(directory) / "tokenizer.json"))

    def _prune(self, root: Path) -> None:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in steps[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore model, optimizer, RNG, data position, step and history from a checkpoint."""
        d = Path(directory)
        state = json.loads((d / "trainer_state.json").read_text())
        saved_model = MoELMConfig.from_json(d / "config.json")
        if saved_model != self.model_config:
            raise ValueError(
                f"checkpoint {d} was written for a different model config:\n  saved:   {saved_model}\n"
                f"  current: {self.model_config}"
            )
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {d} was written with world_size={state['world_size']}; resuming with "
                f"{self.world_size} would change the data order (use the same number of processes)"
            )
        dev = str(self.device)
        self.model.load_state_dict(load_file(str(d / "model.safetensors"), device=dev), strict=True)
        self.optimizer.load_state_dict(
            optimizer_from_safe(load_file(str(d / "optimizer.safetensors")), state["optimizer"])
        )
        set_rng_state(load_file(str(d / "rng.safetensors")), state["rng"])
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.history = state["history"]
        self.train_time = float(state.get("train_time_s", 0.0))
        self.train_cpu_time = float(state.get("train_cpu_time_s", 0.0))
        self.tokens_seen = int(state.get("tokens_seen", 0))

    # -- the loop ---------------------------------------------------------------------------------
    def train(
        self,
        resume: bool | str | Path = False,
        stop_after: int | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> TrainResult:
        """Run to ``train_config.steps``.

        Args:
            resume: ``True`` resumes from the newest checkpoint in ``out_dir`` (if any), a path
                resumes from that checkpoint.
            stop_after: stop after this many steps in total without finishing (simulates an
                interrupted run; used by the resume tests).
            callback: called on rank 0 every ``log_every`` steps and after each evaluation with
                ``{"step", "steps", "loss", "tokens_per_s", "imbalance", "val_loss"}``.
        """
        if resume:
            path = (
                latest_checkpoint(self.out_dir)
                if resume is True and self.out_dir
                else (Path(resume) if not isinstance(resume, bool) else None)
            )
            if path is not None:
                self.load_checkpoint(path)
                self._log(f"resumed from {path} at step {self.step}")
        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        tokens_per_step = cfg.batch_size * cfg.seq_len * self.world_size
        bar = self._progress()
        task = None
        if bar is not None:
            bar.start()
            task = bar.add_task(
                self.description,
                total=cfg.steps,
                completed=self.step,
                loss=float("nan"),
                tps=0.0,
                imb=float("nan"),
                val=float("nan"),
            )
        last_eval: dict[str, Any] = {}
        try:
            while self.step < end:
                t0, c0 = time.perf_counter(), time.process_time()
                ce, _ = self.train_step()
                self.train_time += time.perf_counter() - t0
                self.train_cpu_time += time.process_time() - c0
                self.tokens_seen += tokens_per_step
                report = {
                    "step": self.step,
                    "steps": cfg.steps,
                    "loss": ce,
                    "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9),
                    "imbalance": self.monitor.last_imbalance(),
                }
                if self.step % cfg.log_every == 0 or self.step == end:
                    if bar is not None:
                        bar.update(
                            task,
                            completed=self.step,
                            loss=ce,
                            imb=report["imbalance"],
                            tps=report["tokens_per_s"],
                        )
                    if callback is not None and self.is_main:
                        callback(report)
                final = self.step == cfg.steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or final:
                    last_eval = self.evaluate(with_trace=final)
                    self.history["eval_step"].append(self.step)
                    self.history["val_loss"].append(last_eval["val_loss"])
                    if bar is not None:
                        bar.update(task, val=last_eval["val_loss"])
                    if callback is not None and self.is_main:
                        callback({**report, "val_loss": last_eval["val_loss"]})
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.out_dir is not None:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.stop()
        if self.world_size > 1:
            self.check_replicas()
        if self.step == cfg.steps and self.out_dir is not None and self.is_main:
            self._save_tokenizer(self.model.save_pretrained(self.out_dir / "final"))
        if not last_eval:
            last_eval = self.evaluate(with_trace=True)
        return TrainResult(
            step=self.step,
            val_loss=last_eval["val_loss"],
            val_ppl=last_eval["val_ppl"],
            tokens_per_s=self.tokens_seen / max(self.train_time, 1e-9),
            train_time_s=self.train_time,
            train_cpu_time_s=self.train_cpu_time,
            tokens_per_cpu_s=self.tokens_seen / max(self.train_cpu_time, 1e-9),
            threads=torch.get_num_threads(),
            history=self.history,
            routing=last_eval.get("routing", []),
            load=last_eval.get("load", []),
            no_expert_rate=last_eval.get("no_expert_rate", 0.0),
            locality=last_eval.get("locality", []),
            train_drop_rate=self.monitor.drop_rate(),
            params=self.model.num_parameters(),
            active_params=self.model.num_parameters(active=True),
        )

    def close(self) -> None:
        """Under DDP: finish outstanding communication and free the DDP wrapper while the process
        group is still alive. Call it before ``dist.destroy_process_group()``.

        Why: if the wrapper outlives the process group, its reducer holds the group's last
        reference and destroys it when Python frees the trainer, joining gloo's worker threads
        while holding the GIL; a worker still releasing a finished all-reduce needs the GIL to
        drop its tensors, and the process hangs at exit (seen in 3 of 12 two-process runs).
        """
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
            self.ddp_model = self.model
            gc.collect()
            dist.barrier()  # waits with the GIL released: gloo's threads finish their clean-up

    def check_replicas(self) -> None:
        """Under DDP: raise if the ranks' weights differ (they must be bit-identical)."""
        vec = torch.stack([p.detach().double().sum() for p in self.model.parameters()]).cpu()
        lo, hi = vec.clone(), vec.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError("DDP replicas diverged: parameters differ across ranks")

    # -- output -----------------------------------------------------------------------------------
    def _progress(self):
        if not self.progress:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(
            TextColumn("[bold]{task.description:<14}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  val {task.fields[val]:.3f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TextColumn("max/mean load {task.fields[imb]:.2f}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )

    def _log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.console is not None:
            self.console.print(msg)
        elif self.progress:
            print(msg, flush=True)
