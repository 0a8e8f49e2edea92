"""Local routing consistency: SRP and SCH, and bootstrap confidence intervals.

Liang et al. 2025, "Understanding and Leveraging the Expert Specialization of Local Routing
Consistency in MoE" (official code: github.com/ljcleo/moe-lrc). Both metrics read one layer's
top-k choices in token order, ``topk_index [T, k]``, and ask how well the experts a *segment* of
``L`` consecutive tokens needs can be served by one fixed set (SRP) or by a cache that knows the
segment (SCH). The rules below are those of the official scripts ``src/30_srp_calc.py`` +
``src/31_srp_refine.py`` (SRP) and ``calc_fsf`` in ``src/41_sch_calc.py`` (SCH); the code is
ours, vectorised in torch, and tested against plain loops written from the same rules.

SRP (segment routing best performance), for one segment length ``L``:
    For every sliding window ``w`` of ``L`` tokens inside a sequence (stride 1, never across a
    sequence boundary) and every expert ``e``, ``c[w, e]`` = how many tokens of ``w`` chose
    ``e``. For a threshold ``tau`` in ``0..L`` the window predicts ``S_tau(w) = {e : c[w,e] >= tau}``.
    Summed over all windows (and sequences):
        M(tau) = sum_{w,e} c[w,e] [c[w,e] >= tau]      (activations covered by the prediction)
        P(tau) = L * sum_{w,e} [c[w,e] >= tau]          (predicted slots: |S_tau| experts x L tokens)
        A      = sum_{w,e} c[w,e]                       (all activations, = k L per window for top-k)
    SRP(L) = max_tau 2 M(tau) / (P(tau) + A)        (the best F1 of "one set per segment").
    The threshold is chosen once for the whole layer (after summing over windows and experts).

SCH (segment cache best hit rate), for ``L`` and a cache of ``m`` experts:
    A Mattson stack (Mattson et al. 1970) of the experts seen so far, ordered so that its first
    ``m`` entries are the content of a size-``m`` cache for every ``m`` at once. The priority of
    expert ``e`` is ``(count of e in tokens [t, t+L), last-use time of e)``: more upcoming uses
    first, recency breaks ties. Token ``t``'s ``k`` requests are looked up in the stack as it
    stands at the start of the token (a request at depth ``d`` hits every cache larger than
    ``d``); an expert never seen before counts at depth ``u`` = the number of distinct experts
    requested before it (a cache with a free slot holds it: the official convention). Then the
    requests are applied in column order: the expert moves to the top and the entries above its
    old depth are pushed down by the priority rule (the carried entry keeps sinking while the
    entry below it has a higher priority); its upcoming-use count drops by one and its last-use
    time becomes the request counter. After the token, token ``t + L`` enters the count window.
    SCH(L, m) = (requests at depth < m) / (T k). Over several sequences: the mean of the
    per-sequence rates (equal-length sequences in the paper).

Ragged routings (capacity drops, expert choice: token ``t`` has its own set ``S_t``, possibly
empty). The input is then ``[T, kmax]`` padded with ``-1`` (``Routing.topk_index(fill=-1)``): every
``-1`` entry, wherever it sits in the row, is "no request"; the other entries keep their column
order. Generalisations (ours; on an input without ``-1`` they are the rules above, bit for bit):
    SRP: unchanged. ``c[w, e]`` counts the tokens of ``w`` whose set holds ``e``, so
        ``A = sum_{w,e} c[w,e] = sum_{t in w} |S_t|`` per window (the paper's ``k L``), which is how
        the official code computes ``A`` anyway (``num_matches`` at ``tau = 0``); ``P`` still counts
        ``|S_tau(w)|`` slots for each of the ``L`` tokens.
    SCH: token ``t`` makes ``|S_t|`` requests (none for an empty set: no lookup, no stack update,
        the count window simply has nothing of it). Per sequence,
        ``SCH(L, m) = (requests at depth < m) / sum_t |S_t|``, the same hits-over-requests ratio as
        the cache simulators' ``hit_rate``; over sequences, the mean of the per-sequence rates, a
        sequence without any request (rate 0/0) left out.

Defaults from the official ``config.json``: segment lengths {4, 16, 64, 256}, 1000 bootstrap
resamples, 95% confidence. The bootstrap resamples *sequences* with replacement and reports the
basic (pivotal) interval ``[2 theta - q_hi, 2 theta - q_lo]`` with ``q`` the sorted replicates at
indices ``round(n_boot alpha / 2)`` and ``n_boot - round(n_boot alpha / 2)``, as the official code
does; SRP re-maximises ``tau`` inside every replicate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SEGMENT_LENGTHS: tuple[int, ...] = (4, 16, 64, 256)  # official config.json "seg_lengths"
NUM_BOOTSTRAP = 1000  # official config.json "num_bootstrap"
CI_ALPHA = 0.05  # official config.json "ci_confidence" = 0.95

# SCH priority = count * _COUNT_SCALE + last_use: the count dominates, recency breaks ties.
_COUNT_SCALE = 1 << 32
PAD = -1  # "no request" in a padded [T, kmax] index (Routing.topk_index(fill=-1))


# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------
def check_topk_index(topk_index: object, num_experts: object, name: str = "topk_index") -> Tensor:
    """Validate a ``[T, k]`` (or ``[B, T, k]``) integer tensor of distinct experts per row.

    ``-1`` is padding ("no request"; ``Routing.topk_index(fill=-1)`` of a ragged routing) and may
    repeat within a row; every other entry lies in ``[0, num_experts)`` and is distinct in its row.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if not isinstance(topk_index, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor [T, k] of expert ids, got {type(topk_index).__name__}"
        )
    if topk_index.dim() not in (2, 3):
        raise ValueError(f"{name} must be [T, k] (or [B, T, k]), got shape {tuple(topk_index.shape)}")
    if topk_index.dtype.is_floating_point or topk_index.dtype == torch.bool or topk_index.is_complex():
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {topk_index.dtype}")
    idx = topk_index.long()
    if idx.shape[-1] < 1:
        raise ValueError(f"{name} must have k >= 1 columns, got shape {tuple(idx.shape)}")
    if idx.numel():
        real = idx[idx != PAD]
        if real.numel():
            lo, hi = int(real.min()), int(real.max())
            if lo < 0 or hi >= num_experts:
                raise ValueError(
                    f"{name} must lie in [0, num_experts={num_experts}) (or be {PAD} for padding), "
                    f"got [{lo}, {hi}]"
                )
        srt = idx.sort(dim=-1).values
        if bool(((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] != PAD)).any()):
            raise ValueError(f"{name} rows must hold distinct experts (a token's top-k has no repeats)")
    return idx


