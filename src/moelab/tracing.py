"""Traces: every routed layer's ``Routing``, recorded while a model runs.

    with moelab.trace(model) as tr:
        model(x)
    tr.summary()        # per-layer load, drop rate, entropy
    tr.routing("layers.0.moe")   # one Routing per layer, all calls concatenated

Routings are stored detached and on CPU, so a trace never keeps a graph or device memory alive.
Traces save to safetensors (tensors) plus JSON metadata, never pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .routing.routing import Routing, cat_routings


class Trace:
    """Recorded routings, by layer name, in the order layers first ran."""

    def __init__(self) -> None:
        self.records: dict[str, list[Routing]] = {}
        self.token_ids: dict[str, list[Tensor | None]] = {}

    # -- recording ---------------------------------------------------------------------------------
    def record(self, layer: str, routing: Routing, token_ids: Tensor | None = None) -> None:
        self.records.setdefault(layer, []).append(routing.detach("cpu"))
        ids = None if token_ids is None else token_ids.detach().reshape(-1).to("cpu")
        if ids is not None and ids.shape[0] != routing.num_tokens:
            ids = None  # not aligned with the routed tokens (e.g. a layer that routes a subset)
        self.token_ids.setdefault(layer, []).append(ids)

    # -- reading -------------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.records)

    def routing(self, layer: str) -> Routing:
        """All calls of ``layer`` concatenated along tokens."""
        if layer not in self.records:
            raise KeyError(f"layer {layer!r} was not traced; traced layers: {self.layers}")
        return cat_routings(self.records[layer])

    def tokens(self, layer: str) -> Tensor | None:
        """``[T]`` token ids aligned with ``routing(layer)``, or None if any call lacked them."""
        parts = self.token_ids.get(layer, [])
        if not parts or any(p is None for p in parts):
            return None
        return torch.cat(parts)

    def summary(self) -> list[dict[str, float | int | str]]:
        """Per layer: tokens, assignments, max/mean load, coefficient of variation, drop rate, entropy.

        ``entropy`` is the mean per-token entropy of the router's distribution divided by
        ``log E`` (1 = uniform, 0 = one-hot); NaN when the router gave no probabilities.
        ``z`` is ST-MoE's ``mean_t logsumexp(logits_t)^2`` and ``max_abs_logit`` the largest
        router logit magnitude (NaN without logits).
        """
        rows = []
        for name in self.layers:
            r = self.routing(name)
            load = r.tokens_per_expert().float()
            mean = load.mean().item()
            rows.append(
                {
                    "layer": name,
                    "tokens": r.num_tokens,
                    "assignments": r.num_assignments,
                    "max_over_mean": (load.max().item() / mean) if mean > 0 else float("nan"),
                    "cv": (load.std(unbiased=False).item() / mean) if mean > 0 else float("nan"),
                    "drop_rate": r.drop_rate(),
                    "entropy": routing_entropy(r),
                    **logit_stats(r),
                }
            )
        return rows

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Save to ``path`` (safetensors; metadata as JSON in the header)."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, dict] = {}
        for i, name in enumerate(self.layers):
            r = self.routing(name)
            p = f"l{i}."
            tensors[p + "token_index"] = r.token_index.contiguous()
            tensors[p + "expert_index"] = r.expert_index.contiguous()
            tensors[p + "weight"] = r.weight.float().contiguous()
            for opt in ("logits", "probs", "requested"):
                if getattr(r, opt) is not None:
                    tensors[p + opt] = getattr(r, opt).contiguous()
            ids = self.tokens(name)
            if ids is not None:
                tensors[p + "token_ids"] = ids.long().contiguous()
            meta[str(i)] = {
                "name": name,
                "num_tokens": r.num_tokens,
                "num_experts": r.num_experts,
                "top_k": r.top_k,
            }
        save_file(tensors, str(path), metadata={"moelab_trace": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "moelab_trace" not in header:
            raise ValueError(f"{path} is not a moelab trace (no 'moelab_trace' metadata)")
        meta = json.loads(header["moelab_trace"])
        tensors = load_file(str(path))
        tr = cls()
        for i in sorted(meta, key=int):
            m, p = meta[i], f"l{i}."
            r = Routing(
                token_index=tensors[p + "token_index"],
                expert_index=tensors[p + "expert_index"],
                weight=tensors[p + "weight"],
                num_tokens=m["num_tokens"],
                num_experts=m["num_experts"],
                logits=tensors.get(p + "logits"),
                probs=tensors.get(p + "probs"),
                top_k=m["top_k"],
                requested=tensors.get(p + "requested"),
            )
            tr.records[m["name"]] = [r]
            tr.token_ids[m["name"]] = [tensors.get(p + "token_ids")]
        return tr

    def __repr__(self) -> str:
        return f"Trace(layers={len(self.records)}, calls={sum(len(v) for v in self.records.values())})"


def routing_entropy(r: Routing) -> float:
    """Mean per-token entropy of the router's distribution, normalised by ``log E``."""
    if r.probs is None or r.num_tokens == 0 or r.num_experts < 2:
        return float("nan")
    p = r.probs.float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-20)
    h = -(p * p.clamp_min(1e-20).log()).sum(-1).mean().item()
    return h / math.log(r.num_experts)


def logit_stats(r: Routing) -> dict[str, float]:
    """``z`` (mean squared log-partition) and ``max_abs_logit`` of the router logits."""
    if r.logits is None or r.num_tokens == 0:
        return {"z": float("nan"), "max_abs_logit": float("nan")}
    lg = r.logits.float()
    return {"z": torch.logsumexp(lg, -1).square().mean().item(), "max_abs_logit": lg.abs().max().item()}


def traceable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module that records routings (moelab's routed layers)."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "_moelab_traceable", False)]


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


@contextmanager
def trace(model: nn.Module, trace: Trace | None = None) -> Iterator[Trace]:
    """Record the ``Routing`` of every routed layer of ``model`` while the block runs."""
    tr = trace if trace is not None else Trace()
    layers = traceable_layers(model)
    if not layers and _is_transformers_model(model):
        # An unpatched transformers MoE model: hooks on its router modules (moelab.hf.trace).
        from .hf.trace import trace as hf_trace

        with hf_trace(model, tr):
            yield tr
        return
    if not layers:
        raise ValueError(
            "trace(model): no moelab routed layers found; for a transformers model use moelab.hf.trace"
        )
    for name, m in layers:
        m._moelab_trace = (tr, name or type(m).__name__)
    try:
        yield tr
    finally:
        for _, m in layers:
            m._moelab_trace = None
