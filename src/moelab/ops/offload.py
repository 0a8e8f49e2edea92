"""Expert offloading: experts' weights live in host memory or on disk, a bounded cache holds the
resident ones, and each MoE layer call fetches the experts its routing touches.

The setting of Mixtral-offloading (Eliseev & Mazur 2023, LRU expert cache + speculative
prefetch), MoE-Infinity (Xue et al. 2024, activation-aware prefetch and caching) and Pre-gated
MoE (Hwang et al. 2024, ISCA: the *next* layer's gate applied to the current layer's input
predicts its experts, which are loaded while the current layer computes). With Read-ME's
pre-gating (Cai et al. 2024, ``moelab.routers.pregate``) the experts of every layer are decided
before the backbone runs, so the prediction is exact.

``offload(model, budget_bytes, policy, storage, prefetch)`` turns every ``moelab.MoE`` layer of
``model`` (a ``MoELM``, a transformers model patched by ``moelab.hf.patch``, or any module holding
``MoE`` layers with an ``ExpertBank``) into an offloaded layer:

- the bank's expert-major tensors (its weights, and its biases if it has some) move to an
  ``ExpertStore`` (``"memory"``: host tensors; a path: one safetensors file, read per expert
  through ``safe_open``, memory-mapped);
- the layer's bank becomes an ``OffloadedExperts`` (no parameters: its weights are not in the
  model) and its dispatcher an ``OffloadDispatcher``;
- each layer owns an ``ExpertCache`` of ``capacity`` expert slots (``budget_bytes`` split evenly
  over the MoE layers, counted in whole experts of ``expert_nbytes`` bytes) on the model's device,
  with an eviction policy from ``moelab.policies`` (the one the cache simulator uses).

Per layer call: the touched experts ``U`` (first appearance in token order, column order) are
requested once each: resident -> hit, else miss -> loaded into a slot, evicting a resident expert
not in ``U`` chosen by the policy. The executor then runs on a compact bank of ``U``'s weights
(in expert order, so the executor sorts, groups and combines exactly as on the full bank: the
outputs are bitwise those of the in-memory model for the same executor). If ``|U|`` exceeds the
capacity (a long prefill), the experts that do not fit are loaded for this call only (misses,
counted in ``overflow``) and not kept: documented behaviour, our choice.

Prefetch (a background thread, one per runtime): while layer ``i`` computes, the experts predicted
for layer ``i + 1`` are loaded into its cache (evicting by the policy, predicted experts pinned).
Predictions: ``"pregate"`` (layer ``i + 1`` has a Read-ME pre-gate router: its routing is layer
``i``'s, known exactly) or ``"router"`` (layer ``i + 1``'s router applied to layer ``i``'s input,
Pre-gated MoE). ``prefetch="auto"`` picks ``"pregate"`` for pre-gate routers, ``"router"``
otherwise. A layer waits for its pending prefetch before it looks at its cache.

Policies in the runtime: ``lru`` and ``lfu`` as in the simulator. ``lookahead`` and ``belady``
need the future: a live runtime knows none, so they evict as LRU (the policy's documented
fallback); ``ExpertCache.replay(topk_index)`` runs a known trace with its true future (then
every policy matches ``moelab.analysis.cache.simulate_cache``).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from moelab import registry
from moelab.core.bank import expert_major_tensors, rebuilt_bank
from moelab.core.context import RoutingContext
from moelab.core.routing import Routing
from moelab.experts.bank import ExpertBank
from moelab.ops.dispatchers import Dispatcher, check_rows
from moelab.ops.executors import Executor, resolve_executor
from moelab.policies import POLICIES, CachePolicy, make_policy
from moelab.routers.pregate import PreGateRouter

PREFETCH_MODES = ("auto", "pregate", "router", "none")


# --------------------------------------------------------------------------------- storage
class ExpertStore:
    """Every offloaded layer's expert weights outside the cache: host tensors or a safetensors file.

    ``weights[layer]`` maps a bank's tensor names to expert-major tensors ``[E, ...]`` (every
    parameter and buffer of the bank: ``gate_up_proj`` and ``down_proj`` of an ``ExpertBank``,
    plus the biases of gpt-oss's). ``load(layer, e) -> {name: row e}`` (CPU tensors). On disk each
    expert's row of each tensor is its own entry (``"{layer}.{e}.{name}"``) so one fetch reads one
    expert's bytes from the memory-mapped file. Reads are serialised by a lock (the prefetch
    thread and the main thread share the store).
    """

    def __init__(self, weights: dict[int, dict[str, Tensor]], storage: str | Path = "memory") -> None:
        self.path: Path | None = None
        self._lock = threading.Lock()
        self._memory: dict[str, Tensor] = {}
        self._file = None
        self.names = {layer: list(tensors) for layer, tensors in weights.items()}
        rows = {
            f"{layer}.{e}.{name}": t[e]
            for layer, tensors in weights.items()
            for name, t in tensors.items()
            for e in range(t.shape[0])
        }
        if isinstance(storage, str) and storage == "memory":
            pin = torch.cuda.is_available()
            for key, t in rows.items():
                t = t.detach().to("cpu", copy=True).contiguous()
                self._memory[key] = t.pin_memory() if pin else t
            return
        if not isinstance(storage, (str, Path)):
            raise TypeError(f"storage must be 'memory' or a file path, got {type(storage).__name__}")
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = Path(storage)
        if path.is_dir():
            path = path / "experts.safetensors"
        if not path.parent.is_dir():
            raise ValueError(f"storage: the directory {str(path.parent)!r} does not exist")
        save_file({k: t.detach().to("cpu").contiguous() for k, t in rows.items()}, str(path))
        del rows
        self.path = path
        self._file = safe_open(str(path), framework="pt", device="cpu")

    def load(self, layer: int, expert: int) -> dict[str, Tensor]:
        keys = {name: f"{layer}.{expert}.{name}" for name in self.names[layer]}
        if self._file is None:
            return {name: self._memory[k] for name, k in keys.items()}
        with self._lock:
            return {name: self._file.get_tensor(k) for name, k in keys.items()}


# --------------------------------------------------------------------------------- one layer's cache
@dataclass
class CacheStats:
    """Counters of one layer's cache (requests are per call and unique expert; prefetched experts
    that are then requested count as hits and in ``prefetch_hits``)."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0
    overflow: int = 0

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")