def is_ragged(topk_index: Tensor) -> bool:
    """Whether a (validated) index tensor holds padding, i.e. tokens with fewer than ``k`` experts."""
    return bool((topk_index == PAD).any())


def experts_per_token(topk_index: Tensor) -> Tensor:
    """``[..., T]`` long: ``|S_t|``, the non-padding entries of each row."""
    return (topk_index != PAD).sum(-1)


def _check_segment_length(segment_length: object) -> int:
    if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 1:
        raise ValueError(f"segment_length must be an int >= 1, got {segment_length!r}")
    return segment_length


def _as_sequences(topk_index: Tensor | Sequence[Tensor], num_experts: int) -> list[Tensor]:
    """``[T, k]``, ``[B, T, k]`` or a list of ``[T_i, k_i]`` -> list of validated ``[T_i, k]``.

    Sequences of a list narrower than the widest are padded with ``-1`` (no request) to its width.
    """
    if isinstance(topk_index, Tensor):
        idx = check_topk_index(topk_index, num_experts)
        return [idx] if idx.dim() == 2 else list(idx.unbind(0))
    if not isinstance(topk_index, Sequence) or len(topk_index) == 0:
        raise TypeError(
            "sequences must be a [T, k] / [B, T, k] tensor or a non-empty list of [T_i, k] tensors"
        )
    seqs = [check_topk_index(s, num_experts, name=f"sequences[{i}]") for i, s in enumerate(topk_index)]
    if any(s.dim() != 2 for s in seqs):
        raise ValueError("each sequence must be a [T_i, k] tensor")
    k = max(int(s.shape[1]) for s in seqs)
    return [
        s if s.shape[1] == k else torch.nn.functional.pad(s, (0, k - int(s.shape[1])), value=PAD)
        for s in seqs
    ]


def topk_mask(topk_index: Tensor, num_experts: int) -> Tensor:
    """``[..., T, E]`` bool: ``m[t, e]`` = token ``t`` chose expert ``e`` (padding ``-1`` ignored)."""
    idx = check_topk_index(topk_index, num_experts)
    mask = torch.zeros(*idx.shape[:-1], num_experts + 1, dtype=torch.bool, device=idx.device)
    # Padding goes to an extra column E, dropped afterwards.
    return mask.scatter_(-1, idx.masked_fill(idx == PAD, num_experts), True)[..., :num_experts]


