"""Loss functions for ``moelab.train.Trainer``: ``loss_fn(model, batch) -> (loss, metrics)``.

``loss`` is back-propagated. ``metrics`` may hold, by name:

- ``task_loss``: the loss without auxiliary terms; the trainer logs it and averages it for the val
  loss (default: ``loss``);
- ``aux_loss``: the auxiliary (routing) losses, logged;
- ``count``: the weight of this batch in the val mean (default: its number of rows);
- ``tokens``: what throughput counts (default: its number of rows);
- ``row_loss``: ``[rows]``, each row's own task loss (evaluation only, optional): the trainer
  reports the val loss's standard error over rows from it (``val_loss_se``);
- ``type_loss``: ``[types, 2]``, the summed task loss and the count of predicted tokens of each
  token type (evaluation only, with token types): the trainer reports ``val_loss_by_type``.

A ``loss_fn`` that takes a ``step`` keyword gets the optimizer step (schedules, ``RoutingContext``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moelab.core.context import RoutingContext

# ``loss_fn(model, batch) -> (loss, metrics)``; it may also take ``step=`` (the optimizer step).
LossFn = Callable[..., tuple[Tensor, dict[str, Any]]]


def accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def lm_loss(
    model: nn.Module, batch: Tensor | tuple[Tensor, Tensor], *, step: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """The default loss: a language model called as ``model(ids, labels=ids)`` that returns an
    object with ``.loss`` (``MoELM``; a transformers causal LM). ``batch``: ``[B, S]`` token ids,
    or ``(ids, types)`` from a corpus with token types (``moelab.data.mixed``), passed on as
    ``model(..., token_types=types)``.

    Metrics: ``task_loss`` (``.ce_loss`` when the output has it, the next-token cross-entropy
    without auxiliary losses), ``aux_loss``, ``count`` (the ``B * (S - 1)`` predicted tokens
    that weight the val mean), ``tokens`` (``B * S``, for throughput) and, in eval mode,
    ``row_loss`` (``[B]``: each window's mean next-token cross-entropy, from ``.logits``; the
    val loss is their mean, and their spread its standard error). A model whose ``forward``
    takes ``ctx`` gets ``RoutingContext(step=step)``.
    """
    types = None
    if _typed_ids(batch):
        batch, types = batch
    if not isinstance(batch, Tensor) or batch.dim() != 2:
        got = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise TypeError(f"lm_loss (the default loss_fn) takes [B, S] token ids, got {got}; pass loss_fn=")
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    kwargs: dict[str, Any] = {"ctx": RoutingContext(step=step)} if accepts(inner.forward, "ctx") else {}
    if types is not None:
        if not accepts(inner.forward, "token_types"):
            raise TypeError(
                f"the data has token types but {type(inner).__name__}.forward takes no token_types"
            )
        kwargs["token_types"] = types
    out = model(batch, labels=batch, **kwargs)
    loss = getattr(out, "loss", None)
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"lm_loss (the default loss_fn) needs model(ids, labels=ids) to return an object with a .loss "
            f"tensor; {type(inner).__name__} returned {type(out).__name__}: pass loss_fn=(model, batch) -> (loss, metrics)"
        )
    ce = getattr(out, "ce_loss", None)
    b, s = batch.shape
    metrics: dict[str, Any] = {
        "task_loss": ce if ce is not None else loss,
        "count": b * (s - 1),
        "tokens": b * s,
    }
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        metrics["aux_loss"] = aux
    logits = getattr(out, "logits", None)
    if not inner.training and isinstance(logits, Tensor) and logits.shape[:2] == (b, s) and s > 1:
        # one cross-entropy per window (windows are equally long, so their mean is the val loss)
        ce_BS = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none"
        )
        metrics["row_loss"] = ce_BS.mean(1)
        if types is not None:
            # per token type of the *predicted* token: [types, 2] = (sum of CE, count)
            target_types = types[:, 1:].reshape(-1).long()
            n = int(target_types.max()) + 1 if target_types.numel() else 0
            sums = torch.zeros(n, dtype=torch.float64, device=ce_BS.device).index_add_(
                0, target_types, ce_BS.reshape(-1).double()
            )
            counts = torch.bincount(target_types, minlength=n).double()
            metrics["type_loss"] = torch.stack([sums, counts], dim=1)
    return loss, metrics


def _typed_ids(batch: Any) -> bool:
    """Whether ``batch`` is ``(ids, types)``: two integer ``[B, S]`` tensors of one shape."""
    return (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(isinstance(t, Tensor) and t.dim() == 2 and not t.is_floating_point() for t in batch)
        and batch[0].shape == batch[1].shape
    )


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_len(batch: Any) -> int:
    first = (
        batch[0]
        if isinstance(batch, (tuple, list))
        else next(iter(batch.values()))
        if isinstance(batch, dict)
        else batch
    )
    return int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else 1


def scalar(x: Any) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)
