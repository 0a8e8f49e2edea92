"""Local routing consistency: SRP and SCH, with bootstrap confidence intervals over sequences.

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
does (``moelab.analysis.stats``); SRP re-maximises ``tau`` inside every replicate.

Sequences matter: windows never cross a sequence boundary. A batch traced as ``[B, S]`` is a
routing of ``T = B S`` tokens, batch-major; pass ``topk_index.view(B, S, k)`` (or a list of
``[T_i, k]``), not the flat ``[B S, k]``, which would be read as one long sequence.

Large E: SRP builds ``[T, E]`` window counts per sequence and SCH walks an ``E``-deep stack per
token, so both refuse (``ValueError`` naming them) when a sequence's ``T x E`` exceeds
``moelab.core.routing.MAX_DENSE_ELEMENTS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.analysis.limits import require_dense
from moelab.analysis.sequences import PAD, as_sequences, topk_mask
from moelab.analysis.stats import (
    CI,
    CI_ALPHA,
    NUM_BOOTSTRAP,
    check_bootstrap,
    interval_from_replicates,
    resample_weights,
)

SEGMENT_LENGTHS: tuple[int, ...] = (4, 16, 64, 256)  # official config.json "seg_lengths"

# SCH priority = count * _COUNT_SCALE + last_use: the count dominates, recency breaks ties.
_COUNT_SCALE = 1 << 32


def _check_segment_length(segment_length: object) -> int:
    if isinstance(segment_length, bool) or not isinstance(segment_length, int) or segment_length < 1:
        raise ValueError(f"segment_length must be an int >= 1, got {segment_length!r}")
    return segment_length


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
    seqs = as_sequences(topk_index, num_experts)
    return srp_sequences(seqs, num_experts, segment_length)


def srp_sequences(sequences: Tensor | Sequence[Tensor], num_experts: int, segment_length: int) -> float:
    """SRP pooled over sequences (list of ``[T_i, k]`` or ``[B, T, k]``)."""
    seqs = as_sequences(sequences, num_experts)
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


def _batches_by_length(seqs: list[Tensor], elements_per_sequence, budget: int) -> list[list[int]]:
    """Indices of ``seqs`` grouped by length, each group cut so that it holds at most ``budget``
    elements of per-sequence work (``elements_per_sequence(T)``; at least one sequence each)."""
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(int(s.shape[0]), []).append(i)
    out: list[list[int]] = []
    for T, ids in by_len.items():
        n = max(1, budget // max(1, elements_per_sequence(T)))
        out.extend(ids[j : j + n] for j in range(0, len(ids), n))
    return out


# Sequences batched per SRP/SCH step: SRP's window counts are int64 copies of the [B, T, E] mask,
# so a batch of 2^22 elements keeps them near 32 MiB each (our choice; the results do not depend on it).
_BATCH_ELEMENTS = 2**22


def _stats_per_sequence(seqs: list[Tensor], num_experts: int, segment_length: int) -> SRPStats:
    """Stats ``[B, L+1]`` for ragged sequences: equal lengths are batched together."""
    L = _check_segment_length(segment_length)
    longest = max((int(s.shape[0]) for s in seqs), default=0)
    require_dense("SRP", "[T, E] (window counts per sequence)", longest, num_experts)
    B = len(seqs)
    matches = torch.zeros(B, L + 1, dtype=torch.long)
    preds = torch.zeros(B, L + 1, dtype=torch.long)
    acts = torch.zeros(B, dtype=torch.long)
    for ids in _batches_by_length(seqs, lambda T: T * num_experts, _BATCH_ELEMENTS):
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
    seqs = as_sequences(sequences, num_experts)
    _check_segment_length(segment_length)
    # Each token updates an E-deep stack: T x E work per sequence, refused at the dense-view limit.
    longest = max((int(s.shape[0]) for s in seqs), default=0)
    require_dense("SCH", "[T, E] (stack steps per sequence)", longest, num_experts)
    out = torch.zeros(len(seqs), num_experts, dtype=torch.float64)
    k = max((int(s.shape[1]) for s in seqs), default=1)
    # Sequences step in lockstep on [B, k, E] tensors; the batch keeps those near _BATCH_ELEMENTS.
    for ids in _batches_by_length(seqs, lambda T: k * num_experts, _BATCH_ELEMENTS):
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
# confidence intervals (the bootstrap itself: moelab.analysis.stats)
# --------------------------------------------------------------------------------------------------
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
    check_bootstrap(n_boot, alpha, method)
    seqs = as_sequences(sequences, num_experts)
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
    check_bootstrap(n_boot, alpha, method)
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