# --------------------------------------------------------------------------------------------------
# SRP
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SRPStats:
    """Window statistics of one or more sequences for one segment length ``L``.

    Attributes:
        matches: ``[B, L+1]`` long, ``M(tau)`` per sequence for ``tau = 0..L``.
        preds: ``[B, L+1]`` long, ``P(tau)`` per sequence.
        acts: ``[B]`` long, ``A`` per sequence.
        segment_length: ``L``.
    """

    matches: Tensor
    preds: Tensor
    acts: Tensor
    segment_length: int


def srp_stats(mask: Tensor, segment_length: int) -> SRPStats:
    """SRP window statistics of ``mask [T, E]`` or ``[B, T, E]`` (bool/0-1), per sequence.

    A sequence shorter than ``L`` has no window and contributes zeros.
    """
    L = _check_segment_length(segment_length)
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 3):
        raise ValueError(f"mask must be a [T, E] or [B, T, E] tensor, got {getattr(mask, 'shape', mask)!r}")
    m_BTE = (mask if mask.dim() == 3 else mask.unsqueeze(0)).long()
    B, T, E = m_BTE.shape
    n_win = T - L + 1
    if n_win <= 0:
        z = torch.zeros(B, L + 1, dtype=torch.long)
        return SRPStats(z, z.clone(), torch.zeros(B, dtype=torch.long), L)
    # Window counts from a prefix sum: c[w] = S[w + L] - S[w].
    csum = torch.nn.functional.pad(m_BTE.cumsum(1), (0, 0, 1, 0))
    c_BWE = csum[:, L:] - csum[:, :n_win]
    # hist[b, c] = number of (window, expert) pairs of sequence b whose count is c.
    hist_BC = torch.zeros(B, L + 1, dtype=torch.long, device=m_BTE.device)
    hist_BC.scatter_add_(1, c_BWE.reshape(B, -1), torch.ones_like(c_BWE.reshape(B, -1)))
    c_vals = torch.arange(L + 1, device=m_BTE.device)
    # Reverse cumulative sums over the count value give "count >= tau" for every tau at once.
    matches = (hist_BC * c_vals).flip(-1).cumsum(-1).flip(-1)
    preds = hist_BC.flip(-1).cumsum(-1).flip(-1) * L
    return SRPStats(matches.cpu(), preds.cpu(), matches[:, 0].cpu(), L)


def srp_from_stats(matches: Tensor, preds: Tensor, acts: Tensor) -> Tensor:
    """``max_tau 2 M(tau) / (P(tau) + A)`` over the last dim; leading dims are kept.

    ``matches``/``preds`` are ``[..., L+1]`` and ``acts`` ``[...]``, already summed over whatever
    is pooled (windows, sequences). The denominator is clamped at 1 as in the official code.
    """
    f1 = 2.0 * matches.double() / (preds + acts.unsqueeze(-1)).clamp(min=1).double()
    return f1.max(dim=-1).values


def srp(topk_index: Tensor, num_experts: int, segment_length: int) -> float:
    """SRP of one layer's choices ``topk_index [T, k]`` (one sequence, token order) for ``L``.

    A ``[B, T, k]`` tensor is read as ``B`` sequences whose window statistics are pooled before
    the threshold is chosen (the paper's per-layer number). Raises if no sequence has ``L`` tokens.
    """
    seqs = _as_sequences(topk_index, num_experts)
    return srp_sequences(seqs, num_experts, segment_length)


def srp_sequences(sequences: Tensor | Sequence[Tensor], num_experts: int, segment_length: int) -> float:
    """SRP pooled over sequences (list of ``[T_i, k]`` or ``[B, T, k]``)."""
    seqs = _as_sequences(sequences, num_experts)
    st = _stats_per_sequence(seqs, num_experts, segment_length)
    _check_srp_stats(st, seqs)
    return float(srp_from_stats(st.matches.sum(0), st.preds.sum(0), st.acts.sum(0)))