class ExpertCache:
    """``capacity`` expert slots of one layer on ``device`` with an eviction ``policy``.

    Slot tensors: one ``[capacity, ...]`` per tensor of the bank (``slots["gate_up_proj"]``,
    ``slots["down_proj"]``, ...). ``request(U)`` makes the experts ``U`` resident (pinned while it
    runs) and returns their weights; ``prefetch(P)`` loads predicted experts without a request.
    """

    def __init__(
        self, layer: int, store: ExpertStore, template: nn.Module, capacity: int, policy: CachePolicy,
        device: torch.device,
    ) -> None:  # fmt: skip
        self.layer = layer
        self.store = store
        self.capacity = capacity
        self.policy = policy
        self.num_experts = template.num_experts
        tensors = expert_major_tensors(template)
        self.slots = {
            name: torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device=device)
            for name, t in tensors.items()
        }
        self.expert_nbytes = sum(t[0].numel() * t.element_size() for t in tensors.values())
        self.slot_of: dict[int, int] = {}
        self.free = list(range(capacity - 1, -1, -1))
        self.prefetched: set[int] = set()  # loaded by prefetch, not yet requested
        self.stats = CacheStats()
        self.step = 0

    def _read(self, e: int) -> dict[str, Tensor]:
        rows = self.store.load(self.layer, e)
        self.stats.bytes_read += self.expert_nbytes
        return rows

    def _admit(self, e: int, pinned: set[int], next_use=None) -> bool:
        """Load ``e`` into a slot (evicting an unpinned expert if full); False if all are pinned."""
        if not self.free:
            cand = [r for r in self.slot_of if r not in pinned]
            if not cand:
                return False
            victim = self.policy.victim(cand, self.step, next_use)
            self.free.append(self.slot_of.pop(victim))
            self.prefetched.discard(victim)
        slot = self.free.pop()
        for name, row in self._read(e).items():
            self.slots[name][slot].copy_(row, non_blocking=True)
        self.slot_of[e] = slot
        return True

    def request(self, experts: list[int], next_use=None) -> dict[str, Tensor]:
        """Make ``experts`` (unique) resident and return their weights stacked in sorted expert
        order: ``{name: [u, ...]}`` for each tensor of the bank. Experts beyond the capacity are
        loaded for this call only (``overflow``)."""
        pinned = set(experts)
        transient: dict[int, dict[str, Tensor]] = {}
        for e in experts:
            if e in self.slot_of:
                self.stats.hits += 1
                if e in self.prefetched:
                    self.stats.prefetch_hits += 1
                    self.prefetched.discard(e)
            else:
                self.stats.misses += 1
                if not self._admit(e, pinned, next_use):
                    transient[e] = self._read(e)
                    self.stats.overflow += 1
            self.policy.on_access(e)
        self.step += 1
        order = sorted(experts)
        if not transient:
            idx = torch.tensor([self.slot_of[e] for e in order], device=self.device)
            return {name: slot.index_select(0, idx) for name, slot in self.slots.items()}
        return {
            name: torch.stack([
                slot[self.slot_of[e]] if e in self.slot_of else transient[e][name].to(self.device)
                for e in order
            ])
            for name, slot in self.slots.items()
        }  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(iter(self.slots.values())).device

    def prefetch(self, experts: list[int]) -> None:
        """Load predicted experts (no request: recency only); at most ``capacity`` of them."""
        pinned = set(experts[: self.capacity])
        for e in experts[: self.capacity]:
            if e in self.slot_of:
                continue
            if self._admit(e, pinned):
                self.stats.prefetched += 1
                self.prefetched.add(e)
                self.policy.on_load(e)

    def replay(self, topk_index: Tensor) -> CacheStats:
        """Run a known trace ``[T, k]`` (``-1`` = no request), one token per step, with its true
        future for ``lookahead``/``belady``; returns the counters (the cache is reset first).
        The same rules as ``moelab.analysis.cache.simulate_cache``."""
        self.reset()
        rows = [[e for e in row if e >= 0] for row in topk_index.tolist()]
        future = _next_uses(rows, self.num_experts) if self.policy.uses_future else None
        for t, req in enumerate(rows):
            if len(req) > self.capacity:
                raise ValueError(f"token {t} requests {len(req)} experts; the cache holds {self.capacity}")
            self.step = t
            pinned = set(req)
            for e in req:
                if e in self.slot_of:
                    self.stats.hits += 1
                else:
                    self.stats.misses += 1
                    self._admit(e, pinned, future[t] if future else None)
                self.policy.on_access(e)
        return self.stats

    def reset(self) -> None:
        """Empty the cache and its counters, and forget the policy's history."""
        self.slot_of = {}  # new containers: a shallow copy of the cache (bench replays) stays intact
        self.free = list(range(self.capacity - 1, -1, -1))
        self.prefetched = set()
        self.stats = CacheStats()
        self.policy.reset()
        self.step = 0


