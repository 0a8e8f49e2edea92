"""Expert-offloading cache simulators: LRU, LFU, Belady (oracle) and lookahead.

The setting (MoE inference with experts offloaded to slower memory; Eliseev & Mazur 2023,
Read-ME (Cai et al. 2024) for pre-gating lookahead): one layer keeps ``m`` of its ``E`` experts
resident. Tokens arrive in order; token ``t`` needs the set ``S_t`` of experts it was routed to
(its row of ``topk_index``). The rules, which are ours where no paper fixes them:

* **Requests are per token.** An expert of ``S_t`` that is resident when token ``t`` starts is a
  hit; every other one is a miss and is fetched. All of ``S_t`` is resident before token
  ``t + 1`` starts, so the cache must hold at least ``max_t |S_t|`` experts (``cache_size >= k``).
* **Pinning.** While token ``t`` is served its own experts are never evicted: the victim is
  chosen among resident experts not in ``S_t``.
* **Cold start.** The cache starts empty; first uses are misses (unlike SCH's convention, see
  ``lrc.py``).
* **Clock.** Every request gets the next value of a counter, in token order and, within a token,
  in column order: ``last_use[e]`` is the clock of ``e``'s latest request and ``freq[e]`` the number
  of requests of ``e`` so far (never reset by eviction).
* **Victim** = the resident, unpinned expert with the smallest key:
    - ``lru``: ``last_use``;
    - ``lfu``: ``(freq, last_use)`` (least frequently used, ties by LRU);
    - ``belady``: ``(-next_use, last_use)``, ``next_use`` = the first later token whose set holds
      the expert (infinity if none): evict the expert needed farthest in the future, ties by LRU
      (Belady 1966; optimal for demand paging);
    - ``lookahead`` with window ``W``: as ``belady`` but the policy sees only tokens
      ``t+1 .. t+W`` (what pre-gating provides): a next use beyond the window counts as infinity,
      so among experts not needed within the window it falls back to LRU. ``W = 0`` is LRU and
      ``W >= T`` is Belady.
* ``hit_rate = hits / sum_t |S_t|``.

Ragged routings (capacity drops; expert choice gives a token 0..E experts): ``topk_index`` is
``[T, kmax]`` padded with ``-1`` (``Routing.topk_index(fill=-1)``). Every ``-1``, wherever it sits in
a row, is "no request"; ``S_t`` is the row's other entries, in column order. A token with no
expert requests nothing: it makes no hit, no miss and no clock tick, but it still is a token, so
it counts in ``next_use`` distances and in the lookahead window (which is ``W`` tokens, not ``W``
requests). ``cache_size`` must be at least ``max_t |S_t|`` (and at least 1). Without padding this
is exactly the rule set above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.analysis.limits import require_dense
from moelab.analysis.sequences import PAD, check_topk_index, nominal_k
from moelab.core.routing import Routing
from moelab.policies import DEFAULT_LOOKAHEAD, POLICIES, make_policy  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class CacheResult:
    """Outcome of one simulation."""

    policy: str
    cache_size: int
    hits: int
    requests: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else float("nan")


def next_use_table(topk_index: Tensor, num_experts: int) -> Tensor:
    """``[T, E]`` long: ``next[t, e]`` = the first token ``t' > t`` that uses ``e``, else ``T`` (never).

    ``-1`` entries (padding) use nothing.
    """
    T = topk_index.shape[0]
    require_dense("next_use_table", "[T, E]", T, num_experts)
    idx = topk_index.cpu()
    # Padding is scattered into an extra column E, dropped afterwards.
    mask = torch.zeros(T, num_experts + 1, dtype=torch.bool)
    mask = mask.scatter_(1, idx.masked_fill(idx == PAD, num_experts), True)[:, :num_experts]
    t_col = torch.arange(T).unsqueeze(1).expand(T, num_experts)
    at = torch.where(mask, t_col, torch.full_like(t_col, T))
    # Reverse cumulative minimum over tokens t'..T-1, then shift by one: uses strictly after t.
    after = at.flip(0).cummin(0).values.flip(0)
    return torch.cat([after[1:], torch.full((1, num_experts), T, dtype=torch.long)], 0)


def _check_policy(policy: object, lookahead: object) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise ValueError(f"lookahead must be an int >= 0 (tokens), got {lookahead!r}")


def simulate_cache(
    topk_index: Tensor,
    num_experts: int,
    cache_size: int,
    policy: str = "lru",
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> CacheResult:
    """Simulate one layer's expert cache on ``topk_index [T, k]`` (token order). See the module doc.

    ``[B, T, k]`` is ``B`` sequences, each starting with an empty cache; their hits and requests
    are summed (as ``hit_rate_curve`` pools them).
    """
    idx = check_topk_index(topk_index, num_experts)
    if idx.dim() == 3:
        parts = [simulate_cache(s, num_experts, cache_size, policy, lookahead) for s in idx.unbind(0)]
        _check_policy(policy, lookahead)  # B = 0 runs no simulation to check it
        return CacheResult(policy, cache_size, sum(r.hits for r in parts), sum(r.requests for r in parts))
    _check_policy(policy, lookahead)
    T = idx.shape[0]
    rows: list[list[int]] = [[e for e in row if e != PAD] for row in idx.tolist()]
    kmax = max((len(r) for r in rows), default=0)
    lo = max(kmax, 1)
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or not lo <= cache_size <= num_experts:
        raise ValueError(
            f"cache_size must be an int in [max_t |S_t| = {lo}, num_experts={num_experts}] (a token's "
            f"experts must all be resident), got {cache_size!r}"
        )
    nxt: list[list[int]] | None = None
    if policy in ("belady", "lookahead"):
        # Future uses come from a [T, E] next-use table; LRU and LFU need only [E] counters.
        require_dense(f"the {policy!r} cache simulator", "[T, E] (next-use table)", T, num_experts)
        nxt = next_use_table(idx, num_experts).tolist()
    # The eviction rules are the shared policy objects (moelab.policies), as in moelab.ops.offload.
    cache_policy = make_policy(policy, num_experts, lookahead)
    never = T  # next_use value meaning "not needed again"
    resident: set[int] = set()
    hits = 0
    for t, req in enumerate(rows):
        pinned = set(req)
        hits += sum(1 for e in req if e in resident)
        for e in req:
            if e not in resident:
                if len(resident) >= cache_size:
                    cand = [r for r in resident if r not in pinned]
                    resident.remove(cache_policy.victim(cand, t, nxt[t] if nxt else None, never))
                resident.add(e)
            cache_policy.on_access(e)
    return CacheResult(policy, cache_size, hits, sum(len(r) for r in rows))


def hit_rate_curve(
    sequences: Tensor | Sequence[Tensor],
    num_experts: int,
    cache_sizes: Sequence[int] | None = None,
    policies: Sequence[str] = POLICIES,
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> dict[str, list[float]]:
    """Hit rate against cache size for each policy, pooled over sequences (hits / requests).

    ``sequences``: one ``[T, k]`` tensor, a ``[B, T, k]`` tensor or a list of ``[T_i, k_i]``; each
    sequence starts with an empty cache; ``-1`` entries are padding (no request). ``cache_sizes``
    defaults to the multiples of ``k`` up to ``E`` (as SCH reports them); for a ragged input (any
    padding, or sequences of different widths) to ``ragged_cache_sizes`` of the pooled requests.
    Returns ``{"cache_size": [...], policy: [hit rates]}``.
    """
    if isinstance(sequences, (Tensor, Routing)):  # a Routing gets check_topk_index's how-to-cut error
        idx = check_topk_index(sequences, num_experts)
        seqs = [idx] if idx.dim() == 2 else list(idx.unbind(0))
    else:
        seqs = [check_topk_index(s, num_experts, name=f"sequences[{i}]") for i, s in enumerate(sequences)]
        if not seqs:
            raise ValueError("sequences must not be empty")
    if cache_sizes is not None:
        sizes = list(cache_sizes)
    elif len({int(s.shape[1]) for s in seqs}) == 1 and not any(bool((s == PAD).any()) for s in seqs):
        sizes = default_cache_sizes(int(seqs[0].shape[1]), num_experts)
    else:
        per_tok = torch.cat([(s != PAD).sum(1) for s in seqs])
        sizes = ragged_cache_sizes(per_tok, num_experts)
    for p in policies:
        _check_policy(p, lookahead)
    out: dict[str, list[float]] = {"cache_size": [float(m) for m in sizes]}
    for p in policies:
        rates = []
        for m in sizes:
            res = [simulate_cache(s, num_experts, m, p, lookahead) for s in seqs]
            req = sum(r.requests for r in res)
            rates.append(sum(r.hits for r in res) / req if req else float("nan"))
        out[p] = rates
    return out


def default_cache_sizes(k: int, num_experts: int) -> list[int]:
    """Multiples of ``k`` up to ``E`` (and ``E`` itself)."""
    sizes = list(range(k, num_experts + 1, k))
    if not sizes or sizes[-1] != num_experts:
        sizes.append(num_experts)
    return sizes


def ragged_cache_sizes(experts_per_token: Tensor, num_experts: int) -> list[int]:
    """Cache sizes for a ragged routing (ours): ``kmax = max_t |S_t|`` (the smallest cache that
    holds every token's experts), then the multiples of ``nominal_k`` above it, then ``E``.

    For a uniform ``|S_t| = k`` this is ``default_cache_sizes(k, E)``.
    """
    kmax = max(1, int(experts_per_token.max())) if experts_per_token.numel() else 1
    step = nominal_k(experts_per_token)
    sizes = [kmax] + [m for m in range(step, num_experts + 1, step) if m > kmax]
    if sizes[-1] != num_experts:
        sizes.append(num_experts)
    return sizes


def lru(topk_index: Tensor, num_experts: int, cache_size: int) -> float:
    """Hit rate of a least-recently-used expert cache on ``[T, k]`` or ``[B, T, k]`` (module doc)."""
    return simulate_cache(topk_index, num_experts, cache_size, "lru").hit_rate


def lfu(topk_index: Tensor, num_experts: int, cache_size: int) -> float:
    """Hit rate of a least-frequently-used expert cache (ties by LRU); ``[T, k]`` or ``[B, T, k]``."""
    return simulate_cache(topk_index, num_experts, cache_size, "lfu").hit_rate


def belady(topk_index: Tensor, num_experts: int, cache_size: int) -> float:
    """Hit rate of Belady's optimal cache (evicts the expert needed farthest in the future);
    ``[T, k]`` or ``[B, T, k]``."""
    return simulate_cache(topk_index, num_experts, cache_size, "belady").hit_rate


def lookahead(
    topk_index: Tensor, num_experts: int, cache_size: int, window: int = DEFAULT_LOOKAHEAD
) -> float:
    """Hit rate of a cache that sees the next ``window`` tokens' routing (pre-gating); ``[T, k]`` or
    ``[B, T, k]``."""
    return simulate_cache(topk_index, num_experts, cache_size, "lookahead", window).hit_rate


def first_tokens(sequences: Sequence[Tensor], budget: int) -> list[Tensor]:
    """The leading sequences (the last one cut) holding the first ``budget`` tokens in total."""
    out: list[Tensor] = []
    for s in sequences:
        if budget <= 0:
            break
        out.append(s[:budget])
        budget -= int(s.shape[0])
    return out
