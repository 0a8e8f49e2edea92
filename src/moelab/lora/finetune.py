"""Fine-tuning LoRA mixtures on instruction tasks: packing, the loss, the measurements.

The pieces ``moelab finetune`` / ``moelab compare --mixtures`` (``moelab.train.finetune``) and the
LoRA reproductions (``moelab.repro.lora``) share:

- ``pack_examples``: ``moelab.data.tasks.encode_examples`` rows packed whole into fixed-length
  rows (greedy; no example is split; the rest padded), as packing SFT trainers do.
- ``sequence_losses`` / ``mixture_loss``: each row's mean target cross-entropy; the loss a
  ``moelab.train.Trainer`` runs: that cross-entropy plus the mixtures' auxiliary losses
  (``moelab.aux_loss``), or ReMix's RLOO step (``remix_rloo_step``) when the model has ReMix routers.
- ``evaluate_tasks``: per task, the target tokens' cross-entropy, and ``routing_metrics`` of the
  mixture layers on the real tokens (entropy, ESS, load, task-expert mutual information).

Works for any causal LM called as ``model(ids).logits`` (a transformers model, ``MoELM``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.core.routed import override_routing, routed_layers
from moelab.lora.remix import REMIX_NUM_SAMPLES, remix_rloo_step, remix_routers, router_effective_num_experts

EVAL_ROWS = 16  # packed val rows per forward


def pack_examples(encoded: dict[str, Tensor], length: int, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pack ``encode_examples`` rows whole, in order, into rows of ``length`` tokens (greedy:
    an example that does not fit starts a new row; one longer than ``length`` is dropped).

    Returns ``(input_ids [N, L], labels [N, L], mask [N, L] bool)``: labels ``-100`` off the
    targets and on padding, ``mask`` True on real tokens. Raises ``ValueError`` when nothing fits.
    """
    ids_rows: list[list[int]] = [[]]
    lab_rows: list[list[int]] = [[]]
    for ids, labels, keep in zip(
        encoded["input_ids"], encoded["labels"], encoded["attention_mask"], strict=True
    ):
        n = int(keep.sum())
        if n > length:
            continue
        if len(ids_rows[-1]) + n > length:
            ids_rows.append([])
            lab_rows.append([])
        ids_rows[-1].extend(ids[:n].tolist())
        lab_rows[-1].extend(labels[:n].tolist())
    if not ids_rows[-1]:
        ids_rows.pop()
        lab_rows.pop()
    if not ids_rows:
        raise ValueError(f"pack_examples: no example fits in length={length}")
    ids_NL = torch.full((len(ids_rows), length), pad_id, dtype=torch.long)
    labels_NL = torch.full((len(ids_rows), length), -100, dtype=torch.long)
    mask_NL = torch.zeros((len(ids_rows), length), dtype=torch.bool)
    for i, (ids, labels) in enumerate(zip(ids_rows, lab_rows, strict=True)):
        ids_NL[i, : len(ids)] = torch.tensor(ids)
        labels_NL[i, : len(ids)] = torch.tensor(labels)
        mask_NL[i, : len(ids)] = True
    return ids_NL, labels_NL, mask_NL


ROUTING_METRICS = (
    "entropy",
    "router_ess",
    "max_over_mean",
    "usage_cv",
    "ess",
    "experts_per_token",
    "task_mi",
)


def routing_metrics(records: list[tuple[str, Any, Tensor, int]], num_experts: int) -> dict[str, float]:
    """Routing statistics of ``records`` = ``[(task, routing, valid_T bool, layer)]`` (one per
    mixture layer and forward; ``valid_T`` marks the real tokens of the ``routing.num_tokens``),
    pooled per layer over forwards, then averaged over layers (module docstring): the
    ``ROUTING_METRICS`` ``entropy``, ``router_ess``, ``max_over_mean``, ``usage_cv``, ``ess``,
    ``experts_per_token``, ``task_mi``."""
    if not records:
        raise ValueError("routing_metrics: records is empty (no mixture layer ran)")
    log_e = math.log(num_experts)
    per_layer: dict[int, dict[str, Any]] = {}
    for task, r, valid_T, layer in records:
        acc = per_layer.setdefault(
            layer, {"entropy": 0.0, "router_ess": 0.0, "tokens": 0, "ess": 0.0, "assign": 0, "counts": {}}
        )
        valid_T = valid_T.reshape(-1)
        keep_A = valid_T[r.token_index]  # assignments of real tokens
        probs_TE = r.probs if r.probs is not None else torch.softmax(r.logits, dim=-1)
        p_TE = probs_TE.detach().float()[valid_T]
        entropy_T = -(p_TE * p_TE.clamp_min(1e-30).log()).sum(-1) / log_e
        w_A, token_A = r.weight.detach().float()[keep_A], r.token_index[keep_A]
        sum_T = torch.zeros(r.num_tokens).index_add_(0, token_A, w_A)
        sq_T = torch.zeros(r.num_tokens).index_add_(0, token_A, w_A * w_A)
        has_T = valid_T & (sq_T > 0)  # a token no expert took counts ESS 0
        acc["entropy"] += float(entropy_T.sum())
        if p_TE.shape[0]:  # the mean over these tokens of 1 / sum_e p_e^2, back to a sum
            acc["router_ess"] += float(router_effective_num_experts(p_TE)) * p_TE.shape[0]
        acc["tokens"] += int(valid_T.sum())
        acc["ess"] += float((sum_T[has_T] ** 2 / sq_T[has_T]).sum())
        acc["assign"] += int(keep_A.sum())
        counts_E = torch.bincount(r.expert_index[keep_A], minlength=num_experts).double()
        acc["counts"][task] = acc["counts"].get(task, 0) + counts_E
    out = dict.fromkeys(ROUTING_METRICS, 0.0)
    for acc in per_layer.values():
        table_NE = torch.stack(list(acc["counts"].values()))  # [tasks, E] assignments
        usage_E = table_NE.sum(0)
        mean = usage_E.mean()
        tokens = max(1, acc["tokens"])
        out["entropy"] += acc["entropy"] / tokens
        out["router_ess"] += acc["router_ess"] / tokens
        out["ess"] += acc["ess"] / tokens
        out["experts_per_token"] += acc["assign"] / tokens
        out["max_over_mean"] += float(usage_E.max() / mean)
        out["usage_cv"] += float(usage_E.std(unbiased=False) / mean)
        joint_NE = table_NE / table_NE.sum()
        outer_NE = joint_NE.sum(1, keepdim=True) * joint_NE.sum(0, keepdim=True)
        nz = joint_NE > 0
        out["task_mi"] += float((joint_NE[nz] * (joint_NE[nz] / outer_NE[nz]).log()).sum()) / log_e
    return {k: v / len(per_layer) for k, v in out.items()}