def _next_uses(rows: list[list[int]], num_experts: int) -> list[list[float]]:
    """``out[t][e]``: the first step after ``t`` whose requests hold ``e`` (``inf`` if none)."""
    out: list[list[float]] = [[]] * len(rows)
    nxt = [math.inf] * num_experts
    for t in range(len(rows) - 1, -1, -1):
        out[t] = list(nxt)
        for e in rows[t]:
            nxt[e] = t
    return out


# --------------------------------------------------------------------------------- the layer side
class OffloadedExperts(nn.Module):
    """The bank of an offloaded layer: shapes only, no parameters (the weights are in the store).

    ``expert_forward(e, x)`` reads expert ``e`` from the store (the readable definition);
    ``compact(weights)`` is the bank of a few experts the ``OffloadDispatcher`` runs instead of
    ``forward_sorted``: a plain ``ExpertBank`` is rebuilt from its two tensors; any other bank
    (gpt-oss's, with biases) is copied from a weightless (``meta``) template of the original.
    """

    def __init__(self, template: ExpertBank, layer: int, store: ExpertStore) -> None:
        super().__init__()
        self.num_experts, self.d_in, self.d_out = template.num_experts, template.d_in, template.d_out
        self.hidden, self.activation = template.hidden, template.activation
        self.layer = layer
        self._store = store
        self._plain = type(template) is ExpertBank
        meta = {
            n: torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(False)
            for n, t in expert_major_tensors(template).items()
        }
        # Kept out of the module tree (no state_dict entries, not moved by .to()).
        self.__dict__["_template"] = rebuilt_bank(template, meta, template.num_experts)

    def compact(self, weights: dict[str, Tensor]) -> nn.Module:
        """A bank of ``u`` experts whose tensors are ``weights`` (``{name: [u, ...]}``)."""
        u = next(iter(weights.values())).shape[0]
        if self._plain:
            w_in = weights["gate_up_proj"] if "gate_up_proj" in weights else weights["up_proj"]
            return ExpertBank.from_parameters(w_in, weights["down_proj"], self.activation)
        tensors = {n: nn.Parameter(t, requires_grad=False) for n, t in weights.items()}
        return rebuilt_bank(self.__dict__["_template"], tensors, u)

    def expert_forward(self, e: int, x_nD: Tensor) -> Tensor:
        rows = self._store.load(self.layer, e)
        return self.compact({n: t.to(x_nD.device)[None] for n, t in rows.items()}).expert_forward(0, x_nD)

    def forward_sorted(self, x_sorted_ND: Tensor, order) -> Tensor:
        raise RuntimeError("an offloaded bank runs through its OffloadDispatcher (moelab.ops.offload)")

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_in}, hidden={self.hidden}, offloaded (layer {self.layer})"


