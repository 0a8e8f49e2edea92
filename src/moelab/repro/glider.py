"""``glider_heldin``: Glider's global bias raises held-in expert retrieval accuracy over PHATGOOSE.

Glider (Li et al. 2024; UNITES-Lab/glider) routes a mixture of per-task LoRA experts with
PHATGOOSE's local gate vectors plus ``scale * cos(task instruction embedding, query instruction
embedding)``. Its claim on held-in tasks is that the global bias lets each query reach its own
task's expert, which the local router alone often misses. The reproduction, per seed
(``run_glider_arms``), on the LoRA reproductions' harness (``moelab.repro.lora``):

1. **base**: the seed's pretrained dense byte ``MoELM`` of ``LORA_MODEL`` (``pretrained_base``,
   shared with the other LoRA reproductions in one process).
2. **PHATGOOSE stage 1** (``stage1_experts``): for each of ``GLIDER_TASKS`` (the generated tasks
   and stdlib code completion: no Debian package needed), a deep copy of the base gets one LoRA
   expert of rank ``RANK`` on ``TARGETS`` (``apply_phatgoose``), trained ungated on that task
   alone for ``steps`` (phase ``"lora"``), then its gate vectors from zero for ``gate_steps``
   with the LoRA frozen (phase ``"gate"``, ``gate_lr``); ``finetune`` with the task's packed rows.
3. **assembly**: ``assemble`` stacks the ``E = 4`` experts and gate vectors into one Glider
   mixture (top-2) on a fresh copy of the base, with MiniLM embeddings of one hand-written task
   description per expert (``TASK_DESCRIPTIONS``).
4. **arms**, on every task's val rows (packed per task; each packed row is one query):
   ``phatgoose``, the local router alone (scale 0), and ``glider``, the global bias at the
   held-in scale 100, each row's query instruction a hand-written paraphrase
   (``QUERY_PARAPHRASES``, none equal to the description or to the prompt's instruction), the
   row's one picked by ``(row + seed) % P``. No further training: Glider's mixture is zero-shot.

Metrics: ``retrieval`` (over the mixture layers, the fraction of real val tokens whose top-1
expert, by combine weight, is their task's expert; averaged over tasks, then layers),
``retrieval_seq`` (the same per packed row, the expert with the largest mean weight over the
row's tokens), ``val_loss`` (unweighted mean over tasks of the targets' cross-entropy) and
``val_loss_<task>``; the ``glider`` row also has ``instruction_retrieval``, the fraction of
queries whose closest description (cosine) is their task's. ``_oracle``: each task's val loss
under its own stage-1 adapter; ``_base``: the base's.
"""

from __future__ import annotations

import copy
import functools
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.repro.lora import (
    LORA_MODEL,
    LORA_TRAIN,
    RANK,
    TARGETS,
    evaluate,
    finetune,
    pretrained_base,
    single_task_data,
    train_settings,
)
from moelab.repro.rules import Arm, Condition, Reproduction, Rows, diff, fmt

GLIDER_TASKS = ("arithmetic", "brackets", "sort", "code")
GLIDER_ALPHA = 8.0  # scaling alpha / r = 1, as the other LoRA reproductions (ours; PHATGOOSE: 1/r)
# Stage 1 (our choices: the LoRA phase at the mixture reproductions' lr; the gate phase, from
# zero, at a higher lr for a few steps, as PHATGOOSE trains the gate briefly after the module).
GLIDER_TRAIN = {**LORA_TRAIN, "steps": 60, "warmup_steps": 6, "gate_steps": 30, "gate_lr": 1e-2}
GLIDER_SCALE = 100.0  # paper-eval.sh, T0 held-in
EVAL_ROWS = 16
RETRIEVAL_MARGIN = 0.05  # Glider's token retrieval must exceed PHATGOOSE's by more than this (ours)