def _check_srp_stats(st: SRPStats, seqs: list[Tensor]) -> None:
    """Raise when nothing can be scored: no window at all, or windows without any activation."""
    if int(st.acts.sum()) != 0:
        return
    longest = max(int(s.shape[0]) for s in seqs)
    if longest < st.segment_length:
        raise ValueError(
            f"segment_length={st.segment_length} is longer than every sequence "
            f"(longest: {longest} tokens); no window to score"
        )
    raise ValueError(
        f"no token in any window of segment_length={st.segment_length} was routed to an expert "
        "(every row is padding): SRP is undefined"
    )


def _stats_per_sequence(seqs: list[Tensor], num_experts: int, segment_length: int) -> SRPStats:
    """Stats ``[B, L+1]`` for ragged sequences: equal lengths are batched together."""
    L = _check_segment_length(segment_length)
    B = len(seqs)
    matches = torch.zeros(B, L + 1, dtype=torch.long)
    preds = torch.zeros(B, L + 1, dtype=torch.long)
    acts = torch.zeros(B, dtype=torch.long)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(int(s.shape[0]), []).append(i)
    for _, ids in by_len.items():
        mask = topk_mask(torch.stack([seqs[i] for i in ids]), num_experts)
        st = srp_stats(mask, L)
        matches[ids], preds[ids], acts[ids] = st.matches, st.preds, st.acts
    return SRPStats(matches, preds, acts, L)


# --------------------------------------------------------------------------------------------------
# SCH
# --------------------------------------------------------------------------------------------------
def sch_curve_batch(topk_BTK: Tensor, num_experts: int, segment_length: int) -> Tensor:
    """``[B, E]`` SCH hit rates of ``B`` equal-length sequences for cache sizes ``1..E``.

    ``topk_BTK`` is a validated ``[B, T, k]`` long tensor, ``-1`` = no request (see the module doc).
    All sequences step in lockstep; each request is one vectorised stack update (a prefix minimum
    over the stack's priorities). A sequence without any request gets a row of NaN (0/0).
    """
    L = _check_segment_length(segment_length)
    idx = topk_BTK.long().cpu()
    B, T, K = idx.shape
    E = num_experts
    if T == 0:
        return torch.zeros(B, E, dtype=torch.float64)
    valid_BTK = idx != PAD
    safe_BTK = idx.clamp(min=0)  # padding points at expert 0 with weight 0 / masked updates
    rows = torch.arange(B)
    pos_E = torch.arange(E)
    stack = torch.full((B, E), -1, dtype=torch.long)  # expert ids by depth, -1 = empty
    length = torch.zeros(B, dtype=torch.long)
    count = torch.zeros(B, E, dtype=torch.long)  # uses of each expert in tokens [t, t + L)
    last = torch.zeros(B, E, dtype=torch.long)  # last-use time (request counter), 0 = never
    depth_hist = torch.zeros(B, E + 1, dtype=torch.long)
    for t in range(min(L, T)):
        count.scatter_add_(1, safe_BTK[:, t], valid_BTK[:, t].long())
    clock = 0
    inf = torch.iinfo(torch.long).max
    for t in range(T):
        x_BK = idx[:, t]
        v_BK = valid_BTK[:, t]
        # Depths at the start of the token; unseen experts count at the number of distinct experts
        # requested before them (stack length + earlier unseen experts of this token).
        hit_BKE = (stack.unsqueeze(1) == x_BK.unsqueeze(2)) & v_BK.unsqueeze(2)
        found_BK = hit_BKE.any(-1)
        depth_BK = torch.where(found_BK, hit_BKE.long().argmax(-1), 0)
        unseen_rank = (v_BK & ~found_BK).long().cumsum(1) - 1
        depth_BK = torch.where(found_BK, depth_BK, length.unsqueeze(1) + unseen_rank)
        depth_hist.scatter_add_(1, depth_BK.clamp(min=0, max=E), v_BK.long())
        for j in range(K):
            x_B = x_BK[:, j]
            v_B = v_BK[:, j]
            in_stack = (stack == x_B.unsqueeze(1)) & v_B.unsqueeze(1)
            present = in_stack.any(1)
            d_B = torch.where(present, in_stack.long().argmax(1), length)
            valid = pos_E.unsqueeze(0) < length.unsqueeze(1)
            safe = stack.clamp(min=0)
            pri = torch.where(valid, count.gather(1, safe) * _COUNT_SCALE + last.gather(1, safe), inf)
            # carry arriving at depth j = the lowest-priority entry among depths 0..j-1.
            pmin_val, pmin_pos = torch.cummin(pri, dim=1)
            carry_val = torch.cat([torch.full((B, 1), inf), pmin_val[:, :-1]], 1)
            carry_ent = torch.cat([torch.full((B, 1), -1), stack.gather(1, pmin_pos)[:, :-1]], 1)
            d = d_B.unsqueeze(1)
            above = pos_E.unsqueeze(0) < d
            keep = pri > carry_val
            new = torch.where(above, torch.where(keep, stack, carry_ent), stack)
            new = torch.where(pos_E.unsqueeze(0) == d, carry_ent, new)
            new[:, 0] = x_B
            clock += 1
            # Sequences whose token has no j-th request (padding) keep their state; the clock only
            # orders requests within a sequence, so values it skips there are harmless.
            stack = torch.where(v_B.unsqueeze(1), new, stack)
            length = length + (v_B & ~present).long()
            x_safe = x_B.clamp(min=0)
            count[rows, x_safe] -= v_B.long()
            last[rows, x_safe] = torch.where(v_B, clock, last[rows, x_safe])
        if t + L < T:
            count.scatter_add_(1, safe_BTK[:, t + L], valid_BTK[:, t + L].long())
    hits = depth_hist[:, :E].cumsum(1).double()
    requests = valid_BTK.sum((1, 2)).double()  # sum_t |S_t| per sequence (T k without padding)
    return hits / requests.unsqueeze(1)