class OffloadDispatcher(Dispatcher):
    """Fetch the routing's experts into the layer's cache, run the executor on them (module doc)."""

    name = "offload"

    def __init__(self, runtime: OffloadRuntime, position: int) -> None:
        self.runtime = runtime
        self.position = position  # index among the runtime's offloaded layers

    def __call__(self, x_TD: Tensor, routing: Routing, bank: nn.Module, executor: Executor) -> Tensor:
        check_rows(x_TD, routing, bank)
        rt = self.runtime
        cache = rt.caches[self.position]
        rt.wait(self.position)
        experts = _touched(routing)
        rt.record(self.position, routing)
        weights = cache.request(experts)
        rt.start_prefetch(self.position, x_TD, routing)
        # Compact bank of the touched experts in expert order: the executor sorts, groups and
        # combines the rows exactly as on the full bank (bitwise the in-memory outputs).
        remap = torch.full((routing.num_experts,), -1, dtype=torch.long, device=x_TD.device)
        remap[torch.tensor(sorted(experts), dtype=torch.long, device=x_TD.device)] = torch.arange(
            len(experts), device=x_TD.device
        )
        compact = replace(
            routing, expert_index=remap[routing.expert_index], num_experts=len(experts),
            logits=None, probs=None, requested=None, aux={}, validate=False,
        )  # fmt: skip
        small = bank.compact(weights)
        backend = rt.backends[self.position]
        return resolve_executor(backend, x_TD.device, small)(x_TD, compact, small)

    def __repr__(self) -> str:
        return f"OffloadDispatcher(layer={self.position})"