# The experts' task instructions (Glider has an LLM write one per training task; ours by hand).
TASK_DESCRIPTIONS = {
    "arithmetic": "This task is solving short math word problems about people and the numbers of objects "
    "they own; the answer is a single integer.",
    "brackets": "This task is completing a sequence of nested brackets by writing the closing brackets in "
    "the right order.",
    "sort": "This task is ordering a list of integers in ascending or descending order, as requested.",
    "code": "This task is Python code completion: given the start of a standard library function, write "
    "its next line.",
}
# The queries' instructions: paraphrases, different from the descriptions and from the prompts'
# own instructions (moelab.data.tasks.INSTRUCTIONS), so retrieval is not string identity.
QUERY_PARAPHRASES = {
    "arithmetic": (
        "Work out how many items someone has at the end of the story.",
        "Compute the number that answers this counting puzzle.",
        "Read the little story and do the math.",
        "Figure out the final total after the purchases and losses.",
        "Calculate, then reply with one whole number.",
        "A quantitative reasoning question: give the resulting count.",
    ),
    "brackets": (
        "Balance the parentheses by adding the missing closers.",
        "Finish the string so that every opening symbol gets matched.",
        "Write what is needed to close all the unclosed delimiters.",
        "Make this expression of braces well-formed.",
        "Append the closing characters for ( [ { < in the right order.",
        "Properly nest and terminate this sequence of brackets.",
    ),
    "sort": (
        "Arrange these numbers from smallest to largest, or the reverse if asked.",
        "Put the list of values in order.",
        "Reorder the integers the way the question says.",
        "Return the numbers ranked in the requested direction.",
        "Order this collection of numbers.",
        "Give the sequence back, sorted.",
    ),
    "code": (
        "Continue writing this Python method.",
        "Predict the following line of source code.",
        "Complete the function body with its next statement.",
        "What comes next in this piece of Python?",
        "Autocomplete the next line of the program.",
        "Extend the given function definition by one line of code.",
    ),
}


# --------------------------------------------------------------------------------- embeddings
@functools.lru_cache(maxsize=1)
def instruction_embeddings() -> tuple[Tensor, dict[str, Tensor]]:
    """``(descriptions [E, m], {task: paraphrases [P, m]})``: MiniLM embeddings of
    ``TASK_DESCRIPTIONS`` (in ``GLIDER_TASKS`` order) and ``QUERY_PARAPHRASES``, once per process."""
    from moelab.data.embed import embed_texts

    texts = [TASK_DESCRIPTIONS[t] for t in GLIDER_TASKS]
    for t in GLIDER_TASKS:
        texts += list(QUERY_PARAPHRASES[t])
    emb = embed_texts(texts)
    e = len(GLIDER_TASKS)
    out, at = {}, e
    for t in GLIDER_TASKS:
        p = len(QUERY_PARAPHRASES[t])
        out[t] = emb[at : at + p]
        at += p
    return emb[:e], out


# --------------------------------------------------------------------------------- stage 1
def stage1_experts(
    base: nn.Module,
    tasks: dict[str, tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]],
    *,
    seed: int,
    settings: dict[str, Any],
) -> tuple[list[Any], dict[str, float]]:
    """PHATGOOSE stage 1 on each task of ``tasks`` (``{task: (train, val)}``, in order): a copy of
    ``base`` with ``apply_phatgoose`` (rank ``RANK``, ``GLIDER_ALPHA``), ``finetune`` ungated for
    ``settings["steps"]`` at ``lr``, then the gate alone for ``gate_steps`` at ``gate_lr``.
    Returns ``(experts in task order, row)``: ``val_loss_<task>`` under the task's own adapter,
    ``val_loss`` and ``train_s``."""
    from moelab.lora.glider import apply_phatgoose, phatgoose_phase, task_expert

    experts, row, seconds = [], {}, 0.0
    gate = {
        **settings,
        "steps": int(settings["gate_steps"]),
        "lr": float(settings["gate_lr"]),
        "warmup_steps": 0,
    }
    for i, (name, (data, val)) in enumerate(tasks.items()):
        model = copy.deepcopy(base)
        torch.manual_seed(seed * 1000 + i)  # each task's LoRA its own initialisation, seeded
        apply_phatgoose(model, list(TARGETS), rank=RANK, alpha=GLIDER_ALPHA)
        phatgoose_phase(model, "lora")
        seconds += finetune(model, seed=seed, train=settings, data=data, num_experts=None)["train_s"]
        phatgoose_phase(model, "gate")
        seconds += finetune(model, seed=seed + 1, train=gate, data=data, num_experts=None)["train_s"]
        row[f"val_loss_{name}"] = evaluate(model, {name: val}, num_experts=None)["val_loss"]
        experts.append(task_expert(model))
    row["val_loss"] = sum(row[f"val_loss_{t}"] for t in tasks) / len(tasks)
    row["train_s"] = seconds
    return experts, row


