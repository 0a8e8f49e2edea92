"""Fine-tune LoRA mixtures on a pretrained causal LM: ``moelab finetune`` and ``moelab compare --mixtures``.

    row = finetune_mixture(model, tokenizer, FinetuneSettings(method="dynmole", tasks=["sort"]))
    summary = compare_mixtures(lambda: copy.deepcopy(base), tokenizer, ["mole", "dynmole", "remix"],
                               FinetuneSettings(tasks=["arithmetic", "sort"]), out="runs/cmp")

One run: ``moelab.lora.apply`` puts the method's mixture on the named projections (and
``target_parameters``), ``moelab.train.Trainer`` trains it (AdamW on the mixtures' parameters
only, warm-up then cosine, clipping; checkpoints and resume as any Trainer run) with
``moelab.lora.finetune.mixture_loss`` (target cross-entropy + the mixtures' auxiliary losses,
ReMix's RLOO step for ReMix) on packed rows of the built-in tasks (``moelab.data.tasks``) or of
text files, then it measures: each task's val loss and routing statistics
(``evaluate_tasks``) and, by greedy decoding of test prompts, each task's own metric (exact
match or chrF).

A comparison runs every mixture on every seed from the same base, data and budget, and writes
``report.md`` (means with 95% t-intervals over seeds) and ``results.json`` (every row).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.analysis.intervals import t_interval
from moelab.data import TensorData
from moelab.data.tasks import encode_examples, encoder_of, load_tasks, score
from moelab.lora import apply, apply_flylora, flylora_layers, mixture_layers
from moelab.lora.finetune import evaluate_tasks, mixture_loss, pack_examples
from moelab.lora.presets import MIXTURE_PRESETS, PAPER_TARGETS
from moelab.train.config import TrainConfig
from moelab.train.resources import cpu_model, torch_threads
from moelab.train.trainer import Trainer

# Every attention and MLP projection of a Llama-family model (SmolLM2): MixLoRA adapts them all.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TASKS = ("arithmetic", "brackets", "sort")  # generated: no Debian package needed
DEFAULT_RANK = 8  # PEFT's LoraConfig.r


@dataclass
class FinetuneSettings:
    """One fine-tuning run (``moelab finetune``; each arm of ``moelab compare --mixtures``).

    Mixture: ``method`` (a preset of ``moelab.lora.MIXTURE_PRESETS``: ``mole``, ``dynmole``,
    ``lora_mixer``, ``remix``, ...; or ``flylora``: ``moelab.lora.apply_flylora``, its rank-wise
    top-``top_k`` of rank ``rank``, FlyLoRA's 32 / 8 by default), ``targets`` (None: the method's paper targets, else every
    Llama projection ``LLAMA_TARGETS``), ``target_parameters`` (fused 3-D expert parameters),
    ``num_experts``, ``rank`` (default 8, PEFT's ``r``), ``alpha``, ``dropout``, and ``router`` / ``top_k`` /
    ``router_kwargs`` / ``aux_losses`` over the method's.

    Data: ``tasks`` (built-in task names) with ``train_examples`` / ``val_examples`` /
    ``test_examples`` per task, or ``text`` (text files: next-token loss on windows of ``seq_len``
    tokens, ``val_fraction`` of them held out). Rows are ``seq_len`` tokens, packed.

    Training: ``steps``, ``batch_size`` (packed rows), ``lr`` (1e-3, our choice for a short run
    from ``B = 0`` on a small model; MixLoRA uses 2e-4 on 7B models), ``warmup_steps``,
    ``weight_decay`` (0, as PEFT's LoRA recipes), ``rloo_samples`` (ReMix's ``M``), ``seed``,
    ``threads``, ``eval_every``, ``ckpt_every``.

    Measurement: ``generate`` test prompts per task decoded greedily (0: none), at most
    ``max_new_tokens`` tokens each.
    """

    method: str = "mole"
    targets: list[str] | str | None = None
    target_parameters: list[str] | None = None
    num_experts: int = 4
    rank: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    router: str | None = None
    top_k: int | None = None
    router_kwargs: dict[str, Any] | None = None
    aux_losses: dict[str, float] | None = None
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    text: list[str] | None = None
    train_examples: int = 400
    val_examples: int = 32
    test_examples: int = 16
    val_fraction: float = 0.05
    seq_len: int = 256
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 6
    weight_decay: float = 0.0
    rloo_samples: int = 4
    seed: int = 0
    threads: int = 0
    eval_every: int = 0
    ckpt_every: int = 0
    generate: int = 16
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if self.method not in MIXTURE_PRESETS and self.method != "flylora":
            raise ValueError(
                f"method must be one of {sorted([*MIXTURE_PRESETS, 'flylora'])}, got {self.method!r}"
            )
        if self.text is None and not self.tasks:
            raise ValueError("tasks must name at least one built-in task (or give text files)")
        for name in ("num_experts", "rank", "seq_len", "steps", "batch_size", "rloo_samples"):
            value = getattr(self, name)
            if value is None and name == "rank":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("train_examples", "val_examples", "test_examples", "generate", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")

    def resolved_targets(self) -> list[str] | str:
        if self.targets is not None:
            return self.targets
        return list(PAPER_TARGETS.get(self.method, LLAMA_TARGETS))


# ------------------------------------------------------------------------------------------ data
def task_tensors(tokenizer: Any, s: FinetuneSettings) -> tuple[tuple[Tensor, Tensor], dict[str, tuple], dict]:
    """``(train (ids, labels), {task: val (ids, labels, mask)}, {task: Task})``: the tasks' train
    examples shuffled together (seeded) and packed into ``seq_len`` rows; each val split packed alone."""
    sizes = {"train": s.train_examples, "val": s.val_examples, "test": s.test_examples}
    tasks = load_tasks(s.tasks, seed=s.seed, sizes=sizes)
    if not tasks:
        raise ValueError(f"none of the tasks {s.tasks} is available here (see the install lines above)")
    pad = encoder_of(tokenizer)[2]
    train = [ex for t in tasks.values() for ex in t.examples("train")]
    random.Random(s.seed).shuffle(train)
    ids, labels, _ = pack_examples(encode_examples(train, tokenizer), s.seq_len, pad)
    val = {
        name: pack_examples(encode_examples(t.examples("val"), tokenizer), s.seq_len, pad)
        for name, t in tasks.items()
        if t.examples("val")
    }
    return (ids, labels), val, tasks


def text_tensors(tokenizer: Any, s: FinetuneSettings) -> tuple[tuple[Tensor, Tensor], dict[str, tuple]]:
    """Windows of ``seq_len`` tokens of the text files ``s.text`` (every token a target); the last
    ``val_fraction`` of the windows (at least one) are the val set ``{"text": ...}``."""
    ids: list[int] = []
    for name in s.text or []:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"text: {path} is not a file")
        ids.extend(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")))
    windows = len(ids) // s.seq_len
    if windows < 2:
        raise ValueError(f"text: {len(ids)} tokens make fewer than 2 windows of seq_len={s.seq_len}")
    rows = torch.tensor(ids[: windows * s.seq_len]).view(windows, s.seq_len)
    n_val = max(1, round(windows * s.val_fraction))
    train, val = rows[:-n_val], rows[-n_val:]
    return (train, train.clone()), {"text": (val, val.clone(), torch.ones_like(val, dtype=torch.bool))}


# ------------------------------------------------------------------------------------------ measurement
@torch.no_grad()
def generation_score(model: nn.Module, tokenizer: Any, task: Any, n: int, max_new_tokens: int) -> float:
    """``task``'s metric on greedy continuations of its first ``n`` test prompts (a transformers
    model's ``generate``; prompts encoded as in training; stops at the targets' end token or
    ``max_new_tokens``)."""
    examples = task.examples("test")[:n]
    if not examples:
        return float("nan")
    encode, end, pad = encoder_of(tokenizer)
    was_training = model.training
    model.eval()
    predictions = []
    for ex in examples:
        prompt = torch.tensor([encode(ex.prompt)])
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end,
            pad_token_id=pad,
        )
        predictions.append(tokenizer.decode(out[0, prompt.shape[1] :].tolist()))
    model.train(was_training)
    return score(task.name, predictions, [ex.target for ex in examples])


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ one run
def finetune_mixture(
    model: nn.Module,
    tokenizer: Any,
    settings: FinetuneSettings,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
    console: Any = None,
    resume: bool | str = False,
) -> dict[str, Any]:
    """Put ``settings``' mixture on ``model`` (in place), fine-tune it and measure it (module
    docstring). ``tokenizer``: ``encode(text) -> ids`` (and ``decode`` for ``generate``). With
    ``out_dir``, the Trainer writes its checkpoints there (``ckpt_every``) and ``resume`` works as
    ``Trainer.train``'s. Returns the row: ``val_loss`` (mean over tasks), ``val_loss_<task>``,
    ``score_<task>`` (greedy decoding; with ``generate``), the routing statistics, ``train_s``,
    ``trainable_params``, ``steps``."""
    s = settings
    torch.manual_seed(s.seed)  # the mixture's initialisation
    if s.method == "flylora":
        if not flylora_layers(model):
            fly = {"rank": s.rank, "top_k": s.top_k, "alpha": s.alpha}
            apply_flylora(
                model, s.resolved_targets(), seed=s.seed, **{k: v for k, v in fly.items() if v is not None}
            )
    elif not mixture_layers(model):
        apply(
            model,
            s.resolved_targets(),
            method=s.method,
            num_experts=s.num_experts,
            rank=DEFAULT_RANK if s.rank is None else s.rank,
            alpha=s.alpha,
            dropout=s.dropout,
            router=s.router,
            top_k=s.top_k,
            router_kwargs=s.router_kwargs,
            aux_losses=s.aux_losses,
            target_parameters=s.target_parameters,
        )
    if s.text:
        train, val = text_tensors(tokenizer, s)
        tasks: dict[str, Any] = {}
    else:
        train, val, tasks = task_tensors(tokenizer, s)
    val_rows = tuple(torch.cat([v[i] for v in val.values()]) for i in range(2))
    cfg = TrainConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        seq_len=s.seq_len,
        lr=s.lr,
        warmup_steps=min(s.warmup_steps, s.steps),
        weight_decay=s.weight_decay,
        eval_every=s.eval_every,
        eval_batches=max(1, -(-val_rows[0].shape[0] // s.batch_size)),
        ckpt_every=s.ckpt_every,
        seed=s.seed,
        threads=s.threads,
    )

    def loss_fn(m: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        return mixture_loss(m, batch, rloo_samples=s.rloo_samples)

    data = TensorData(train=train, val=val_rows)
    trainer = Trainer(
        model,
        cfg,
        out_dir,
        loss_fn=loss_fn,
        data=data,
        progress=progress,
        console=console,
        description=s.method,
    )
    start = time.perf_counter()
    trainer.train(resume=resume)
    row: dict[str, Any] = {"train_s": time.perf_counter() - start}
    trainer.close()
    with torch_threads(s.threads):
        num_experts = s.num_experts if mixture_layers(model) else None
        row.update(evaluate_tasks(model, val, num_experts))
        if s.generate and hasattr(model, "generate"):
            for name, task in tasks.items():
                row[f"score_{name}"] = generation_score(model, tokenizer, task, s.generate, s.max_new_tokens)
    row["trainable_params"] = trainable_parameters(model)
    row["steps"] = s.steps
    return row


# ------------------------------------------------------------------------------------------ comparison
def compare_mixtures(
    make_base: Callable[[], nn.Module],
    tokenizer: Any,
    mixtures: Sequence[str],
    settings: FinetuneSettings,
    *,
    seeds: Sequence[int] = (0,),
    out: str | Path = "runs/compare-mixtures",
    base_name: str = "",
    progress: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Fine-tune each of ``mixtures`` (preset names) on each seed, from a fresh ``make_base()``
    every time, with ``settings`` otherwise equal; write ``out/report.md`` and
    ``out/results.json``. The base model without a mixture is measured once as ``base``.
    Returns the summary written to ``results.json``."""
    if not mixtures:
        raise ValueError("mixtures must name at least one method")
    unknown = [m for m in mixtures if m not in MIXTURE_PRESETS and m != "flylora"]
    if unknown:
        raise ValueError(
            f"mixtures {unknown} are not presets; known: {sorted([*MIXTURE_PRESETS, 'flylora'])}"
        )
    if len(set(mixtures)) != len(mixtures):
        raise ValueError(f"mixtures must not repeat a method, got {list(mixtures)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    base = make_base()
    if settings.text:
        _, val = text_tensors(tokenizer, settings)
        tasks: dict[str, Any] = {}
    else:
        _, val, tasks = task_tensors(tokenizer, settings)
    with torch_threads(settings.threads):
        base_row: dict[str, Any] = evaluate_tasks(base, val, None)
        if settings.generate and hasattr(base, "generate"):
            for name, task in tasks.items():
                base_row[f"score_{name}"] = generation_score(
                    base, tokenizer, task, settings.generate, settings.max_new_tokens
                )
    del base
    for seed in seeds:
        for method in mixtures:
            if console is not None:
                console.print(f"{method}, seed {seed}", highlight=False)
            arm = dataclasses.replace(settings, method=method, seed=seed)
            row = finetune_mixture(make_base(), tokenizer, arm, progress=progress, console=console)
            rows.setdefault(method, []).append({"seed": seed, **row})
    summary = {
        "base": base_name,
        "mixtures": list(mixtures),
        "seeds": list(seeds),
        "settings": asdict(settings),
        "base_row": base_row,
        "rows": rows,
        "means": {m: summarize(r) for m, r in rows.items()},
        "machine": {"cpu": cpu_model(), "torch": torch.__version__},
        "wall_time_s": time.perf_counter() - start,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "report.md").write_text(render_report(summary))
    return summary


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per numeric key, the mean over ``rows`` (seeds) with its 95% t-interval (NaN for one seed)."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and k != "seed"]
    out = {}
    for k in keys:
        values = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        finite = [v for v in values if v == v]
        if finite:
            iv = t_interval(finite)
            out[k] = {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}
    return out


def _cell(stat: dict[str, float] | None, digits: int = 3) -> str:
    if stat is None:
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    if stat["n"] > 1 and stat["high"] == stat["high"]:
        text += f" ± {(stat['high'] - stat['low']) / 2:.{digits}f}"
    return text


REPORT_COLUMNS = (
    ("val_loss", "val loss", 3),
    ("entropy", "router entropy / log E", 3),
    ("ess", "ESS", 2),
    ("max_over_mean", "max/mean load", 2),
    ("task_mi", "task-expert MI", 3),
    ("trainable_params", "trainable params", 0),
    ("train_s", "train s", 0),
)


def render_report(summary: dict[str, Any]) -> str:
    """``report.md``: the settings, one table of means (± 95% t half-width over seeds) per mixture,
    and each task's val loss and decoded score."""
    s = summary["settings"]
    means = summary["means"]
    tasks = sorted({k[len("val_loss_") :] for m in means.values() for k in m if k.startswith("val_loss_")})
    lines = [
        f"# LoRA mixtures on {summary['base'] or 'the base model'}",
        "",
        f"Mixtures {', '.join(summary['mixtures'])}; seeds {summary['seeds']}; "
        f"{s['num_experts']} experts of rank {s['rank'] or '8 (FlyLoRA: 32)'}; {s['steps']} steps of {s['batch_size']} rows x "
        f"{s['seq_len']} tokens at lr {s['lr']:g}; data: {', '.join(s['text'] or s['tasks'])}. "
        f"Machine: {summary['machine']['cpu']}, torch {summary['machine']['torch']}; "
        f"wall time {summary['wall_time_s']:.0f} s. Means ± 95% t half-width over seeds.",
        "",
        "| mixture | " + " | ".join(label for _, label, _ in REPORT_COLUMNS) + " |",
        "|---" * (len(REPORT_COLUMNS) + 1) + "|",
    ]
    base = summary["base_row"]
    lines.append(
        f"| base (no mixture; seed {s['seed']}'s data) | "
        + " | ".join(f"{base[k]:.{d}f}" if k in base else "–" for k, _, d in REPORT_COLUMNS)
        + " |"
    )
    for m in summary["mixtures"]:
        lines.append(f"| {m} | " + " | ".join(_cell(means[m].get(k), d) for k, _, d in REPORT_COLUMNS) + " |")
    if tasks:
        lines += [
            "",
            "Per task: val loss (target tokens) / score of greedy decoding (exact match or chrF).",
            "",
        ]
        lines.append("| mixture | " + " | ".join(tasks) + " |")
        lines.append("|---" * (len(tasks) + 1) + "|")
        rows = [
            (
                f"base (no mixture; seed {s['seed']}'s data)",
                {k: {"mean": v, "n": 1} for k, v in base.items() if isinstance(v, float)},
            )
        ]
        rows += [(m, means[m]) for m in summary["mixtures"]]
        for label, stats in rows:
            cells = []
            for t in tasks:
                cell = _cell(stats.get(f"val_loss_{t}"))
                if f"score_{t}" in stats:
                    cell += f" / {_cell(stats[f'score_{t}'])}"
                cells.append(cell)
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