def sch_curves(sequences: Tensor | Sequence[Tensor], num_experts: int, segment_length: int) -> Tensor:
    """``[B, E]`` per-sequence SCH hit rates for cache sizes ``1..E`` (ragged lists allowed).

    A sequence with no request at all (every entry ``-1``) has a row of NaN.
    """
    seqs = _as_sequences(sequences, num_experts)
    _check_segment_length(segment_length)
    out = torch.zeros(len(seqs), num_experts, dtype=torch.float64)
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(int(s.shape[0]), []).append(i)
    for _, ids in by_len.items():
        out[ids] = sch_curve_batch(torch.stack([seqs[i] for i in ids]), num_experts, segment_length)
    return out


def _scored(curves: Tensor) -> Tensor:
    """The rows of sequences that made at least one request (the others are NaN, 0/0)."""
    ok = ~curves.isnan().any(1)
    return curves if bool(ok.all()) else curves[ok]


def sch_curve(topk_index: Tensor, num_experts: int, segment_length: int) -> Tensor:
    """``[E]`` SCH for every cache size ``1..E`` (mean over sequences if several are given).

    Sequences without any request are left out of the mean; NaN if no sequence has one.
    """
    return _scored(sch_curves(topk_index, num_experts, segment_length)).mean(0)


def sch(topk_index: Tensor, num_experts: int, segment_length: int, cache_size: int) -> float:
    """SCH of one layer's choices ``topk_index [T, k]`` for segment ``L`` and a cache of ``m`` experts.

    The paper reports ``m`` in multiples of ``k``; any ``1 <= m <= E`` is accepted. ``-1`` entries
    are padding (no request; see the module doc); NaN if no token requests any expert.
    """
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or not 1 <= cache_size <= num_experts:
        raise ValueError(f"cache_size must be an int in [1, num_experts={num_experts}], got {cache_size!r}")
    return float(sch_curve(topk_index, num_experts, segment_length)[cache_size - 1])


# --------------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CI:
    """A point estimate with its bootstrap confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float
    n_boot: int
    alpha: float
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "n_boot": self.n_boot,
            "alpha": self.alpha,
            "method": self.method,
        }


def _check_boot(n_boot: object, alpha: object, method: object) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1, got {n_boot!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    if method not in ("basic", "percentile"):
        raise ValueError(f"method must be 'basic' (the official code's) or 'percentile', got {method!r}")


def bootstrap_indices(n: int, n_boot: int, seed: int) -> Tensor:
    """``[n_boot, n]`` long: each row draws ``n`` sample indices with replacement."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(n, (n_boot, n), generator=g)


