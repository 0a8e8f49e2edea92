"""The training loop for any ``nn.Module`` and a loss function: AdamW, warmup + cosine, clipping,
evaluation, exact-resume checkpoints, DDP. ``MoELM`` is one user.

    trainer = Trainer(MoELMConfig(d_model=128), TrainConfig(steps=300), out_dir="runs/x")  # a MoE LM
    trainer = Trainer(model, cfg, loss_fn=my_loss, data=TensorData(train=(x, y), val=(xv, yv)))
    result = trainer.train()            # or train(resume=True) after an interruption

One optimizer step per batch: ``loss, metrics = loss_fn(model, batch)`` (optionally under bf16
autocast), backward, gradient clipping, ``AdamW.step``, then ``moelab.step_end(model)`` (routers'
updates outside autograd, e.g. DeepSeek-V3's expert bias). The default ``loss_fn`` is ``lm_loss``:
``model(ids, labels=ids).loss`` for a language model returning an object with ``.loss``.

Data: ``moelab.data.Data`` (token streams, cut into ``seq_len`` windows; loaded from
``train_config.data`` when not given) or ``moelab.data.TensorData`` (in-memory examples). Both are
read in a seeded order whose position is saved in checkpoints.

Checkpoints (every ``ckpt_every`` steps, ``out_dir/checkpoints/step_NNNNNNN/``; see
``moelab.train.checkpoint``) hold no pickle, and resuming restores weights, optimizer, RNGs, data
position and history, so a run interrupted after a checkpoint and resumed ends with bit-identical
weights (CPU, fp32) to one that never stopped. Under ``torchrun`` the model is wrapped in
``DistributedDataParallel`` (``moelab.train.distributed``); only rank 0 prints and writes files.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.analysis.intervals import standard_error
from moelab.core.router import step_end
from moelab.core.tracing import trace
from moelab.data import Batches, Data, TensorBatches, TensorData, eval_batches, load_data
from moelab.losses.registry import get_loss
from moelab.models.config import MoELMConfig
from moelab.models.lm import MoELM
from moelab.parallel.sharding import clip_grad_norm_, expert_parameter_names, gather_experts, shard_experts
from moelab.train import checkpoint as ckpt
from moelab.train.checkpoint import CKPT_DIRNAME, LATEST, latest_checkpoint  # noqa: F401 - re-exported
from moelab.train.config import TrainConfig, lr_at
from moelab.train.distributed import (
    all_gather_floats,
    all_reduce_sum,
    check_replicas,
    init_distributed,
    is_distributed,
    max_over_ranks,
    release_ddp,
    resolve_device,
    wrap_ddp,
)
from moelab.train.loss import LossFn, accepts, batch_len, lm_loss, scalar, to_device
from moelab.train.monitor import (
    RoutingMonitor,
    causal_at_eval,
    ep_traffic,
    router_metrics,
    token_routed_layers,
    val_routing,
)
from moelab.train.progress import RunProgress
from moelab.train.resources import torch_threads

MAX_TOKEN_TYPES = 8  # token types whose val loss is reported separately
TOKEN_TYPE_NAMES = {0: "text", 1: "image"}  # moelab.data.mixed's TEXT and IMAGE

__all__ = ["LossFn", "TrainConfig", "TrainResult", "Trainer", "latest_checkpoint", "lm_loss", "lr_at"]


@dataclass
class TrainResult:
    """What a run measured. ``routing`` is ``moelab.trace``'s per-layer summary on the val set.

    ``tokens_per_s`` is wall-clock throughput of the training steps (``tok/s (wall)``);
    ``tokens_per_cpu_s`` divides by the process' CPU time instead (``tok/s/core`` with one thread).
    """

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
    causal_at_eval: bool = True  # every router routes each token by itself in eval mode
    # With a loss that reports ``row_loss`` (``lm_loss``): the standard error of ``val_loss`` over
    # val windows, and each window's loss (``Trainer.evaluate``); NaN / empty otherwise.
    val_loss_se: float = float("nan")
    val_window_losses: list[float] = field(default_factory=list)
    # Means over routed layers of ``Router.metrics()`` and loss diagnostics (``monitor.router_metrics``).
    router_metrics: dict[str, float] = field(default_factory=dict)
    # With token types (``moelab.data.mixed``): the val loss of the tokens of each type, by name.
    val_loss_by_type: dict[str, float] = field(default_factory=dict)
    # Forward FLOPs per token (``MoELM.flops_per_token``) of the last training step and of the
    # last evaluation forward (a depth router's causal rule at eval may run more or fewer tokens).
    flops_per_token: float = float("nan")
    eval_flops_per_token: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Train any module with a loss function (see the module docstring).

    Args:
        model: an ``nn.Module``, or a ``MoELMConfig`` (a ``MoELM`` is built after seeding, with
            ``vocab_size`` set from the tokenizer).
        train_config: the run.
        out_dir: where checkpoints and the final model go (None: write nothing). A run directory,
            not one of its checkpoints.
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)`` (may take ``step=``); default
            ``lm_loss``. ``loss`` is back-propagated; ``metrics`` may hold ``task_loss`` (reported
            and averaged for the val loss; default ``loss``), ``aux_loss``, ``count`` (weight of
            the batch in the val mean; default its rows) and ``tokens`` (for throughput).
        data: ``moelab.data.Data`` or ``TensorData``; default: ``load_data`` of ``train_config``.
        progress: show progress (rank 0 only): a live bar on a terminal, a line per eval otherwise.
        description: the progress label.
        console: a ``rich.console.Console`` for progress and messages (default: a new one).
    """

    def __init__(
        self,
        model: nn.Module | MoELMConfig,
        train_config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        loss_fn: LossFn | None = None,
        data: Data | TensorData | None = None,
        progress: bool = True,
        description: str = "train",
        console: Any = None,
    ) -> None:
        if not isinstance(train_config, TrainConfig):
            raise TypeError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
        if not isinstance(model, (nn.Module, MoELMConfig)):
            raise TypeError(f"model must be a torch nn.Module or a MoELMConfig, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable (model, batch) -> (loss, metrics), got {type(loss_fn).__name__}"
            )
        self.cfg = cfg = train_config
        self.device = resolve_device(cfg.device)
        self.rank, self.world_size = init_distributed(self.device)
        self.is_main = self.rank == 0
        self.out_dir = Path(out_dir) if out_dir is not None else None
        run = ckpt.run_dir_of(self.out_dir) if self.out_dir is not None else None
        if run is not None:
            raise ValueError(
                f"out_dir {self.out_dir} is a checkpoint directory of the run {run}; pass the run directory "
                f"{run} as out_dir (with resume=True to continue it)"
            )
        self.progress = progress and self.is_main
        self.description = description
        self.console = console
        self.loss_fn: LossFn = lm_loss if loss_fn is None else loss_fn
        self._loss_takes_step = accepts(self.loss_fn, "step")
        if data is None:
            src = cfg.data.split(",") if "," in cfg.data else cfg.data
            data = load_data(src, cfg.tokenizer, bpe_vocab_size=cfg.bpe_vocab_size)
        if not isinstance(data, (Data, TensorData)):
            raise TypeError(f"data must be a moelab.data.Data or TensorData, got {type(data).__name__}")
        if cfg.locality and not isinstance(data, Data):
            raise ValueError(
                "TrainConfig.locality measures routing along token sequences: it needs token data (Data)"
            )
        self.data = data
        for name in cfg.diagnostics:  # an unknown loss fails now, not after training
            get_loss(name)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if isinstance(model, MoELMConfig):
            if not isinstance(data, Data):
                raise TypeError("a MoELMConfig trains on token data: data must be a moelab.data.Data")
            if model.vocab_size != data.vocab_size:
                model = MoELMConfig.from_dict({**model.to_dict(), "vocab_size": data.vocab_size})
            self._check_lm(model)
            model = MoELM(model)
        elif isinstance(model, MoELM) and isinstance(data, Data):
            if model.config.vocab_size != data.vocab_size:
                raise ValueError(
                    f"the model's vocab_size={model.config.vocab_size} differs from the tokenizer's {data.vocab_size}"
                )
            self._check_lm(model.config)
        self.model_config = model.config if isinstance(model, MoELM) else None
        self.model = model.to(self.device)
        # Expert parallelism: every rank built the same global model (same seed); each keeps its
        # block of experts. The all-to-alls get their own group, apart from DDP's all-reduces.
        self.ep_group = None
        if cfg.ep > 1:
            if cfg.ep != self.world_size:
                raise ValueError(
                    f"TrainConfig.ep={cfg.ep} must equal the number of processes ({self.world_size}): "
                    f"run under torchrun --nproc_per_node {cfg.ep}"
                )
            self.ep_group = dist.new_group(list(range(self.world_size)))
            shard_experts(self.model, self.ep_group)
        self._step_traffic: dict[str, int] = {}
        self.expert_params = frozenset(expert_parameter_names(self.model)) if self.ep_group else frozenset()
        self.ddp_model: nn.Module = (
            wrap_ddp(self.model, self.device, ignore=sorted(self.expert_params))
            if self.world_size > 1
            else self.model
        )
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
        )
        shard = {"rank": self.rank, "world_size": self.world_size}
        self._token_data = isinstance(data, Data)  # batches are ids, or (ids, types)
        if isinstance(data, Data):
            self.batches: Batches | TensorBatches = Batches(
                data.train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed, types=data.train_types, **shard
            )
            val_of = lambda n: eval_batches(  # noqa: E731
                data.val_tokens, cfg.seq_len, cfg.batch_size, n, types=data.val_types, **shard
            )
        else:
            self.batches = TensorBatches(data, cfg.batch_size, seed=cfg.seed, **shard)
            val_of = lambda n: data.eval_batches(cfg.batch_size, n, **shard)  # noqa: E731
        self.val = val_of(cfg.eval_batches)
        # the final evaluation's windows (``final_eval_batches``), when they differ from ``val``'s
        more = cfg.final_eval_batches not in (0, cfg.eval_batches)
        self.final_val = val_of(cfg.final_eval_batches) if more else None
        self.step = 0
        self.history: dict[str, list[float]] = {
            k: [] for k in ("step", "loss", "aux_loss", "lr", "eval_step", "val_loss")
        }
        self.monitor = RoutingMonitor(self.model)
        self.train_time = 0.0
        self.train_cpu_time = 0.0
        self.tokens_seen = 0

    def _check_lm(self, config: MoELMConfig) -> None:
        if config.max_seq_len < self.cfg.seq_len:
            raise ValueError(
                f"seq_len={self.cfg.seq_len} exceeds the model's max_seq_len={config.max_seq_len}"
            )

    # -- one step ---------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def compute_loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Any]]:
        """``loss_fn(model, batch)``, checked: a scalar tensor and a dict."""
        out = (
            self.loss_fn(model, batch, step=self.step)
            if self._loss_takes_step
            else self.loss_fn(model, batch)
        )
        if not (
            isinstance(out, tuple)
            and len(out) == 2
            and isinstance(out[0], Tensor)
            and isinstance(out[1], dict)
        ):
            raise TypeError(f"loss_fn must return (loss tensor, metrics dict), got {type(out).__name__}")
        if out[0].dim() != 0:
            raise ValueError(f"loss_fn's loss must be a scalar tensor, got shape {tuple(out[0].shape)}")
        return out

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the next batch. Returns ``(task loss, aux loss)`` of this rank."""
        self.model.train()
        lr = lr_at(self.step, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        batch = to_device(self.batches.next(), self.device)
        with self._autocast():
            loss, metrics = self.compute_loss(self.ddp_model, batch)
        loss.backward()
        if self.ep_group is not None:
            # An expert's gradient summed every rank's mean loss; DDP averaged the others.
            for name, p in self.model.named_parameters():
                if name in self.expert_params and p.grad is not None:
                    p.grad.div_(self.world_size)
        if self.cfg.grad_clip > 0:
            if self.ep_group is not None:  # one global norm, so every replica clips alike
                clip_grad_norm_(self.model, self.cfg.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_end(self.model)
        self.step += 1
        task, aux = scalar(metrics.get("task_loss", loss)), scalar(metrics.get("aux_loss", 0.0))
        self._step_tokens = int(scalar(metrics.get("tokens", batch_len(batch)))) * self.world_size
        self.history["step"].append(self.step)
        self.history["loss"].append(task)
        self.history["aux_loss"].append(aux)
        self.history["lr"].append(lr)
        self._step_traffic = ep_traffic(self.model)  # this rank's all-to-all bytes, this step
        return task, aux

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, with_trace: bool = False, *, final: bool = False) -> dict[str, Any]:
        """Mean val task loss (per ``count``; nats/token for ``lm_loss``) and its exp (perplexity);
        with ``with_trace``, routing statistics of the routed layers too. ``final`` evaluates on
        the ``final_eval_batches`` windows (``TrainConfig``).

        When the loss function reports ``row_loss`` (``lm_loss`` does), also each val window's
        loss (``val_window_losses``, in the same order for every run of the same val set, so two
        runs can be compared window by window) and the standard error of their mean,
        ``val_loss_se = sd / sqrt(windows)``: how much the val loss would move on another draw of
        windows from the same text.
        """
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        layers = token_routed_layers(self.model)
        tr_ctx = trace(self.model) if with_trace and layers else nullcontext()
        lengths: list[int] = []  # the val windows, in trace order
        rows: list[float] | None = []
        by_type = torch.zeros(MAX_TOKEN_TYPES, 2, dtype=torch.float64)
        batches = self.final_val if final and self.final_val is not None else self.val
        # The all-to-alls are collective: a rank with fewer val batches (the last global batch may
        # not reach it) runs empty ones after its own, so every rank runs as many. Counted before
        # the loop: an all-reduce after it would wait on a rank still inside an all-to-all.
        pad = max_over_ranks(len(batches)) - len(batches) if self.ep_group is not None else 0
        with tr_ctx as tr:
            for batch in batches:
                batch = to_device(batch, self.device)
                ids = batch[0] if isinstance(batch, tuple) and self._token_data else batch
                if isinstance(ids, Tensor) and ids.dim() == 2:
                    lengths += [ids.shape[1]] * ids.shape[0]
                with self._autocast():
                    loss, metrics = self.compute_loss(self.model, batch)
                n = scalar(metrics.get("count", batch_len(batch)))
                total += torch.tensor([scalar(metrics.get("task_loss", loss)) * n, n], dtype=torch.float64)
                row = metrics.get("row_loss")
                if rows is not None and isinstance(row, Tensor):
                    rows += row.detach().double().flatten().tolist()
                else:
                    rows = None
                typed = metrics.get("type_loss")
                if isinstance(typed, Tensor):
                    by_type[: typed.shape[0]] += typed.detach().cpu().double()[:MAX_TOKEN_TYPES]
        for _ in range(pad):  # outside the trace: empty batches have no routing to report
            self.model(torch.zeros(0, self.cfg.seq_len, dtype=torch.long, device=self.device))
        ep_traffic(self.model)  # evaluation traffic is not a training step's
        all_reduce_sum(total)
        all_reduce_sum(by_type)
        loss = float(total[0] / total[1])
        res: dict[str, Any] = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if rows is not None:
            rows = all_gather_floats(rows)
            res["val_window_losses"] = rows
            res["val_loss_se"] = standard_error(rows)
        if by_type[:, 1].sum() > 0:
            res["val_loss_by_type"] = {
                TOKEN_TYPE_NAMES.get(i, f"type{i}"): float(by_type[i, 0] / by_type[i, 1])
                for i in range(MAX_TOKEN_TYPES)
                if by_type[i, 1] > 0
            }
        if tr is not None:
            res.update(val_routing(tr, lengths, layers, locality=self.cfg.locality))
        self.model.train()
        return res

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | Path | None = None) -> Path | None:
        """Write a checkpoint (rank 0). Default location: ``out_dir/checkpoints/step_NNNNNNN``."""
        if directory is None:
            if self.out_dir is None:
                raise ValueError("save_checkpoint needs a directory or the trainer's out_dir")
            directory = self.out_dir / CKPT_DIRNAME / f"step_{self.step:07d}"
        # Expert parallelism: the model is saved gathered (a collective: one process can load it),
        # the optimizer as one shard per rank, written into rank 0's staging directory.
        sharded = self.ep_group is not None
        model = gather_experts(copy.deepcopy(self.model)) if sharded else self.model
        if sharded and not self.is_main:
            dist.barrier(self.ep_group)  # rank 0 has staged the checkpoint
            ckpt.write_optimizer_shard(self.optimizer, ckpt.staging_dir(directory), self.rank)
            dist.barrier(self.ep_group)  # every shard is written: rank 0 renames
            return Path(directory)
        if not self.is_main:
            return Path(directory)

        def write_shards(staged: Path) -> None:
            ckpt.write_optimizer_shard(self.optimizer, staged, self.rank)
            dist.barrier(self.ep_group)
            dist.barrier(self.ep_group)

        tok = getattr(self.data, "tokenizer", None)
        state = {
            "step": self.step,
            "world_size": self.world_size,
            "data": self.batches.state_dict(),
            "tokenizer": getattr(tok, "name", None),
            "train_config": asdict(self.cfg),
            "model": ckpt.model_signature(self.model),
            "history": self.history,
            "train_time_s": self.train_time,
            "train_cpu_time_s": self.train_cpu_time,
            "tokens_seen": self.tokens_seen,
        }
        return ckpt.write_checkpoint(
            directory, model=model, optimizer=None if sharded else self.optimizer, state=state,
            tokenizer=tok, keep=self.cfg.keep_checkpoints, before_rename=write_shards if sharded else None,
        )  # fmt: skip

    def check_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """The checkpoint's state, after checking it fits this trainer; errors name only what differs."""
        return ckpt.check_compatible(
            directory, model=self.model, train_config=asdict(self.cfg), world_size=self.world_size
        )

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore model, optimizer, RNG, data position, step and history from a checkpoint."""
        d = Path(directory)
        self.check_checkpoint(d)
        if self.ep_group is None:
            state = ckpt.read_checkpoint(d, model=self.model, optimizer=self.optimizer, device=self.device)
        else:  # the checkpoint holds the unsharded model: load it whole, keep this rank's experts
            full = gather_experts(copy.deepcopy(self.model))
            state = ckpt.read_checkpoint(d, model=full, optimizer=None, device=self.device)
            self.model.load_state_dict(shard_experts(full, self.ep_group).state_dict())
            del full
            ckpt.read_optimizer_shard(self.optimizer, d, self.rank)
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.history = state["history"]
        self.train_time = float(state.get("train_time_s", 0.0))
        self.train_cpu_time = float(state.get("train_cpu_time_s", 0.0))
        self.tokens_seen = int(state.get("tokens_seen", 0))

    def _resume(self, resume: bool | str | Path) -> None:
        path = ckpt.resume_path(resume, self.out_dir)
        if path is not None:
            self.load_checkpoint(path)
            self._log(f"resumed from {path} at step {self.step}")

    # -- the loop ---------------------------------------------------------------------------------
    def train(
        self,
        resume: bool | str | Path = False,
        stop_after: int | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> TrainResult:
        """Run to ``train_config.steps``.

        Args:
            resume: ``True`` resumes from the newest checkpoint in ``out_dir`` and fails
                (``FileNotFoundError: no checkpoint under ...``) when there is none; ``"auto"``
                resumes when there is one; a path resumes from that checkpoint (or the newest
                under that run directory). ``False`` refuses an ``out_dir`` that already holds
                checkpoints (``FileExistsError``) rather than mixing two runs.
            stop_after: stop after this many steps in total without finishing (simulates an
                interrupted run; used by the resume tests).
            callback: called on rank 0 every ``log_every`` steps and after each evaluation with
                ``{"step", "steps", "loss", "tokens_per_s", "tokens_per_cpu_s", "imbalance"}``
                (+ ``"val_loss"`` after an evaluation).
        """
        self._resume(resume)
        if self.device.type != "cpu":
            return self._train(stop_after, callback, torch.get_num_threads())
        with torch_threads(self.cfg.threads) as n:
            return self._train(stop_after, callback, n)

    def _train(self, stop_after: int | None, callback: Callable | None, threads: int) -> TrainResult:
        cfg = self.cfg
        self._train_flops = self._eval_flops = float("nan")
        end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        display = RunProgress(self.console, enabled=self.progress)
        display.add(self.description, cfg.steps, completed=self.step)
        last_eval: dict[str, Any] = {}
        with display:
            while self.step < end:
                t0, c0 = time.perf_counter(), time.process_time()
                task, _ = self.train_step()
                self.train_time += time.perf_counter() - t0
                self.train_cpu_time += time.process_time() - c0
                self.tokens_seen += self._step_tokens
                report = {
                    "step": self.step,
                    "steps": cfg.steps,
                    "loss": task,
                    "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9),
                    "tokens_per_cpu_s": self.tokens_seen / max(self.train_cpu_time, 1e-9),
                    "imbalance": self.monitor.last_imbalance(),
                    **self._step_traffic,
                }
                if self.step % cfg.log_every == 0 or self.step == end:
                    self._report(display, report, callback)
                final = self.step == cfg.steps
                evaluating = (cfg.eval_every and self.step % cfg.eval_every == 0) or final
                if (
                    evaluating or self.step == end
                ):  # the training forward's cost, before an evaluation's replaces it
                    self._train_flops = _last_flops(self.model, self._train_flops)
                if evaluating:
                    last_eval = self.evaluate(with_trace=final, final=final)
                    self._eval_flops = _last_flops(self.model, self._eval_flops)
                    curve = self.evaluate() if final and self.final_val is not None else last_eval
                    self.history["eval_step"].append(self.step)
                    self.history["val_loss"].append(curve["val_loss"])
                    self._report(display, {**report, "val_loss": last_eval["val_loss"]}, callback)
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.out_dir is not None:
                    self.save_checkpoint()
            if self.world_size > 1:
                check_replicas(self.model, skip=self.expert_params)
            final_model = self.model
            if self.ep_group is not None and self.step == cfg.steps and self.out_dir is not None:
                final_model = gather_experts(copy.deepcopy(self.model))  # collective: saved unsharded
            if self.step == cfg.steps and self.out_dir is not None and self.is_main:
                final_dir = ckpt.save_weights(final_model, self.out_dir / "final")
                ckpt.save_tokenizer(getattr(self.data, "tokenizer", None), final_dir)
            if not last_eval:
                last_eval = self.evaluate(with_trace=True, final=True)
            display.finish(self.description, last_eval["val_loss"])
        active = self.model.num_parameters(active=True) if isinstance(self.model, MoELM) else None
        params = sum(p.numel() for p in self.model.parameters())
        return TrainResult(
            step=self.step,
            val_loss=last_eval["val_loss"],
            val_ppl=last_eval["val_ppl"],
            tokens_per_s=self.tokens_seen / max(self.train_time, 1e-9),
            train_time_s=self.train_time,
            train_cpu_time_s=self.train_cpu_time,
            tokens_per_cpu_s=self.tokens_seen / max(self.train_cpu_time, 1e-9),
            threads=threads,
            history=self.history,
            routing=last_eval.get("routing", []),
            load=last_eval.get("load", []),
            no_expert_rate=last_eval.get("no_expert_rate", 0.0),
            locality=last_eval.get("locality", []),
            train_drop_rate=self.monitor.drop_rate(),
            params=params,
            active_params=params if active is None else active,
            causal_at_eval=causal_at_eval(self.model),
            val_loss_se=last_eval.get("val_loss_se", float("nan")),
            val_window_losses=last_eval.get("val_window_losses", []),
            router_metrics=router_metrics(self.model, self.cfg.diagnostics),
            val_loss_by_type=last_eval.get("val_loss_by_type", {}),
            flops_per_token=self._train_flops,
            eval_flops_per_token=self._eval_flops,
        )

    def _report(self, display: RunProgress, report: dict[str, Any], callback: Callable | None) -> None:
        display.update(self.description, report)
        if callback is not None and self.is_main:
            callback(report)

    def close(self) -> None:
        """Under DDP: finish outstanding communication and free the DDP wrapper while the process
        group is still alive. Call it before ``dist.destroy_process_group()``
        (``moelab.train.distributed.release_ddp`` says why)."""
        if self.world_size > 1 and is_distributed():
            dist.barrier()
            self.ddp_model = self.model
            release_ddp(self.world_size)

    def check_replicas(self) -> None:
        """Under DDP: raise if the ranks' weights differ (they must be bit-identical)."""
        check_replicas(self.model)

    def _log(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.console is not None:
            self.console.print(msg, highlight=False, markup=False)
        elif self.progress:
            print(msg, flush=True)


def _last_flops(model: nn.Module, default: float) -> float:
    """``model.flops_per_token()`` of its last forward when it counts FLOPs (``MoELM``), else ``default``."""
    fn = getattr(model, "flops_per_token", None)
    return float(fn()) if callable(fn) else default