# --------------------------------------------------------------------------------- the arms
def retrieval_eval(
    model: nn.Module,
    val: dict[str, tuple[Tensor, Tensor, Tensor]],
    query_emb: dict[str, Tensor] | None,
    *,
    seed: int,
) -> dict[str, float]:
    """On every task's val rows (``val`` in expert order: task ``i`` owns expert ``i``), with each
    row's query embedding ``query_emb[task][(row + seed) % P]`` (None: no query, the local router):
    ``retrieval``, ``retrieval_seq``, ``val_loss_<task>``, ``val_loss`` (module docstring)."""
    import torch.nn.functional as F

    from moelab.core.routed import override_routing
    from moelab.lora.glider import queries

    row: dict[str, float] = {}
    tok_hits: dict[int, list[float]] = {}  # layer -> per task token retrieval
    seq_hits: dict[int, list[float]] = {}
    was_training = model.training
    model.eval()
    for expert, (task, (ids, labels, mask)) in enumerate(val.items()):
        total, count = 0.0, 0
        tok: dict[int, list[int]] = {}
        seq: dict[int, list[int]] = {}
        for lo in range(0, ids.shape[0], EVAL_ROWS):
            rows = torch.arange(lo, min(lo + EVAL_ROWS, ids.shape[0]))
            q = None
            if query_emb is not None:
                table = query_emb[task]
                q = table[(rows + seed) % table.shape[0]]
            seen: list[Any] = []

            def record(routing: Any, site: Any, seen: list = seen) -> Any:
                seen.append(routing)
                return routing

            with torch.no_grad(), override_routing(model, record), queries(model, q):
                logits = model(ids[rows]).logits
            lab = labels[rows][:, 1:].reshape(-1)
            total += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    lab,
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((lab != -100).sum())
            valid_BS = mask[rows]
            for layer, r in enumerate(seen):
                w_BSE = r.dense().detach().float().view(*valid_BS.shape, -1)
                top_BS = w_BSE.argmax(-1)
                hit = tok.setdefault(layer, [0, 0])
                hit[0] += int(((top_BS == expert) & valid_BS).sum())
                hit[1] += int(valid_BS.sum())
                mean_BE = (w_BSE * valid_BS[..., None]).sum(1) / valid_BS.sum(1, keepdim=True).clamp_min(1)
                s = seq.setdefault(layer, [0, 0])
                s[0] += int((mean_BE.argmax(-1) == expert).sum())
                s[1] += int(valid_BS.shape[0])
        row[f"val_loss_{task}"] = total / max(1, count)
        for layer, (h, n) in tok.items():
            tok_hits.setdefault(layer, []).append(h / max(1, n))
        for layer, (h, n) in seq.items():
            seq_hits.setdefault(layer, []).append(h / max(1, n))
    model.train(was_training)
    row["val_loss"] = sum(row[f"val_loss_{t}"] for t in val) / len(val)
    row["retrieval"] = sum(sum(v) / len(v) for v in tok_hits.values()) / len(tok_hits)
    row["retrieval_seq"] = sum(sum(v) / len(v) for v in seq_hits.values()) / len(seq_hits)
    return row


def instruction_retrieval(task_emb: Tensor, query_emb: dict[str, Tensor]) -> float:
    """The fraction of query paraphrases whose most similar description (cosine) is their own task's
    (task ``i`` of ``query_emb``'s order has description ``i``)."""
    from moelab.lora.glider import glider_global_bias

    hits, n = 0, 0
    for i, table in enumerate(query_emb.values()):
        hits += int((glider_global_bias(task_emb, table).argmax(-1) == i).sum())
        n += table.shape[0]
    return hits / max(1, n)


def glider_seed(
    base: nn.Module,
    tasks: dict[str, tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]],
    *,
    seed: int,
    settings: dict[str, Any],
    task_emb: Tensor,
    query_emb: dict[str, Tensor],
    scale: float = GLIDER_SCALE,
) -> Rows:
    """One seed's arms from ``base`` and ``tasks`` (``{task: (train, val)}``; task ``i`` gets
    expert ``i``): stage 1, the assembled mixture (top-2, ``scale``), then ``phatgoose`` (no
    query) and ``glider`` (``query_emb``) on the val rows. Rows ``phatgoose``, ``glider``,
    ``_oracle`` (each task under its own adapter; ``train_s`` of stage 1) and ``_base``."""
    from moelab.lora.glider import assemble

    if list(query_emb) != list(tasks) or task_emb.shape[0] != len(tasks):
        raise ValueError(
            f"glider_seed: query_emb must be keyed by the tasks {list(tasks)} in order, and task_emb [E={len(tasks)}, m]; "
            f"got keys {list(query_emb)} and task_emb {tuple(task_emb.shape)}"
        )
    val = {name: v for name, (_, v) in tasks.items()}
    base_row = evaluate(base, val, num_experts=None)
    experts, oracle = stage1_experts(base, tasks, seed=seed, settings=settings)
    mixture = copy.deepcopy(base)
    assemble(mixture, experts, task_emb, scale=scale)
    t0 = time.perf_counter()
    rows: Rows = {"phatgoose": retrieval_eval(mixture, val, None, seed=seed)}
    rows["glider"] = retrieval_eval(mixture, val, query_emb, seed=seed)
    rows["glider"]["instruction_retrieval"] = instruction_retrieval(task_emb, query_emb)
    eval_s = time.perf_counter() - t0
    for label in ("phatgoose", "glider"):
        rows[label]["eval_s"] = eval_s / 2
        rows[label]["train_s"] = oracle["train_s"]
        rows[label]["steps"] = float(settings["steps"])
        rows[label]["gate_steps"] = float(settings["gate_steps"])
    rows["_oracle"] = oracle
    rows["_base"] = base_row
    return rows