def interval_from_replicates(
    estimate: Tensor, replicates: Tensor, alpha: float = CI_ALPHA, method: str = "basic"
) -> tuple[Tensor, Tensor]:
    """``(low, high)`` from ``replicates [n_boot, ...]`` around ``estimate [...]``.

    Order statistics at ``lo = round(n_boot alpha / 2)`` and ``hi = n_boot - lo`` (clamped to the
    last index), as ``31_srp_refine.py``/``41_sch_calc.py`` do. ``basic``: ``2 theta - q``.
    """
    n_boot = replicates.shape[0]
    srt = replicates.double().sort(dim=0).values
    lo_i = round(n_boot * alpha / 2)
    hi_i = min(n_boot - lo_i, n_boot - 1)
    q_lo, q_hi = srt[lo_i], srt[hi_i]
    if method == "basic":
        est = estimate.double()
        return 2 * est - q_hi, 2 * est - q_lo
    return q_lo, q_hi


def bootstrap_ci(
    fn: Callable[[list], float],
    samples: Sequence,
    n_boot: int = NUM_BOOTSTRAP,
    alpha: float = CI_ALPHA,
    seed: int = 0,
    method: str = "basic",
) -> CI:
    """Bootstrap ``fn`` over ``samples`` (e.g. one ``[T, k]`` tensor per sequence).

    Every replicate calls ``fn`` on ``len(samples)`` samples drawn with replacement (rows of
    ``bootstrap_indices(len(samples), n_boot, seed)``); the point estimate is ``fn(samples)``.
    """
    _check_boot(n_boot, alpha, method)
    if not isinstance(samples, Sequence) or isinstance(samples, (str, bytes)) or len(samples) == 0:
        raise ValueError("samples must be a non-empty sequence (list/tuple) of samples")
    items = list(samples)
    est = float(fn(items))
    idx = bootstrap_indices(len(items), n_boot, seed)
    reps = torch.tensor([float(fn([items[i] for i in row.tolist()])) for row in idx], dtype=torch.float64)
    lo, hi = interval_from_replicates(torch.tensor(est, dtype=torch.float64), reps, alpha, method)
    return CI(est, float(lo), float(hi), n_boot, float(alpha), method)


def resample_weights(n: int, n_boot: int, seed: int) -> Tensor:
    """``[n_boot, n]``: how many times each sample is drawn in each replicate (same draws as above)."""
    idx = bootstrap_indices(n, n_boot, seed)
    w = torch.zeros(n_boot, n, dtype=torch.long)
    return w.scatter_add_(1, idx, torch.ones_like(idx))


def srp_ci(
    sequences: Tensor | Sequence[Tensor],
    num_experts: int,
    segment_length: int,
    n_boot: int = NUM_BOOTSTRAP,
    alpha: float = CI_ALPHA,
    seed: int = 0,
    method: str = "basic",
) -> CI:
    """SRP over sequences with a bootstrap CI (resampling sequences), computed from per-sequence
    statistics: equal to ``bootstrap_ci(lambda s: srp_sequences(s, E, L), seqs, ...)`` for the
    same seed, without recomputing windows per replicate."""
    _check_boot(n_boot, alpha, method)
    seqs = _as_sequences(sequences, num_experts)
    st = _stats_per_sequence(seqs, num_experts, segment_length)
    _check_srp_stats(st, seqs)
    est = srp_from_stats(st.matches.sum(0), st.preds.sum(0), st.acts.sum(0))
    w = resample_weights(len(seqs), n_boot, seed)
    reps = srp_from_stats(w @ st.matches, w @ st.preds, w @ st.acts)
    lo, hi = interval_from_replicates(est, reps, alpha, method)
    return CI(float(est), float(lo), float(hi), n_boot, float(alpha), method)


def sch_ci(
    sequences: Tensor | Sequence[Tensor],
    num_experts: int,
    segment_length: int,
    n_boot: int = NUM_BOOTSTRAP,
    alpha: float = CI_ALPHA,
    seed: int = 0,
    method: str = "basic",
) -> list[CI]:
    """SCH for every cache size ``1..E`` with bootstrap CIs over sequences (one ``CI`` per size).

    Sequences without any request are left out before resampling (their rate is 0/0).
    """
    _check_boot(n_boot, alpha, method)
    curves = _scored(sch_curves(sequences, num_experts, segment_length))
    n = curves.shape[0]
    if n == 0:
        raise ValueError(
            "no sequence has a token routed to an expert (every row is padding): SCH is undefined"
        )
    est = curves.mean(0)
    w = resample_weights(n, n_boot, seed).double()
    reps = (w @ curves) / n
    lo, hi = interval_from_replicates(est, reps, alpha, method)
    return [
        CI(float(est[m]), float(lo[m]), float(hi[m]), n_boot, float(alpha), method)
        for m in range(num_experts)
    ]