def evaluate_tasks(
    model: nn.Module,
    val: dict[str, tuple[Tensor, Tensor, Tensor]],
    num_experts: int | None,
    rows_per_forward: int = EVAL_ROWS,
) -> dict[str, float]:
    """``val_loss_<task>`` (target tokens' cross-entropy), ``val_loss`` (their unweighted mean)
    and, unless ``num_experts`` is None (a model without mixtures), ``routing_metrics`` on
    every real val token."""
    records: list[tuple[str, Any, Tensor, int]] = []
    row: dict[str, float] = {}
    was_training = model.training
    model.eval()
    for task, (ids, labels, mask) in val.items():
        total, count = 0.0, 0
        for lo in range(0, ids.shape[0], rows_per_forward):
            chunk = slice(lo, lo + rows_per_forward)
            seen: list[Any] = []

            def record(routing: Any, site: Any, seen: list = seen) -> Any:
                seen.append(routing)
                return routing

            watch = override_routing(model, record) if num_experts is not None else contextlib.nullcontext()
            with torch.no_grad(), watch:
                logits = model(ids[chunk]).logits
            lab = labels[chunk][:, 1:].reshape(-1)
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), lab, ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((lab != -100).sum())
            records.extend((task, r, mask[chunk].reshape(-1), layer) for layer, r in enumerate(seen))
        row[f"val_loss_{task}"] = total / max(1, count)
    row["val_loss"] = sum(row[f"val_loss_{t}"] for t in val) / len(val)
    if num_experts is not None:
        row.update(routing_metrics(records, num_experts))
    model.train(was_training)
    return row


def sequence_losses(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """``[B]``: each row's mean target cross-entropy (a row without targets gives 0)."""
    logits = model(ids).logits[:, :-1]
    lab = labels[:, 1:]
    ce_BS = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), lab.reshape(-1), ignore_index=-100, reduction="none"
    ).view(lab.shape)
    return ce_BS.sum(1) / (lab != -100).sum(1).clamp_min(1)


def mixture_loss(
    model: nn.Module, batch: tuple[Tensor, Tensor], *, rloo_samples: int = REMIX_NUM_SAMPLES
) -> tuple[Tensor, dict[str, Any]]:
    """``moelab.train.Trainer``'s ``loss_fn`` for a model with LoRA mixtures on packed task rows.

    ``batch = (input_ids [B, L], labels [B, L])`` (``pack_examples``; ``-100`` off the targets).
    The loss is the target tokens' cross-entropy (each row's mean, then the mean over rows) plus
    ``moelab.aux_loss(model)``. With ReMix routers in training it is ``remix_rloo_step``'s:
    ``rloo_samples`` forwards with sampled expert subsets, their mean loss plus the RLOO surrogate.

    Metrics: ``task_loss``, ``aux_loss``, ``count`` (rows: the val mean weights rows equally),
    ``tokens`` (``B * L``) and, in eval mode, ``row_loss [B]``.
    """
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError("batch must be (input_ids [B, L], labels [B, L]) from pack_examples")
    ids, labels = batch
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if inner.training and remix_routers(inner):
        rows = torch.arange(ids.shape[0])
        task, surrogate = remix_rloo_step(
            model, lambda m, b: sequence_losses(m, ids[b], labels[b]), rows, num_samples=rloo_samples
        )
        loss, row_loss = task + surrogate, None
    else:
        row_loss = sequence_losses(model, ids, labels)
        task = row_loss.mean()
        loss = task
    # every routed layer's aux loss of this forward (moelab.aux_loss, which needs at least one)
    terms = [m.aux_loss for _, m in routed_layers(inner) if isinstance(getattr(m, "aux_loss", None), Tensor)]
    aux = torch.stack(terms).sum() if terms else torch.zeros((), device=ids.device)
    metrics: dict[str, Any] = {
        "task_loss": float(task.detach()),
        "aux_loss": float(aux.detach()),
        "count": int(ids.shape[0]),
        "tokens": int(ids.numel()),
    }
    if row_loss is not None and not inner.training:
        metrics["row_loss"] = row_loss.detach()
    return loss + aux, metrics