def _settings(train: dict[str, Any]) -> dict[str, Any]:
    """``GLIDER_TRAIN`` with ``train``'s overrides of its keys; ``threads``."""
    return train_settings(GLIDER_TRAIN, train)


def run_glider_arms(
    *,
    seed: int,
    model: dict[str, Any],
    train: dict[str, Any],
    out: Path | None = None,
    progress: bool = False,
    console: Any = None,
) -> Rows:
    """One seed of ``glider_heldin`` (module docstring): the seed's base, ``GLIDER_TASKS``' packed
    rows (``single_task_data``), the MiniLM embeddings (``instruction_embeddings``), ``glider_seed``."""
    from moelab.train.resources import torch_threads

    settings = _settings(train)
    base = pretrained_base(seed, {**LORA_MODEL, **model}, settings, progress, console)
    with torch_threads(settings["threads"]):
        task_emb, query_emb = instruction_embeddings()
        tasks = single_task_data(seed, GLIDER_TASKS)
        if progress and console is not None:
            console.print(f"glider seed {seed}: PHATGOOSE stage 1 on {', '.join(GLIDER_TASKS)}")
        return glider_seed(base, tasks, seed=seed, settings=settings, task_emb=task_emb, query_emb=query_emb)


def _requires() -> str | None:
    from moelab.data.embed import embedding_unavailable

    return embedding_unavailable()


def _describe(r: Rows) -> str:
    names = [k.removeprefix("val_loss_") for k in r["_oracle"] if k.startswith("val_loss_")]

    def arm(label: str) -> str:
        x = r[label]
        tasks = ", ".join(f"{t} {x[f'val_loss_{t}']:.3f}" for t in names)
        return (
            f"{label}: retrieval {fmt(x['retrieval'])} of tokens, {fmt(x['retrieval_seq'])} of rows; val loss "
            f"{x['val_loss']:.3f} ({tasks})"
        )

    oracle = ", ".join(f"{t} {r['_oracle'][f'val_loss_{t}']:.3f}" for t in names)
    return (
        f"{len(names)} PHATGOOSE experts (LoRA r = {RANK} on qkv/out/gate_up/down of the "
        f"{LORA_MODEL['n_layers']}-layer d={LORA_MODEL['d_model']} byte LM; {r['glider']['steps']:.0f} LoRA + "
        f"{r['glider']['gate_steps']:.0f} gate steps per task, {r['glider']['train_s']:.0f} s), assembled top-2; "
        f"held-in val rows, the query a MiniLM-embedded paraphrase (its nearest description is its task's for "
        f"{fmt(r['glider']['instruction_retrieval'])} of the paraphrases); mean over seeds. {arm('phatgoose')}; "
        f"{arm('glider')} (scale {GLIDER_SCALE:g}); own adapter {oracle}; base val loss {r['_base']['val_loss']:.3f}"
    )


GLIDER_HELDIN = Reproduction(
    name="glider_heldin",
    method="glider",
    paper="Glider (Li et al. 2024); code UNITES-Lab/glider (molora layers, paper-eval.sh); PAPERS.md B.11",
    claim=(
        "On held-in tasks, Glider's global bias (scale 100, MiniLM embeddings of task descriptions vs query "
        "paraphrases) raises expert retrieval accuracy (the share of val tokens whose top-1 expert is their "
        f"task's) over PHATGOOSE's local router alone by more than {RETRIEVAL_MARGIN}."
    ),
    arms={"phatgoose": Arm("glider", {"scale": 0.0}), "glider": Arm("glider", {"scale": GLIDER_SCALE})},
    conditions=(
        Condition(
            "token expert retrieval: glider - phatgoose",
            diff("retrieval", "glider", "phatgoose"),
            "higher",
            threshold=RETRIEVAL_MARGIN,
        ),
    ),
    describe=_describe,
    model=LORA_MODEL,
    train=dict(GLIDER_TRAIN),
    runner=run_glider_arms,
    requires=_requires,
)

GLIDER: list[Reproduction] = [GLIDER_HELDIN]