def _touched(routing: Routing) -> list[int]:
    """The routing's experts, unique, in first appearance (token order, then column order)."""
    seen: dict[int, None] = {}
    for e in routing.expert_index.tolist():
        seen.setdefault(e, None)
    return list(seen)


# --------------------------------------------------------------------------------- the runtime
class OffloadRuntime:
    """The state of an offloaded model: the store, one ``ExpertCache`` per MoE layer, the
    prefetch thread, counters (``stats()``). Made by ``offload``; ``close()`` stops the thread."""

    def __init__(self, layers: list[nn.Module], store: ExpertStore, caches: list[ExpertCache],
                 prefetch: str) -> None:  # fmt: skip
        self.layers = layers
        self.store = store
        self.caches = caches
        self.backends = [layer.backend for layer in layers]
        self.prefetch = prefetch
        self.pending: dict[int, Future] = {}
        self.trace: list[list[Tensor]] = [[] for _ in layers]
        self.record_trace = False
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="moelab-prefetch")
            if prefetch != "none"
            else None
        )

    def wait(self, position: int) -> None:
        fut = self.pending.pop(position, None)
        if fut is not None:
            fut.result()

    def record(self, position: int, routing: Routing) -> None:
        if self.record_trace:
            self.trace[position].append(routing.topk_index(fill=-1).cpu())

    def start_prefetch(self, position: int, x_TD: Tensor, routing: Routing) -> None:
        nxt = position + 1
        if self._pool is None or nxt >= len(self.layers):
            return
        router = self.layers[nxt].router
        if isinstance(router, PreGateRouter):
            # Read-ME: every pre-gate layer uses the same decision, known now.
            predicted = _touched(routing)
        elif self.prefetch == "pregate":
            return
        else:
            # Pre-gated MoE: the next layer's gate on this layer's input.
            with torch.no_grad():
                predicted = _touched(router(x_TD, RoutingContext()))
        self.pending[nxt] = self._pool.submit(self.caches[nxt].prefetch, predicted)

    def stats(self) -> dict[str, float]:
        """Totals over layers: hits, misses, requests, hit_rate, bytes_read, prefetched,
        prefetch_hits, overflow."""
        tot = CacheStats()
        for c in self.caches:
            for f in ("hits", "misses", "bytes_read", "prefetched", "prefetch_hits", "overflow"):
                setattr(tot, f, getattr(tot, f) + getattr(c.stats, f))
        return {
            "hits": tot.hits, "misses": tot.misses, "requests": tot.requests, "hit_rate": tot.hit_rate,
            "bytes_read": tot.bytes_read, "prefetched": tot.prefetched, "prefetch_hits": tot.prefetch_hits,
            "overflow": tot.overflow,
        }  # fmt: skip

    def reset(self) -> None:
        """Empty every cache, its counters and the recorded trace."""
        for pos in list(self.pending):
            self.wait(pos)
        for c in self.caches:
            c.reset()
        self.trace = [[] for _ in self.layers]

    def close(self) -> None:
        for pos in list(self.pending):
            self.wait(pos)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __repr__(self) -> str:
        cap = self.caches[0].capacity if self.caches else 0
        return f"OffloadRuntime(layers={len(self.layers)}, capacity={cap}, prefetch={self.prefetch!r})"


def offloadable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with a ``router``, a plain ``ExpertBank`` as ``experts`` and a
    ``dispatcher`` (``moelab.MoE`` layers), in module order."""
    return [
        m for m in model.modules()
        if isinstance(getattr(m, "experts", None), ExpertBank) and hasattr(m, "dispatcher") and hasattr(m, "router")
    ]  # fmt: skip


def expert_nbytes(model: nn.Module) -> int:
    """Bytes of one expert (its row of every tensor of the bank) of ``model``'s first MoE layer."""
    layers = offloadable_layers(model)
    if not layers:
        raise ValueError("model has no moelab MoE layer with an ExpertBank to offload")
    return sum(t[0].numel() * t.element_size() for t in expert_major_tensors(layers[0].experts).values())


