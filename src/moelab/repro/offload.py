"""Offloading reproduction: ``pregate_prefetch`` (prefetching from Read-ME's pre-gate beats a plain
LRU expert cache on hit rate and tokens/s).

No model trains: each seed builds an untrained ``MoELM`` whose MoE layers are routed by Read-ME's
pre-gate (``router="pregate"``, top-1, the paper's setting: the expert of every layer is decided
from the token ids before the backbone runs), offloads its experts to host memory with a cache of
``slots`` experts per layer (``moelab.ops.offload``), and decodes the same prompt greedily with
both arms:

- ``lru``: LRU cache, no prefetch (Mixtral-offloading's cache without its speculation);
- ``pregate_prefetch``: the same cache, and while layer ``i`` computes, a background thread loads
  the experts of layer ``i + 1`` that the pre-gate decided (exact: every layer uses the decision).

Measured per arm: ``hit_rate`` (hits / requests over every layer call of one generation) and
``tokens_per_s`` (the median over interleaved rounds). Both arms decode the same tokens (the
runtime is exact). PAPERS.md item 22 (Read-ME): pre-gating "enables lookahead scheduling /
prefetching of experts", claimed to cut latency.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from moelab.models.config import MoELMConfig
from moelab.models.generate import generate
from moelab.models.lm import MoELM
from moelab.ops.offload import budget_for, offload
from moelab.repro.rules import Arm, Reproduction, Rows, fmt, higher

# Our choice: small enough for a CPU run of every seed well under a minute, experts large enough
# (0.75 MiB in fp32) that loading one costs about as much as computing a token's layer.
OFFLOAD_SETTING = {
    "d_model": 128, "n_layers": 4, "num_experts": 32, "expert_hidden": 512, "slots": 8,
    "prompt": 8, "new_tokens": 32, "rounds": 3,
}  # fmt: skip


def _timed(model: MoELM, prompt: torch.Tensor, n: int, runtime) -> tuple[torch.Tensor, float]:
    runtime.reset()
    t0 = time.perf_counter()
    out = generate(model, prompt, n)
    return out, time.perf_counter() - t0


def run_pregate_prefetch(
    seed: int, model: dict[str, Any] | None = None, train: dict[str, Any] | None = None, **_: Any
) -> Rows:
    """One seed's rows (module docstring); ``train["offload"]`` may override ``OFFLOAD_SETTING``."""
    cfg = {**OFFLOAD_SETTING, **((train or {}).get("offload") or {})}
    torch.manual_seed(seed)
    base = MoELM(
        MoELMConfig(
            vocab_size=256,
            d_model=int(cfg["d_model"]),
            n_layers=int(cfg["n_layers"]),
            n_heads=4,
            max_seq_len=128,
            num_experts=int(cfg["num_experts"]),
            top_k=1,
            expert_hidden=int(cfg["expert_hidden"]),
            router="pregate",
        )  # fmt: skip
    ).eval()
    prompt = torch.randint(0, 256, (1, int(cfg["prompt"])), generator=torch.Generator().manual_seed(seed))
    arms = {"lru": "none", "pregate_prefetch": "pregate"}
    models, runtimes = {}, {}
    for arm, prefetch in arms.items():
        models[arm] = copy.deepcopy(base)
        runtimes[arm] = offload(
            models[arm], budget_for(models[arm], int(cfg["slots"])), "lru", prefetch=prefetch
        )
    n = int(cfg["new_tokens"])
    secs: dict[str, list[float]] = {arm: [] for arm in arms}
    outs = {}
    for _ in range(int(cfg["rounds"])):  # interleaved: both arms see the same machine load
        for arm in arms:
            outs[arm], s = _timed(models[arm], prompt, n, runtimes[arm])
            secs[arm].append(s)
    if not torch.equal(outs["lru"], outs["pregate_prefetch"]):
        raise RuntimeError("the two offloaded runs decoded different tokens (the runtime must be exact)")
    rows: Rows = {}
    for arm in arms:
        st = runtimes[arm].stats()  # the last round's counters (every round starts from an empty cache)
        med = sorted(secs[arm])[len(secs[arm]) // 2]
        rows[arm] = {
            "hit_rate": st["hit_rate"],
            "tokens_per_s": n / med,
            "prefetch_hits": float(st["prefetch_hits"]),
        }
        runtimes[arm].close()
    return rows


def _describe(r: Rows) -> str:
    s = OFFLOAD_SETTING
    return (
        f"hit rate: LRU {fmt(r['lru']['hit_rate'])}, pre-gate prefetch {fmt(r['pregate_prefetch']['hit_rate'])}; "
        f"decode tokens/s: LRU {fmt(r['lru']['tokens_per_s'])}, pre-gate prefetch "
        f"{fmt(r['pregate_prefetch']['tokens_per_s'])} (mean over seeds); untrained Read-ME pre-gate MoELM, "
        f"{s['n_layers']} layers of {s['num_experts']} experts, {s['slots']} cached per layer, batch 1, CPU"
    )


PREGATE_PREFETCH = Reproduction(
    name="pregate_prefetch",
    method="offload",
    paper="Read-ME (Cai et al., NeurIPS 2024), pre-gating for expert prefetch; PAPERS.md item 22",
    claim=(
        "With experts offloaded and a cache of a quarter of each layer's experts, prefetching the next layer's "
        "experts from the pre-gate's decision gives a higher cache hit rate and more decode tokens/s than an LRU "
        "cache alone."
    ),
    # Nothing trains: an arm's "router" names the cache setting it documents.
    arms={
        "lru": Arm("pregate", {"offload_policy": "lru", "prefetch": "none"}),
        "pregate_prefetch": Arm("pregate", {"offload_policy": "lru", "prefetch": "pregate"}),
    },
    conditions=(
        higher("hit_rate", "pregate_prefetch", "lru", name="hit rate"),
        higher("tokens_per_s", "pregate_prefetch", "lru", name="tokens/s"),
    ),
    describe=_describe,
    runner=run_pregate_prefetch,
)

OFFLOAD: list[Reproduction] = [PREGATE_PREFETCH]