def budget_for(model: nn.Module, experts_per_layer: int) -> int:
    """``budget_bytes`` that gives every MoE layer of ``model`` a cache of ``experts_per_layer``."""
    return expert_nbytes(model) * experts_per_layer * len(offloadable_layers(model))


@registry.register(
    "placement",
    "offload",
    paper="Eliseev & Mazur 2023 (Mixtral-offloading); Hwang et al. 2024 (Pre-gated MoE); Cai et al. 2024 (Read-ME)",
    summary="experts in host memory or on disk, a bounded per-layer expert cache (LRU/LFU/lookahead/Belady), "
    "prefetch of the next layer's predicted experts in a background thread",
)
def offload(
    model: nn.Module,
    budget_bytes: int,
    policy: str = "lru",
    storage: str | Path = "memory",
    prefetch: str = "none",
    lookahead: int = 8,
) -> OffloadRuntime:
    """Offload ``model``'s experts in place (module docstring); returns the ``OffloadRuntime``.

    Args:
        model: a ``MoELM``, a patched transformers model, or any module with ``moelab.MoE``
            layers holding an ``ExpertBank``.
        budget_bytes: bytes of resident experts over all MoE layers, split evenly; each layer
            gets ``min(E, budget_bytes // (layers * expert_nbytes))`` slots, at least ``top_k``.
        policy: ``"lru"``, ``"lfu"``, ``"lookahead"`` or ``"belady"`` (``moelab.policies``).
        storage: ``"memory"`` (host tensors) or a path (a ``.safetensors`` file or a directory).
        prefetch: ``"none"`` (default), ``"auto"``, ``"pregate"`` or ``"router"``.
        lookahead: the ``"lookahead"`` policy's window (tokens).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a moelab MoELM), got {type(model).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if prefetch not in PREFETCH_MODES:
        raise ValueError(f"prefetch must be one of {PREFETCH_MODES}, got {prefetch!r}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be an int > 0, got {budget_bytes!r}")
    if not (isinstance(storage, Path) or (isinstance(storage, str) and storage)):
        raise TypeError(f"storage must be 'memory' or a file path, got {storage!r}")
    layers = offloadable_layers(model)
    if not layers:
        raise ValueError("model has no moelab MoE layer with an ExpertBank to offload (already offloaded?)")
    per_expert = expert_nbytes(model)
    capacity_bytes = budget_bytes // len(layers)
    need = max(int(getattr(layer, "top_k", 1)) for layer in layers)
    slots = capacity_bytes // per_expert
    if slots < need:
        raise ValueError(
            f"budget_bytes={budget_bytes} gives {slots} expert slots per layer ({len(layers)} MoE layers, "
            f"{per_expert} bytes per expert); each layer needs at least top_k={need} "
            f"(budget_bytes >= {need * per_expert * len(layers)})"
        )
    store = ExpertStore({i: expert_major_tensors(layer.experts) for i, layer in enumerate(layers)}, storage)
    caches = []
    for i, layer in enumerate(layers):
        bank = layer.experts
        device = bank.down_proj.device
        cap = min(slots, bank.num_experts)
        caches.append(
            ExpertCache(i, store, bank, cap, make_policy(policy, bank.num_experts, lookahead), device)
        )
    runtime = OffloadRuntime(layers, store, caches, "auto" if prefetch == "auto" else prefetch)
    for i, layer in enumerate(layers):
        layer.experts = OffloadedExperts(layer.experts, i, store)
        layer.dispatcher = OffloadDispatcher(runtime, i)
    model.offload_runtime = runtime  # kept with the model (not a module: no state_dict entry)
    return runtime
